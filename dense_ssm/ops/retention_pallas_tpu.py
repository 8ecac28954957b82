"""TPU (Pallas Mosaic) kernels for chunked retention; algebra in retention_pallas.py.

Grid (B, H, [V/BV,] N): the chunk axis is last and "arbitrary" (sequential), the state of one
(batch, head) lives in a float32 VMEM scratch across it; the other axes are "parallel".

  forward  grid (B, H, V/BV, N)   blocks q,k (C,K), v,o (C,BV), state (K,BV)    in order
  dq       grid (B, H, N)         blocks q,k (C,K), v,do (C,V), state (K,V)     in order
  dk, dv   grid (B, H, N)         blocks q,k (C,K), v,do (C,V), dS (K,V)        reverse order

q/k/v are read in place from the [B, T, H*D] view of [B,T,H,D] (a free reshape): a block is C
tokens by one head's D lanes, so D must be a multiple of 128 (heads are padded up to that outside).
Per-chunk gates arrive as one float32 [8, C] tile (rows: cumulative log-decay, log fq, log fk,
segment index, chunk decay); its transpose gives the column forms. The backward keeps all of V in
one block so dq and dk need no partial sums; a [384, 1536] float32 state is 2.4 MB of VMEM.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dense_ssm.ops import retention_pallas as rp

_LANES = 128
_MAX_BLOCK_V = 512


def padded_head_dims(dk, dv):
  pad = lambda n: -(-n // _LANES) * _LANES
  return pad(dk), pad(dv)


def _gate_tile(gates):
  """[B|1,H,N,8,C] float32: rows cum, log fq, log fk, segment index, chunk decay, 0, 0, 0."""
  b, h, n = gates.dec.shape
  t = gates.cum.shape[-1]
  c = t // n
  split = lambda x: x.reshape(b, h, n, c)
  seg = (jnp.zeros((b, h, n, c), jnp.float32) if gates.seg is None
         else jnp.broadcast_to(gates.seg.reshape(b, 1, n, c), (b, h, n, c)))
  dec = jnp.broadcast_to(gates.dec[..., None], (b, h, n, c))
  zeros = jnp.zeros((b, h, n, c), jnp.float32)
  rows = [split(gates.cum), split(gates.log_fq), split(gates.log_fk), seg, dec, zeros, zeros, zeros]
  return jnp.stack(rows, axis=3)


def _unpack_gates(gate_ref, has_seg):
  """D [C,C], fq [C,1], fk [C,1], dec [1,1] from the [8,C] gate tile."""
  rows = gate_ref[...]
  cols = rows.T
  if has_seg:
    d = rp.decay_matrix(cols[:, 0:1], rows[0:1, :], cols[:, 3:4], rows[3:4, :])
  else:
    d = rp.decay_matrix(cols[:, 0:1], rows[0:1, :])
  return d, jnp.exp(cols[:, 1:2]), jnp.exp(cols[:, 2:3]), rows[4:5, 0:1]


def _vmem_limit(nbytes):
  """Raise the scoped VMEM limit only for big tiles (default limits are 16-32 MiB)."""
  return None if nbytes < (12 << 20) else min(2 * nbytes, 100 << 20)


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, has_seg, has_h0, n_chunks):
  q_ref, k_ref, v_ref, gate_ref = refs[:4]
  h0_ref = refs[4] if has_h0 else None
  o_ref, ht_ref, s_scr = refs[4 + int(has_h0):]
  ci = pl.program_id(3)

  @pl.when(ci == 0)
  def _():
    s_scr[...] = h0_ref[...] if has_h0 else jnp.zeros(s_scr.shape, jnp.float32)

  d, fq, fk, dec = _unpack_gates(gate_ref, has_seg)
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  s = s_scr[...]
  scores = rp.mm(q, k, tb=True) * d
  o = rp.mm(scores.astype(v.dtype), v) + fq * rp.mm(q, s.astype(q.dtype))
  o_ref[...] = o.astype(o_ref.dtype)
  s = dec * s + rp.mm(k, (v * fk).astype(v.dtype), ta=True)
  s_scr[...] = s

  @pl.when(ci == n_chunks - 1)
  def _():
    ht_ref[...] = s


def _dq_kernel(*refs, has_seg, has_h0):
  q_ref, k_ref, v_ref, do_ref, gate_ref = refs[:5]
  h0_ref = refs[5] if has_h0 else None
  dq_ref, qdq_ref, s_scr = refs[5 + int(has_h0):]

  @pl.when(pl.program_id(2) == 0)
  def _():
    s_scr[...] = h0_ref[...] if has_h0 else jnp.zeros(s_scr.shape, jnp.float32)

  d, fq, fk, dec = _unpack_gates(gate_ref, has_seg)
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  s = s_scr[...]
  dp = rp.mm(do, v, tb=True) * d
  dq = rp.mm(dp.astype(k.dtype), k) + fq * rp.mm(do, s.astype(do.dtype), tb=True)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  qdq_ref[...] = jnp.sum(q.astype(jnp.float32) * dq, axis=1, keepdims=True)
  s_scr[...] = dec * s + rp.mm((k * fk).astype(k.dtype), v, ta=True)


def _dkdv_kernel(*refs, has_seg, has_h0, n_chunks):
  q_ref, k_ref, v_ref, do_ref, gate_ref, dht_ref = refs[:6]
  dk_ref, dv_ref, kdk_ref = refs[6:9]
  dh0_ref = refs[9] if has_h0 else None
  ds_scr = refs[-1]
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    ds_scr[...] = dht_ref[...]

  d, fq, fk, dec = _unpack_gates(gate_ref, has_seg)
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  ds = ds_scr[...]
  dp = rp.mm(do, v, tb=True) * d
  dk = rp.mm(dp.astype(q.dtype), q, ta=True) + fk * rp.mm(v, ds.astype(v.dtype), tb=True)
  scores = rp.mm(q, k, tb=True) * d
  dv = rp.mm(scores.astype(do.dtype), do, ta=True) + fk * rp.mm(k, ds.astype(k.dtype))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  kdk_ref[...] = jnp.sum(k.astype(jnp.float32) * dk, axis=1, keepdims=True)
  ds = dec * ds + rp.mm((q * fq).astype(q.dtype), do, ta=True)
  ds_scr[...] = ds
  if has_h0:
    @pl.when(step == n_chunks - 1)
    def _():
      dh0_ref[...] = ds


# ----------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------


def _flat(x):
  b, t, h, d = x.shape
  return x.reshape(b, t, h * d)


def _block_v(dv):
  bv = min(dv, _MAX_BLOCK_V)
  while dv % bv:
    bv -= _LANES
  return bv


def forward(q, k, v, gates, h0, cfg):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = cfg.chunk
  n = t // c
  bv = _block_v(dv)
  nv = dv // bv
  has_seg, has_h0 = gates.seg is not None, h0 is not None
  qk_spec = pl.BlockSpec((None, c, dk), lambda bi, hi, vi, ci: (bi, ci, hi))
  v_spec = pl.BlockSpec((None, c, bv), lambda bi, hi, vi, ci: (bi, ci, hi * nv + vi))
  gb = gates.dec.shape[0] > 1  # gates per sequence, or shared by the batch
  gate_spec = pl.BlockSpec((None, None, None, 8, c),
                           lambda bi, hi, vi, ci: (bi if gb else 0, hi, ci, 0, 0))
  state_spec = pl.BlockSpec((None, None, dk, bv), lambda bi, hi, vi, ci: (bi, hi, 0, vi))
  in_specs = [qk_spec, qk_spec, v_spec, gate_spec] + ([state_spec] if has_h0 else [])
  args = [_flat(q), _flat(k), _flat(v), _gate_tile(gates)] + ([h0] if has_h0 else [])
  item = q.dtype.itemsize
  vmem = 2 * (2 * c * dk * item + 2 * c * bv * item + 8 * c * 4) + 3 * dk * bv * 4 + 6 * c * c * 4
  o, ht = pl.pallas_call(
      functools.partial(_fwd_kernel, has_seg=has_seg, has_h0=has_h0, n_chunks=n),
      grid=(b, h, nv, n),
      in_specs=in_specs,
      out_specs=[v_spec, state_spec],
      out_shape=[rp.out_struct((b, t, h * dv), v.dtype, q),
                 rp.out_struct((b, h, dk, dv), jnp.float32, q)],
      scratch_shapes=[pltpu.VMEM((dk, bv), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=_vmem_limit(vmem)),
      interpret=cfg.interpret, name="retention_fwd")(*args)
  return o.reshape(b, t, h, dv), ht


def backward(q, k, v, do, gates, h0, dht, cfg):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = cfg.chunk
  n = t // c
  has_seg, has_h0 = gates.seg is not None, h0 is not None
  gate_tile = _gate_tile(gates)
  item = q.dtype.itemsize
  vmem = (2 * (4 * c * dk * item + 4 * c * dv * item + 8 * c * 4) + 4 * dk * dv * 4
          + 8 * c * max(c, dv) * 4)
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=_vmem_limit(vmem))
  flat = [_flat(q), _flat(k), _flat(v), _flat(do)]
  state_spec = pl.BlockSpec((None, None, dk, dv), lambda bi, hi, ci: (bi, hi, 0, 0))

  gb = gates.dec.shape[0] > 1

  def specs(chunk_of):
    qk = pl.BlockSpec((None, c, dk), lambda bi, hi, ci: (bi, chunk_of(ci), hi))
    vo = pl.BlockSpec((None, c, dv), lambda bi, hi, ci: (bi, chunk_of(ci), hi))
    gate = pl.BlockSpec((None, None, None, 8, c),
                        lambda bi, hi, ci: (bi if gb else 0, hi, chunk_of(ci), 0, 0))
    dot = pl.BlockSpec((None, None, c, 1), lambda bi, hi, ci: (bi, hi, chunk_of(ci), 0))
    return qk, vo, gate, dot

  dot_shape = rp.out_struct((b, h, t, 1), jnp.float32, q)
  qk, vo, gate, dot = specs(lambda ci: ci)
  dq, qdq = pl.pallas_call(
      functools.partial(_dq_kernel, has_seg=has_seg, has_h0=has_h0),
      grid=(b, h, n),
      in_specs=[qk, qk, vo, vo, gate] + ([state_spec] if has_h0 else []),
      out_specs=[qk, dot],
      out_shape=[rp.out_struct((b, t, h * dk), q.dtype, q), dot_shape],
      scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      compiler_params=params, interpret=cfg.interpret, name="retention_bwd_dq",
  )(*flat, gate_tile, *([h0] if has_h0 else []))

  qk, vo, gate, dot = specs(lambda ci: n - 1 - ci)
  out_specs = [qk, vo, dot] + ([state_spec] if has_h0 else [])
  out_shape = [rp.out_struct((b, t, h * dk), k.dtype, q),
               rp.out_struct((b, t, h * dv), v.dtype, q), dot_shape]
  out_shape += [rp.out_struct((b, h, dk, dv), jnp.float32, q)] if has_h0 else []
  outs = pl.pallas_call(
      functools.partial(_dkdv_kernel, has_seg=has_seg, has_h0=has_h0, n_chunks=n),
      grid=(b, h, n),
      in_specs=[qk, qk, vo, vo, gate, state_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      compiler_params=params, interpret=cfg.interpret, name="retention_bwd_dkdv",
  )(*flat, gate_tile, dht)
  dk_, dv_, kdk = outs[:3]
  dh0 = outs[3] if has_h0 else None
  return (dq.reshape(q.shape), dk_.reshape(k.shape), dv_.reshape(v.shape), dh0,
          qdq[..., 0], kdk[..., 0])
