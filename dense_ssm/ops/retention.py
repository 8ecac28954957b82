"""Retention: one entry point, several implementations behind one signature.

Every implementation computes the plain (unnormalised) gated linear recurrence

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t        (float32 state of d_k x d_v per head)
    o_t = q_t S_t

with `g_t` a constant per head (RetNet: log(1 - 2^(-5-h))) or a per-token per-head log-decay,
an optional initial state, and `segment_ids` that reset the state at each document start
(t > 0 and segment_ids[t] != segment_ids[t-1]). Each returns `(o, final_state)`.

Implementations:
  "reference"  token-by-token `lax.scan` (the recurrent form; exact, slow).
  "parallel"   quadratic masked form `(q k^T * D) v` (exact, O(T^2) memory).
  "chunkwise"  chunked form: quadratic inside chunks of `chunk_size`, state carried across chunks.
               "xla" is an alias.
  "pallas"     fused Pallas kernel (dense_ssm/ops/retention_pallas.py), TPU and GPU.
               "pallas_interpret" runs it in the Pallas interpreter (any platform; for tests).
  "auto"       pallas on TPU, and on GPU for the head dims its kernels were checked at (up to the
               paper's d_k 384, d_v 1536: retention_pallas_gpu.supports); chunkwise otherwise
               (CPU, wider heads on GPU).

The original code's exact *normalised* parallel form (docs/model.md, 'Retention modes'), used by
DenseRetNet's parallel mode, is `retention_parallel_normalized`; the layer applies the closed-form
row factor otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(a):
  """At least float32 (bf16 -> f32; f64 stays f64 so float64 gradient checks are exact)."""
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))

IMPLS = ("auto", "reference", "parallel", "chunkwise", "xla", "pallas", "pallas_interpret")


def retnet_log_decay(num_heads: int) -> jax.Array:
  """log(gamma_h) with gamma_h = 1 - 2^(-5-h), h = 0..num_heads-1 (RetNet's decays)."""
  h = jnp.arange(num_heads, dtype=jnp.float32)
  return jnp.log1p(-jnp.exp2(-5.0 - h))


def _check(q, k, v, log_decay, initial_state, segment_ids):
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(
        f"retention expects q, k [B,T,H,K] and v [B,T,H,V] with matching B,T,H; got q{q.shape}, "
        f"k{k.shape}, v{v.shape}.")
  b, t, h, dk = q.shape
  if log_decay.shape not in ((h,), (b, t, h)):
    raise ValueError(
        f"log_decay must have shape [H]={(h,)} or [B,T,H]={(b, t, h)}; got {log_decay.shape}.")
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
    raise ValueError(f"initial_state must be [B,H,K,V]={(b, h, dk, v.shape[-1])}; got "
                     f"{initial_state.shape}.")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids must be [B,T]={(b, t)}; got {segment_ids.shape}.")


def _per_token_log_decay(log_decay, b, t):
  """[H] or [B,T,H] -> float32 [B,T,H]."""
  log_decay = _f32(log_decay)
  if log_decay.ndim == 1:
    log_decay = jnp.broadcast_to(log_decay, (b, t, log_decay.shape[0]))
  return log_decay


def reset_mask(segment_ids, b, t):
  """[B,T] bool: True where the state is reset before the token (a new document starts)."""
  if segment_ids is None:
    return jnp.zeros((b, t), bool)
  first = jnp.zeros((b, 1), bool)
  return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def _retention_reference(q, k, v, log_decay, initial_state, segment_ids):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  g_BxTxH = _per_token_log_decay(log_decay, b, t)
  keep_BxTxH = jnp.broadcast_to(~reset_mask(segment_ids, b, t)[..., None], (b, t, h))
  s0 = (jnp.zeros((b, h, dk, dv), jnp.promote_types(q.dtype, jnp.float32)) if initial_state is None
        else _f32(initial_state))

  def step(s_BxHxKxV, inp):
    q_t, k_t, v_t, g_t, keep_t = inp
    a = jnp.exp(g_t) * keep_t
    s_BxHxKxV = a[..., None, None] * s_BxHxKxV + jnp.einsum(
        "bhk,bhv->bhkv", _f32(k_t), _f32(v_t))
    o_t = jnp.einsum("bhk,bhkv->bhv", _f32(q_t), s_BxHxKxV)
    return s_BxHxKxV, o_t

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g_BxTxH, keep_BxTxH))
  s, o_TxBxHxV = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o_TxBxHxV, 0, 1).astype(v.dtype), s


