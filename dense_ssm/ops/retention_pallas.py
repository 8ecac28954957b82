"""Fused chunked retention as Pallas kernels (TPU: Mosaic, GPU: Triton lowering), with a custom VJP.

Computes the ops-contract retention core (plain, unnormalised, float32 state):

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,    o_t = q_t S_t,    returns (o, S_{T-1})

with g_t a per-head constant ([H]) or a per-token log-decay ([B,T,H]), an optional initial state and
`segment_ids` resets. Time is cut into chunks of C tokens. With b_t the cumulative log-decay inside
the chunk (b_t = sum of g over the chunk's tokens up to t):

    D[t,s] = exp(b_t - b_s)         if s <= t and t, s are in one document, else 0
    fq_t   = exp(b_t)               if no document starts in the chunk up to t, else 0
    fk_s   = exp(b_{C-1} - b_s)     if no document starts in the chunk after s, else 0
    dec    = fq_{C-1}               (decay of the incoming state over the whole chunk)

    forward:   o  = ((q k^T) * D) v + fq * (q S)               S  <- dec S + k^T (fk * v)
    backward:  dq = ((do v^T) * D) k + fq * (do S^T)          (chunks in order, S recomputed)
               dk = ((do v^T) * D)^T q + fk * (v dS^T)        (chunks in reverse order,
               dv = ((q k^T) * D)^T do + fk * (k dS)           dS starts at d final_state)
               dS <- dec dS + q^T (fq * do)                   (dS at the end = d initial_state)
               d g_r = sum_{t >= r} (q_t.dq_t - k_t.dk_t) + <dS_T, S_T>,  0 where a document starts.

All exponents are <= 0, so every factor is in [0, 1] for any decay strength. Matrix products take
the input dtype (bf16 or float32) and accumulate in float32; the state is float32 (cast to the input
dtype only as a matmul operand, as the Triton kernels of flash-linear-attention do).

The kernels live in retention_pallas_tpu.py (grid over chunks marked "arbitrary", state in a VMEM
scratch) and retention_pallas_gpu.py (one program per state tile, loop over chunks, state in
registers). This file holds the public function, the float32 gate precomputation in XLA, the
custom VJP and the chunk algebra shared by both kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dense_ssm.ops import dispatch

BACKENDS = ("tpu", "gpu")
_INPUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Chunk algebra shared by the TPU and GPU kernels (operates on loaded values).
# ----------------------------------------------------------------------------------------------


def decay_matrix(b_col, b_row, seg_col=None, seg_row=None):
  """D[t,s] = exp(b_t - b_s) for s <= t in one segment, else 0. b_col [C,1], b_row [1,C] f32."""
  c = b_col.shape[0]
  t_idx = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  s_idx = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  keep = s_idx <= t_idx
  if seg_col is not None:
    keep = keep & (seg_col == seg_row)
  return jnp.exp(jnp.where(keep, b_col - b_row, -jnp.inf))


def mm(a, b, *, ta=False, tb=False):
  """a @ b with optional transposes, float32 accumulation, exact float32 for float32 operands."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def out_struct(shape, dtype, like):
  """ShapeDtypeStruct for a kernel output that varies over the same manual mesh axes as `like`,
  so that the kernels run inside `jax.shard_map` with check_vma=True (the attribute's name has
  changed across jax versions; without one, a plain struct)."""
  aval = jax.typeof(like)
  for attr, kwarg in (("mat", "manual_axis_type"), ("vma", "vma")):
    value = getattr(aval, attr, None)
    if value is not None:
      try:
        return jax.ShapeDtypeStruct(shape, dtype, **{kwarg: value})
      except TypeError:
        pass
  return jax.ShapeDtypeStruct(shape, dtype)


def _varying_axes(x):
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  axes = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
  return frozenset(axes or ())


def _match_varying(ct, primal):
  """Sum a cotangent over the manual mesh axes its primal does not vary over (a replicated
  log_decay or initial state inside shard_map gets the sum of the per-shard gradients)."""
  extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
  return lax.psum(ct, extra) if extra else ct


# ----------------------------------------------------------------------------------------------
# Gates: per-token float32 quantities computed once in XLA (cheap: [B,H,T]).
# ----------------------------------------------------------------------------------------------


class Gates(NamedTuple):
  """Per-chunk decay data over the padded time axis (N chunks of C). Exponents are <= 0 or -inf.

  The leading axis is B, or 1 when the decay is a per-head constant and nothing is packed (then
  every sequence shares the gates and kernels index them by head only).
  """
  cum: jax.Array        # [B|1,H,T] b_t, cumulative log-decay inside the chunk
  log_fq: jax.Array     # [B|1,H,T] log fq_t  (-inf after a document start in the chunk)
  log_fk: jax.Array     # [B|1,H,T] log fk_s  (-inf before a document start in the chunk)
  dec: jax.Array        # [B|1,H,N] dec = fq_{C-1}
  seg: jax.Array | None  # [B,T] float32 segment index (monotone), None when unpacked


