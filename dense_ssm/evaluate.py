"""Token-level cross-entropy, the jitted evaluation step, and validation loss / perplexity.

  loss = sum_{b,t} w_bt * (logsumexp(z_bt) - z_bt[y_bt]) / sum_{b,t} w_bt,   ppl = exp(loss)

where w is the per-token weight of a batch (0 on padding).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                       weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token losses, sum of weights), in float32."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  gold_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  weights_BxT = weights_BxT.astype(jnp.float32)
  return jnp.sum((lse_BxT - gold_BxT) * weights_BxT), jnp.sum(weights_BxT)


def forward_sums(model, params, batch: Mapping[str, jax.Array], *, deterministic: bool,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Runs the model on a batch dict and returns `cross_entropy_sums` of its logits."""
  rngs = {} if dropout_key is None else {"dropout": dropout_key}
  logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"], deterministic=deterministic, rngs=rngs)
  return cross_entropy_sums(logits, batch["targets"], batch["weights"])


def make_eval_step(model) -> Callable:
  """eval_step(params, batch) -> {"loss_sum", "weight_sum"}; jit it with the caller's shardings."""

  def eval_step(params, batch):
    loss_sum, weight_sum = forward_sums(model, params, batch, deterministic=True)
    return {"loss_sum": loss_sum, "weight_sum": weight_sum}

  return eval_step


def evaluate(eval_step: Callable, params: Any, batches: Iterable[Any]) -> dict[str, float]:
  """Mean validation loss and perplexity over `batches` (already-placed device batches)."""
  loss_sum, weight_sum, n = 0.0, 0.0, 0
  for batch in batches:
    out = jax.device_get(eval_step(params, batch))
    loss_sum += float(out["loss_sum"])
    weight_sum += float(out["weight_sum"])
    n += 1
  if weight_sum <= 0:
    raise ValueError("the validation split produced no tokens; add data or lower "
                     "config.data.valid_fraction / config.train.eval_batches.")
  loss = loss_sum / weight_sum
  return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "batches": n, "tokens": weight_sum}


__all__ = ["cross_entropy_sums", "forward_sums", "make_eval_step", "evaluate"]
