"""GPU benchmark of the Pallas selective scan (Mamba-1) against the associative-scan form.

    python benchmarks/kernels_scan.py --out DIR [--sweep] [--dtype bfloat16] [--quick]

1. Correctness first: values and gradients of the Pallas kernel against a float32 `lax.scan`
   reference (ragged T, packed segments, initial state, d_skip, z, dt_bias), for float32 and
   bfloat16 inputs; relative errors ||out - ref|| / ||ref||.
2. Optional `--sweep`: fwd and fwd+bwd time of a few GPU kernel configurations (block_d,
   num_warps, body lengths, prefetch) at the first shape, each one's y checked against float32;
   the fastest fwd+bwd is used below.
3. Timing: fwd and fwd+bwd at (B,T,D,N) = (8,2048,2048,16) and (4,8192,4096,16), median over many
   repetitions after warm-up, rotating over fresh random input sets: ours (Pallas) vs the
   associative scan (`dense_ssm.ops.selective_scan(..., impl="associative")`, a chunked
   `jax.lax.associative_scan`). Each row: ms, ratio to the associative scan, and the share of the
   byte floor (fewest bytes each pass must move / 4.3 TB/s measured copy bandwidth).
A table is printed last; all rows go to DIR/kernels_scan.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_timing  # pylint: disable=g-import-not-at-top,wrong-import-position

from dense_ssm.ops.selective_scan import selective_scan  # pylint: disable=g-import-not-at-top,wrong-import-position
from dense_ssm.ops.selective_scan_pallas import selective_scan_pallas  # pylint: disable=g-import-not-at-top

PEAK_BYTES = 4.3e12  # device-to-device copy on the H200 kind, bytes read + written (KINDS.md)
SHAPES = ((8, 2048, 2048, 16), (4, 8192, 4096, 16))


def reference_scan(x, dt, a, b, c, **kw):
  """The project's sequential reference (float32 math, exact matmuls)."""
  with jax.default_matmul_precision("highest"):
    return selective_scan(x, dt, a, b, c, impl="sequential", **kw)


def associative_scan(x, dt, a, b, c, **kw):
  """The XLA path the kernel must beat: chunked `jax.lax.associative_scan`."""
  return selective_scan(x, dt, a, b, c, impl="associative", **kw)


def make_inputs(key, shape, dtype, extras=False):
  bsz, t, d, n = shape
  ks = jax.random.split(key, 10)
  dt_init = jax.random.uniform(ks[7], (d,), minval=np.log(1e-3), maxval=np.log(1e-1))
  args = dict(
      x=jax.random.normal(ks[0], (bsz, t, d), dtype),
      dt=(0.5 * jax.random.normal(ks[1], (bsz, t, d))).astype(dtype),
      a=-jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (d, 1))
      * jnp.exp(0.3 * jax.random.normal(ks[2], (d, n))),
      b=jax.random.normal(ks[3], (bsz, t, n), dtype),
      c=jax.random.normal(ks[4], (bsz, t, n), dtype),
      d_skip=jax.random.normal(ks[5], (d,)),
      z=jax.random.normal(ks[6], (bsz, t, d), dtype),
      dt_bias=jnp.exp(dt_init) + jnp.log(-jnp.expm1(-jnp.exp(dt_init))),  # softplus^-1
  )
  if extras:
    args["initial_state"] = jax.random.normal(ks[8], (bsz, d, n))
    seg = jnp.cumsum(jax.random.bernoulli(ks[9], 4.0 / t, (bsz, t)), axis=1).astype(jnp.int32)
    args["segment_ids"] = seg
  return args


def rel_err(a, b):
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  if not np.all(np.isfinite(a)):
    return float("nan")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


DIFF_ARGS = ("x", "dt", "a", "b", "c", "d_skip", "z", "dt_bias", "initial_state")


def fwd_bwd_fn(fn, names):
  """jit(args..., dy) -> (y, h, grads of names) through jax.vjp."""

  def run(args, dy, dh):
    diff = {k: args[k] for k in names}
    rest = {k: v for k, v in args.items() if k not in names}
    (y, h), vjp = jax.vjp(lambda d: fn(**d, **rest), diff)
    return y, h, vjp((dy, dh))[0]

  return jax.jit(run)


