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
    one basic block (no branching libdevice calls, see _softplus) so that its
    loads issue together, and the forward loads the next body's rows while it
    computes this one (`prefetch`).
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
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dense_ssm.ops import dispatch

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
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
# State representation.
#   TPU: an [N, block_d] array; d-vectors are rows [1, bd], n-vectors columns
#        [N, 1], broadcasting does the rest.
#   GPU: `_Cols`, a tuple of N per-channel vectors [bd] (one per state index n),
#        so that every thread owns all N states of its channels: sums over n are
#        register adds and per-channel math (softplus, gates) is not replicated.
#        n-vectors (b_t, c_t) are _Cols of N scalars.


@jax.tree_util.register_pytree_node_class
class _Cols(tuple):
  """Elementwise arithmetic over a tuple of arrays (broadcasting non-_Cols operands)."""

  def _zip(self, other, op):
    if isinstance(other, _Cols):
      return _Cols(op(a, b) for a, b in zip(self, other))
    return _Cols(op(a, other) for a in self)

  def __add__(self, other):
    return self._zip(other, lambda a, b: a + b)

  def __mul__(self, other):
    return self._zip(other, lambda a, b: a * b)

  def __sub__(self, other):
    return self._zip(other, lambda a, b: a - b)

  __radd__ = __add__
  __rmul__ = __mul__

  def tree_flatten(self):
    return tuple(self), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(children)


def _map(f, s):
  return _Cols(f(v) for v in s) if isinstance(s, _Cols) else f(s)


def _sum_n(cfg, s):
  """Sum over the state index n -> d-vector."""
  if cfg.cols:
    return functools.reduce(lambda a, b: a + b, s)
  return jnp.sum(s, axis=0, keepdims=True)


def _sigmoid(v):
  return 1.0 / (1.0 + jnp.exp(-v))


def _softplus(cfg, v):
  """softplus(v) = max(v, 0) + log(1 + e^-|v|).

  On GPU through exp2 / log2 (single MUFU instructions): libdevice's log1pf
  branches, and a branch per step splits the unrolled body into basic blocks
  that the compiler cannot hoist the next step's loads across (measured: one
  memory latency exposed per step). log(1 + e) for e < 2^-24 rounds to 0, an
  absolute error below 6e-8.
  """
  if cfg.backend == "tpu":
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))
  return jnp.maximum(v, 0.0) + _log2(cfg, 1.0 + jnp.exp2(-jnp.abs(v) * _LOG2E)) * _LN2


def _log2(cfg, v):
  """log2 of a float32 >= 1 on GPU: one lg2.approx (relative error ~2^-22).

  jnp.log2 lowers to libdevice's logf, whose special-value branch would split
  the body (see _softplus); the interpreter uses jnp.log2.
  """
  if cfg.interpret:
    return jnp.log2(v)
  from jax.experimental.pallas import triton as pltr  # pylint: disable=g-import-not-at-top
  [out] = pltr.elementwise_inline_asm(
      "lg2.approx.ftz.f32 $0, $1;", args=[v], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, v.dtype)])
  return out


# ------------------------------------------------------------------------------
# Shared per-step math (both backends).


def _delta(cfg, p, dt, valid):
  """(delta, v = dt + bias); padded steps get delta = 0 (a = 1, u = 0: identities)."""
  v = dt + p["bias"] if cfg.has_bias else dt
  delta = _softplus(cfg, v) if cfg.softplus else v
  if valid is not None:
    delta = jnp.where(valid, delta, 0.0)
  return delta, v


def _step_inputs(cfg, get, i, p):
  """Discretised inputs of step i: (x, v = dt + bias, delta, b, a, dx = delta*x)."""
  x, dt, b = get("x", i), get("dt", i), get("b", i)
  delta, v = _delta(cfg, p, dt, get("valid", i) if cfg.masked else None)
  # exp(delta A); on GPU p["a_exp"] holds A * log2(e) and exp2 is used.
  a = _map(jnp.exp if cfg.backend == "tpu" else jnp.exp2, delta * p["a_exp"])
  if cfg.has_seg:
    a = a * get("keep", i)
  return x, v, delta, b, a, delta * x


