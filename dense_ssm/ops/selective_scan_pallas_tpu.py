"""TPU (Mosaic) kernels of the Pallas selective scan; see selective_scan_pallas.py.

Grid (B, D / block_d, T / chunk), the chunk axis sequential ("arbitrary"); one chunk per grid step,
fully unrolled; blocks are loaded into VMEM values once and rows sliced statically; the state is an
[N, block_d] value carried across chunks in VMEM scratch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dense_ssm.ops import selective_scan_pallas_steps as st


def _eye(n):
  return (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
          == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)).astype(st.F32)


def _params(cfg, r):
  a_nat = r["A"][...].astype(st.F32)
  p = {"a_nat": a_nat, "a_exp": a_nat}
  for key, name in (("d", "dskip"), ("bias", "bias")):
    if name in r:
      p[key] = r[name][...].astype(st.F32)
  return p


def _getter(cfg, blocks, k, offset):
  """Step i of the body at `offset` in the current chunk (static slices).

  Columns (b, c) are turned from a [1, N] row into an [N, 1] column with an
  identity mask and a lane reduction.
  """
  eye = _eye(blocks["b"].shape[1])

  def get(name, i):
    i = offset + i
    if name == "valid":
      return k * cfg.chunk + i < cfg.seq_len
    row = blocks[name][i:i + 1, :]
    if name in ("b", "c"):
      return jnp.sum(eye * row, axis=1, keepdims=True)
    return row

  return get


def _load_blocks(r, names):
  return {n: r[n][...].astype(st.F32) for n in names if n in r}


def fwd_kernel(cfg, in_names, out_names, *refs):
  r = dict(zip(in_names + out_names + ["h_scr", "y_scr"], refs))
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    if cfg.has_h0:
      r["h_scr"][...] = r["h0"][...].astype(st.F32)
    else:
      r["h_scr"][...] = jnp.zeros(r["h_scr"].shape, st.F32)

  h = r["h_scr"][...]
  if "ckpt" in r:
    r["ckpt"][...] = h
  blocks = _load_blocks(r, ("x", "dt", "b", "c", "z", "keep"))
  p = _params(cfg, r)
  for i0 in range(0, cfg.chunk, cfg.sub):
    h, ys = st.forward_steps(cfg, _getter(cfg, blocks, k, i0), h, p, cfg.sub)
    for i, y in enumerate(ys):
      r["y_scr"][i0 + i:i0 + i + 1, :] = y
  r["h_scr"][...] = h
  r["y"][...] = r["y_scr"][...].astype(r["y"].dtype)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    r["hT"][...] = h


_BWD_ROWS = ("dx", "ddt", "dz", "db", "dc")


def bwd_kernel(cfg, in_names, out_names, *refs):
  scr_names = ["g_scr"] + [n + "_scr" for n in _BWD_ROWS]
  r = dict(zip(in_names + out_names + scr_names, refs))
  kk = pl.program_id(2)
  n_chunks = pl.num_programs(2)
  k = n_chunks - 1 - kk

  @pl.when(kk == 0)
  def _():
    r["g_scr"][...] = r["dhT"][...].astype(st.F32)
    for name in ("dA", "dD", "dbias"):
      if name in r:
        r[name][...] = jnp.zeros(r[name].shape, st.F32)

  blocks = _load_blocks(r, ("x", "dt", "b", "c", "z", "keep", "dy"))
  p = _params(cfg, r)
  eye = _eye(blocks["b"].shape[1])
  acc = {n: r[n][...] for n in ("dD", "dbias") if n in r}

  def finish_at(i0):
    def finish(i, step, prods):  # per-step reductions; rows to VMEM scratch
      i = i0 + i
      red = {key: st.sum_n(cfg, val) for key, val in prods.items()}
      valid = k * cfg.chunk + i < cfg.seq_len if cfg.masked else None
      dx, ddt, dz, dd_term, db_term = st.grad_outputs(cfg, p, step, valid, red)
      sum_d_row = lambda s: jnp.sum(eye * jnp.sum(s, axis=1, keepdims=True), axis=0,
                                    keepdims=True)  # [N, bd] -> [N, 1] -> [1, N]
      outs = {"dx": dx, "ddt": ddt, "dz": dz, "dc": sum_d_row(prods["dc"]),
              "db": sum_d_row(prods["db"])}
      for name, val in outs.items():
        if val is not None:
          r[name + "_scr"][i:i + 1, :] = val
      if cfg.has_d:
        acc["dD"] = acc["dD"] + dd_term
      if cfg.has_bias:
        acc["dbias"] = acc["dbias"] + db_term
    return finish

  subs, h = [], r["ckpt"][...]
  for i0 in range(0, cfg.chunk, cfg.sub):  # pass 1: states at sub-chunk starts
    subs.append(h)
    h = st.advance(cfg, _getter(cfg, blocks, k, i0), h, p, cfg.sub)
  g, d_a = r["g_scr"][...], r["dA"][...]
  for q in reversed(range(len(subs))):  # pass 2: reverse scan, one sub-chunk at a time
    i0 = q * cfg.sub
    g, d_a = st.backward_steps(cfg, _getter(cfg, blocks, k, i0), subs[q], g, d_a, p,
                             cfg.sub, finish_at(i0))
  r["g_scr"][...] = g
  r["dA"][...] = d_a
  for name, val in acc.items():
    r[name][...] = val
  for name in _BWD_ROWS:
    if name in r:
      r[name][...] = r[name + "_scr"][...].astype(r[name].dtype)

  @pl.when(kk == n_chunks - 1)
  def _():
    r["dh0"][...] = g