def _same_segment(segment_ids, b, t):
  """[B,T,T] bool: token i and token j are in the same document (ones when unpacked)."""
  if segment_ids is None:
    return jnp.ones((b, t, t), bool)
  return segment_ids[:, :, None] == segment_ids[:, None, :]


def _decay_matrix(g_BxTxH, same_BxTxT):
  """D[b,h,i,j] = exp(sum_{u=j+1..i} g_u) for j <= i in one document, else 0 (float32)."""
  t = g_BxTxH.shape[1]
  cum_BxHxT = jnp.cumsum(jnp.moveaxis(g_BxTxH, 2, 1), axis=-1)
  diff = cum_BxHxT[..., :, None] - cum_BxHxT[..., None, :]
  causal = jnp.tril(jnp.ones((t, t), bool))
  mask = causal[None, None] & same_BxTxT[:, None]
  return jnp.exp(jnp.where(mask, diff, -jnp.inf)), cum_BxHxT


def _retention_parallel(q, k, v, log_decay, initial_state, segment_ids):
  b, t, h, dk = q.shape
  g_BxTxH = _per_token_log_decay(log_decay, b, t)
  same = _same_segment(segment_ids, b, t)
  d_BxHxTxT, cum_BxHxT = _decay_matrix(g_BxTxH, same)
  qf, kf, vf = (_f32(a) for a in (q, k, v))
  a_BxHxTxT = jnp.einsum("bihk,bjhk->bhij", qf, kf) * d_BxHxTxT
  o = jnp.einsum("bhij,bjhv->bihv", a_BxHxTxT, vf)
  # Final state: tokens of the last document, decayed to T-1.
  w_BxHxT = d_BxHxTxT[:, :, -1, :]
  final = jnp.einsum("bht,bthk,bthv->bhkv", w_BxHxT, kf, vf)
  if initial_state is not None:
    s0 = _f32(initial_state)
    first_doc_BxT = same[:, :, 0]  # tokens still in the first document
    w0_BxHxT = jnp.exp(cum_BxHxT) * first_doc_BxT[:, None, :]
    o = o + jnp.einsum("bthk,bhkv,bht->bthv", qf, s0, w0_BxHxT)
    final = final + s0 * w0_BxHxT[:, :, -1, None, None]
  return o.astype(v.dtype), final


def _pad_time(x, pad, mode="constant"):
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, mode=mode)