def segment_positions(segment_ids, b, t):
  """[B,T] int32 running count of document starts (0 for the first document), or None."""
  if segment_ids is None:
    return None
  starts = jnp.concatenate(
      [jnp.zeros((b, 1), jnp.int32), (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)],
      axis=1)
  return jnp.cumsum(starts, axis=1)


def compute_gates(log_decay, segpos_BxT, chunk, t_pad, t_valid):
  """Gates from log_decay [H] (padded tokens get decay 1) or [B,T_pad,H] (already padded)."""
  n = t_pad // chunk
  if log_decay.ndim == 1:
    # Closed form g_h * (valid tokens so far in the chunk): no cumsum over a broadcast constant,
    # which XLA would otherwise constant-fold slowly for a constant log_decay.
    pos = jnp.arange(chunk, dtype=jnp.float32)[None, :]
    left = (t_valid - chunk * jnp.arange(n, dtype=jnp.float32))[:, None]
    count = jnp.clip(jnp.minimum(pos + 1.0, left), 0.0, None)
    cum = log_decay.astype(jnp.float32)[None, :, None, None] * count     # [1,H,N,C]
  else:
    b, _, h = log_decay.shape
    cum = jnp.cumsum(jnp.moveaxis(log_decay, 2, 1).reshape(b, h, n, chunk), axis=-1)
  if segpos_BxT is None:
    log_fq, log_fk, seg = cum, cum[..., -1:] - cum, None
  else:
    b = segpos_BxT.shape[0]
    pos = segpos_BxT.reshape(b, 1, n, chunk)
    prev = jnp.concatenate([pos[:, :, :1, :1], pos[:, :, :-1, -1:]], axis=2)  # token before chunk
    cum = jnp.broadcast_to(cum, (b,) + cum.shape[1:])
    log_fq = jnp.where(pos == prev, cum, -jnp.inf)
    log_fk = jnp.where(pos == pos[..., -1:], cum[..., -1:] - cum, -jnp.inf)
    seg = segpos_BxT.astype(jnp.float32)
  dec = jnp.exp(log_fq[..., -1])
  flat = lambda x: x.reshape(x.shape[0], x.shape[1], t_pad)
  return Gates(flat(cum), flat(log_fq), flat(log_fk), dec, seg)


# ----------------------------------------------------------------------------------------------
# Custom VJP around the backend kernels. Shapes here are already padded for the backend.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  backend: str
  chunk: int
  t_valid: int   # tokens before time padding
  interpret: bool
  tuning: tuple = ()  # backend-specific (name, value) overrides, for benchmarks


def _backend_module(backend):
  # pylint: disable=g-import-not-at-top
  if backend == "tpu":
    from dense_ssm.ops import retention_pallas_tpu as mod
  else:
    from dense_ssm.ops import retention_pallas_gpu as mod
  return mod


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _retention_core(cfg, q, k, v, g, h0, segpos):
  o, h_t = _core_fwd(cfg, q, k, v, g, h0, segpos)[0]
  return o, h_t


def _core_fwd(cfg, q, k, v, g, h0, segpos):
  gates = compute_gates(g, segpos, cfg.chunk, q.shape[1], cfg.t_valid)
  o, h_t = _backend_module(cfg.backend).forward(q, k, v, gates, h0, cfg)
  return (o, h_t), (q, k, v, g, h0, segpos, h_t)


def _core_bwd(cfg, res, cts):
  q, k, v, g, h0, segpos, h_t = res
  do, dh_t = cts
  gates = compute_gates(g, segpos, cfg.chunk, q.shape[1], cfg.t_valid)
  dq, dk, dv, dh0, qdq, kdk = _backend_module(cfg.backend).backward(
      q, k, v, do.astype(v.dtype), gates, h0, dh_t.astype(jnp.float32), cfg)
  # d g: reverse cumulative sum of d b_t = q_t.dq_t - k_t.dk_t (+ <dS_T, S_T> at the last token).
  db_BxHxT = qdq - kdk
  db_BxHxT = db_BxHxT.at[:, :, -1].add(jnp.sum(dh_t * h_t, axis=(2, 3)))
  dg_BxHxT = jnp.flip(jnp.cumsum(jnp.flip(db_BxHxT, -1), axis=-1), -1)
  if segpos is not None:  # the decay at a document start multiplies a zeroed state
    starts = jnp.concatenate([jnp.zeros_like(segpos[:, :1]), jnp.diff(segpos, axis=1)], axis=1)
    dg_BxHxT = jnp.where(starts[:, None, :] > 0, 0.0, dg_BxHxT)
  if g.ndim == 1:  # a per-head constant: padded tokens used decay 1, not g
    dg = jnp.sum(dg_BxHxT[:, :, :cfg.t_valid], axis=(0, 2))
  else:
    dg = jnp.moveaxis(dg_BxHxT, 1, 2)
  dsegpos = None if segpos is None else jnp.zeros(segpos.shape, jax.dtypes.float0)
  dh0 = None if h0 is None else _match_varying(dh0, h0)
  return dq, dk, dv, _match_varying(dg, g), dh0, dsegpos