def _gate(cfg, p, yc, x, z):
  """y = (yc + d_skip x) * silu(z)."""
  y = yc + p["d"] * x if cfg.has_d else yc
  return y * (z * _sigmoid(z)) if cfg.has_z else y


def _advance(cfg, get, h, p, steps):
  """State after `steps` (static) steps from h."""
  for i in range(steps):
    _, _, _, b, a, dx = _step_inputs(cfg, get, i, p)
    h = a * h + b * dx
  return h


def _forward_steps(cfg, get, h, p, steps):
  """Returns (state after `steps` steps, per-step y_t = (h_t c_t + d x_t) silu(z_t)).

  Callers store the ys after the loop, so no load is ordered after a store.
  """
  ys = []
  for i in range(steps):
    x, _, _, b, a, dx = _step_inputs(cfg, get, i, p)
    h = a * h + b * dx
    ys.append(_gate(cfg, p, _sum_n(cfg, h * get("c", i)), x,
                    get("z", i) if cfg.has_z else None))
  return h, ys


def _backward_steps(cfg, get, h0, g, d_a, p, steps, finish):
  """Reverse scan over `steps` (static) steps whose start state is h0.

  g is the adjoint of the state after the steps; returns (adjoint of h0, d_a).
  For each step (walking backwards) calls finish(i, step, prods) with the
  step's d-vectors (x, v, delta, z, dy) and the state-shaped products whose
  sums give the outputs: sum_n of "yc" = h c, "gb" = g b, "wa" = w A and sum_d
  of "dc" = h dy', "db" = g delta x  (w = g a h_{t-1}, dy' = dy * silu(z)).
  """
  ins, hs = [], [h0]
  for i in range(steps):  # recompute the states (b, c are re-read below, from L1)
    step = _step_inputs(cfg, get, i, p)
    ins.append(step[:3] + step[4:] + (get("dy", i), get("z", i) if cfg.has_z else None))
    hs.append(step[4] * hs[-1] + step[3] * step[5])
  for i in reversed(range(steps)):
    (x, v, delta, a, dx, dy, z), b, c = ins[i], get("b", i), get("c", i)
    h, h_prev = hs[i + 1], hs[i]
    dyg = dy * (z * _sigmoid(z)) if cfg.has_z else dy
    g = g + c * dyg
    w = g * a * h_prev
    prods = {"dc": h * dyg, "db": g * dx, "gb": g * b, "wa": w * p["a_nat"]}
    if cfg.has_z:
      prods["yc"] = h * c
    finish(i, (x, v, delta, z, dy), prods)
    d_a = d_a + w * delta
    g = g * a
  return g, d_a


def _grad_outputs(cfg, p, step, valid, red):
  """Per-(t, d) gradients of one step from its d-vectors and the n-sums `red`.

  Returns (dx, ddt, dz or None, d_skip term dy' x, dt_bias term ddt).
  """
  x, v, delta, z, dy = step
  dz = None
  dyg = dy
  if cfg.has_z:
    s = _sigmoid(z)
    dyg = dy * z * s
    yd = red["yc"] + p["d"] * x if cfg.has_d else red["yc"]
    dz = dy * yd * s * (1.0 + z * (1.0 - s))
  dx = red["gb"] * delta + (dyg * p["d"] if cfg.has_d else 0.0)
  ddelta = red["wa"] + red["gb"] * x
  if valid is not None:
    ddelta = jnp.where(valid, ddelta, 0.0)
  ddt = ddelta * _sigmoid(v) if cfg.softplus else ddelta
  return dx, ddt, dz, dyg * x, ddt


# ------------------------------------------------------------------------------
# GPU kernels (Triton lowering). Grid (B, D / block_d): each program walks all of
# time in loops whose bodies are `fwd_sub` / `sub` unrolled steps (small bodies
# keep the compile fast; loads of a body are issued before its stores).
# HBM state arrays are [..., N, block_d] blocks.


def _load_state(ref, *idx):
  """[N, bd] block -> _Cols (one load, split in registers: few memory ops keep
  Triton's coalescing pass, quadratic in them, fast)."""
  tile = ref[idx + (slice(None), slice(None))].astype(_F32)
  return _Cols(v.reshape(v.shape[1:]) for v in jnp.split(tile, tile.shape[0], axis=0))


