"""Training throughput: tokens/s, step time and MFU of the real (sharded, donated) train step.

    python benchmarks/train_throughput.py --out DIR                  # GPU/TPU: the issue's models
    python benchmarks/train_throughput.py --config configs/retnet_1b3.py:gau --batch 8 --out DIR
    python benchmarks/train_throughput.py --tiny --out DIR           # CPU smoke test

For each config (default: DenseRetNet-1.3B and its m = 0 baseline, DenseMamba-360M, Mamba-360M,
LLaMA-350M), at sequence length --seq (default 2048), the step of `dense_ssm.train_step` (the
one `dense_ssm.train` runs: AdamW, clipping, donation, the mesh over all local devices) is
compiled and timed on random tokens: median step time over --steps steps after --warmup steps.
--batch auto (default) picks the largest power-of-two global batch whose memory fits: XLA's
memory analysis at 1 and 2 rows per device gives fixed + per-row bytes, the guess is checked by
compiling it and running (halved on out-of-memory). Without a known device memory (CPU) it
starts at --max_batch and halves.

  MFU = flops_per_token * tokens/s / (peak bf16 FLOP/s per device * devices)

with flops_per_token = 6 * (params - embedding table) + 3 * forward mixing FLOPs
(`dense_ssm.models.flops_per_token`). --set KEY=VALUE overrides config keys (default:
model.dtype=bfloat16; params stay float32). A table is printed last and all rows are written to
DIR/train_throughput.json (DIR: --out, else $OUT, else the current directory).

Scaling (several GPUs or TPU chips of one host):

    python benchmarks/train_throughput.py --config configs/retnet_1b3.py --devices 1,2 \
        --mesh data=-1 --mesh fsdp=-1 --per_device_batch 8 --out DIR

measures each config on the first n devices for each n in --devices, under each --mesh (the
config's mesh axes, data / fsdp / tensor; unnamed axes are 1; one n = 1 run serves all meshes),
with the global batch --per_device_batch * n (weak scaling). Each row adds tokens/s per device,
the scaling efficiency (tokens/s per device over the same config's one-device figure) and the
per-device bytes of the step's arguments (train state + batch: replicated under data
parallelism, about 1/n of it under fsdp).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # room for the largest batch

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_timing  # pylint: disable=g-import-not-at-top,wrong-import-position
import profile_trace  # pylint: disable=g-import-not-at-top,wrong-import-position
from dense_ssm import config_file, models, optim, sharding, train_log, train_step  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ("configs/retnet_1b3.py", "configs/retnet_1b3.py:gau", "configs/mamba_360m.py",
                   "configs/mamba_360m.py:plain", "configs/llama_350m.py")
TINY_CONFIGS = ("configs/default.py", "configs/default.py:gau")


def load_config(spec: str, sets: list[str]):
  """`path[:arg]` (relative to the repository) -> get_config(arg), then KEY=VALUE overrides."""
  return config_file.load(spec, sets, root=REPO)


def random_batch(batch: int, seq: int, vocab: int, mesh) -> dict:
  return token_batch(np.random.default_rng(0).integers(0, vocab, (batch, seq + 1)), mesh)


def token_batch(tokens, mesh) -> dict:
  """A train batch placed on `mesh` from [batch, seq + 1] token ids: one document per row."""
  tokens = np.asarray(tokens, np.int32)
  batch, seq = tokens.shape[0], tokens.shape[1] - 1
  return sharding.global_batch({
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "segment_ids": np.ones((batch, seq), np.int32),
      "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
      "weights": np.ones((batch, seq), np.float32)}, mesh)


def device_bytes() -> int | None:
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return stats.get("bytes_limit") if stats else None


def parse_mesh(spec: str) -> dict[str, int]:
  """'fsdp=-1' or 'data=2,fsdp=4' -> {data, fsdp, tensor} sizes (unnamed axes 1)."""
  mesh = {a: 1 for a in sharding.MESH_AXES}
  for item in filter(None, spec.split(",")):
    axis, _, size = item.partition("=")
    if axis not in mesh or not size.lstrip("-").isdigit():
      raise SystemExit(f"--mesh {spec!r}: expected AXIS=SIZE items with AXIS in "
                       f"{', '.join(sharding.MESH_AXES)} (e.g. --mesh fsdp=-1).")
    mesh[axis] = int(size)
  return mesh


def mesh_name(mesh) -> str:
  return ",".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "1 device"


def build_step(config, batch: int, seq: int, mesh_cfg=None, devices=None):
  """(StepFns, ModelConfig, mesh) of `dense_ssm.train`'s step at one global batch size, on
  `devices` (default: all) under `mesh_cfg` (default: data parallel)."""
  config.train.batch_size = batch
  config.data.seq_len = seq
  cfg = models.ModelConfig.from_dict(config.model.to_dict())
  mesh = sharding.make_mesh(mesh_cfg or {"data": -1, "fsdp": 1, "tensor": 1}, devices)
  sharding.check_batch_divisible(batch, mesh, jax.process_count())
  tx, schedule = optim.make_optimizer(config.train)
  fns = train_step.build(models.build_model(cfg), tx, schedule, mesh, seq_len=seq,
                         grad_accum=config.train.grad_accum)
  return fns, cfg, mesh


def compile_step(config, batch: int, seq: int, mesh_cfg=None, devices=None):
  """(compiled step, StepFns, ModelConfig, mesh, memory report) at one global batch size."""
  fns, cfg, mesh = build_step(config, batch, seq, mesh_cfg, devices)
  compiled = fns.train_step.lower(fns.abstract_state,
                                  sharding.abstract_batch(batch, seq, mesh)).compile()
  return compiled, fns, cfg, mesh, train_log.memory_report(compiled)


def random_state(abstract_state):
  """A train state of the right shapes and shardings: float params N(0, 0.02^2), the rest zeros
  (bench_timing.fill_tree; the jitted init of a 1.3B model compiles for minutes on the H200)."""
  return bench_timing.fill_tree(
      abstract_state, lambda path, a: "normal" if path.startswith("['params']")
      and np.issubdtype(a.dtype, np.floating) else "zeros")


def measure(config, batch: int, seq: int, steps: int, warmup: int, profile: str = "",
            mesh_cfg=None, devices=None) -> dict:
  """Compiles and times the train step at one global batch size; raises if it does not fit.
  With `profile` (a .trace.json.gz path), two more steps are traced there and summarised."""
  t0 = time.perf_counter()
  compiled, fns, cfg, mesh, mem = compile_step(config, batch, seq, mesh_cfg, devices)
  compile_s = time.perf_counter() - t0
  limit = device_bytes()
  if limit and mem and mem["total"] > 0.97 * limit:
    raise MemoryError(f"batch {batch} needs {mem['total'] / 2**30:.1f} GiB of "
                      f"{limit / 2**30:.1f} GiB")
  state = random_state(fns.abstract_state)
  data = random_batch(batch, seq, cfg.vocab_size, mesh)
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  summary = None
  if profile:
    with profile_trace.record(profile):
      for _ in range(2):
        state, metrics = compiled(state, data)
      jax.block_until_ready(metrics)
    summary = profile_trace.summarize(profile)
    print(profile_trace.format_summary(summary), flush=True)
  tokens_s = batch * seq / step_s
  fpt = models.flops_per_token(cfg, seq)
  peak = train_log.peak_flops_per_device()
  n = mesh.devices.size
  return {
      "params": models.count_params(cfg), "batch": batch, "seq": seq, "step_ms": step_s * 1e3,
      "devices": n, "mesh": mesh_name(mesh), "tokens_per_s": tokens_s,
      "tokens_per_s_per_device": tokens_s / n, "flops_per_token": fpt,
      "mfu": tokens_s * fpt / (peak * n) if peak else None,
      "memory_gib": mem.get("total", 0) / 2**30 if mem else None,
      "arguments_gib": mem.get("argument", 0) / 2**30 if mem else None, "compile_s": compile_s,
      "loss": float(metrics["loss"]), "dtype": cfg.dtype, "remat": cfg.remat, "impl": cfg.impl,
      "profile": summary,
  }


def largest_batch_guess(spec: str, args, mesh_cfg, devices) -> int | None:
  """Fits memory(b) = fixed + b * per_row from compiles at b = n and 2n (n = devices) and
  returns the largest power-of-two multiple of n below 90% of the device memory."""
  limit, n = device_bytes(), len(devices)
  if not limit:
    return None
  m1 = compile_step(load_config(spec, args.set), n, args.seq, mesh_cfg, devices)[-1]["total"]
  m2 = compile_step(load_config(spec, args.set), 2 * n, args.seq, mesh_cfg, devices)[-1]["total"]
  per_row = max((m2 - m1) / n, 1.0)
  fixed = m1 - per_row * n
  batch = n
  while 2 * batch <= args.max_batch and fixed + per_row * 2 * batch <= 0.9 * limit:
    batch *= 2
  print(f"  {spec}: memory ~ {fixed / 2**30:.1f} GiB + {per_row / 2**30:.2f} GiB/row; "
        f"trying batch {batch}", flush=True)
  return batch


def run_config(spec: str, args, mesh_cfg=None, devices=None) -> dict:
  devices = list(jax.devices() if devices is None else devices)
  name = "".join(c if c.isalnum() else "_" for c in os.path.basename(spec))
  prof = os.path.join(args.out, f"train_{name}.trace.json.gz") if args.profile else ""

  def run(batch):
    return {"config": spec, **measure(load_config(spec, args.set), batch, args.seq, args.steps,
                                      args.warmup, prof, mesh_cfg, devices)}

  if args.per_device_batch:
    return run(args.per_device_batch * len(devices))
  if args.batch != "auto":
    return run(int(args.batch))
  batch = largest_batch_guess(spec, args, mesh_cfg, devices) or args.max_batch
  while batch >= len(devices):
    try:
      return run(batch)
    except (MemoryError, jax.errors.JaxRuntimeError) as e:
      print(f"  {spec}: batch {batch} does not fit ({str(e).splitlines()[0][:120]})", flush=True)
      batch //= 2
  return {"config": spec, "error": "batch 1 per device does not fit; try --set model.remat=True"}


def add_scaling(rows: list[dict]) -> None:
  """Scaling efficiency: tokens/s per device over the same config's one-device run."""
  single = {r["config"]: r for r in rows if r.get("devices") == 1}
  for r in rows:
    base = single.get(r["config"])
    if "error" not in r and base is not None:
      r["scaling_efficiency"] = r["tokens_per_s_per_device"] / base["tokens_per_s_per_device"]


