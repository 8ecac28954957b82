"""Train state, sharded initialisation and the (jitted, donated) training step.

The state is a plain dict {"step", "params", "opt_state"} so that Orbax saves it as a
tree of named arrays. Initialisation never materialises unsharded parameters:

  jax.eval_shape(init) -> logical axis names -> NamedShardings -> jit(init, out_shardings)

One training step with A micro-batches (gradient accumulation) of a global batch B:

  g = sum_a grad(sum_tokens w * CE)_a / sum_tokens w,   then clip, AdamW update,

which is the same update as one step over the whole batch (up to float summation order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dense_ssm import evaluate, sharding


@dataclasses.dataclass(frozen=True)
class StepFns:
  """Jitted functions of one (model, optimizer, mesh) combination."""

  init: Callable  # (key) -> state
  train_step: Callable  # (state, batch) -> (state, metrics); state donated
  eval_step: Callable  # (params, batch) -> {"loss_sum", "weight_sum"}
  abstract_state: Any  # ShapeDtypeStructs with shardings
  state_shardings: Any
  mesh: jax.sharding.Mesh
  raw_train_step: Callable  # unjitted, for AOT lowering with other shardings


def _init_state(model, tx, seq_len: int, key: jax.Array) -> dict:
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init({"params": key}, tokens)["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_state_and_shardings(model, tx, seq_len: int, mesh: jax.sharding.Mesh):
  """(ShapeDtypeStruct tree with shardings, NamedSharding tree) of the unboxed train state."""
  boxed = jax.eval_shape(lambda k: _init_state(model, tx, seq_len, k), jax.random.key(0))
  shardings = sharding.logical_to_sharding(boxed, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def param_count(abstract_state) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(abstract_state["params"]))


def make_train_step(model, tx, schedule, *, grad_accum: int = 1, seed: int = 0) -> Callable:
  """The unjitted step: (state, batch) -> (new state, metrics dict of float32 scalars)."""

  def loss_fn(params, micro, key):
    return evaluate.forward_sums(model, params, micro, deterministic=False, dropout_key=key)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])
    params = state["params"]
    if grad_accum == 1:
      (loss_sum, weight_sum), grads = grad_fn(params, batch, step_key)
    else:
      def split(x_BxT):  # [B, T] -> [A, B/A, T]: micro-batch a takes rows a, a+A, ...
        b = x_BxT.shape[0]
        x = x_BxT.reshape((b // grad_accum, grad_accum) + x_BxT.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return nn.with_logical_constraint(x, (None, "batch", "length"))

      micro_batches = jax.tree.map(split, batch)

      def body(carry, xs):
        a, micro = xs
        (l, w), g = grad_fn(params, micro, jax.random.fold_in(step_key, a))
        acc_l, acc_w, acc_g = carry
        return (acc_l + l, acc_w + w, jax.tree.map(jnp.add, acc_g, g)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
      (loss_sum, weight_sum), grads = _scan_accumulate(body, init, micro_batches, grad_accum)
    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {
        "loss": loss_sum / denom,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state["step"]),
        "tokens": weight_sum,
    }
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    return new_state, metrics

  return train_step


def _scan_accumulate(body, init, micro_batches, n):
  (loss_sum, weight_sum, grads), _ = jax.lax.scan(body, init, (jnp.arange(n), micro_batches))
  return (loss_sum, weight_sum), grads


class _InMeshContext:
  """Calls (and lowers) a jitted function under the mesh and the logical axis rules, which
  `nn.with_logical_constraint` inside the model needs while tracing."""

  def __init__(self, jitted, mesh):
    self._jitted, self._mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return self._jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self._mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return self._jitted.lower(*args)


def build(model, tx, schedule, mesh: jax.sharding.Mesh, *, seq_len: int, grad_accum: int = 1,
          seed: int = 0) -> StepFns:
  """Jits init / train / eval with explicit shardings over `mesh` (logical rules applied)."""
  abstract, shardings = abstract_state_and_shardings(model, tx, seq_len, mesh)
  batch_s = {k: sharding.batch_sharding(mesh)
             for k in ("inputs", "targets", "segment_ids", "positions", "weights")}
  repl = sharding.replicated(mesh)
  raw_step = make_train_step(model, tx, schedule, grad_accum=grad_accum, seed=seed)

  def in_context(jitted):
    return _InMeshContext(jitted, mesh)

  init = in_context(jax.jit(lambda k: nn.meta.unbox(_init_state(model, tx, seq_len, k)),
                            out_shardings=shardings))
  train_step = in_context(jax.jit(raw_step, in_shardings=(shardings, batch_s),
                                  out_shardings=(shardings, repl), donate_argnums=(0,)))
  eval_step = in_context(jax.jit(evaluate.make_eval_step(model),
                                 in_shardings=(shardings["params"], batch_s), out_shardings=repl))
  return StepFns(init=init, train_step=train_step, eval_step=eval_step, abstract_state=abstract,
                 state_shardings=shardings, mesh=mesh, raw_train_step=raw_step)


__all__ = ["StepFns", "build", "make_train_step", "abstract_state_and_shardings", "param_count"]
