"""Shared timing for the kernel benchmarks (METHOD.md: warm up, rotate inputs, take medians)."""

import time

import jax


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