def check(fn_kw, dtype, key, shape=(2, 1000, 256, 16)):
  args = make_inputs(key, shape, dtype, extras=True)
  names = [k for k in DIFF_ARGS if k in args]
  ours = lambda **a: selective_scan_pallas(**{("A" if k == "a" else k): v for k, v in a.items()},
                                           **fn_kw)
  ref = lambda **a: reference_scan(**a)
  k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
  dy = jax.random.normal(k1, shape[:3], dtype)
  dh = jax.random.normal(k2, (shape[0], shape[2], shape[3]))
  y, h, g = fwd_bwd_fn(ours, names)(args, dy, dh)
  # reference on the same (rounded) inputs, in float32
  args32 = {k: (v.astype(jnp.float32) if v.dtype != jnp.int32 else v) for k, v in args.items()}
  yr, hr, gr = fwd_bwd_fn(ref, names)(args32, dy.astype(jnp.float32), dh)
  errs = {"y": rel_err(y, yr), "final_state": rel_err(h, hr)}
  errs.update({"d" + k: rel_err(g[k], gr[k]) for k in names})
  return errs


def time_fn(fn, arg_sets, warmup=3, reps=30, inner=3):
  times = bench_timing.time_calls(fn, arg_sets, warmup, reps, inner)
  return statistics.median(times), min(times)


def byte_floor(shape, itemsize):
  """Fewest HBM bytes: (fwd, fwd+bwd). fwd reads x, dt, z, b, c and writes y; the backward
  reads x, dt, z, b, c, dy and writes dx, ddt, dz, db, dc."""
  bsz, t, d, n = shape
  btd, btn = bsz * t * d * itemsize, bsz * t * n * itemsize
  fwd = 4 * btd + 2 * btn
  bwd = 7 * btd + 4 * btn
  return fwd, fwd + bwd


_T0 = time.perf_counter()
_BUDGET = [float("inf")]


