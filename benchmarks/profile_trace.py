"""Device profiles for the benchmarks: record a trace, summarise where the device time goes.

    python benchmarks/profile_trace.py TRACE.json.gz [--top 25]    # summarise a recorded trace

From a benchmark (`--profile` in train_throughput.py and decode.py):

    with profile_trace.record("OUT/decode_DenseRetNet.trace.json.gz"):
      run_the_thing()
    print(profile_trace.format_summary(profile_trace.summarize("OUT/decode_DenseRetNet.trace.json.gz")))

The trace is the Perfetto JSON that `jax.profiler.trace(create_perfetto_trace=True)` writes (open
it at ui.perfetto.dev). The summary reads the device lanes only (processes named /device:GPU:* or
/device:TPU:*) and reports: the span from the first to the last device event, the busy time
(union of kernel intervals), hence the idle share (launch gaps, host round trips), and the
kernels that take the time, grouped by kernel name, with a coarse kind (matmul / Pallas kernel /
copy / other fusion).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import shutil
import tempfile

_MATMUL_HINTS = ("gemm", "xmma", "cutlass", "cublas", "matmul", "dot", "sm90_", "nvjet")
_COPY_HINTS = ("memcpy", "memset", "copy")


@contextlib.contextmanager
def record(path: str):
  """Traces the body with the JAX profiler; writes the Perfetto JSON trace to `path` (.json.gz)."""
  import jax  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp(prefix="trace_")
  try:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      yield
    found = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
      raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {tmp}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    shutil.copy(found[0], path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def kind_of(label: str) -> str:
  low = label.lower()
  if any(h in low for h in _MATMUL_HINTS):
    return "matmul"
  if any(h in low for h in ("retention", "selective_scan", "pallas")):
    return "pallas"
  if any(h in low for h in _COPY_HINTS):
    return "copy"
  return "other"


def _union_length(intervals) -> float:
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop <= end:
      continue
    total += stop - max(start, end)
    end = stop
  return total


def summarize(path: str, top: int = 25) -> dict:
  """Device-time summary of one Perfetto JSON trace (times in microseconds)."""
  with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  device_pids = {e["pid"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"
                 and str(e.get("args", {}).get("name", "")).startswith(("/device:GPU", "/device:TPU"))}
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids
             and e.get("dur", 0) > 0]
  if not kernels:
    raise ValueError(f"{path} holds no device events (was the trace taken on a GPU/TPU?)")
  by_op = collections.defaultdict(lambda: [0.0, 0])
  by_kind = collections.defaultdict(float)
  for e in kernels:
    label = e["name"]  # the kernel (XLA groups ops into command buffers, so hlo_op says little)
    kind = kind_of(label)
    by_op[(label, kind)][0] += e["dur"]
    by_op[(label, kind)][1] += 1
    by_kind[kind] += e["dur"]
  span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
  busy = _union_length((e["ts"], e["ts"] + e["dur"]) for e in kernels)
  kernel_sum = sum(e["dur"] for e in kernels)
  ops = sorted(((t, n, label, kind) for (label, kind), (t, n) in by_op.items()), reverse=True)
  return {"trace": os.path.basename(path), "span_us": span, "busy_us": busy,
          "idle_share": 1 - busy / span, "kernels": len(kernels), "kernel_sum_us": kernel_sum,
          "by_kind_us": dict(by_kind),
          "top_ops": [{"op": label, "kind": kind, "us": t, "count": n, "share": t / kernel_sum}
                      for t, n, label, kind in ops[:top]]}


def format_summary(s: dict) -> str:
  lines = [f"{s['trace']}: span {s['span_us'] / 1e3:.3f} ms, device busy {s['busy_us'] / 1e3:.3f} ms "
           f"({100 * (1 - s['idle_share']):.0f}%; idle {100 * s['idle_share']:.0f}%), "
           f"{s['kernels']} kernels (mean {s['kernel_sum_us'] / s['kernels']:.1f} us)",
           "by kind: " + ", ".join(f"{k} {v / 1e3:.3f} ms ({100 * v / s['kernel_sum_us']:.0f}%)"
                                   for k, v in sorted(s["by_kind_us"].items(),
                                                      key=lambda kv: -kv[1])),
           "| op | kind | ms | count | share |", "|---|---|---|---|---|"]
  for r in s["top_ops"]:
    lines.append(f"| {r['op'][:60]} | {r['kind']} | {r['us'] / 1e3:.3f} | {r['count']} | "
                 f"{100 * r['share']:.1f}% |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("traces", nargs="+")
  p.add_argument("--top", type=int, default=25)
  a = p.parse_args(argv)
  for path in a.traces:
    print(format_summary(summarize(path, a.top)) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
