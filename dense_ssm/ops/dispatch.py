"""Choosing and running Pallas kernels: the accelerator kind, and execution under a mesh.

XLA cannot partition a Pallas call, so under a device mesh the kernel runs inside `jax.shard_map`
over the mesh axes that shard the batch: each device runs the kernel on its batch shard.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P


def accelerator() -> str | None:
  """'tpu' or 'gpu' for JAX's default backend; None on CPU."""
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  return None


def kernel_backend(op: str, interpret: bool, interpret_backend: str, fallback: str) -> str:
  """The kernel flavour to run: the accelerator's, else `interpret_backend` in interpret mode;
  otherwise a one-line error naming `fallback` (the XLA form to use instead)."""
  kind = accelerator()
  if kind is not None:
    return kind
  if interpret:
    return interpret_backend
  raise ValueError(f"{op} has no kernel for platform {jax.default_backend()!r}; pass "
                   f"interpret=True to run it in the Pallas interpreter, or use {fallback}.")


def batch_sharded(fn: Callable, args: Sequence, batched: Sequence[bool], batch_axes,
                  num_outputs: int):
  """fn(*args) on per-device batch shards when a mesh is active and `batch_axes` is set.

  args may contain None (passed through). `batched[i]` says whether args[i] has the batch as its
  leading dimension (else it is replicated). Every output is batched. A batch that the mesh axes
  do not divide (e.g. the one-row input of `model.init`, or batch-1 generation on several
  devices) runs whole on every device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not batch_axes or mesh.empty or mesh.size == 1:
    return fn(*args)
  present = [i for i, a in enumerate(args) if a is not None]
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  shards = 1
  for a in axes:
    shards *= mesh.shape[a]
  batch = next(args[i].shape[0] for i in present if batched[i])
  spec = P(batch_axes) if batch % shards == 0 else P()

  def inner(*xs):
    full = list(args)
    for i, x in zip(present, xs):
      full[i] = x
    return fn(*full)

  in_specs = tuple(spec if batched[i] else P() for i in present)
  out_specs = (spec,) * num_outputs
  # check_vma=False: the Pallas interpreter (CPU tests) does not track varying axes. Replicated
  # inputs are constants of the model (e.g. the per-head decay), which need no gradient.
  return jax.shard_map(inner, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*(args[i] for i in present))