def _stack_last(vecs):
  """Stacks 2^k arrays along a new last axis with 2-way stacks (Triton joins)."""
  while len(vecs) > 1:  # the last-added axis is the low bit of the index
    half = len(vecs) // 2
    vecs = [jnp.stack([vecs[j], vecs[j + half]], axis=-1) for j in range(half)]
  return vecs[0].reshape(vecs[0].shape[:1] + (-1,))


def _store_state(ref, state, *idx):
  ref[idx + (slice(None), slice(None))] = _stack_last(list(state)).T.astype(ref.dtype)


def _gpu_params(cfg, r):
  a_nat = _load_state(r["A"])
  p = {"a_nat": a_nat, "a_exp": a_nat * _LOG2E}
  for key, name in (("d", "dskip"), ("bias", "bias")):
    if name in r:
      p[key] = r[name][...].astype(_F32)
  return p


def _gpu_getter(cfg, r, base, pre=None):
  """Step i of the body starting at time `base`, loaded from HBM (or taken from
  `pre`, rows loaded earlier by _gpu_prefetch)."""

  def get(name, i):
    t = base + i
    if name == "valid":
      return t < cfg.seq_len
    if pre and name in pre:
      return pre[name][i].astype(_F32)
    if name == "keep":
      return r["keep"][t]
    if name in ("b", "c"):  # one vector load, split into N scalars in registers
      row = r[name][t, :].astype(_F32)
      return _Cols(v.reshape(()) for v in jnp.split(row, row.shape[0]))
    return r[name][t, :].astype(_F32)

  return get


def _gpu_fetch(cfg, r, base, steps, names, on):
  """Rows base .. base+steps-1 of `names` (raw dtype) for a getter's `pre`; {} when off.

  Issued one loop body ahead and carried in registers, so their memory latency
  overlaps the current body's math (the walk is latency-bound)."""
  if not on:
    return {}
  return {name: [r[name][base + i, :] for i in range(steps)] for name in names if name in r}


def _stack_sum_d(prods):
  """[S x _Cols of N [bd] vectors] -> [S, N] sums over bd, in one (batched) reduction."""
  st = _stack_last([v for pr in prods for v in pr])  # [bd, S * N], index s * N + n
  return jnp.sum(st, axis=0).reshape(len(prods), len(prods[0]))


