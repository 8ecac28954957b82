"""dense_ssm: DenseSSM language models (DenseRetNet, DenseMamba) and baselines in JAX/Flax.

Importing the package is light; inference entry points load on first use:
  dense_ssm.generate(source, prompts, ...)      text generation (dense_ssm/generate.py)
  dense_ssm.load_pretrained(export_dir)         config + params + tokenizer (dense_ssm/export.py)
"""

import glob
import importlib
import os
import sys

__version__ = "0.1.0"

_ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd",
                      "/dev/dri")


def default_to_cpu_without_accelerators() -> None:
  """Selects JAX's CPU backend when this machine has no accelerator device files and
  JAX_PLATFORMS is unset: an installed libtpu (the `tpu` extra, used for AOT compilation) would
  otherwise probe for a TPU and print errors. Nothing changes where an accelerator exists."""
  if "JAX_PLATFORMS" in os.environ or any(glob.glob(p) for p in _ACCELERATOR_FILES):
    return
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  else:
    os.environ["JAX_PLATFORMS"] = "cpu"


default_to_cpu_without_accelerators()

_LAZY = {"load_pretrained": "dense_ssm.export", "load_workdir": "dense_ssm.export"}


def __getattr__(name):
  if name == "generate":  # the module is callable: dense_ssm.generate(...) runs generation
    return importlib.import_module("dense_ssm.generate")
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'dense_ssm' has no attribute {name!r}")
