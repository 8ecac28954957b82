"""GPU kernel benchmarks, one function per op (`OPS`); run on a GPU machine:

    python benchmarks/kernels.py --out DIR [--ops retention,selective_scan] [--quick] [--shapes 0,2]

Each op function checks correctness against a float32 reference first, then times fwd and fwd+bwd
(median over many repetitions after warm-up, inputs rotated over fresh random sets) and returns
rows: ms, ratio to the op's anchor, and the share of the FLOP/byte floor (floor time / measured
time, with the ceilings measured on the H200: bf16 dense matmul ~790 TFLOP/s, copy ~4.3 TB/s).
A table is printed last and all rows are written to DIR/kernels.json.

Retention anchor: flash-linear-attention's `chunk_retention` (fla-core; layout [B,T,H,D],
scale=1.0, the same RetNet decays); compared with our Pallas kernel and the XLA chunkwise form.
Selective-scan anchor: the associative scan (`selective_scan(impl="associative")`); the sweep of
kernel configurations lives in kernels_scan.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # leave room for torch

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_timing  # pylint: disable=g-import-not-at-top,wrong-import-position

PEAK_FLOPS = 790e12  # bf16 dense matmul measured on this H200 kind (KINDS.md)
PEAK_BYTES = 4.3e12  # device-to-device copy, bytes read + written
SMOKE = False  # --smoke: tiny shapes in the Pallas interpreter (CPU dry run of this script)
IMPLS = ()  # --impls: run only the implementations whose names start with one of these
SAVE = lambda rows: None  # main() sets it: writes the rows so far (a time limit loses no row)


def _wanted(name):
  return not IMPLS or name.startswith(IMPLS)


# ----------------------------------------------------------------------------------------------
# Timing and error helpers (shared by all ops).
# ----------------------------------------------------------------------------------------------


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if not np.all(np.isfinite(a)):
    return float("nan")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def time_jax(fn, arg_sets, warmup=3, reps=20, inner=5):
  """Median ms per call; each rep runs `inner` async calls over rotating inputs, then blocks."""
  return statistics.median(bench_timing.time_calls(fn, arg_sets, warmup, reps, inner))


def time_torch(fn, arg_sets, warmup=3, reps=20, inner=5):
  import torch  # pylint: disable=g-import-not-at-top
  for i in range(warmup):
    fn(*arg_sets[i % len(arg_sets)])
  torch.cuda.synchronize()
  times = []
  for r in range(reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(inner):
      fn(*arg_sets[(r * inner + i) % len(arg_sets)])
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / inner)
  return statistics.median(times)


def floor_ms(flops, nbytes):
  return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES) * 1e3


def _try(label, fn, default=None):
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    print(f"  [{label}] failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
    traceback.print_exc(limit=3)
    return default


def _to_torch(x):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_dlpack(x)


# ----------------------------------------------------------------------------------------------
# Retention.
# ----------------------------------------------------------------------------------------------

RETENTION_SHAPES = [(8, 2048, 8, 128, 256), (4, 8192, 16, 128, 128), (8, 2048, 2, 384, 1536),
                    (8, 2048, 4, 320, 1280)]
# Tile / chunk variants of our kernel tried at each shape (the default first).
RETENTION_VARIANTS = {
    "default": dict(),
    "fwd16k_w8": dict(tuning=(("fwd_budget", 16384), ("fwd_warps", 8))),
    "bwd8k_w4": dict(tuning=(("bwd_budget", 8192), ("bwd_warps", 4))),
    "stages2": dict(tuning=(("num_stages", 2),)),
    "chunk32": dict(chunk_size=32),
    "chunk128": dict(chunk_size=128),  # the paper RetNet configs' model.chunk_size
}
RETENTION_VARIANTS_ALL_SHAPES = ("fwd16k_w8", "chunk128")  # the others only at the first shape


def _retention_cost(b, t, h, dk, dv, c=64):
  """(flops fwd, flops fwd+bwd, bytes fwd, bytes fwd+bwd) of the chunked algorithm, bf16 I/O."""
  fwd = b * h * (2 * t * c * dk + 2 * t * c * dv + 4 * t * dk * dv)
  e_qk, e_v = b * t * h * dk, b * t * h * dv
  return fwd, 3 * fwd, 2 * (2 * e_qk + 2 * e_v), 2 * (6 * e_qk + 5 * e_v)


def _retention_check_features():
  """Small GPU check of the paths the timed shapes skip: per-token decay, segments, h0, ragged T."""
  from dense_ssm.ops import retention  # pylint: disable=g-import-not-at-top
  from dense_ssm.ops.retention_pallas import retention_pallas  # pylint: disable=g-import-not-at-top
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    b, t, h, dk, dv = 2, 300, 3, 96, 160
    ks = jax.random.split(jax.random.PRNGKey(7), 8)
    q = jax.random.normal(ks[0], (b, t, h, dk)) * dk ** -0.5
    k = jax.random.normal(ks[1], (b, t, h, dk)) * dk ** -0.5
    v = jax.random.normal(ks[2], (b, t, h, dv))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h)) + 1.0)
    h0 = jax.random.normal(ks[4], (b, h, dk, dv))
    seg = jnp.cumsum(jax.random.uniform(ks[5], (b, t)) < 0.02, axis=1).astype(jnp.int32)
    do = jax.random.normal(ks[6], (b, t, h, dv))
    dht = jax.random.normal(ks[7], (b, h, dk, dv))
    qc, kc, vc = (x.astype(dtype) for x in (q, k, v))

    def grads(fn, *xs):
      (o, s), vjp = jax.vjp(fn, *xs)
      return (o, s) + vjp((do.astype(o.dtype), dht))

    ours = jax.jit(lambda *xs: grads(lambda q, k, v, g, h0: retention_pallas(
        q, k, v, g, initial_state=h0, segment_ids=seg, interpret=SMOKE), *xs))(qc, kc, vc, g, h0)
    with jax.default_matmul_precision("float32"):
      ref = jax.jit(lambda *xs: grads(lambda q, k, v, g, h0: retention(
          q, k, v, g, initial_state=h0, segment_ids=seg, impl="reference"), *xs))(
              *(x.astype(jnp.float32) for x in (qc, kc, vc)), g, h0)
    errs = {n: rel_err(a, r) for n, a, r in zip(("o", "S", "dq", "dk", "dv", "dg", "dh0"), ours,
                                                 ref)}
    print(f"  features check {jnp.dtype(dtype).name}: "
          + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
    rows.append(dict(op="retention", check="features", dtype=jnp.dtype(dtype).name, **errs))
  return rows


def bench_retention(quick=False, shapes=None):
  """Retention rows: ours (Pallas), XLA chunkwise, fla chunk_retention; fwd and fwd+bwd.
  `shapes`: indices into RETENTION_SHAPES (default all; --quick: the first)."""
  from dense_ssm.ops import retention, retnet_log_decay  # pylint: disable=g-import-not-at-top
  from dense_ssm.ops.retention_pallas import retention_pallas  # pylint: disable=g-import-not-at-top
  from dense_ssm.ops.retention_pallas_gpu import choose_tiles  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from fla.ops.retention import chunk_retention  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"  fla unavailable ({e}); timing ours and XLA only", flush=True)
    chunk_retention = None

  rows = _try("features check", _retention_check_features, []) or []
  if shapes is None:
    shapes = [0] if quick else range(len(RETENTION_SHAPES))
  selected = [(i, RETENTION_SHAPES[i]) for i in shapes if i < len(RETENTION_SHAPES)]
  if SMOKE:
    selected = [(0, (2, 128, 2, 64, 128))]
  for si, (b, t, h, dk, dv) in selected:
    name = f"B{b} T{t} H{h} K{dk} V{dv}"
    print(f"retention {name}", flush=True)
    log_decay = retnet_log_decay(h)
    fl_f, fl_fb, by_f, by_fb = _retention_cost(b, t, h, dk, dv)
    floor_f, floor_fb = floor_ms(fl_f, by_f), floor_ms(fl_fb, by_fb)

    def make(seed):
      ks = jax.random.split(jax.random.PRNGKey(seed), 4)
      q = (jax.random.normal(ks[0], (b, t, h, dk)) * dk ** -0.5).astype(jnp.bfloat16)
      k = (jax.random.normal(ks[1], (b, t, h, dk)) * dk ** -0.5).astype(jnp.bfloat16)
      v = jax.random.normal(ks[2], (b, t, h, dv)).astype(jnp.bfloat16)
      do = jax.random.normal(ks[3], (b, t, h, dv)).astype(jnp.bfloat16)
      # log_decay is passed as an argument: closed over, XLA constant-folds its cumulative sums
      # (seconds per compile).
      return q, k, v, do, log_decay

    sets = [make(100 * si + i) for i in range(2)]

    def jax_fns(core):
      fwd = jax.jit(lambda q, k, v, do, ld: core(q, k, v, ld)[0])
      def fb(q, k, v, do, ld):
        o, vjp = jax.vjp(lambda q, k, v: core(q, k, v, ld)[0], q, k, v)
        return vjp(do)
      return fwd, jax.jit(fb)

    variants = dict(RETENTION_VARIANTS)
    # Run at every shape: the other side of the chunk-product pre-pass switch, and at the wide
    # heads (fewer than 3 pipeline stages, see retention_pallas_gpu.pipeline_stages) all kernels
    # at 1 and at 2 stages where that differs from the default (2 stages hold about 190-225 KB of
    # shared memory, near the 227 KiB limit).
    tiles = choose_tiles(dk, dv, b * h)
    flip = not tiles.precompute
    shape_variants = {f"precompute_{'on' if flip else 'off'}": dict(tuning=(("precompute", flip),))}
    default_stages = {tiles.fwd_stages, tiles.dv_stages, tiles.dqk_stages}
    if max(default_stages) < 3:
      for n in (1, 2):
        if default_stages != {n}:
          shape_variants[f"stages{n}_all"] = dict(tuning=(("num_stages", n),))
    variants.update(shape_variants)
    impls = {}
    for vname, var in variants.items():
      if vname != "default" and (quick or (si > 0 and vname not in RETENTION_VARIANTS_ALL_SHAPES
                                           and vname not in shape_variants)):
        continue
      impls[f"pallas/{vname}"] = jax_fns(
          lambda q, k, v, ld, var=var: retention_pallas(
              q, k, v, ld, chunk_size=var.get("chunk_size", 64),
              interpret=SMOKE, _tuning=var.get("tuning", ())))
    impls["xla_chunkwise"] = jax_fns(
        lambda q, k, v, ld: retention(q, k, v, ld, impl="chunkwise"))
    impls = {name: fns for name, fns in impls.items() if _wanted(name)}

    # Correctness first: float32 reference (chunkwise form on float32 inputs, exact matmuls).
    q, k, v, do, ld = sets[0]
    f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
    t_shape = time.perf_counter()
    wall = lambda: f"(at {time.perf_counter() - t_shape:.0f} s)"  # pylint: disable=unnecessary-lambda-assignment
    with jax.default_matmul_precision("float32"):
      ref_fwd, ref_fb = jax_fns(lambda q, k, v, ld: retention(q, k, v, ld, impl="chunkwise"))
      ref = [ref_fwd(*f32(q, k, v, do), ld)] + list(ref_fb(*f32(q, k, v, do), ld))
    jax.block_until_ready(ref)
    print(f"  float32 reference done {wall()}", flush=True)

    results = {}
    for iname, (fwd, fb) in impls.items():
      def run(fwd=fwd, fb=fb):
        got = [fwd(q, k, v, do, ld)] + list(fb(q, k, v, do, ld))
        errs = [rel_err(a, r) for a, r in zip(got, ref)]
        ms_f = time_jax(fwd, sets)
        ms_fb = time_jax(fb, sets)
        return errs, ms_f, ms_fb
      res = _try(iname, run)
      if res is not None:
        results[iname] = res
        print(f"  {iname:24s} fwd {res[1]:8.3f} ms  fwd+bwd {res[2]:8.3f} ms  err o/dq/dk/dv "
              + "/".join(f"{e:.1e}" for e in res[0]) + f" {wall()}", flush=True)

    if chunk_retention is not None and _wanted("fla_chunk_retention"):
      def fla_run():
        tsets = [tuple(_to_torch(x) for x in s[:4]) for s in sets]
        for s in tsets:
          for x in s[:3]:
            x.requires_grad_(True)
        f_fwd = lambda q, k, v, do: chunk_retention(q, k, v, scale=1.0)[0]
        def f_fb(q, k, v, do):
          o, _ = chunk_retention(q, k, v, scale=1.0)
          return torch.autograd.grad(o, (q, k, v), do)
        tq, tk, tv, tdo = tsets[0]
        got = [f_fwd(tq, tk, tv, tdo).detach()] + list(f_fb(tq, tk, tv, tdo))
        errs = [rel_err(x.float().cpu().numpy(), r) for x, r in zip(got, ref)]
        return errs, time_torch(f_fwd, tsets), time_torch(f_fb, tsets)
      res = _try("fla", fla_run)
      if res is not None:
        results["fla_chunk_retention"] = res
        print(f"  {'fla_chunk_retention':24s} fwd {res[1]:8.3f} ms  fwd+bwd {res[2]:8.3f} ms  "
              "err o/dq/dk/dv " + "/".join(f"{e:.1e}" for e in res[0]) + f" {wall()}", flush=True)

    anchor = results.get("fla_chunk_retention")
    for iname, (errs, ms_f, ms_fb) in results.items():
      rows.append(dict(
          op="retention", shape=name, impl=iname, ms_fwd=ms_f, ms_fwd_bwd=ms_fb,
          ratio_fwd=(ms_f / anchor[1]) if anchor else None,
          ratio_fwd_bwd=(ms_fb / anchor[2]) if anchor else None,
          floor_ms_fwd=floor_f, floor_ms_fwd_bwd=floor_fb,
          floor_share_fwd=floor_f / ms_f, floor_share_fwd_bwd=floor_fb / ms_fb,
          err_o=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3]))
    SAVE(rows)
  return rows


# ----------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------

def bench_selective_scan(quick=False, shapes=None):
  """Selective-scan rows: ours (Pallas) vs the associative scan (the anchor), through
  kernels_scan.py's correctness check and timing. Errors against float32: y at the timed shape
  (both impls), dx from the small all-options check (ours only)."""
  import kernels_scan  # pylint: disable=g-import-not-at-top
  key = jax.random.PRNGKey(0)
  kw = {"interpret": True} if SMOKE else {}
  errs = kernels_scan.check(kw, jnp.bfloat16, key, (2, 40, 24, 4) if SMOKE else (2, 1000, 256, 16))
  print(f"  selective scan check bf16: {errs}", flush=True)
  if shapes is None:
    shapes = [0] if quick else range(len(kernels_scan.SHAPES))
  selected = ([(2, 64, 32, 4)] if SMOKE else
              [kernels_scan.SHAPES[i] for i in shapes if i < len(kernels_scan.SHAPES)])
  ours = lambda **a: kernels_scan.selective_scan_pallas(
      **{("A" if k == "a" else k): v for k, v in a.items()}, **kw)
  rows = []
  for shape in selected:
    got = kernels_scan.bench_shape(shape, jnp.bfloat16, [("pallas", ours),
                                                        ("associative", kernels_scan.associative_scan)],
                                   key, reps=5 if SMOKE else 20)
    by = {(r["impl"], r["mode"]): r for r in got if "ms" in r}
    anchor = {m: by.get(("associative", m)) for m in ("fwd", "fwd+bwd")}
    for impl in ("pallas", "associative"):
      f, fb = by.get((impl, "fwd")), by.get((impl, "fwd+bwd"))
      if not (f or fb):
        continue
      get = lambda r, field: r[field] if r else None
      ratio = lambda r, m: r["ms"] / anchor[m]["ms"] if r and anchor[m] else None  # pylint: disable=cell-var-from-loop
      rows.append(dict(
          op="selective_scan", shape="B{} T{} D{} N{}".format(*shape), impl=impl,
          ms_fwd=get(f, "ms"), ms_fwd_bwd=get(fb, "ms"), ratio_fwd=ratio(f, "fwd"),
          ratio_fwd_bwd=ratio(fb, "fwd+bwd"), floor_ms_fwd=get(f, "floor_ms"),
          floor_ms_fwd_bwd=get(fb, "floor_ms"), floor_share_fwd=get(f, "share_of_floor"),
          floor_share_fwd_bwd=get(fb, "share_of_floor"),
          err_o=get(f, "err_y"),  # this shape's y against float32 (kernels_scan.bench_shape)
          err_dq=errs["dx"] if impl == "pallas" else None))  # dx: the small check's
    SAVE(rows)
  return rows


OPS = {"retention": bench_retention, "selective_scan": bench_selective_scan}


def print_table(rows):
  print("\n| op | shape | impl | fwd ms | fwd+bwd ms | x anchor (fwd, f+b) | floor share (fwd, f+b) "
        "| rel err out / first input grad |")
  print("|---|---|---|---|---|---|---|---|")
  def fmt(x, spec):
    return "-" if x is None else format(x, spec)

  for r in rows:
    if "impl" not in r:
      continue
    ratio = ("-" if r["ratio_fwd"] is None and r["ratio_fwd_bwd"] is None
             else f"{fmt(r['ratio_fwd'], '.2f')}, {fmt(r['ratio_fwd_bwd'], '.2f')}")
    print(f"| {r['op']} | {r['shape']} | {r['impl']} | {fmt(r['ms_fwd'], '.3f')} "
          f"| {fmt(r['ms_fwd_bwd'], '.3f')} | {ratio} | {fmt(r['floor_share_fwd'], '.0%')}, "
          f"{fmt(r['floor_share_fwd_bwd'], '.0%')} | {fmt(r['err_o'], '.1e')} / {fmt(r['err_dq'], '.1e')} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--ops", default=",".join(OPS))
  parser.add_argument("--quick", action="store_true", help="first shape, default config only")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpreter (CPU)")
  parser.add_argument("--shapes", default="",
                      help="comma-separated indices into each op's shape list, in the order to "
                           "run (indices past an op's list are skipped)")
  parser.add_argument("--impls", default="",
                      help="comma-separated name prefixes: run only these implementations "
                           "(e.g. fla,pallas/default); default all")
  args = parser.parse_args()
  global SMOKE, IMPLS, SAVE
  SMOKE = args.smoke
  IMPLS = tuple(i for i in args.impls.split(",") if i)
  print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
  os.makedirs(args.out, exist_ok=True)
  meta = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), jax=jax.__version__,
              device=str(jax.devices()[0].device_kind), argv=sys.argv)
  rows = []

  def save(op_rows):
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
      json.dump(dict(meta=meta, rows=rows + op_rows), f, indent=1)

  SAVE = save
  for op in args.ops.split(","):
    shapes = [int(i) for i in args.shapes.split(",")] if args.shapes else None
    rows += OPS[op](quick=args.quick, shapes=shapes)
    save([])
  print_table(rows)


if __name__ == "__main__":
  main()
