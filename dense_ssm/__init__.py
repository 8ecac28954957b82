"""dense_ssm: DenseSSM language models (DenseRetNet, DenseMamba) and baselines in JAX/Flax.

Importing the package is light; inference entry points load on first use:
  dense_ssm.generate(source, prompts, ...)      text generation (dense_ssm/generate.py)
  dense_ssm.load_pretrained(export_dir)         config + params + tokenizer (dense_ssm/export.py)
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"load_pretrained": "dense_ssm.export", "load_workdir": "dense_ssm.export"}


def __getattr__(name):
  if name == "generate":  # the module is callable: dense_ssm.generate(...) runs generation
    return importlib.import_module("dense_ssm.generate")
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'dense_ssm' has no attribute {name!r}")
