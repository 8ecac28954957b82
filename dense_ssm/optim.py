"""Optimiser of the paper's recipe (docs/model.md, 'Training recipe'), built from optax.

  lr(s) = peak * s / W                                  for update s = 1..W (warm-up)
  lr(s) = peak + (end - peak) * (s - W) / (S - W)       for s = W..S (linear decay)

with W = max(1, round(warmup_fraction * S)), S = train.steps and end = end_lr_ratio *
peak; then global-norm clipping, then AdamW. Decoupled weight decay applies only to
matrices (ndim >= 2) that are not norms, biases or SSM dynamics parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

# Leaf names never decayed even when they are matrices (Mamba's A_log, D, dt bias;
# any norm scale). Matched case-insensitively against every key on the path.
NO_DECAY_SUBSTRINGS = ("norm", "bias", "a_log", "dt_bias", "scale")
NO_DECAY_EXACT = ("d",)


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
  return max(1, int(round(warmup_fraction * total_steps)))


def make_schedule(peak: float, total_steps: int, warmup_fraction: float,
                  end_ratio: float = 0.0) -> Callable[[Any], jax.Array]:
  """Linear warm-up then linear ("polynomial, power 1") decay; `count` is optax's 0-based."""
  warm = warmup_steps(total_steps, warmup_fraction)
  end = end_ratio * peak
  decay_len = max(1, total_steps - warm)

  def schedule(count):
    s = jnp.asarray(count, jnp.float32) + 1.0  # 1-based update number
    up = peak * s / warm
    frac = jnp.clip((s - warm) / decay_len, 0.0, 1.0)
    down = peak + (end - peak) * frac
    return jnp.where(s <= warm, up, down)

  return schedule


def _path_keys(path) -> list[str]:
  keys = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        keys.append(str(getattr(k, attr)).lower())
        break
  return keys


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: ndim >= 2 and no norm/bias/SSM-dynamics name on the path."""

  def keep(path, p):
    keys = _path_keys(path)
    if jnp.ndim(p) < 2:
      return False
    if any(s in k for k in keys for s in NO_DECAY_SUBSTRINGS):
      return False
    return not (keys and keys[-1] in NO_DECAY_EXACT)

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg: Mapping[str, Any]) -> tuple[optax.GradientTransformation, Callable]:
  """(optax transform, lr schedule) from the `config.train` section."""
  steps = int(train_cfg["steps"])
  if steps <= 0:
    raise ValueError(f"config.train.steps={steps} must be positive.")
  schedule = make_schedule(float(train_cfg["lr"]), steps, float(train_cfg["warmup_fraction"]),
                           float(train_cfg["end_lr_ratio"]))
  tx = optax.chain(
      optax.clip_by_global_norm(float(train_cfg["clip_norm"])),
      optax.adamw(schedule, b1=float(train_cfg["b1"]), b2=float(train_cfg["b2"]),
                  eps=float(train_cfg["eps"]), weight_decay=float(train_cfg["weight_decay"]),
                  mask=decay_mask),
  )
  return tx, schedule


__all__ = ["make_optimizer", "make_schedule", "decay_mask", "warmup_steps"]