def _gpu_fwd_kernel(cfg, in_names, out_names, *refs):
  r = dict(zip(in_names + out_names, refs))
  p = _gpu_params(cfg, r)
  n = r["A"].shape[0]
  zeros = jnp.zeros((cfg.block_d,), _F32)
  h = _load_state(r["h0"]) if cfg.has_h0 else _Cols([zeros] * n)
  body, t_pad = cfg.fwd_sub, r["x"].shape[0]
  # With cfg.prefetch the loop carries the next body's x, dt, z rows (the HBM
  # reads; b and c rows are shared by all channel blocks and come from L2), so
  # their latency overlaps this body's math instead of starting each body.
  fetch = lambda base: _gpu_fetch(cfg, r, base, body, ("x", "dt", "z"), cfg.prefetch)

  def steps(k, q, carry):
    h, pre = carry
    base = k * cfg.chunk + q * body
    nxt = fetch(jnp.minimum(base + body, t_pad - body))  # the last body re-reads itself
    h, ys = _forward_steps(cfg, _gpu_getter(cfg, r, base, pre), h, p, body)
    for i, y in enumerate(ys):
      r["y"][base + i, :] = y.astype(r["y"].dtype)
    return h, nxt

  def chunk(k, carry):
    if "ckpt" in r:
      _store_state(r["ckpt"], carry[0], k)
    return jax.lax.fori_loop(0, cfg.chunk // body, functools.partial(steps, k), carry)

  h, _ = jax.lax.fori_loop(0, t_pad // cfg.chunk, chunk, (h, fetch(0)))
  _store_state(r["hT"], h)


def _gpu_bwd_kernel(cfg, in_names, out_names, *refs):
  r = dict(zip(in_names + out_names, refs))
  p = _gpu_params(cfg, r)
  sub, per_chunk = cfg.sub, cfg.chunk // cfg.sub
  n_chunks = r["x"].shape[0] // cfg.chunk
  scr = r["sub_scr"]  # this program's states at sub-chunk starts (stays in L2)
  zeros = jnp.zeros((cfg.block_d,), _F32)

  def barrier():
    if not cfg.interpret:
      from jax.experimental.pallas import triton as pltr  # pylint: disable=g-import-not-at-top
      pltr.debug_barrier()

  # With cfg.bwd_prefetch both passes load the next sub-chunk's rows one body
  # ahead: pass 1 (forward in time) x and dt, pass 2 (backward in time, carried
  # across chunks: the next chunk's pass 2 starts where this one's ends) x, dt,
  # dy and z.
  t_pad = r["x"].shape[0]
  fetch1 = lambda base: _gpu_fetch(cfg, r, base, sub, ("x", "dt"), cfg.bwd_prefetch)
  fetch2 = lambda base: _gpu_fetch(cfg, r, base, sub, ("x", "dt", "dy", "z"), cfg.bwd_prefetch)

  def sub_chunk(k, qq, carry):
    q = per_chunk - 1 - qq
    base = k * cfg.chunk + q * sub
    g, d_a, d_d, d_bias, pre = carry
    nxt = fetch2(jnp.maximum(base - sub, 0))  # the first sub-chunk re-reads itself
    acc = {"d": d_d, "bias": d_bias}
    pending = []

    def finish(i, step, prods):
      t = base + i
      red = {key: _sum_n(cfg, prods[key]) for key in ("yc", "gb", "wa") if key in prods}
      dx, ddt, dz, dd_term, db_term = _grad_outputs(
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

    g, d_a = _backward_steps(cfg, _gpu_getter(cfg, r, base, pre), _load_state(scr, q), g, d_a,
                             p, sub, finish)
    return g, d_a, acc["d"], acc["bias"], nxt

  def chunk(kk, carry):
    k = n_chunks - 1 - kk

    def save(q, carry1):
      h, pre = carry1
      base = k * cfg.chunk + q * sub
      nxt = fetch1(jnp.minimum(base + sub, t_pad - sub))
      _store_state(scr, h, q)
      return _advance(cfg, _gpu_getter(cfg, r, base, pre), h, p, sub), nxt

    jax.lax.fori_loop(0, per_chunk, save, (_load_state(r["ckpt"], k), fetch1(k * cfg.chunk)))
    barrier()  # sub-chunk states written by all threads before any reads them
    carry = jax.lax.fori_loop(0, per_chunk, functools.partial(sub_chunk, k), carry)
    barrier()  # ... and read before the next chunk overwrites them
    return carry

  n = r["A"].shape[0]
  init = (_load_state(r["dhT"]), _Cols([zeros] * n), zeros, zeros, fetch2(t_pad - sub))
  g, d_a, d_d, d_bias, _ = jax.lax.fori_loop(0, n_chunks, chunk, init)
  _store_state(r["dh0"], g)
  _store_state(r["dA"], d_a)
  if cfg.has_d:
    r["dD"][...] = d_d
  if cfg.has_bias:
    r["dbias"][...] = d_bias


# ------------------------------------------------------------------------------
# TPU kernels (Mosaic). Grid (B, D / block_d, T / chunk), the chunk axis
# sequential; one chunk per grid step, fully unrolled; blocks are loaded into
# VMEM values once and rows sliced statically; the state is an [N, bd] value.


def _eye(n):
  return (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
          == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)).astype(_F32)


def _tpu_params(cfg, r):
  a_nat = r["A"][...].astype(_F32)
  p = {"a_nat": a_nat, "a_exp": a_nat}
  for key, name in (("d", "dskip"), ("bias", "bias")):
    if name in r:
      p[key] = r[name][...].astype(_F32)
  return p


def _tpu_getter(cfg, blocks, k, offset):
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


def _tpu_load_blocks(r, names):
  return {n: r[n][...].astype(_F32) for n in names if n in r}


def _tpu_fwd_kernel(cfg, in_names, out_names, *refs):
  r = dict(zip(in_names + out_names + ["h_scr", "y_scr"], refs))
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    if cfg.has_h0:
      r["h_scr"][...] = r["h0"][...].astype(_F32)
    else:
      r["h_scr"][...] = jnp.zeros(r["h_scr"].shape, _F32)

  h = r["h_scr"][...]
  if "ckpt" in r:
    r["ckpt"][...] = h
  blocks = _tpu_load_blocks(r, ("x", "dt", "b", "c", "z", "keep"))
  p = _tpu_params(cfg, r)
  for i0 in range(0, cfg.chunk, cfg.sub):
    h, ys = _forward_steps(cfg, _tpu_getter(cfg, blocks, k, i0), h, p, cfg.sub)
    for i, y in enumerate(ys):
      r["y_scr"][i0 + i:i0 + i + 1, :] = y
  r["h_scr"][...] = h
  r["y"][...] = r["y_scr"][...].astype(r["y"].dtype)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    r["hT"][...] = h


_TPU_BWD_ROWS = ("dx", "ddt", "dz", "db", "dc")


def _tpu_bwd_kernel(cfg, in_names, out_names, *refs):
  scr_names = ["g_scr"] + [n + "_scr" for n in _TPU_BWD_ROWS]
  r = dict(zip(in_names + out_names + scr_names, refs))
  kk = pl.program_id(2)
  n_chunks = pl.num_programs(2)
  k = n_chunks - 1 - kk

  @pl.when(kk == 0)
  def _():
    r["g_scr"][...] = r["dhT"][...].astype(_F32)
    for name in ("dA", "dD", "dbias"):
      if name in r:
        r[name][...] = jnp.zeros(r[name].shape, _F32)

  blocks = _tpu_load_blocks(r, ("x", "dt", "b", "c", "z", "keep", "dy"))
  p = _tpu_params(cfg, r)
  eye = _eye(blocks["b"].shape[1])
  acc = {n: r[n][...] for n in ("dD", "dbias") if n in r}

  def finish_at(i0):
    def finish(i, step, prods):  # per-step reductions; rows to VMEM scratch
      i = i0 + i
      red = {key: _sum_n(cfg, val) for key, val in prods.items()}
      valid = k * cfg.chunk + i < cfg.seq_len if cfg.masked else None
      dx, ddt, dz, dd_term, db_term = _grad_outputs(cfg, p, step, valid, red)
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
    h = _advance(cfg, _tpu_getter(cfg, blocks, k, i0), h, p, cfg.sub)
  g, d_a = r["g_scr"][...], r["dA"][...]
  for q in reversed(range(len(subs))):  # pass 2: reverse scan, one sub-chunk at a time
    i0 = q * cfg.sub
    g, d_a = _backward_steps(cfg, _tpu_getter(cfg, blocks, k, i0), subs[q], g, d_a, p,
                             cfg.sub, finish_at(i0))
  r["g_scr"][...] = g
  r["dA"][...] = d_a
  for name, val in acc.items():
    r[name][...] = val
  for name in _TPU_BWD_ROWS:
    if name in r:
      r[name][...] = r[name + "_scr"][...].astype(r[name].dtype)

  @pl.when(kk == n_chunks - 1)
  def _():
    r["dh0"][...] = g


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
  kernel = _tpu_fwd_kernel if cfg.backend == "tpu" else _gpu_fwd_kernel
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
  kernel = _tpu_bwd_kernel if tpu else _gpu_bwd_kernel
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

# GPU: one channel per thread; more, smaller programs hide more memory latency. Measured on an
# H200 at (8, 2048, 2048, 16) bf16 fwd+bwd (benchmarks/RESULTS.md, 2026-11-29): block_d 32 / 1
# warp 7.96 ms, 64 / 2 warps 8.12 ms, 128 / 4 warps 8.95 ms; then with one basic block per body:
# 8-step forward bodies 7.81 ms, with prefetch 5.81 ms (forward 3.34 -> 1.83 ms), 16-step bodies
# without prefetch 6.96 ms (forward 1.22 ms). 16-step bodies with prefetch were not timed: their
# Triton compile did not finish within the call's limit.
_DEFAULTS = {  # backend -> block_d, chunk, sub_chunk, fwd_sub_chunk, num_warps, reduce_batch
    "tpu": dict(block_d=512, chunk=64, sub_chunk=8, fwd_sub_chunk=8, num_warps=4,
                reduce_batch=1, prefetch=0, bwd_prefetch=0),
    "gpu": dict(block_d=32, chunk=64, sub_chunk=4, fwd_sub_chunk=8, num_warps=1,
                reduce_batch=2, prefetch=1, bwd_prefetch=0),
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