_retention_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, log_decay, initial_state, segment_ids, chunk_size, backend):
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"retention_pallas expects q, k [B,T,H,K] and v [B,T,H,V] with matching "
                     f"B,T,H; got q{q.shape}, k{k.shape}, v{v.shape}.")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not any(x.dtype == d for d in _INPUT_DTYPES):
      raise ValueError(f"retention_pallas: {name} has dtype {x.dtype}; use bfloat16, float16 or "
                       "float32.")
  if log_decay.shape not in ((h,), (b, t, h)):
    raise ValueError(f"log_decay must have shape [H]={(h,)} or [B,T,H]={(b, t, h)}; got "
                     f"{log_decay.shape}.")
  if initial_state is not None and initial_state.shape != (b, h, dk, dv):
    raise ValueError(f"initial_state must be [B,H,K,V]={(b, h, dk, dv)}; got "
                     f"{initial_state.shape}.")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids must be [B,T]={(b, t)}; got {segment_ids.shape}.")
  if chunk_size < 16 or chunk_size & (chunk_size - 1):
    raise ValueError(f"chunk_size must be a power of two >= 16; got {chunk_size}.")
  if backend not in BACKENDS:
    raise ValueError(f"retention_pallas backend={backend!r} is unknown; use one of {BACKENDS} "
                     "(or None to follow jax.default_backend()).")


def default_backend(interpret=False):
  """'tpu' or 'gpu' from jax.default_backend(); interpret mode on CPU runs the GPU kernels."""
  return dispatch.kernel_backend("retention_pallas", interpret, "gpu",
                                 "the XLA chunkwise form (ops.retention(impl='chunkwise'))")


def _pad_axis(x, axis, new_size):
  if x is None or x.shape[axis] == new_size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, new_size - x.shape[axis])
  return jnp.pad(x, widths)


def retention_pallas(q, k, v, log_decay, *, initial_state=None, segment_ids=None, chunk_size=64,
                     backend=None, interpret=False, _tuning=()):
  """Chunked retention `o_t = q_t S_t`, `S_t = exp(g_t) S_{t-1} + k_t^T v_t` as Pallas kernels.

  Args:
    q, k: [B,T,H,K]; v: [B,T,H,V]; bfloat16, float16 or float32 (matmuls in the widest of them,
      float32 accumulation and state).
    log_decay: [H] (constant per head) or [B,T,H] (per token), float, <= 0.
    initial_state: optional float32 [B,H,K,V] state before token 0.
    segment_ids: optional int [B,T]; the state is reset before t > 0 where the id changes.
    chunk_size: tokens per chunk (power of two >= 16); shorter sequences use a smaller chunk.
    backend: 'tpu' (Mosaic) or 'gpu' (Triton lowering); None follows jax.default_backend().
    interpret: run the kernels in the Pallas interpreter (any platform; for tests).
  Returns:
    (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32). Differentiable in q, k, v, log_decay
    and initial_state (custom VJP with its own backward kernels).
  """
  if backend is None:
    backend = default_backend(interpret)
  _check_inputs(q, k, v, log_decay, initial_state, segment_ids, chunk_size, backend)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  out_dtype = v.dtype
  q, k, v = (x.astype(dtype) for x in (q, k, v))

  chunk = min(chunk_size, max(16, 1 << max(0, (t - 1).bit_length())))
  t_pad = -(-t // chunk) * chunk
  mod = _backend_module(backend)
  dk_pad, dv_pad = mod.padded_head_dims(dk, dv)

  g = log_decay.astype(jnp.float32)
  segpos = segment_positions(segment_ids, b, t)
  # Padding: zero q/k/v, zero log-decay and the last segment, so that the state is unchanged.
  q = _pad_axis(_pad_axis(q, 1, t_pad), 3, dk_pad)
  k = _pad_axis(_pad_axis(k, 1, t_pad), 3, dk_pad)
  v = _pad_axis(_pad_axis(v, 1, t_pad), 3, dv_pad)
  g = _pad_axis(g, 1, t_pad) if g.ndim == 3 else g
  if segpos is not None and t_pad != t:
    segpos = jnp.pad(segpos, ((0, 0), (0, t_pad - t)), mode="edge")
  h0 = None
  if initial_state is not None:
    h0 = _pad_axis(_pad_axis(initial_state.astype(jnp.float32), 2, dk_pad), 3, dv_pad)

  cfg = KernelConfig(backend=backend, chunk=chunk, t_valid=t, interpret=bool(interpret),
                     tuning=tuple(_tuning))
  o, h_t = _retention_core(cfg, q, k, v, g, h0, segpos)
  return o[:, :t, :, :dv].astype(out_dtype), h_t[:, :, :dk, :dv]
