"""Helpers of the Colab notebooks (notebooks/*.ipynb): a small config in three sizes, a cached
training run, its loss curves, and the per-token decode cost at a given context.

Sizes (`set_size`): "full" (1.6 M tokens per model; meant for a GPU/TPU runtime, about an hour
per model on two busy CPU cores), "cpu" (0.16 M tokens; a few minutes per model on two CPU
cores) and "tiny" (seconds; what `DENSE_SSM_NOTEBOOK_TINY=1` forces, whatever the notebook asks,
so that CI runs the notebooks fast). "auto" picks "full" when JAX sees a GPU or TPU, else "cpu".
`DENSE_SSM_RUNS` is where runs are kept (default: /content/dense_ssm_runs on Colab, else
/tmp/dense_ssm_runs), one folder per size, so that notebooks 2 and 3 reuse notebook 1's models.
"""

from __future__ import annotations

import functools
import json
import os
import time

TINY = os.environ.get("DENSE_SSM_NOTEBOOK_TINY", "") == "1"
RUNS = os.environ.get("DENSE_SSM_RUNS") or (
    "/content/dense_ssm_runs" if os.path.isdir("/content") else "/tmp/dense_ssm_runs")

# Per size: the model's shape, then data and training settings (the rest is shared).
_SIZES = {
    "tiny": dict(model=dict(vocab_size=384, num_layers=2, hidden_size=32, qk_dim=16,
                            chunk_size=16, max_len=128),
                 seq_len=32, batch_size=4, steps=4, max_chars=60_000,
                 tokenizer_train_chars=60_000, log_every=1, eval_batches=1),
    "cpu": dict(model=dict(vocab_size=1024, num_layers=4, hidden_size=128, qk_dim=64,
                           chunk_size=64, max_len=128),
                seq_len=128, batch_size=8, steps=160, max_chars=1_000_000,
                tokenizer_train_chars=300_000, log_every=5, eval_batches=4),
    "full": dict(model=dict(vocab_size=2048, num_layers=4, hidden_size=192, qk_dim=96,
                            chunk_size=64, max_len=512),
                 seq_len=256, batch_size=16, steps=400, max_chars=8_000_000,
                 tokenizer_train_chars=2_000_000, log_every=10, eval_batches=8),
}
SIZE = "tiny" if TINY else "full"


def set_size(size: str) -> str:
  """Sets the size every later call uses ("auto", "cpu" or "full"; "tiny" when
  DENSE_SSM_NOTEBOOK_TINY=1, whatever is asked) and returns it."""
  global SIZE
  if size not in (*_SIZES, "auto"):
    raise ValueError(f"demo size {size!r} is unknown; use one of {[*_SIZES, 'auto']}.")
  if TINY:
    size = "tiny"
  elif size == "auto":
    import jax  # pylint: disable=g-import-not-at-top

    size = "cpu" if jax.default_backend() == "cpu" else "full"
  SIZE = size
  return SIZE


def run_dir(name: str) -> str:
  """Where the run `name` of the current size is kept: RUNS/<size>/<name>."""
  return os.path.join(RUNS, SIZE, name)


def demo_config(dense_layers: int = 2, steps: int | None = None, size: str | None = None):
  """configs/default.py's small DenseRetNet (m = `dense_layers`; 0 = the GAU baseline), trained
  on the embedded data (the Python standard library's source), at `size` (default: the current
  size)."""
  from dense_ssm import config_lib  # pylint: disable=g-import-not-at-top

  s = _SIZES[size or SIZE]
  c = config_lib.base_config()
  c.model = config_lib.model_defaults(family="dense_retnet", num_heads=2,
                                      dense={"layers": dense_layers, "r_k": 8, "r_v": 8},
                                      **s["model"])
  c.data.source = "stdlib"
  c.data.seq_len = s["seq_len"]
  c.data.max_chars = s["max_chars"]
  c.data.tokenizer_train_chars = s["tokenizer_train_chars"]
  c.train.batch_size = s["batch_size"]
  c.train.steps = steps or s["steps"]
  c.train.lr = 3e-3
  c.train.warmup_fraction = 0.05
  c.train.log_every = s["log_every"]
  c.train.eval_every = 1000
  c.train.eval_batches = s["eval_batches"]
  c.train.checkpoint_every = c.train.steps
  return c


def train_demo(name: str, dense_layers: int, *, steps: int | None = None,
               tokenizer: str = "") -> str:
  """Trains (or, if already finished, reuses) run_dir(name) at the current size; returns the
  workdir."""
  from dense_ssm import export, train  # pylint: disable=g-import-not-at-top

  workdir = run_dir(name)
  config = demo_config(dense_layers, steps)
  config.data.tokenizer = tokenizer
  if config.train.steps in export.checkpoint_steps(workdir):
    print(f"{workdir}: already trained ({config.train.steps} steps)")
    return workdir
  train.train_and_evaluate(config, workdir)
  return workdir


def losses(workdir: str, key: str = "train/loss") -> tuple[list[int], list[float]]:
  """(steps, values) of metric `key` ("train/loss", "valid/loss", ...) from
  workdir/metrics.jsonl."""
  steps, values = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        steps.append(int(row["step"]))
        values.append(float(row[key]))
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
