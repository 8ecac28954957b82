"""Observability of a training run: metric writers, the progress line, MFU, memory report.

  MFU = (model FLOPs per token * tokens per second) / (peak FLOP/s per chip * chips)

Only process 0 writes TensorBoard events and `metrics.jsonl`; every process logs.

TensorBoard events are written with the `tensorboard` package's own writer
(`tensorboard.summary.writer.event_file_writer` and its protos), whether or not TensorFlow is
installed: `tensorboard` is a dependency already (tensorboardX would add one), and one writer means
the same event files everywhere. Scalars are plain `simple_value` summaries, which TensorBoard and
`event_accumulator` read as scalars; the hyper-parameters go to the HParams plugin. Files go
through TensorBoard's file layer: TensorFlow's `tf.io.gfile` when TensorFlow is installed (local
paths, gs://, ...), otherwise TensorBoard's own (local paths, s3://, and fsspec URLs such as gs://
with gcsfs installed). Neither clu nor TensorFlow is imported here.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax

# Dense bf16 peak FLOP/s per device (one jax.Device), by `device_kind` prefix.
PEAK_FLOPS = (
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA GH200", 989e12),
    ("NVIDIA B200", 2250e12),
)

# High-bandwidth memory per device, for the compile-only "fits?" verdict.
HBM_BYTES = (
    ("TPU v6", 32 << 30),
    ("TPU v5 lite", 16 << 30),
    ("TPU v5p", 95 << 30),
    ("TPU v5", 95 << 30),
    ("TPU v4", 32 << 30),
)


def _lookup(table, device_kind: str):
  for prefix, value in table:
    if device_kind.startswith(prefix):
      return value
  return None


def peak_flops_per_device(device: Any = None) -> float | None:
  """Peak dense bf16 FLOP/s of `device` (default: the first device); None if unknown (CPU)."""
  device = device or jax.devices()[0]
  return _lookup(PEAK_FLOPS, getattr(device, "device_kind", ""))


def hbm_bytes_per_device(device: Any) -> int | None:
  return _lookup(HBM_BYTES, getattr(device, "device_kind", ""))


def format_duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


def memory_report(compiled: Any) -> dict[str, int]:
  """Per-device bytes of a compiled executable (arguments, outputs, temporaries, code)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  r = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
       for k in ("argument", "output", "alias", "temp", "generated_code")}
  r["total"] = r["argument"] + r["output"] - r["alias"] + r["temp"] + r["generated_code"]
  return r


def cost_flops(compiled: Any) -> float | None:
  """XLA's FLOP count of one call of a compiled (per-device SPMD) executable."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


class JsonlWriter:
  """Appends {"step": s, **scalars} lines to a file. An object store (a gs:// workdir) cannot
  append: there the file (with the lines it already had) is rewritten whole, at most every
  `rewrite_secs` and at close."""

  def __init__(self, path: str, rewrite_secs: float = 60.0):
    from dense_ssm import fs  # pylint: disable=g-import-not-at-top

    self._fs, self._path, self._rewrite_secs = fs, path, rewrite_secs
    self._remote = fs.is_remote(path)
    if self._remote:
      self._lines = [fs.read_text(path)] if fs.exists(path) else []
      self._written, self._dirty = time.monotonic(), False
    else:
      self._f = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    if not self._remote:
      self._f.write(json.dumps(row) + "\n")
      self._f.flush()
      return
    self._lines.append(json.dumps(row) + "\n")
    self._dirty = True
    self.flush(force=False)

  def write_hparams(self, hparams: Mapping[str, Any]):
    pass

  def flush(self, force: bool = True):
    if not self._remote:
      self._f.flush()
    elif self._dirty and (force or time.monotonic() - self._written >= self._rewrite_secs):
      self._fs.write_text(self._path, "".join(self._lines))
      self._written, self._dirty = time.monotonic(), False

  def close(self):
    if self._remote:
      self.flush()
    else:
      self._f.close()


class TensorBoardWriter:
  """Scalars and hyper-parameters as TensorBoard events in `logdir` (one new events file)."""

  def __init__(self, logdir: str):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # if TensorFlow serves the file layer
    from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top

    self._writer = event_file_writer.EventFileWriter(logdir, flush_secs=30)

  def _add(self, step: int, summary) -> None:
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top

    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top

    self._add(step, summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]))

  def write_hparams(self, hparams: Mapping[str, Any]):
    from tensorboard.plugins.hparams import summary_v2  # pylint: disable=g-import-not-at-top

    self._add(0, summary_v2.hparams_pb(dict(hparams)))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class LoggingWriter:
  """Scalars to absl INFO: `[step] name=value, ...` (shown with `-v 0`)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    from absl import logging  # pylint: disable=g-import-not-at-top

    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

  def write_hparams(self, hparams: Mapping[str, Any]):
    from absl import logging  # pylint: disable=g-import-not-at-top

    logging.info("hparams: %s", ", ".join(f"{k}={v}" for k, v in hparams.items()))

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter:
  """Fans each call out to `writers`, in order."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def make_writer(workdir: str) -> MultiWriter:
  """Console (absl INFO) on every process; on process 0 also TensorBoard (workdir/tensorboard)
  and metrics.jsonl (`JsonlWriter`: rewritten whole on object stores, which cannot append)."""
  writers = [LoggingWriter()]
  if jax.process_index() == 0:
    writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))
    writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
  return MultiWriter(writers)


class Progress:
  """Formats `step | loss | tokens/s | MFU | ETA` from host-side timings."""

  def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float,
               num_devices: int, peak_flops: float | None):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak = peak_flops * num_devices if peak_flops else None
    self._t, self._step = None, None

  def start(self, step: int) -> None:
    self._t, self._step = time.perf_counter(), step

  def rates(self, step: int) -> dict[str, float]:
    """Throughput since the previous call (or start) up to finished step `step`."""
    now = time.perf_counter()
    steps = step - self._step
    dt = max(now - self._t, 1e-9)
    self._t, self._step = now, step
    if steps <= 0:
      return {}
    tok_s = steps * self.tokens_per_step / dt
    out = {"tokens_per_s": tok_s, "step_time_s": dt / steps,
           "eta_s": (self.total_steps - step) * dt / steps}
    if self.peak:
      out["mfu"] = tok_s * self.flops_per_token / self.peak
    return out

  def line(self, step: int, loss: float, rates: Mapping[str, float]) -> str:
    parts = [f"step {step}/{self.total_steps}", f"loss {loss:.4f}"]
    if rates:
      parts.append(f"{rates['tokens_per_s']:,.0f} tok/s")
      parts.append(f"{rates['step_time_s'] * 1e3:.0f} ms/step")
      parts.append(f"MFU {rates['mfu']:.1%}" if "mfu" in rates else "MFU n/a")
      parts.append(f"ETA {format_duration(rates['eta_s'])}")
    return " | ".join(parts)


__all__ = [
    "peak_flops_per_device", "hbm_bytes_per_device", "memory_report", "cost_flops",
    "format_bytes", "format_duration", "JsonlWriter", "TensorBoardWriter", "LoggingWriter",
    "MultiWriter", "make_writer", "Progress",
]
