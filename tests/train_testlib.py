"""Shared pieces of the training tests: a tiny configs/default.py and a CLI runner."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")

# configs/default.py shrunk so that a step takes milliseconds on one CPU core.
TINY = {
    "model.vocab_size": 512,
    "model.num_layers": 2,
    "model.hidden_size": 64,
    "model.qk_dim": 32,
    "model.num_heads": 2,
    "model.chunk_size": 32,
    "model.max_len": 128,
    "data.seq_len": 64,
    "data.max_chars": 400_000,
    "data.tokenizer_train_chars": 200_000,
    "train.batch_size": 8,
    "train.steps": 24,
    "train.lr": 3e-3,
    "train.log_every": 1,
    "train.eval_every": 1000,
    "train.eval_batches": 2,
    "train.checkpoint_every": 1000,
}


def overrides(**changes) -> dict:
  """TINY updated with `changes` given as model__hidden_size=... (double underscore = dot)."""
  out = dict(TINY)
  out.update({k.replace("__", "."): v for k, v in changes.items()})
  return out


def tiny_config(**changes):
  """The ConfigDict of configs/default.py with `overrides(**changes)` applied."""
  spec = importlib.util.spec_from_file_location("default_config", DEFAULT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides(**changes).items():
    section, *rest = key.split(".")
    node = config[section]
    for part in rest[:-1]:
      node = node[part]
    node[rest[-1]] = value
  return config


def cli_args(workdir: str, extra: dict | None = None, flags: list[str] = ()) -> list[str]:
  args = [sys.executable, "-m", "dense_ssm.train", f"--config={DEFAULT_CONFIG}",
          f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in (extra if extra is not None else TINY).items()]
  return args + list(flags)


def run_cli(workdir: str, extra: dict | None = None, flags: list[str] = (), timeout: int = 240,
            env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(cli_args(workdir, extra, flags), cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, **(env or {})})


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}
