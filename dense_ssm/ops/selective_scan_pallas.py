"""Pallas selective scan (Mamba-1 / S6), fused, forward and backward, TPU and GPU.

Math (per batch row; D channels, N states; float32 state and accumulation):

    delta_t = softplus(dt_t + dt_bias)                                  [D]
    h_t     = keep_t * exp(delta_t A) * h_{t-1} + (delta_t x_t) b_t^T   [D, N]
    y_t     = (h_t c_t + d_skip x_t) * silu(z_t)                        [D]

with keep_t = 0 where `segment_ids` changes (t > 0) and 1 elsewhere (the initial
state only reaches the first segment); returns (y in x.dtype, h_{T-1} float32).

Kernels. The state of one block of channels lives on chip in float32; no
[T, D, N] tensor ever touches HBM. Time is walked sequentially:
  * TPU (Mosaic): grid (B, D/block_d, T/chunk), the chunk axis "arbitrary"; the
    state is an [N, block_d] value carried across chunks in VMEM scratch; each
    grid step runs one chunk, fully unrolled.
  * GPU (Triton lowering): grid (B, D/block_d); each program walks all of time
    in loops of a few unrolled steps; the state is N per-channel vectors (each
    thread owns all N states of its channel), so sums over N are register adds.
    The walk is bound by memory latency, not bandwidth: each loop body is kept
    one basic block (no branching libdevice calls; see `softplus` in the steps
    module) so that its loads issue together, and the forward loads the next
    body's rows while it computes this one (`prefetch`).
The forward saves the state at every chunk start ([B, T/chunk, N, D] float32, a
1/chunk fraction of the [T, D, N] states). The backward walks the chunks in
reverse: it recomputes each chunk's states from its checkpoint (first the states
every `sub` steps, then step by step inside each sub-chunk, kept on chip) and
runs the reverse (adjoint) scan g_{t-1} = a_t g_t + c_t dy_t on chip. Gradients:

    w_t      = g_t * a_t * h_{t-1}          (dL/d(delta_t A), per [d, n])
    ddelta_t = sum_n w_t A + x_t sum_n g_t b_t
    dA      += w_t delta_t
    dx_t     = delta_t sum_n g_t b_t + d_skip dy'_t,   dy' = dy * silu(z)
    db_t     = sum_d g_t delta_t x_t,      dc_t = sum_d h_t dy'_t
Partial sums over channel blocks (db, dc) and over batch (dA, d_skip, dt_bias)
are finished by XLA outside the kernels.

Files: this one holds the public function, its configuration, padding and
layout, the custom VJP and the pallas_call builders; the kernels are in
selective_scan_pallas_tpu.py and selective_scan_pallas_gpu.py, and the per-step
math they share in selective_scan_pallas_steps.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dense_ssm.ops import dispatch
from dense_ssm.ops import selective_scan_pallas_gpu as gpu_kernels
from dense_ssm.ops import selective_scan_pallas_tpu as tpu_kernels

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  """Static configuration of one kernel instance (hashable: a jit/custom_vjp key)."""

  backend: str  # "tpu" or "gpu"
  seq_len: int  # the real T (the arrays are padded to a multiple of chunk)
  chunk: int  # steps per chunk (checkpoint spacing)
  sub: int  # steps per unrolled backward body (their states stay on chip)
  block_d: int
  has_d: bool
  has_z: bool
  has_bias: bool
  has_h0: bool
  has_seg: bool
  softplus: bool
  interpret: bool = False
  fwd_sub: int = 8  # GPU: steps per unrolled forward body
  num_warps: int = 4  # GPU: warps per program
  red_batch: int = 4  # GPU: backward steps whose d-reductions (db, dc) are batched
  prefetch: bool = False  # GPU forward: load the next body's x, dt, z before this body's math
  bwd_prefetch: bool = False  # GPU backward: the same for both passes of each chunk

  @property
  def masked(self) -> bool:
    return self.seq_len % self.chunk != 0

  @property
  def cols(self) -> bool:
    return self.backend == "gpu"


# ------------------------------------------------------------------------------
# pallas_call builders. Arrays reaching the kernels are padded and laid out:
#   x, dt, z, dy: [B, Tp, Dp];  b, c: [B, Tp, Np];  A: state layout [Np, Dp] or
#   [Dp, Np];  h0 / hT / dA: [B, *state];  ckpt: [B, Tp/chunk, *state];
#   GPU: d_skip, dt_bias [Dp], keep [B, Tp];  TPU: [1, Dp] and [B, Tp, 1].


class _Specs:
  """BlockSpecs for both backends. Grid: GPU (B, nD); TPU (B, nD, nC)."""

  def __init__(self, cfg, n_state, rev=False):
    self.cfg, self.n = cfg, n_state
    self.rev = rev
    self.tpu = cfg.backend == "tpu"

  def _k(self, k, nc):
    return nc - 1 - k if self.rev else k

  def seq(self, nc):  # [B, Tp, Dp]
    bd, L = self.cfg.block_d, self.cfg.chunk
    if self.tpu:
      return pl.BlockSpec((None, L, bd), lambda b, j, k: (b, self._k(k, nc), j))
    return pl.BlockSpec((None, L * nc, bd), lambda b, j: (b, 0, j))

  def seq_n(self, nc):  # [B, Tp, Np]
    L, n = self.cfg.chunk, self.n
    if self.tpu:
      return pl.BlockSpec((None, L, n), lambda b, j, k: (b, self._k(k, nc), 0))
    return pl.BlockSpec((None, L * nc, n), lambda b, j: (b, 0, 0))

  def part_n(self, nc):  # [B, nD, Tp, Np] partial sums over channel blocks
    L, n = self.cfg.chunk, self.n
    if self.tpu:
      return pl.BlockSpec((None, None, L, n), lambda b, j, k: (b, j, self._k(k, nc), 0))
    return pl.BlockSpec((None, None, L * nc, n), lambda b, j: (b, j, 0, 0))

  def keep(self, nc):
    L = self.cfg.chunk
    if self.tpu:
      return pl.BlockSpec((None, L, 1), lambda b, j, k: (b, self._k(k, nc), 0))
    return pl.BlockSpec((None, L * nc), lambda b, j: (b, 0))

  def _state_block(self):
    bd, n = self.cfg.block_d, self.n
    return (n, bd), lambda j: (0, j)

  def a_mat(self):  # A in the state layout
    shape, idx = self._state_block()
    if self.tpu:
      return pl.BlockSpec(shape, lambda b, j, k: idx(j))
    return pl.BlockSpec(shape, lambda b, j: idx(j))

  def state(self):  # [B, *state]
    shape, idx = self._state_block()
    if self.tpu:
      return pl.BlockSpec((None,) + shape, lambda b, j, k: (b,) + idx(j))
    return pl.BlockSpec((None,) + shape, lambda b, j: (b,) + idx(j))

  def ckpt(self, nc):  # [B, nC, *state]
    shape, idx = self._state_block()
    if self.tpu:
      return pl.BlockSpec((None, None) + shape,
                          lambda b, j, k: (b, self._k(k, nc)) + idx(j))
    return pl.BlockSpec((None, nc) + shape, lambda b, j: (b, 0) + idx(j))

  def chan(self):  # d_skip / dt_bias: GPU [Dp], TPU [1, Dp]
    bd = self.cfg.block_d
    if self.tpu:
      return pl.BlockSpec((1, bd), lambda b, j, k: (0, j))
    return pl.BlockSpec((bd,), lambda b, j: (j,))

  def chan_b(self):  # per-batch channel partials: GPU [B, Dp], TPU [B, 1, Dp]
    bd = self.cfg.block_d
    if self.tpu:
      return pl.BlockSpec((None, 1, bd), lambda b, j, k: (b, 0, j))
    return pl.BlockSpec((None, bd), lambda b, j: (b, j))


def _compiler_params(cfg):
  if cfg.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"))
  from jax.experimental.pallas import triton as pltr  # pylint: disable=g-import-not-at-top
  return pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=1)


def _in_specs(cfg, sp, ins, nc):
  table = {
      "x": sp.seq(nc), "dt": sp.seq(nc), "z": sp.seq(nc), "dy": sp.seq(nc),
      "b": sp.seq_n(nc), "c": sp.seq_n(nc), "A": sp.a_mat(),
      "dskip": sp.chan(), "bias": sp.chan(), "h0": sp.state(), "dhT": sp.state(),
      "keep": sp.keep(nc), "ckpt": sp.ckpt(nc),
  }
  return [table[n] for n in ins]


def _call(cfg, kernel, sp, ins, outs, scratch, nc):
  """outs: list of (name, ShapeDtypeStruct, BlockSpec)."""
  in_names = list(ins)
  out_names = [o[0] for o in outs]
  n_d = ins["x"].shape[2] // cfg.block_d
  grid = (ins["x"].shape[0], n_d, nc) if cfg.backend == "tpu" else (ins["x"].shape[0], n_d)
  return pl.pallas_call(
      functools.partial(kernel, cfg, in_names, out_names),
      out_shape=[o[1] for o in outs],
      grid=grid,
      in_specs=_in_specs(cfg, sp, in_names, nc),
      out_specs=[o[2] for o in outs],
      scratch_shapes=scratch,
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name="selective_scan_" + ("bwd" if "dy" in ins else "fwd"),
  )(*[ins[n] for n in in_names])


def _forward_call(cfg, ins, save_ckpt):
  bsz, tp, dp = ins["x"].shape
  n = ins["A"].shape[0]
  nc = tp // cfg.chunk
  sp = _Specs(cfg, n)
  state_shape = (n, dp)
  outs = [("y", jax.ShapeDtypeStruct((bsz, tp, dp), ins["x"].dtype), sp.seq(nc)),
          ("hT", jax.ShapeDtypeStruct((bsz,) + state_shape, _F32), sp.state())]
  if save_ckpt:
    outs.append(("ckpt", jax.ShapeDtypeStruct((bsz, nc) + state_shape, _F32),
                 sp.ckpt(nc)))
  scratch = []
  if cfg.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    scratch = [pltpu.VMEM((n, cfg.block_d), _F32),
               pltpu.VMEM((cfg.chunk, cfg.block_d), _F32)]
  kernel = (tpu_kernels if cfg.backend == "tpu" else gpu_kernels).fwd_kernel
  res = _call(cfg, kernel, sp, ins, outs, scratch, nc)
  return tuple(res) if save_ckpt else tuple(res) + (None,)


def _backward_call(cfg, ins):
  bsz, tp, dp = ins["x"].shape
  n = ins["A"].shape[0]
  nc = tp // cfg.chunk
  n_d = dp // cfg.block_d
  tpu = cfg.backend == "tpu"
  sp = _Specs(cfg, n, rev=tpu)
  state_shape = (n, dp)
  sds = jax.ShapeDtypeStruct
  chan_b = sds((bsz, 1, dp) if tpu else (bsz, dp), _F32)
  outs = [("dx", sds((bsz, tp, dp), ins["x"].dtype), sp.seq(nc)),
          ("ddt", sds((bsz, tp, dp), ins["dt"].dtype), sp.seq(nc))]
  if cfg.has_z:
    outs.append(("dz", sds((bsz, tp, dp), ins["z"].dtype), sp.seq(nc)))
  outs += [("db", sds((bsz, n_d, tp, n), _F32), sp.part_n(nc)),
           ("dc", sds((bsz, n_d, tp, n), _F32), sp.part_n(nc)),
           ("dA", sds((bsz,) + state_shape, _F32), sp.state()),
           ("dh0", sds((bsz,) + state_shape, _F32), sp.state())]
  if cfg.has_d:
    outs.append(("dD", chan_b, sp.chan_b()))
  if cfg.has_bias:
    outs.append(("dbias", chan_b, sp.chan_b()))
  if not tpu:  # per-program states at sub-chunk starts (re-used each chunk)
    per_chunk = cfg.chunk // cfg.sub
    blk = (n, cfg.block_d)
    outs.append(("sub_scr", sds((bsz, n_d, per_chunk) + blk, _F32),
                 pl.BlockSpec((None, None, per_chunk) + blk, lambda b, j: (b, j, 0, 0, 0))))
  scratch = []
  if tpu:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    L, bd = cfg.chunk, cfg.block_d
    scratch = [pltpu.VMEM((n, bd), _F32), pltpu.VMEM((L, bd), _F32),
               pltpu.VMEM((L, bd), _F32), pltpu.VMEM((L, bd), _F32),
               pltpu.VMEM((L, n), _F32), pltpu.VMEM((L, n), _F32)]
  kernel = (tpu_kernels if tpu else gpu_kernels).bwd_kernel
  res = _call(cfg, kernel, sp, ins, outs, scratch, nc)
  return dict(zip([o[0] for o in outs], res))


# ------------------------------------------------------------------------------
# Padding, layout and the custom VJP.


def _round_up(v, m):
  return (v + m - 1) // m * m


def _pad(arr, axis_sizes):
  """Zero-pads arr so that arr.shape[axis] == size for each (axis, size)."""
  widths = [(0, 0)] * arr.ndim
  for axis, size in axis_sizes:
    widths[axis] = (0, size - arr.shape[axis])
  if all(w == (0, 0) for w in widths):
    return arr
  return jnp.pad(arr, widths)


def _dims(cfg, x, b):
  bsz, t, d = x.shape
  n = b.shape[-1]
  tp = _round_up(t, cfg.chunk)
  dp = _round_up(d, cfg.block_d)
  n_p = max(8, pl.next_power_of_2(n)) if cfg.backend == "gpu" else _round_up(n, 8)
  return bsz, t, d, n, tp, dp, n_p


def _to_state(s_bxdxn):  # [..., D, N] -> kernel state layout [..., N, D]
  return jnp.swapaxes(s_bxdxn, -1, -2)


def _from_state(s):
  return jnp.swapaxes(s, -1, -2)


def _kernel_inputs(cfg, x, dt, a_mat, b, c, d_skip, z, dt_bias, h0, keep):
  bsz, _, d, n, tp, dp, n_p = _dims(cfg, x, b)
  tpu = cfg.backend == "tpu"
  ins = {
      "x": _pad(x, [(1, tp), (2, dp)]),
      "dt": _pad(dt, [(1, tp), (2, dp)]),
      "b": _pad(b, [(1, tp), (2, n_p)]),
      "c": _pad(c, [(1, tp), (2, n_p)]),
      "A": _to_state(_pad(a_mat.astype(_F32), [(0, dp), (1, n_p)])),
  }
  chan = (lambda v: _pad(v.astype(_F32), [(0, dp)]).reshape((1, dp) if tpu else (dp,)))
  if cfg.has_d:
    ins["dskip"] = chan(d_skip)
  if cfg.has_z:
    ins["z"] = _pad(z, [(1, tp), (2, dp)])
  if cfg.has_bias:
    ins["bias"] = chan(dt_bias)
  if cfg.has_h0:
    ins["h0"] = _to_state(_pad(h0.astype(_F32), [(1, dp), (2, n_p)]))
  if cfg.has_seg:
    keep = jnp.pad(keep, ((0, 0), (0, tp - keep.shape[1])), constant_values=1.0)
    ins["keep"] = keep[..., None] if tpu else keep
  del bsz, d, n
  return ins


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, x, dt, a_mat, b, c, d_skip, z, dt_bias, h0, keep):
  y, h_last, _ = _scan_fwd_impl(cfg, x, dt, a_mat, b, c, d_skip, z, dt_bias, h0,
                                keep, save_ckpt=False)
  return y, h_last


def _scan_fwd_impl(cfg, x, dt, a_mat, b, c, d_skip, z, dt_bias, h0, keep, save_ckpt):
  _, t, d, n, _, _, _ = _dims(cfg, x, b)
  ins = _kernel_inputs(cfg, x, dt, a_mat, b, c, d_skip, z, dt_bias, h0, keep)
  y, h_last, ckpt = _forward_call(cfg, ins, save_ckpt)
  return y[:, :t, :d], _from_state(h_last)[:, :d, :n], ckpt


def _scan_fwd(cfg, x, dt, a_mat, b, c, d_skip, z, dt_bias, h0, keep):
  y, h_last, ckpt = _scan_fwd_impl(cfg, x, dt, a_mat, b, c, d_skip, z, dt_bias, h0,
                                   keep, save_ckpt=True)
  return (y, h_last), (x, dt, a_mat, b, c, d_skip, z, dt_bias, h0, keep, ckpt)


def _scan_bwd(cfg, res, cts):
  x, dt, a_mat, b, c, d_skip, z, dt_bias, h0, keep, ckpt = res
  dy, dh_last = cts
  _, t, d, n, tp, dp, n_p = _dims(cfg, x, b)
  ins = _kernel_inputs(cfg, x, dt, a_mat, b, c, d_skip, z, dt_bias, h0, keep)
  ins.pop("h0", None)
  ins["ckpt"] = ckpt
  ins["dy"] = _pad(dy.astype(x.dtype), [(1, tp), (2, dp)])
  ins["dhT"] = _to_state(_pad(dh_last.astype(_F32), [(1, dp), (2, n_p)]))
  out = _backward_call(cfg, ins)
  seq = lambda v: v[:, :t, :d]
  chan = lambda v, like: v.reshape(-1, dp).sum(0)[:d].astype(like.dtype)
  grads = (
      seq(out["dx"]).astype(x.dtype),
      seq(out["ddt"]).astype(dt.dtype),
      _from_state(out["dA"].sum(0))[:d, :n].astype(a_mat.dtype),
      out["db"].sum(1)[:, :t, :n].astype(b.dtype),
      out["dc"].sum(1)[:, :t, :n].astype(c.dtype),
      chan(out["dD"], d_skip) if cfg.has_d else None,
      seq(out["dz"]).astype(z.dtype) if cfg.has_z else None,
      chan(out["dbias"], dt_bias) if cfg.has_bias else None,
      _from_state(out["dh0"])[:, :d, :n].astype(h0.dtype) if cfg.has_h0 else None,
      None,
  )
  return grads


_scan.defvjp(_scan_fwd, _scan_bwd)


# ------------------------------------------------------------------------------
# Public entry point.

# GPU: one channel per thread; more, smaller programs hide more memory latency. The defaults are
# the fastest measured configuration on an H200 (block_d 32 with one warp, 8-step forward bodies,
# prefetch in both passes); the timings of every configuration tried are in benchmarks/RESULTS.md
# ("Selective scan").
_DEFAULTS = {  # backend -> block_d, chunk, sub_chunk, fwd_sub_chunk, num_warps, reduce_batch
    "tpu": dict(block_d=512, chunk=64, sub_chunk=8, fwd_sub_chunk=8, num_warps=4,
                reduce_batch=1, prefetch=0, bwd_prefetch=0),
    "gpu": dict(block_d=32, chunk=64, sub_chunk=4, fwd_sub_chunk=8, num_warps=1,
                reduce_batch=2, prefetch=1, bwd_prefetch=1),
}


def _pick_backend(backend, interpret):
  if backend is not None:
    if backend not in ("tpu", "gpu"):
      raise ValueError(f"backend must be None, 'tpu' or 'gpu', got {backend!r}.")
    return backend
  return dispatch.kernel_backend("selective_scan_pallas", interpret, "tpu",
                                 "the XLA forms in dense_ssm.ops.selective_scan")


def _check_shapes(x, dt, a_mat, b, c, d_skip, z, dt_bias, h0, segment_ids):
  if x.ndim != 3:
    raise ValueError(f"x must be [B, T, D], got shape {x.shape}.")
  bsz, t, d = x.shape
  n = a_mat.shape[-1] if a_mat.ndim == 2 else -1
  expect = {
      "dt": (dt, (bsz, t, d)), "A": (a_mat, (d, n)), "b": (b, (bsz, t, n)),
      "c": (c, (bsz, t, n)), "d_skip": (d_skip, (d,)), "z": (z, (bsz, t, d)),
      "dt_bias": (dt_bias, (d,)), "initial_state": (h0, (bsz, d, n)),
      "segment_ids": (segment_ids, (bsz, t)),
  }
  for name, (arr, shape) in expect.items():
    if arr is not None and tuple(arr.shape) != shape:
      raise ValueError(
          f"{name} has shape {tuple(arr.shape)}, expected {shape} for x of shape "
          f"{x.shape} and A of shape {a_mat.shape} ([D, N]).")


def selective_scan_pallas(x, dt, A, b, c, *, d_skip=None, z=None, dt_bias=None,
                          dt_softplus=True, initial_state=None, segment_ids=None,
                          backend=None, interpret=False, block_d=None, chunk=None,
                          sub_chunk=None, fwd_sub_chunk=None, num_warps=None,
                          reduce_batch=None, prefetch=None, bwd_prefetch=None):
  """Fused selective scan (see the module docstring for the math).

  Args:
    x: [B, T, D] input (any float dtype; y comes back in this dtype).
    dt: [B, T, D] raw step sizes (before dt_bias and softplus).
    A: [D, N] negative state matrix (= -exp(A_log)).
    b, c: [B, T, N] input / output projections.
    d_skip: optional [D] skip term.
    z: optional [B, T, D] gate; y *= silu(z).
    dt_bias: optional [D], added to dt before the softplus.
    dt_softplus: apply softplus to dt + dt_bias (else use it as is).
    initial_state: optional [B, D, N] float32 state before token 0.
    segment_ids: optional [B, T] int; the state resets before token t > 0 whose
      segment id differs from token t-1's.
    backend: "tpu", "gpu" or None (from jax.default_backend(); on CPU with
      interpret=True the TPU form is used).
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    block_d: channels per program (TPU: multiple of 128; GPU: power of 2).
    chunk: time steps per chunk = checkpoint spacing (multiple of 8; of 16 for
      16-bit inputs on TPU).
    sub_chunk, fwd_sub_chunk, num_warps, reduce_batch, prefetch, bwd_prefetch:
      tuning knobs: steps per unrolled backward body (their states stay on
      chip; divides chunk), steps per unrolled GPU forward body, GPU warps per
      program, GPU backward steps per batched reduction over channels, GPU
      forward / backward loads one body ahead. None = per-backend defaults.

  Returns:
    (y [B, T, D] in x.dtype, final_state [B, D, N] float32).
  """
  _check_shapes(x, dt, A, b, c, d_skip, z, dt_bias, initial_state, segment_ids)
  backend = _pick_backend(backend, interpret)
  knobs = dict(_DEFAULTS[backend])
  for name, val in (("block_d", block_d), ("chunk", chunk), ("sub_chunk", sub_chunk),
                    ("fwd_sub_chunk", fwd_sub_chunk), ("num_warps", num_warps),
                    ("reduce_batch", reduce_batch), ("prefetch", prefetch),
                    ("bwd_prefetch", bwd_prefetch)):
    if val is not None:
      knobs[name] = int(val)
  bsz, t, d = x.shape
  block_d = knobs["block_d"]
  if backend == "tpu":
    block_d = min(block_d, _round_up(d, 128))
    if block_d % 128:
      raise ValueError(f"block_d must be a multiple of 128 on TPU, got {block_d}.")
  else:
    block_d = min(block_d, max(16, pl.next_power_of_2(d)))
    if block_d & (block_d - 1):
      raise ValueError(f"block_d must be a power of 2 on GPU, got {block_d}.")
  chunk = min(knobs["chunk"], _round_up(t, 16))
  if chunk % 8 or (backend == "tpu" and x.dtype.itemsize < 4 and chunk % 16):
    raise ValueError(f"chunk must be a multiple of 8 (16 for 16-bit inputs on TPU), got {chunk}.")
  sub = min(knobs["sub_chunk"], chunk)
  fwd_sub = min(knobs["fwd_sub_chunk"], chunk)
  red_batch = min(knobs["reduce_batch"], sub)
  for name, val in (("sub_chunk", sub), ("fwd_sub_chunk", fwd_sub), ("reduce_batch", red_batch)):
    if val & (val - 1) or chunk % val:
      raise ValueError(f"{name} must be a power of 2 dividing chunk ({chunk}), got {val}.")
  cfg = ScanConfig(
      backend=backend, seq_len=t, chunk=chunk, sub=sub, block_d=block_d,
      has_d=d_skip is not None, has_z=z is not None, has_bias=dt_bias is not None,
      has_h0=initial_state is not None, has_seg=segment_ids is not None,
      softplus=bool(dt_softplus), interpret=bool(interpret), fwd_sub=fwd_sub,
      num_warps=knobs["num_warps"], red_batch=red_batch,
      prefetch=backend == "gpu" and bool(knobs["prefetch"]),
      bwd_prefetch=backend == "gpu" and bool(knobs["bwd_prefetch"]))
  keep = None
  if segment_ids is not None:
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    keep = jnp.concatenate([jnp.ones((bsz, 1), bool), same], axis=1).astype(_F32)
  return _scan(cfg, x, dt, A, b, c, d_skip, z, dt_bias, initial_state, keep)
