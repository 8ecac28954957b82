"""The train job's setup on a machine as a CUDA jax image has it: no TensorFlow, no clu, perhaps a
device JAX cannot use, paper configs without a dataset."""

from __future__ import annotations

import fnmatch
import glob
import os
import subprocess
import sys
import textwrap

import pytest

from train_testlib import cli_args, overrides, REPO

# Runs dense_ssm.train with tensorflow, tensorflow_datasets and clu absent, as on an image without
# them: every import finder is wrapped so that it does not find those names, so
# `importlib.util.find_spec` returns None and `import` raises ModuleNotFoundError.
_NO_TF_MAIN = textwrap.dedent("""
    import importlib.util, runpy, sys

    BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")

    class Hide:
      def __init__(self, finder):
        self.finder = finder

      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
          return None
        return self.finder.find_spec(name, path, target)

      def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    assert importlib.util.find_spec("tensorflow") is None
    try:
      import tensorflow
      raise SystemExit("tensorflow was importable")
    except ModuleNotFoundError:
      pass
    sys.argv = ["dense_ssm.train"] + sys.argv[1:]
    runpy.run_module("dense_ssm.train", run_name="__main__", alter_sys=True)
""")


def test_trains_and_writes_events_without_tensorflow(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "w")
  args = cli_args(workdir, overrides(model__num_layers=1, train__steps=4, train__log_every=2,
                                     train__eval_batches=1))
  proc = subprocess.run([sys.executable, "-c", _NO_TF_MAIN] + args[3:], cwd=REPO,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "final validation loss" in proc.stdout
  files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1, files
  acc = event_accumulator.EventAccumulator(files[0])
  acc.Reload()
  tags = set(acc.Tags()["scalars"])
  assert {"train/loss", "train/grad_norm", "train/lr", "perf/tokens_per_s", "valid/loss",
          "valid/perplexity"} <= tags, tags
  assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
  assert [e.step for e in acc.Scalars("valid/loss")] == [4]
  assert 0 < acc.Scalars("valid/loss")[0].value < 10


@pytest.mark.parametrize("device, backend, env, expected", [
    ("nvidia", "cpu", {}, "an NVIDIA GPU but JAX"),
    ("tpu", "cpu", {}, "a TPU but JAX"),
    ("nvidia", "gpu", {}, None),
    ("none", "cpu", {}, None),
    ("nvidia", "cpu", {"JAX_PLATFORMS": "cpu"}, None),
])
def test_accelerator_warning(monkeypatch, device, backend, env, expected):
  import jax  # pylint: disable=g-import-not-at-top

  from dense_ssm import train  # pylint: disable=g-import-not-at-top

  files = {"nvidia": ["/dev/nvidia0"], "tpu": ["/dev/accel0"], "none": []}[device]
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setattr(train.shutil, "which", lambda name: None)
  monkeypatch.setattr(train.glob, "glob", lambda pattern: fnmatch.filter(files, pattern))
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  warning = train.accelerator_warning()
  if expected is None:
    assert warning is None
  else:
    assert warning.startswith("warning: ") and expected in warning and "\n" not in warning
    assert "runs on the CPU" in warning
    assert (train.GPU_INSTALL if device == "nvidia" else train.TPU_INSTALL) in warning


def test_paper_config_without_data_source_warns_once():
  from dense_ssm import config_lib, train  # pylint: disable=g-import-not-at-top

  config = config_lib.retnet_config("1b3")
  assert config.data.source == ""
  warning = train.resolve_data_source(config)
  assert config.data.source == "stdlib"
  assert warning.startswith("warning: ") and "\n" not in warning
  assert "paper-size model" in warning and "embedded demo corpus" in warning
  assert "trained just now" in warning
  assert "--config.data.source=jsonl:" in warning and "--config.data.tokenizer=" in warning
  assert train.resolve_data_source(config) is None  # a named source: nothing to say
  config = config_lib.retnet_config("1b3")
  config.data.tokenizer = "/data/llama/tokenizer.model"
  warning = train.resolve_data_source(config)
  assert "--config.data.tokenizer" not in warning and "/data/llama/tokenizer.model" in warning