def bench_shape(shape, dtype, impls, key, reps):
  rows = []
  sets = [make_inputs(jax.random.fold_in(key, i), shape, dtype) for i in range(2)]
  names = [k for k in DIFF_ARGS if k in sets[0]]
  dys = [(jax.random.normal(jax.random.fold_in(key, 10 + i), shape[:3], dtype),
          jnp.zeros((shape[0], shape[2], shape[3]), jnp.float32)) for i in range(2)]
  fb, fbb = byte_floor(shape, jnp.dtype(dtype).itemsize)
  ref = []  # float32 sequential reference (y, h) on sets[0], computed on first use

  def errors(out):
    if not ref:
      f32 = {k: (v.astype(jnp.float32) if v.dtype != jnp.int32 else v) for k, v in sets[0].items()}
      ref.append(jax.jit(lambda a: reference_scan(**a))(f32))
    return {"err_y": rel_err(out[0], ref[0][0]), "err_h": rel_err(out[1], ref[0][1])}

  for label, fn in impls:
    fwd = jax.jit(lambda a, fn=fn: fn(**a))
    both = fwd_bwd_fn(fn, names)
    for mode, run, args, floor in (
        ("fwd", fwd, [(s,) for s in sets], fb),
        ("fwd+bwd", both, [(s,) + d for s, d in zip(sets, dys)], fbb)):
      row = {"shape": list(shape), "dtype": jnp.dtype(dtype).name, "impl": label, "mode": mode}
      if time.perf_counter() - _T0 > _BUDGET[0]:
        row["error"] = "skipped: time budget"
        rows.append(row)
        continue
      try:
        t0 = time.perf_counter()
        out = jax.block_until_ready(run(*args[0]))  # compile + first run
        row["first_call_s"] = time.perf_counter() - t0
        if mode == "fwd":  # every configuration is checked, not only the default
          row.update(errors(out))
        med, best = time_fn(run, args, reps=reps)
        row.update(ms=med, ms_min=best, floor_ms=floor / PEAK_BYTES * 1e3,
                   share_of_floor=floor / PEAK_BYTES * 1e3 / med,
                   wall_s=time.perf_counter() - t0)
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(json.dumps(row), flush=True)
      rows.append(row)
  for row in rows:  # ratio: assoc time / this time (speed-up over the associative scan)
    assoc = [r for r in rows if r["impl"] == "associative" and r["mode"] == row["mode"]
             and "ms" in r]
    if assoc and "ms" in row:
      row["speedup_vs_assoc"] = assoc[0]["ms"] / row["ms"]
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--sweep", action="store_true")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--configs", default="", help="JSON list of kernel kwargs to sweep")
  ap.add_argument("--shapes", default="", help="JSON list of [B,T,D,N]")
  ap.add_argument("--interpret", action="store_true", help="CPU smoke test (tiny shapes)")
  ap.add_argument("--budget_s", type=float, default=420.0,
                  help="start no new measurement after this many seconds")
  args = ap.parse_args()
  print(jax.__version__, jax.devices(), flush=True)
  _BUDGET[0] = args.budget_s
  dtype = jnp.dtype(args.dtype)
  key = jax.random.PRNGKey(0)
  result = {"jax": jax.__version__, "device": str(jax.devices()[0]), "checks": {}, "rows": []}
  os.makedirs(args.out, exist_ok=True)
  out_path = os.path.join(args.out, "kernels_scan.json")

  def save():
    with open(out_path, "w") as f:
      json.dump(result, f, indent=1)

  kernel_kw = {"interpret": True} if args.interpret else {}
  check_shape = (2, 40, 24, 4) if args.interpret else (2, 1000, 256, 16)
  for dt_name in ("float32", "bfloat16"):
    try:
      result["checks"][dt_name] = check(kernel_kw, jnp.dtype(dt_name), key, check_shape)
    except Exception:  # pylint: disable=broad-except
      result["checks"][dt_name] = {"error": traceback.format_exc()[-2000:]}
    print("check", dt_name, json.dumps(result["checks"][dt_name]), flush=True)
  save()
  shapes = [tuple(s) for s in json.loads(args.shapes)] if args.shapes else list(SHAPES)
  reps = 10 if args.quick else 30
  if args.sweep:
    configs = json.loads(args.configs) if args.configs else [
        # The default (block_d 32 / 1 warp, 8-step forward bodies, prefetch in both passes) and
        # its neighbours: no backward prefetch, half-warp programs, and last 16-step forward
        # bodies with prefetch (their Triton compile takes ~70 s on the H200).
        {}, {"bwd_prefetch": 0}, {"block_d": 16, "num_warps": 1}, {"fwd_sub_chunk": 16},
    ]
    sweep = []
    for kw in configs:
      kw = {**kw, **({"interpret": True} if args.interpret else {})}
      fn = lambda kw=kw, **a: selective_scan_pallas(
          **{("A" if k == "a" else k): v for k, v in a.items()}, **kw)
      t0 = time.perf_counter()
      rows = bench_shape(shapes[0], dtype, [(f"pallas {json.dumps(kw)}", fn)], key, reps=10)
      for r in rows:
        r["config"] = kw
        r["wall_s"] = time.perf_counter() - t0
      sweep += rows
      result["sweep"] = sweep
      save()
    ok = [r for r in sweep if r["mode"] == "fwd+bwd" and "ms" in r]
    if ok:
      kernel_kw = min(ok, key=lambda r: r["ms"])["config"]
    print("best config", kernel_kw, flush=True)
  result["kernel_kw"] = kernel_kw
  ours = lambda **a: selective_scan_pallas(
      **{("A" if k == "a" else k): v for k, v in a.items()}, **kernel_kw)
  for shape in shapes:
    result["rows"] += bench_shape(shape, dtype, [("pallas", ours),
                                                 ("associative", associative_scan)], key, reps)
    save()
  print("\n| shape (B,T,D,N) | dtype | impl | mode | ms | speed-up vs assoc | floor ms | "
        "share of byte floor | y err vs float32 |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in result.get("sweep", []) + result["rows"]:
    if "ms" in r:
      err = f"{r['err_y']:.1e}" if "err_y" in r else ""
      print(f"| {tuple(r['shape'])} | {r['dtype']} | {r['impl']} | {r['mode']} | {r['ms']:.3f} | "
            f"{r.get('speedup_vs_assoc', float('nan')):.2f} | {r['floor_ms']:.3f} | "
            f"{r['share_of_floor']:.2f} | {err} |")
    else:
      print(f"| {tuple(r['shape'])} | {r['dtype']} | {r['impl']} | {r['mode']} | "
            f"{r.get('error', '')[:80]} | | | | |")


if __name__ == "__main__":
  main()