def table(rows: list[dict]) -> str:
  head = ("config", "params", "devices", "mesh", "batch", "seq", "step ms", "tok/s",
          "tok/s/device", "scaling", "MFU", "mem GiB", "args GiB")
  lines = [" | ".join(head), " | ".join("---" for _ in head)]
  fmt = lambda v, f: "n/a" if v is None else format(v, f)  # pylint: disable=unnecessary-lambda-assignment
  for r in rows:
    if "error" in r:
      lines.append(f"{r['config']} | error: {r['error']}")
      continue
    lines.append(" | ".join((
        r["config"], f"{r['params'] / 1e6:.0f}M", str(r["devices"]), r["mesh"], str(r["batch"]),
        str(r["seq"]), f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:,.0f}",
        f"{r['tokens_per_s_per_device']:,.0f}", fmt(r.get("scaling_efficiency"), ".1%"),
        fmt(r["mfu"], ".1%"), fmt(r["memory_gib"], ".1f"), fmt(r["arguments_gib"], ".1f"))))
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", action="append", help="path[:variant]; repeatable")
  parser.add_argument("--batch", default="auto", help="global batch, or auto (largest that fits)")
  parser.add_argument("--max_batch", type=int, default=512)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--per_device_batch", type=int, default=0,
                      help="global batch = this * devices (overrides --batch)")
  parser.add_argument("--devices", default="all",
                      help="comma-separated device counts to run on (the first n devices), or all")
  parser.add_argument("--mesh", action="append", default=None,
                      help="AXIS=SIZE[,AXIS=SIZE] over data/fsdp/tensor; repeatable "
                           "(default: data=-1)")
  parser.add_argument("--set", action="append", default=None, help="KEY=VALUE config override")
  parser.add_argument("--tiny", action="store_true", help="CPU smoke test: small configs")
  parser.add_argument("--profile", action="store_true",
                      help="trace two extra steps per config into OUT/train_*.trace.json.gz and "
                           "print where the device time goes")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  args = parser.parse_args()
  if args.set is None:
    args.set = ["model.dtype=bfloat16"]
  if args.tiny:
    configs = args.config or list(TINY_CONFIGS)
    args.seq, args.steps, args.warmup = min(args.seq, 128), min(args.steps, 3), 1
    args.batch = "4" if args.batch == "auto" else args.batch
  else:
    configs = args.config or list(DEFAULT_CONFIGS)
  meshes = [parse_mesh(m) for m in (args.mesh or ["data=-1"])]
  counts = ([jax.device_count()] if args.devices == "all"
            else [int(n) for n in args.devices.split(",")])
  if max(counts) > jax.device_count() or min(counts) < 1:
    raise SystemExit(f"--devices {args.devices}: this host has {jax.device_count()} devices.")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  rows = []
  for spec in configs:
    for n in counts:
      for mesh_cfg in meshes[:1] if n == 1 else meshes:
        rows.append(run_config(spec, args, mesh_cfg, jax.devices()[:n]))
        add_scaling(rows)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
  print(table(rows))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "train_throughput.json")
  with open(path, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
               "rows": rows, "argv": sys.argv[1:]}, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
