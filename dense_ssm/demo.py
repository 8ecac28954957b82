"""Helpers of the Colab notebooks (notebooks/*.ipynb): one small config, a cached training run,
its loss curves, and the per-token decode cost at a given context.

`DENSE_SSM_NOTEBOOK_TINY=1` shrinks everything to seconds (CI runs the notebooks that way);
`DENSE_SSM_RUNS` is where runs are kept (default: /content/dense_ssm_runs on Colab, else
/tmp/dense_ssm_runs), so that notebook 2 and 3 reuse notebook 1's models.
"""

from __future__ import annotations

import functools
import json
import os
import time

TINY = os.environ.get("DENSE_SSM_NOTEBOOK_TINY", "") == "1"
RUNS = os.environ.get("DENSE_SSM_RUNS") or (
    "/content/dense_ssm_runs" if os.path.isdir("/content") else "/tmp/dense_ssm_runs")


def demo_config(dense_layers: int = 2, steps: int | None = None, tiny: bool = TINY):
  """configs/default.py's small DenseRetNet (m = `dense_layers`; 0 = the GAU baseline), trained
  on the embedded data (the Python standard library's source). ~10 min on a Colab CPU; `tiny`:
  seconds."""
  from dense_ssm import config_lib  # pylint: disable=g-import-not-at-top

  c = config_lib.base_config()
  size = (dict(vocab_size=384, num_layers=2, hidden_size=32, qk_dim=16, chunk_size=16,
               max_len=128) if tiny else
          dict(vocab_size=2048, num_layers=4, hidden_size=192, qk_dim=96, chunk_size=64,
               max_len=512))
  c.model = config_lib.model_defaults(family="dense_retnet", num_heads=2,
                                      dense={"layers": dense_layers, "r_k": 8, "r_v": 8}, **size)
  c.data.source = "stdlib"
  c.data.seq_len = 32 if tiny else 256
  c.data.max_chars = 60_000 if tiny else 8_000_000
  c.data.tokenizer_train_chars = 60_000 if tiny else 2_000_000
  c.train.batch_size = 4 if tiny else 16
  c.train.steps = steps or (4 if tiny else 400)
  c.train.lr = 3e-3
  c.train.warmup_fraction = 0.05
  c.train.log_every = 1 if tiny else 10
  c.train.eval_every = 1000
  c.train.eval_batches = 1 if tiny else 8
  c.train.checkpoint_every = c.train.steps
  return c


def train_demo(name: str, dense_layers: int, *, steps: int | None = None,
               tokenizer: str = "") -> str:
  """Trains (or, if already finished, reuses) RUNS/name; returns the workdir."""
  from dense_ssm import export, train  # pylint: disable=g-import-not-at-top

  workdir = os.path.join(RUNS, name)
  config = demo_config(dense_layers, steps)
  config.data.tokenizer = tokenizer
  if config.train.steps in export.checkpoint_steps(workdir):
    print(f"{workdir}: already trained ({config.train.steps} steps)")
    return workdir
  train.train_and_evaluate(config, workdir)
  return workdir


def losses(workdir: str) -> tuple[list[int], list[float]]:
  """(steps, training losses) from workdir/metrics.jsonl."""
  steps, values = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        steps.append(int(row["step"]))
        values.append(float(row["train/loss"]))
  return steps, values


@functools.lru_cache(maxsize=8)
def _decode_fns(cfg, new_tokens: int):
  import jax  # pylint: disable=g-import-not-at-top

  from dense_ssm import generate as gen  # pylint: disable=g-import-not-at-top

  return (jax.jit(functools.partial(gen.start, cfg, max_new_tokens=new_tokens, greedy=True)),
          jax.jit(functools.partial(gen.decode_block, cfg, steps=new_tokens, pad_id=0,
                                    greedy=True)))


def decode_ms_per_token(cfg, params, context: int, new_tokens: int = 32,
                        reps: int | None = None) -> float:
  """Milliseconds per generated token after a real prefill of `context` random tokens
  (batch 1, greedy; the median of `reps` timed decode loops after a compile run)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from dense_ssm import generate as gen  # pylint: disable=g-import-not-at-top

  cfg = gen.inference_config(cfg)
  reps = reps or (1 if TINY else 3)
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, context)).astype(np.int32)
  start, block = _decode_fns(cfg, new_tokens)
  times = []
  for r in range(reps + 1):
    carry = jax.block_until_ready(start(params, tokens, np.ones_like(tokens),
                                        jax.random.PRNGKey(0), 0.0, 0, 1.0, -1))
    t0 = time.perf_counter()
    jax.block_until_ready(block(params, carry))
    if r:
      times.append(time.perf_counter() - t0)
  return 1e3 * sorted(times)[len(times) // 2] / new_tokens