def _retention_chunkwise(q, k, v, log_decay, initial_state, segment_ids, chunk_size):
  """Chunked form. Within a chunk the quadratic form; across chunks a scan of the float32 state.

  Shapes after chunking: N chunks of C tokens. G is the cumulative log-decay inside a chunk.
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = max(1, min(chunk_size, t))
  pad = (-t) % c
  n = (t + pad) // c
  g_BxTxH = _per_token_log_decay(log_decay, b, t)
  seg_BxT = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  # Padding: zero q/k/v and zero log-decay, same segment as the last token: the state is unchanged.
  q, k, v, g_BxTxH = (_pad_time(a, pad) for a in (q, k, v, g_BxTxH))
  seg_BxT = _pad_time(seg_BxT, pad, mode="edge")
  qf, kf, vf = (_f32(a).reshape(b, n, c, h, -1) for a in (q, k, v))
  g_BxNxCxH = g_BxTxH.reshape(b, n, c, h)
  seg_BxNxC = seg_BxT.reshape(b, n, c)
  # Segment of the token before each chunk (the first chunk continues the initial state's segment).
  prev_seg_BxN = jnp.concatenate([seg_BxNxC[:, :1, 0], seg_BxNxC[:, :-1, -1]], axis=1)

  if log_decay.ndim == 1:
    # Closed form for a constant decay per head: no cumsum over a broadcast constant (XLA would
    # constant-fold it at compile time, slowly). Padded tokens (end of the last chunk) add no decay.
    valid_N = jnp.full((n,), c).at[-1].set(c - pad)
    steps_NxC = jnp.minimum(jnp.arange(1, c + 1)[None, :], valid_N[:, None]).astype(g_BxTxH.dtype)
    cum_BxNxHxC = jnp.broadcast_to(
        _f32(log_decay)[None, :, None] * steps_NxC[:, None, :], (b, n, h, c))
  else:
    cum_BxNxHxC = jnp.cumsum(jnp.moveaxis(g_BxNxCxH, 3, 2), axis=-1)
  same_BxNxCxC = seg_BxNxC[..., :, None] == seg_BxNxC[..., None, :]
  causal = jnp.tril(jnp.ones((c, c), bool))
  mask = (causal & same_BxNxCxC)[:, :, None]  # [B,N,1,C,C]
  diff = cum_BxNxHxC[..., :, None] - cum_BxNxHxC[..., None, :]
  d_BxNxHxCxC = jnp.exp(jnp.where(mask, diff, -jnp.inf))

  # Intra-chunk output.
  scores = jnp.einsum("bnihk,bnjhk->bnhij", qf, kf) * d_BxNxHxCxC
  o_intra = jnp.einsum("bnhij,bnjhv->bnihv", scores, vf)

  # Tokens connected to the incoming state (no document start since the chunk began).
  carry_in_BxNxC = seg_BxNxC == prev_seg_BxN[..., None]
  # Each chunk's own contribution to the state at its end, and the decay of the incoming state.
  last_BxNxC = seg_BxNxC == seg_BxNxC[..., -1:]
  w_end_BxNxHxC = jnp.exp(cum_BxNxHxC[..., -1:] - cum_BxNxHxC) * last_BxNxC[:, :, None]
  kv_BxNxHxKxV = jnp.einsum("bnhc,bnchk,bnchv->bnhkv", w_end_BxNxHxC, kf, vf)
  a_BxNxH = jnp.exp(cum_BxNxHxC[..., -1]) * carry_in_BxNxC[..., -1:]

  s0 = (jnp.zeros((b, h, dk, dv), jnp.promote_types(q.dtype, jnp.float32)) if initial_state is None
        else _f32(initial_state))

  def step(s_BxHxKxV, inp):
    a_BxH, kv = inp
    return a_BxH[..., None, None] * s_BxHxKxV + kv, s_BxHxKxV

  final, s_in_NxBxHxKxV = jax.lax.scan(
      step, s0, (jnp.moveaxis(a_BxNxH, 1, 0), jnp.moveaxis(kv_BxNxHxKxV, 1, 0)))
  s_in_BxNxHxKxV = jnp.moveaxis(s_in_NxBxHxKxV, 0, 1)
  w_in_BxNxHxC = jnp.exp(cum_BxNxHxC) * carry_in_BxNxC[:, :, None]
  o_inter = jnp.einsum("bnihk,bnhkv,bnhi->bnihv", qf, s_in_BxNxHxKxV, w_in_BxNxHxC)
  o = (o_intra + o_inter).reshape(b, n * c, h, dv)[:, :t]
  return o.astype(v.dtype), final


def retention(q, k, v, log_decay, *, initial_state=None, segment_ids=None, impl="auto",
              chunk_size=64, batch_axes=None):
  """Gated retention `o_t = q_t S_t`, `S_t = exp(g_t) S_{t-1} + k_t^T v_t`; see module doc.

  Args:
    q, k: [B,T,H,K]; v: [B,T,H,V] (any float dtype; math in float32).
    log_decay: [H] (constant per head) or [B,T,H] (per token), <= 0.
    initial_state: optional [B,H,K,V] state before token 0.
    segment_ids: optional [B,T] int; state resets where the id changes.
    impl: one of IMPLS.
    chunk_size: chunk length of the chunkwise/pallas forms (any T is accepted).
    batch_axes: mesh axes sharding the batch; under a mesh the Pallas kernel then runs per batch
      shard (`jax.shard_map`), since XLA cannot partition a kernel call.
  Returns:
    (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32).
  """
  _check(q, k, v, log_decay, initial_state, segment_ids)
  if impl == "auto":
    impl = _auto_impl(q.shape[-1], v.shape[-1])
  if impl == "reference":
    return _retention_reference(q, k, v, log_decay, initial_state, segment_ids)
  if impl == "parallel":
    return _retention_parallel(q, k, v, log_decay, initial_state, segment_ids)
  if impl in ("chunkwise", "xla"):
    return _retention_chunkwise(q, k, v, log_decay, initial_state, segment_ids, chunk_size)
  if impl in ("pallas", "pallas_interpret"):
    from dense_ssm.ops import retention_pallas  # pylint: disable=g-import-not-at-top
    from dense_ssm.ops.dispatch import batch_sharded  # pylint: disable=g-import-not-at-top

    def kernel(q, k, v, log_decay, initial_state, segment_ids):
      return retention_pallas.retention_pallas(
          q, k, v, log_decay, initial_state=initial_state, segment_ids=segment_ids,
          chunk_size=chunk_size, interpret=impl == "pallas_interpret")

    return batch_sharded(kernel, (q, k, v, log_decay, initial_state, segment_ids),
                         (True, True, True, log_decay.ndim == 3, True, True), batch_axes, 2)
  raise ValueError(f"retention impl={impl!r} is unknown; use one of {IMPLS}.")


def _auto_impl(dk: int, dv: int) -> str:
  """The Pallas kernel on TPU, and on GPU for the head dims it was checked at; else chunkwise.

  GPU: the kernels compile within the H100/H200 shared-memory limit up to the paper's widest heads
  (d_k 384, d_v 1536; checked without a GPU by benchmarks/gpu_kernel_resources.py). Timed on the
  H200 at the (128, 256), (128, 128), 350M (384, 1536) and 1.3B (320, 1280) heads: 3.2-5.8x
  faster fwd+bwd than the chunkwise form at chunk 64 (benchmarks/RESULTS.md).
  """
  from dense_ssm.ops.dispatch import accelerator  # pylint: disable=g-import-not-at-top
  kind = accelerator()
  if kind == "tpu":
    return "pallas"
  if kind == "gpu":
    from dense_ssm.ops import retention_pallas_gpu  # pylint: disable=g-import-not-at-top
    if retention_pallas_gpu.supports(dk, dv):
      return "pallas"
  return "chunkwise"


def retention_step(q_BxHxK, k_BxHxK, v_BxHxV, log_decay, state_BxHxKxV, reset_B=None):
  """One recurrent step (decode). log_decay: [H] or [B,H]. Returns (o [B,H,V], new state)."""
  a = jnp.exp(_f32(log_decay))
  a = jnp.broadcast_to(a, state_BxHxKxV.shape[:2])
  if reset_B is not None:
    a = a * (~reset_B)[:, None]
  state = a[..., None, None] * state_BxHxKxV + jnp.einsum(
      "bhk,bhv->bhkv", _f32(k_BxHxK), _f32(v_BxHxV))
  o = jnp.einsum("bhk,bhkv->bhv", _f32(q_BxHxK), state)
  return o.astype(v_BxHxV.dtype), state


def retention_parallel_normalized(q, k, v, log_decay_H, *, segment_ids=None):
  """The parallel form of the original DenseRetNet code, exactly (docs/model.md, 'Retention modes').

  D[i,j] = gamma^(i-j) (j <= i, same document), each row divided by sqrt(sum_j D[i,j]);
  A = (q k^T) * D; A /= clamp(sum_j |A[i,j]|, 1, 5e4) (stop-gradient); o = A v.
  Returns (o [B,T,H,V], final_state) with the *unnormalised* final state of the plain recurrence,
  so that decoding can continue from it.
  """
  b, t, h, _ = q.shape
  g_BxTxH = _per_token_log_decay(log_decay_H, b, t)
  same = _same_segment(segment_ids, b, t)
  d_BxHxTxT, _ = _decay_matrix(g_BxTxH, same)
  qf, kf, vf = (_f32(a) for a in (q, k, v))
  final = jnp.einsum("bht,bthk,bthv->bhkv", d_BxHxTxT[:, :, -1, :], kf, vf)
  d_BxHxTxT = d_BxHxTxT / jnp.sqrt(d_BxHxTxT.sum(-1, keepdims=True))
  a_BxHxTxT = jnp.einsum("bihk,bjhk->bhij", qf, kf) * d_BxHxTxT
  denom = jax.lax.stop_gradient(jnp.clip(jnp.abs(a_BxHxTxT).sum(-1, keepdims=True), 1.0, 5e4))
  o = jnp.einsum("bhij,bjhv->bihv", a_BxHxTxT / denom, vf)
  return o.astype(v.dtype), final

