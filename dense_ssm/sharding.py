"""Device mesh and logical-axis partitioning: the one place that decides what lives where.

Models name the dimensions of their parameters and activations with *logical* axes
("embed", "mlp", "batch", ...). `LOGICAL_RULES` maps each logical axis to axes of a
three-axis device mesh:

  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters / optimizer state sharded (ZeRO-3 style),
  tensor  Megatron-style tensor parallelism of the inner widths.

A batch of B sequences is split over data x fsdp; a parameter [embed, mlp] is split
over fsdp x tensor. A dimension whose size is not divisible by its mesh axes is
replicated instead (with one log line), so that tiny test models run on any mesh.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical axis, mesh axes). Order matters: flax assigns the first free mesh axis.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("state", None),
    ("conv", None),
    ("lowrank", None),
    ("layers", None),
    # Activations.
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_heads", "tensor"),
)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the (data, fsdp, tensor) sizes; one of them may be -1 (fill the rest)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
        f"{num_devices} are present; set one axis to -1 to fill.")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), topology-aware on TPU."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Device sets that mesh_utils cannot lay out (e.g. an odd subset): plain order.
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh, name: str) -> P:
  """Drops mesh axes from dimensions they do not divide (replicating that dimension)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in names)
    if dim % size:
      logging.info("sharding: %s dim %d not divisible by mesh %s=%d; replicated.",
                   name, dim, names, size)
      out.append(None)
    else:
      out.append(axes)
  return P(*out)


def logical_to_sharding(abstract_tree: Any, mesh: jax.sharding.Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`-boxed) abstract arrays.

  Leaves without logical names (optimizer counters, the step) are replicated.
  Returns a tree with the boxes removed, matching `nn.meta.unbox(abstract_tree)`.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  values = nn.meta.unbox(abstract_tree)
  paths_values, treedef = jax.tree_util.tree_flatten_with_path(values)
  flat_specs = treedef.flatten_up_to(mesh_specs)
  shardings = [
      NamedSharding(mesh, _fit_spec(spec if isinstance(spec, P) else P(), v.shape, mesh,
                                    jax.tree_util.keystr(path)))
      for (path, v), spec in zip(paths_values, flat_specs)
  ]
  return jax.tree_util.tree_unflatten(treedef, shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """[B, T] arrays: batch over data x fsdp, length replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: jax.sharding.Mesh, process_count: int) -> None:
  """The global batch must split evenly over the batch mesh axes and over hosts."""
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch % shards or global_batch % process_count:
    raise ValueError(
        f"config.train.batch_size={global_batch} must be divisible by mesh data*fsdp={shards} "
        f"and by the {process_count} process(es); change the batch size or config.mesh.")


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """Assembles each host's rows of a batch into global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def abstract_batch(batch_size: int, seq_len: int, mesh: jax.sharding.Mesh) -> dict:
  """ShapeDtypeStructs of a global training batch (for AOT compilation)."""
  s = batch_sharding(mesh)
  i32 = lambda: jax.ShapeDtypeStruct((batch_size, seq_len), np.int32, sharding=s)
  return {"inputs": i32(), "targets": i32(), "segment_ids": i32(), "positions": i32(),
          "weights": jax.ShapeDtypeStruct((batch_size, seq_len), np.float32, sharding=s)}


__all__ = [
    "MESH_AXES", "BATCH_AXES", "LOGICAL_RULES", "mesh_shape", "make_mesh",
    "logical_to_sharding", "batch_sharding", "replicated", "check_batch_divisible",
    "global_batch", "abstract_batch",
]
