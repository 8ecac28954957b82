"""Shared helpers of the benchmarks: timing (METHOD.md: warm up, rotate inputs, take medians)
and random arrays of given shapes."""

import time

import jax
import numpy as np


def time_calls(fn, arg_sets, warmup=3, reps=20, inner=5):
  """Milliseconds per call for each of `reps` repetitions; each runs `inner` asynchronous calls
  over rotating input sets, then blocks on the last result."""
  for i in range(warmup):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  times = []
  for r in range(reps):
    t0 = time.perf_counter()
    out = None
    for i in range(inner):
      out = fn(*arg_sets[(r * inner + i) % len(arg_sets)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner * 1e3)
  return times


def fill_tree(abstract, kind, seed=0, std=0.02):
  """Arrays for a tree of ShapeDtypeStructs: kind(path string, leaf) -> "normal" (N(0, std^2)),
  "ones" or "zeros"; leaves with a sharding are placed with it.

  Benchmark timings do not depend on the values, and compiling a 1.3B model's jitted random init
  took 75-103 s on the H200; this compiles one small fill per distinct shape instead."""
  normal = jax.jit(lambda k, shape, dtype: (std * jax.random.normal(k, shape)).astype(dtype),
                   static_argnums=(1, 2))
  leaves, treedef = jax.tree.flatten_with_path(abstract)
  out = []
  for i, (path, a) in enumerate(leaves):
    how = kind(jax.tree_util.keystr(path), a)
    if how == "normal":
      x = normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), a.shape, a.dtype)
    else:
      x = (np.ones if how == "ones" else np.zeros)(a.shape, a.dtype)
    sharding = getattr(a, "sharding", None)
    out.append(jax.device_put(x, sharding) if sharding is not None else jax.numpy.asarray(x))
  return jax.tree.unflatten(treedef, out)
