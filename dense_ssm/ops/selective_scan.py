"""Mamba-1 selective scan: one entry point, implementations behind one signature.

    delta_t = softplus(dt_t + dt_bias)                           [D]
    h_t     = exp(delta_t A) * h_{t-1} + (delta_t x_t) b_t^T    [D, N]  (float32)
    y_t     = h_t c_t + d_skip * x_t,   then y_t *= silu(z_t)

`segment_ids` reset the state at each document start. Each implementation returns
`(y, final_state)`.

Implementations:
  "sequential"   `lax.scan` over time (the reference; state [B,D,N] only).
  "associative"  `jax.lax.associative_scan` over time, run in chunks of `chunk_size` tokens with the
                 state carried between chunks (bounds the [B,C,D,N] intermediate).
  "pallas"       fused Pallas kernel (dense_ssm/ops/selective_scan_pallas.py), TPU and GPU;
                 "pallas_interpret" runs it in the Pallas interpreter (any platform; for tests).
  "auto"         pallas on TPU and GPU (on an H200 its fwd+bwd ran 4.9x faster than the associative
                 form, benchmarks/RESULTS.md); associative elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(a):
  """At least float32 (bf16 -> f32; f64 stays f64 so float64 gradient checks are exact)."""
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))

IMPLS = ("auto", "sequential", "reference", "associative", "xla", "pallas", "pallas_interpret")


def _check(x, dt, a, b, c, initial_state, segment_ids):
  bsz, t, d = x.shape
  n = a.shape[-1]
  if dt.shape != x.shape or a.shape != (d, n) or b.shape != (bsz, t, n) or c.shape != b.shape:
    raise ValueError(
        f"selective_scan expects x, dt [B,T,D], A [D,N], b, c [B,T,N]; got x{x.shape}, "
        f"dt{dt.shape}, A{a.shape}, b{b.shape}, c{c.shape}.")
  if initial_state is not None and initial_state.shape != (bsz, d, n):
    raise ValueError(f"initial_state must be [B,D,N]={(bsz, d, n)}; got {initial_state.shape}.")
  if segment_ids is not None and segment_ids.shape != (bsz, t):
    raise ValueError(f"segment_ids must be [B,T]={(bsz, t)}; got {segment_ids.shape}.")


def discretize(x, dt, a, b, segment_ids, dt_bias, dt_softplus):
  """Returns per-token decay and input terms, float32: (decay [B,T,D,N], inp [B,T,D,N])."""
  delta = _f32(dt)
  if dt_bias is not None:
    delta = delta + _f32(dt_bias)
  if dt_softplus:
    delta = jax.nn.softplus(delta)
  decay = jnp.exp(delta[..., None] * _f32(a))
  if segment_ids is not None:
    reset = jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    decay = decay * (~reset)[..., None, None]
  inp = (delta * _f32(x))[..., None] * _f32(b)[:, :, None, :]
  return decay, inp


def _finish(y, x, d_skip, z):
  if d_skip is not None:
    y = y + _f32(d_skip) * _f32(x)
  if z is not None:
    y = y * jax.nn.silu(_f32(z))
  return y.astype(x.dtype)


def _scan_sequential(x, dt, a, b, c, h0, segment_ids, dt_bias, dt_softplus):
  delta = _f32(dt)
  if dt_bias is not None:
    delta = delta + _f32(dt_bias)
  if dt_softplus:
    delta = jax.nn.softplus(delta)
  bsz, t, _ = x.shape
  if segment_ids is None:
    reset_BxT = jnp.zeros((bsz, t), bool)
  else:
    reset_BxT = jnp.concatenate(
        [jnp.zeros((bsz, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  af = _f32(a)

  def step(h_BxDxN, inp):
    x_t, d_t, b_t, c_t, r_t = inp
    decay = jnp.exp(d_t[..., None] * af) * (~r_t)[:, None, None]
    h_BxDxN = decay * h_BxDxN + (d_t * x_t)[..., None] * b_t[:, None, :]
    return h_BxDxN, jnp.einsum("bdn,bn->bd", h_BxDxN, c_t)

  xs = (_f32(x), delta, _f32(b), _f32(c), reset_BxT)
  h, y_TxBxD = jax.lax.scan(step, h0, tuple(jnp.moveaxis(u, 1, 0) for u in xs))
  return jnp.moveaxis(y_TxBxD, 0, 1), h


def _combine(left, right):
  a_l, b_l = left
  a_r, b_r = right
  return a_r * a_l, a_r * b_l + b_r


def _scan_associative(x, dt, a, b, c, h0, segment_ids, dt_bias, dt_softplus, chunk_size,
                      return_states=False):
  bsz, t, d = x.shape
  n = a.shape[-1]
  ch = max(1, min(chunk_size, t))
  pad = (-t) % ch

  def pad_t(u, mode="constant"):
    widths = [(0, 0)] * u.ndim
    widths[1] = (0, pad)
    return jnp.pad(u, widths, mode=mode) if pad else u

  # Padded steps: dt -> -inf after softplus is awkward; instead zero their x (no input) and mark
  # their decay as 1 below via a validity mask.
  valid = pad_t(jnp.ones((bsz, t), bool))
  seg = None if segment_ids is None else pad_t(segment_ids, mode="edge")
  decay, inp = discretize(pad_t(x), pad_t(dt), a, pad_t(b), seg, dt_bias, dt_softplus)
  decay = jnp.where(valid[..., None, None], decay, 1.0)
  inp = inp * valid[..., None, None]
  nc = (t + pad) // ch
  decay = decay.reshape(bsz, nc, ch, d, n)
  inp = inp.reshape(bsz, nc, ch, d, n)
  cf = _f32(pad_t(c)).reshape(bsz, nc, ch, n)

  def chunk(h_BxDxN, xs):
    dec, u, c_chunk = xs
    a_cum, b_cum = jax.lax.associative_scan(_combine, (dec, u), axis=1)
    h_all = a_cum * h_BxDxN[:, None] + b_cum  # [B,C,D,N]
    y = jnp.einsum("bcdn,bcn->bcd", h_all, c_chunk)
    return h_all[:, -1], (y, h_all) if return_states else (y, None)

  xs = (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(inp, 1, 0), jnp.moveaxis(cf, 1, 0))
  h, (y_NxBxCxD, states) = jax.lax.scan(chunk, h0, xs)
  y = jnp.moveaxis(y_NxBxCxD, 0, 1).reshape(bsz, nc * ch, d)[:, :t]
  if return_states:
    states = jnp.moveaxis(states, 0, 1).reshape(bsz, nc * ch, d, n)[:, :t]
    return y, h, states
  return y, h


def selective_scan(x, dt, a, b, c, *, d_skip=None, z=None, dt_bias=None, dt_softplus=True,
                   initial_state=None, segment_ids=None, impl="auto", chunk_size=128,
                   batch_axes=None):
  """Selective scan of Mamba-1 (see module doc).

  Args:
    x, dt: [B,T,D]; a: [D,N] (negative); b, c: [B,T,N]; d_skip, dt_bias: [D]; z: [B,T,D].
    initial_state: optional float32 [B,D,N]; segment_ids: optional [B,T].
    impl: one of IMPLS; chunk_size: time chunk of the associative form.
    batch_axes: mesh axes sharding the batch; under a mesh the Pallas kernel runs per batch shard.
  Returns:
    (y [B,T,D] in x.dtype, final_state [B,D,N] float32).
  """
  _check(x, dt, a, b, c, initial_state, segment_ids)
  bsz, _, d = x.shape
  h0 = (jnp.zeros((bsz, d, a.shape[-1]), jnp.promote_types(x.dtype, jnp.float32))
        if initial_state is None
        else _f32(initial_state))
  if impl == "auto":
    from dense_ssm.ops.dispatch import accelerator  # pylint: disable=g-import-not-at-top
    impl = "pallas" if accelerator() in ("tpu", "gpu") else "associative"
  if impl in ("sequential", "reference"):
    y, h = _scan_sequential(x, dt, a, b, c, h0, segment_ids, dt_bias, dt_softplus)
  elif impl in ("associative", "xla"):
    y, h = _scan_associative(x, dt, a, b, c, h0, segment_ids, dt_bias, dt_softplus, chunk_size)
  elif impl in ("pallas", "pallas_interpret"):
    from dense_ssm.ops import selective_scan_pallas  # pylint: disable=g-import-not-at-top
    from dense_ssm.ops.dispatch import batch_sharded  # pylint: disable=g-import-not-at-top

    def kernel(x, dt, a, b, c, d_skip, z, dt_bias, initial_state, segment_ids):
      return selective_scan_pallas.selective_scan_pallas(
          x, dt, a, b, c, d_skip=d_skip, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
          initial_state=initial_state, segment_ids=segment_ids,
          interpret=impl == "pallas_interpret")

    return batch_sharded(
        kernel, (x, dt, a, b, c, d_skip, z, dt_bias, initial_state, segment_ids),
        (True, True, False, True, True, False, True, False, True, True), batch_axes, 2)
  else:
    raise ValueError(f"selective_scan impl={impl!r} is unknown; use one of {IMPLS}.")
  return _finish(y, x, d_skip, z), h


def selective_scan_states(x, dt, a, b, *, dt_bias=None, dt_softplus=True, initial_state=None,
                          segment_ids=None, chunk_size=128):
  """All per-token states h_t [B,T,D,N] (float32): used by DenseMamba's state-level variant."""
  bsz, _, d = x.shape
  h0 = (jnp.zeros((bsz, d, a.shape[-1]), jnp.promote_types(x.dtype, jnp.float32))
        if initial_state is None
        else _f32(initial_state))
  c0 = jnp.zeros_like(b)
  _, h, states = _scan_associative(x, dt, a, b, c0, h0, segment_ids, dt_bias, dt_softplus,
                                   chunk_size, return_states=True)
  return states, h


def selective_scan_step(x_BxD, dt_BxD, a, b_BxN, c_BxN, h_BxDxN, *, d_skip=None, z_BxD=None,
                        dt_bias=None, dt_softplus=True):
  """One recurrent step (decode). Returns (y [B,D], new state [B,D,N])."""
  decay, inp = discretize(x_BxD[:, None], dt_BxD[:, None], a, b_BxN[:, None], None, dt_bias,
                          dt_softplus)
  h = decay[:, 0] * h_BxDxN + inp[:, 0]
  y = jnp.einsum("bdn,bn->bd", h, _f32(c_BxN))
  return _finish(y, x_BxD, d_skip, z_BxD), h
