"""GPU (Triton lowering) kernels of the Pallas selective scan; see selective_scan_pallas.py.

Grid (B, D / block_d): each program walks all of time in loops whose bodies are `fwd_sub` / `sub`
unrolled steps (small bodies keep the Triton compile fast; a body's loads are issued before its
stores, and with `prefetch` / `bwd_prefetch` one body ahead). The state is a `Cols` of N
per-channel vectors; HBM state arrays are [..., N, block_d] blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dense_ssm.ops import selective_scan_pallas_steps as st


def _load_state(ref, *idx):
  """[N, bd] block -> Cols (one load, split in registers: few memory ops keep
  Triton's coalescing pass, quadratic in them, fast)."""
  tile = ref[idx + (slice(None), slice(None))].astype(st.F32)
  return st.Cols(v.reshape(v.shape[1:]) for v in jnp.split(tile, tile.shape[0], axis=0))


def _stack_last(vecs):
  """Stacks 2^k arrays along a new last axis with 2-way stacks (Triton joins)."""
  while len(vecs) > 1:  # the last-added axis is the low bit of the index
    half = len(vecs) // 2
    vecs = [jnp.stack([vecs[j], vecs[j + half]], axis=-1) for j in range(half)]
  return vecs[0].reshape(vecs[0].shape[:1] + (-1,))


def _store_state(ref, state, *idx):
  ref[idx + (slice(None), slice(None))] = _stack_last(list(state)).T.astype(ref.dtype)


def _params(cfg, r):
  a_nat = _load_state(r["A"])
  p = {"a_nat": a_nat, "a_exp": a_nat * st.LOG2E}
  for key, name in (("d", "dskip"), ("bias", "bias")):
    if name in r:
      p[key] = r[name][...].astype(st.F32)
  return p


def _getter(cfg, r, base, pre=None):
  """Step i of the body starting at time `base`, loaded from HBM (or taken from
  `pre`, rows loaded earlier by _fetch)."""

  def get(name, i):
    t = base + i
    if name == "valid":
      return t < cfg.seq_len
    if pre and name in pre:
      return pre[name][i].astype(st.F32)
    if name == "keep":
      return r["keep"][t]
    if name in ("b", "c"):  # one vector load, split into N scalars in registers
      row = r[name][t, :].astype(st.F32)
      return st.Cols(v.reshape(()) for v in jnp.split(row, row.shape[0]))
    return r[name][t, :].astype(st.F32)

  return get


def _fetch(r, base, steps, names, on):
  """Rows base .. base+steps-1 of `names` (raw dtype) for a getter's `pre`; {} when off.

  Issued one loop body ahead and carried in registers, so their memory latency
  overlaps the current body's math (the walk is latency-bound)."""
  if not on:
    return {}
  return {name: [r[name][base + i, :] for i in range(steps)] for name in names if name in r}


def _stack_sum_d(prods):
  """[S x Cols of N [bd] vectors] -> [S, N] sums over bd, in one (batched) reduction."""
  stacked = _stack_last([v for pr in prods for v in pr])  # [bd, S * N], index s * N + n
  return jnp.sum(stacked, axis=0).reshape(len(prods), len(prods[0]))


def fwd_kernel(cfg, in_names, out_names, *refs):
  r = dict(zip(in_names + out_names, refs))
  p = _params(cfg, r)
  n = r["A"].shape[0]
  zeros = jnp.zeros((cfg.block_d,), st.F32)
  h = _load_state(r["h0"]) if cfg.has_h0 else st.Cols([zeros] * n)
  body, t_pad = cfg.fwd_sub, r["x"].shape[0]
  # With cfg.prefetch the loop carries the next body's x, dt, z rows (the HBM
  # reads; b and c rows are shared by all channel blocks and come from L2), so
  # their latency overlaps this body's math instead of starting each body.
  fetch = lambda base: _fetch(r, base, body, ("x", "dt", "z"), cfg.prefetch)

  def steps(k, q, carry):
    h, pre = carry
    base = k * cfg.chunk + q * body
    nxt = fetch(jnp.minimum(base + body, t_pad - body))  # the last body re-reads itself
    h, ys = st.forward_steps(cfg, _getter(cfg, r, base, pre), h, p, body)
    for i, y in enumerate(ys):
      r["y"][base + i, :] = y.astype(r["y"].dtype)
    return h, nxt

  def chunk(k, carry):
    if "ckpt" in r:
      _store_state(r["ckpt"], carry[0], k)
    return jax.lax.fori_loop(0, cfg.chunk // body, functools.partial(steps, k), carry)

  h, _ = jax.lax.fori_loop(0, t_pad // cfg.chunk, chunk, (h, fetch(0)))
  _store_state(r["hT"], h)


def bwd_kernel(cfg, in_names, out_names, *refs):
  r = dict(zip(in_names + out_names, refs))
  p = _params(cfg, r)
  sub, per_chunk = cfg.sub, cfg.chunk // cfg.sub
  n_chunks = r["x"].shape[0] // cfg.chunk
  scr = r["sub_scr"]  # this program's states at sub-chunk starts (stays in L2)
  zeros = jnp.zeros((cfg.block_d,), st.F32)

  def barrier():
    if not cfg.interpret:
      from jax.experimental.pallas import triton as pltr  # pylint: disable=g-import-not-at-top
      pltr.debug_barrier()

  # With cfg.bwd_prefetch both passes load the next sub-chunk's rows one body
  # ahead: pass 1 (forward in time) x and dt, pass 2 (backward in time, carried
  # across chunks: the next chunk's pass 2 starts where this one's ends) x, dt,
  # dy and z.
  t_pad = r["x"].shape[0]
  fetch1 = lambda base: _fetch(r, base, sub, ("x", "dt"), cfg.bwd_prefetch)
  fetch2 = lambda base: _fetch(r, base, sub, ("x", "dt", "dy", "z"), cfg.bwd_prefetch)

  def sub_chunk(k, qq, carry):
    q = per_chunk - 1 - qq
    base = k * cfg.chunk + q * sub
    g, d_a, d_d, d_bias, pre = carry
    nxt = fetch2(jnp.maximum(base - sub, 0))  # the first sub-chunk re-reads itself
    acc = {"d": d_d, "bias": d_bias}
    pending = []

    def finish(i, step, prods):
      t = base + i
      red = {key: st.sum_n(cfg, prods[key]) for key in ("yc", "gb", "wa") if key in prods}
      dx, ddt, dz, dd_term, db_term = st.grad_outputs(
          cfg, p, step, t < cfg.seq_len if cfg.masked else None, red)
      r["dx"][t, :] = dx.astype(r["dx"].dtype)
      r["ddt"][t, :] = ddt.astype(r["ddt"].dtype)
      if cfg.has_z:
        r["dz"][t, :] = dz.astype(r["dz"].dtype)
      acc["d"] = acc["d"] + dd_term
      acc["bias"] = acc["bias"] + db_term
      pending.insert(0, prods)
      if len(pending) == cfg.red_batch or i == 0:  # batched cross-thread sums over d
        for name in ("dc", "db"):
          r[name][pl.ds(t, len(pending)), :] = _stack_sum_d([pr[name] for pr in pending])
        pending.clear()

    g, d_a = st.backward_steps(cfg, _getter(cfg, r, base, pre), _load_state(scr, q), g, d_a,
                             p, sub, finish)
    return g, d_a, acc["d"], acc["bias"], nxt

  def chunk(kk, carry):
    k = n_chunks - 1 - kk

    def save(q, carry1):
      h, pre = carry1
      base = k * cfg.chunk + q * sub
      nxt = fetch1(jnp.minimum(base + sub, t_pad - sub))
      _store_state(scr, h, q)
      return st.advance(cfg, _getter(cfg, r, base, pre), h, p, sub), nxt

    jax.lax.fori_loop(0, per_chunk, save, (_load_state(r["ckpt"], k), fetch1(k * cfg.chunk)))
    barrier()  # sub-chunk states written by all threads before any reads them
    carry = jax.lax.fori_loop(0, per_chunk, functools.partial(sub_chunk, k), carry)
    barrier()  # ... and read before the next chunk overwrites them
    return carry

  n = r["A"].shape[0]
  init = (_load_state(r["dhT"]), st.Cols([zeros] * n), zeros, zeros, fetch2(t_pad - sub))
  g, d_a, d_d, d_bias, _ = jax.lax.fori_loop(0, n_chunks, chunk, init)
  _store_state(r["dh0"], g)
  _store_state(r["dA"], d_a)
  if cfg.has_d:
    r["dD"][...] = d_d
  if cfg.has_bias:
    r["dbias"][...] = d_bias
