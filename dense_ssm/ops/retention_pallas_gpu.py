"""GPU (Pallas Triton lowering) kernels for chunked retention; algebra in retention_pallas.py.

One program owns one tile of the [K,V] state of one (batch, head) and walks the chunks of the
sequence with the tile in registers (float32), so no per-chunk state is ever written to HBM:

  forward  grid (V/BV, B*H)          tile [K, BV]   o[:, tile]        in order
  dq       grid (K/BK, V/VG, B*H)    tile [BK, VG]  dq[:, tile]       in order (S recomputed)
  dk       grid (K/BK, V/VG, B*H)    tile [BK, VG]  dk[:, tile], dS0  reverse order
  dv       grid (V/BV, B*H)          tile [K, BV]   dv[:, tile]       reverse order

A program whose tile spans the whole contraction dimension writes its output directly; when the
value dimension is split into VG groups (large d_v), dq and dk are written as float32 partial sums
over the groups and added in XLA. For wide heads (many value tiles) a pre-pass kernel computes the
masked chunk products q k^T * D and do v^T * D once, instead of in every tile. Inside a tile, K and
V are walked in power-of-two sub-blocks so that head dims such as 320 or 1536 need no padding. The
tile's first grid axis varies fastest, so programs of one (batch, head) run together and share
q/k/v/do reads through L2.

Shared memory (the limit on Hopper is 227 KiB per program): Triton's software pipeliner keeps
num_stages copies of every tile the chunk loop loads for a matmul. The measured (128, 256) heads run
3 stages; wide heads (whose [K, BV] tiles load q and k over all of d_k per chunk) run 2 stages where
they fit with margin (the 1.3B heads) and else unpipelined (1 stage; `pipeline_stages`). An
unpipelined loop holds its loads in registers, so there each
sub-block's state update is traced right after its sub-block is read (`early`), and its q/k (or
v/do) tiles die before the next sub-block loads; a pipelined loop keeps the measured order (all
updates after the chunk's output). benchmarks/gpu_kernel_resources.py compiles the kernels for
sm_90 without a GPU and prints their shared memory, registers and spills.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dense_ssm.ops import retention_pallas as rp

def _pow2_divisor(n, cap=128):
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


def padded_head_dims(dk, dv):
  """Pad head dims to a multiple of min(64, next power of two) so sub-blocks are >= 16 wide."""
  def pad(n):
    m = min(64, max(16, 1 << (n - 1).bit_length()))
    return -(-n // m) * m
  return pad(dk), pad(dv)


@dataclasses.dataclass(frozen=True)
class Tiles:
  sub_k: int        # K sub-block inside a [K, BV] tile
  fwd_block_v: int  # BV of the forward tile [K, BV]
  fwd_warps: int
  fwd_stages: int   # software-pipeline depth of the forward's chunk loop
  block_v: int      # BV of the dv tile [K, BV]
  dv_stages: int
  block_k: int      # BK of the dq / dk tiles [BK, VG]
  group_v: int      # VG of the dq / dk tiles
  sub_v: int        # V sub-block inside a [BK, VG] tile
  dqk_stages: int
  bwd_warps: int
  precompute: bool  # masked q k^T and do v^T in a pre-pass instead of in every tile


# Defaults measured on an H200 (benchmarks/RESULTS.md, 2026-11-29): the forward is fastest with
# small tiles (<= 8K state elements, 4 warps, >= 2 programs per SM); the backward kernels with
# 16K-element tiles, 8 warps and 3 pipeline stages, shrunk while there are fewer programs than
# about one per SM (each backward program also recomputes a [C, C] product over its full tile).
_FWD_BUDGET, _FWD_WARPS = 8192, 4
_BWD_BUDGET, _BWD_WARPS, _STAGES = 16384, 8, 3
_MIN_PROGRAMS = 128
# Pre-pass for the [C, C] chunk products once the forward splits V into this many tiles (each
# would recompute q k^T over all of K): the paper heads (d_k 320-384, d_v 1280-1536; 40-48 tiles),
# not the measured (128, 256) heads (4 tiles).
_PRECOMPUTE_TILES = 8
# Shared memory one program may use on an H100 / H200 (227 KiB; the Hopper opt-in maximum).
SHARED_MEMORY_LIMIT = 232448
_DQK_TWO_STAGE_FILL = 1.3  # see pipeline_stages
# Largest padded head dims (d_k, d_v) whose kernels were compiled for sm_90 and checked by
# benchmarks/gpu_kernel_resources.py: every kernel within the shared-memory limit for d_k in 16..384
# and d_v in 32..1536 (bf16 register spills at chunk 64 <= 470 B: two-stage dq / dk kernels with a
# 16-32 wide d_k block; at chunk 128 up to 1.3 KB; the measured (128, 256) backward spills 4 B).
MAX_HEAD_DIMS = (384, 1536)


def pipeline_stages(widths, chunk, itemsize, two_stage_fill=1.0):
  """num_stages of a chunk loop that loads [chunk, w] matmul operands, w in `widths`, per chunk.

  Triton's software pipeliner keeps num_stages copies of each such tile in shared memory,
  num_stages * chunk * sum(widths) * itemsize bytes, and the compiled kernels hold up to about
  one [chunk, chunk] bf16 tile more (measured with benchmarks/gpu_kernel_resources.py: 0.5-6 KB
  more at chunk 64, 20-30 KB at chunk 128; float32 inputs need less than their estimate). Three
  stages (measured fastest at the (128, 256) heads) when they fit; else two when they fit within
  `two_stage_fill` of the limit; else one. On the H200 two stages beat one at the 1.3B heads
  (320 x 1280, chunk 64: fwd+bwd 4.05 vs 4.81 ms) and at the 350M heads (384 x 1536, chunk 64:
  3.04 vs 4.94 ms all kernels; 4.45 ms with two stages for the forward and dv kernels only).
  The dq / dk kernels compile to less than the estimate when it is over the limit (287 KB ->
  221 KB at the 350M heads: the pipeliner leaves an operand single-buffered), which was checked
  at chunk 64 only: there they use _DQK_TWO_STAGE_FILL. Every kernel configuration these rules
  give two or three stages within MAX_HEAD_DIMS, at chunk 64 and 128, bf16 and float32, whose
  estimate is over 85% of the limit was compiled with triton 3.6: all fit.
  """
  need = chunk * sum(widths) * itemsize
  extra = 2 * chunk * chunk
  if _STAGES * need + extra <= SHARED_MEMORY_LIMIT:
    return _STAGES
  return 2 if 2 * need + extra <= two_stage_fill * SHARED_MEMORY_LIMIT else 1


def choose_tiles(dk, dv, batch_heads=None, tuning=(), chunk=64, itemsize=2):
  """Tile sizes for head dims (dk, dv), B*H sequences, chunk length and input itemsize (bytes);
  `tuning` overrides (benchmarks; "num_stages" sets all three kernels' pipeline depth)."""
  opts = dict(tuning)
  many = lambda n: batch_heads is None or n * batch_heads >= _MIN_PROGRAMS
  sub_k, sub_v = _pow2_divisor(dk), _pow2_divisor(dv)

  def block_v_for(budget, least=16):
    return min(sub_v, max(least, _pow2_floor(budget // dk)))

  # A forward tile recomputes q k^T over all of K: keep it at least 32 wide for big d_k.
  fwd_block_v = opts.get("fwd_block_v") or block_v_for(opts.get("fwd_budget", _FWD_BUDGET), 32)
  bwd_budget = opts.get("bwd_budget", _BWD_BUDGET)
  block_v = opts.get("block_v") or block_v_for(bwd_budget)
  while "block_v" not in opts and block_v > 32 and not many(dv // block_v):
    block_v //= 2
  block_k, group_v = opts.get("block_k"), opts.get("group_v")
  if block_k is None or group_v is None:
    # Fewest value groups (partial sums) with a BK of at least 32 (or all of K).
    best = (16, sub_v)
    for groups in range(1, dv // sub_v + 1):
      if dv % (groups * sub_v):
        continue
      gv = dv // groups
      bk = min(sub_k, _pow2_floor(bwd_budget // gv))
      if bk >= min(32, dk):
        best = (bk, gv)
        break
    block_k, group_v = block_k or best[0], group_v or best[1]
    while block_k > 32 and not many((dk // block_k) * (dv // group_v)):
      block_k //= 2
  precompute = bool(opts.get("precompute", dv // fwd_block_v >= _PRECOMPUTE_TILES))

  # Matmul operands each kernel loads per chunk: [C, width] tiles (plus the pre-pass's [C, C]).
  pre = [chunk] if precompute else []
  stages = lambda *widths, fill=1.0: opts.get("num_stages") or pipeline_stages(
      list(widths) + pre, chunk, itemsize, fill)
  return Tiles(sub_k=sub_k, fwd_block_v=fwd_block_v, fwd_warps=opts.get("fwd_warps", _FWD_WARPS),
               fwd_stages=stages(dk, dk, fwd_block_v),            # q, k, v
               block_v=block_v, dv_stages=stages(dk, dk, block_v),  # q, k, do
               block_k=block_k, group_v=group_v, sub_v=min(sub_v, group_v),
               dqk_stages=stages(block_k, group_v, group_v,       # k | q, v, do
                                 fill=_DQK_TWO_STAGE_FILL if chunk <= 64 else 1.0),
               bwd_warps=opts.get("bwd_warps", _BWD_WARPS), precompute=precompute)


def supports(dk, dv):
  """Whether the kernels were checked for head dims (dk, dv) (after padding; MAX_HEAD_DIMS)."""
  dk, dv = padded_head_dims(dk, dv)
  return dk <= MAX_HEAD_DIMS[0] and dv <= MAX_HEAD_DIMS[1]


def _pow2_floor(n):
  return 1 << (max(1, n).bit_length() - 1)


# ----------------------------------------------------------------------------------------------
# Shared loads.
# ----------------------------------------------------------------------------------------------


def _chunk_gates(refs, row, b, t0, c, need_d=True):
  """Loads one chunk's gates: D [C,C] (or None), fq [C,1], fk [C,1] (float32)."""
  cum_ref, lfq_ref, lfk_ref, seg_ref = refs
  cum = cum_ref[row, pl.ds(t0, c)]
  if not need_d:
    d = None
  elif seg_ref is None:
    d = rp.decay_matrix(cum[:, None], cum[None, :])
  else:
    seg = seg_ref[b, pl.ds(t0, c)]
    d = rp.decay_matrix(cum[:, None], cum[None, :], seg[:, None], seg[None, :])
  fq = jnp.exp(lfq_ref[row, pl.ds(t0, c)])[:, None]
  fk = jnp.exp(lfk_ref[row, pl.ds(t0, c)])[:, None]
  return d, fq, fk


def _unpack(refs, n_fixed, *present):
  """Kernel refs are: n_fixed inputs, one optional input per flag in `present`, outputs."""
  refs = list(refs)
  fixed, rest = refs[:n_fixed], refs[n_fixed:]
  optional = [rest.pop(0) if flag else None for flag in present]
  return (fixed, *optional, rest)


# ----------------------------------------------------------------------------------------------
# Optional pre-pass: masked chunk products X Y^T * D for all chunks at once ([B*H, T, C]).
# With wide state tiles split over many programs (large d_k x d_v), every program would otherwise
# recompute q k^T (forward, dv) or do v^T (dq, dk) over a whole head dim for each chunk.
# ----------------------------------------------------------------------------------------------


def _intra_kernel(*refs, dims, has_seg, sub):
  n_heads, _, c, _, _, per_batch = dims
  (x_ref, y_ref, cum_ref), seg_ref, (out_ref,) = _unpack(refs, 3, has_seg)
  ci, bh = pl.program_id(0), pl.program_id(1)
  b, h = bh // n_heads, bh % n_heads
  ts = pl.ds(pl.multiple_of(ci * c, c), c)
  cum = cum_ref[bh if per_batch else h, ts]
  if seg_ref is None:
    d = rp.decay_matrix(cum[:, None], cum[None, :])
  else:
    seg = seg_ref[b, ts]
    d = rp.decay_matrix(cum[:, None], cum[None, :], seg[:, None], seg[None, :])
  prod = jnp.zeros((c, c), jnp.float32)
  for j in range(x_ref.shape[-1] // sub):
    js = pl.ds(j * sub, sub)
    prod += rp.mm(x_ref[b, ts, h, js], y_ref[b, ts, h, js], tb=True)
  out_ref[bh, ts, :] = (prod * d).astype(out_ref.dtype)


def _masked_products(x, y, gates, dims, has_seg, sub, interpret):
  b, t, h, _ = x.shape
  c = dims[2]
  kernel = functools.partial(_intra_kernel, dims=dims, has_seg=has_seg, sub=sub)
  args = [x, y, gates.cum.reshape(-1, t)] + ([gates.seg] if has_seg else [])
  return _call(kernel, (t // c, b * h), rp.out_struct((b * h, t, c), x.dtype, x),
               4, 2, interpret, "retention_chunk_products")(*args)


# ----------------------------------------------------------------------------------------------
# Forward: tile [K, BV], chunks in order.
# ----------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, dims, tiles, has_seg, has_h0, has_pre):
  n_heads, n_chunks, c, dk, _, per_batch = dims
  ((q_ref, k_ref, v_ref, cum_ref, lfq_ref, lfk_ref, dec_ref), seg_ref, h0_ref, pre_ref,
   (o_ref, ht_ref)) = _unpack(refs, 7, has_seg, has_h0, has_pre)
  bv, sk = tiles.fwd_block_v, tiles.sub_k
  nk = dk // sk
  early = tiles.fwd_stages == 1  # update each sub-block once read (module doc)
  vb, bh = pl.program_id(0), pl.program_id(1)
  b, h = bh // n_heads, bh % n_heads
  grow = bh if per_batch else h  # row of the gate arrays
  vs = pl.ds(vb * bv, bv)
  ks = [pl.ds(j * sk, sk) for j in range(nk)]
  if h0_ref is None:
    state = tuple(jnp.zeros((sk, bv), jnp.float32) for _ in range(nk))
  else:
    state = tuple(h0_ref[b, h, ks[j], vs] for j in range(nk))
  gate_refs = (cum_ref, lfq_ref, lfk_ref, seg_ref)

  def body(ci, state):
    t0 = pl.multiple_of(ci * c, c)
    ts = pl.ds(t0, c)
    d, fq, fk = _chunk_gates(gate_refs, grow, b, t0, c, need_d=not has_pre)
    v = v_ref[b, ts, h, vs]
    factors = lambda: ((v * fk).astype(v.dtype), dec_ref[grow, ci])  # S_j <- dec S_j + k_j^T vk
    vk, dec = factors() if early else (None, None)
    scores = jnp.zeros((c, c), jnp.float32)
    inter = jnp.zeros((c, bv), jnp.float32)
    new_state, k_blocks = [], []
    for j in range(nk):
      qj = q_ref[b, ts, h, ks[j]]
      kj = k_ref[b, ts, h, ks[j]]
      if not has_pre:
        scores += rp.mm(qj, kj, tb=True)
      inter += rp.mm(qj, state[j].astype(qj.dtype))
      if early:
        new_state.append(dec * state[j] + rp.mm(kj, vk, ta=True))
      else:
        k_blocks.append(kj)
    scores = pre_ref[bh, ts, :] if has_pre else (scores * d).astype(v.dtype)
    o = rp.mm(scores, v) + fq * inter
    o_ref[b, ts, h, vs] = o.astype(o_ref.dtype)
    if not early:
      vk, dec = factors()
      new_state = [dec * state[j] + rp.mm(k_blocks[j], vk, ta=True) for j in range(nk)]
    return tuple(new_state)

  state = lax.fori_loop(0, n_chunks, body, state)
  for j in range(nk):
    ht_ref[b, h, ks[j], vs] = state[j]


# ----------------------------------------------------------------------------------------------
# dq (in order) and dk (reverse): tile [BK, VG].
# ----------------------------------------------------------------------------------------------


def _dqk_kernel(*refs, dims, tiles, has_seg, has_h0, has_pre, which):
  """which='dq': dq and q.dq, S from h0, in order; 'dk': dk, k.dk and dS0, reverse order."""
  n_heads, n_chunks, c, _, dv, per_batch = dims
  is_dq = which == "dq"
  ins, seg_ref, s0_ref, pre_ref, outs = _unpack(refs, 8, has_seg, has_h0 or not is_dq, has_pre)
  q_ref, k_ref, v_ref, do_ref, cum_ref, lfq_ref, lfk_ref, dec_ref = ins
  grad_ref, dot_ref = outs[0], outs[1]
  ds0_ref = outs[2] if (not is_dq and has_h0) else None
  bk, gv, sv = tiles.block_k, tiles.group_v, tiles.sub_v
  ni = gv // sv
  early = tiles.dqk_stages == 1  # update each sub-block once read (module doc)
  kb, vg, bh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  n_groups = dv // gv
  b, h = bh // n_heads, bh % n_heads
  grow = bh if per_batch else h  # row of the gate arrays
  ks = pl.ds(kb * bk, bk)
  vss = [pl.ds(vg * gv + i * sv, sv) for i in range(ni)]
  if s0_ref is None:
    state = tuple(jnp.zeros((bk, sv), jnp.float32) for _ in range(ni))
  else:
    state = tuple(s0_ref[b, h, ks, vss[i]] for i in range(ni))
  gate_refs = (cum_ref, lfq_ref, lfk_ref, seg_ref)
  partial = len(grad_ref.shape) == 5

  def body(step, state):
    ci = step if is_dq else n_chunks - 1 - step
    t0 = pl.multiple_of(ci * c, c)
    ts = pl.ds(t0, c)
    d, fq, fk = _chunk_gates(gate_refs, grow, b, t0, c, need_d=not has_pre)
    own = (q_ref if is_dq else k_ref)[b, ts, h, ks]      # q for q.dq, k for k.dk
    other = (k_ref if is_dq else q_ref)[b, ts, h, ks]    # k for dq, q for dk
    # dq: S_i <- dec S_i + (k * fk)^T v_i;  dk: dS_i <- dec dS_i + (q * fq)^T do_i.
    scale = lambda: (other * (fk if is_dq else fq)).astype(other.dtype)
    scaled, dec = (scale(), dec_ref[grow, ci]) if early else (None, None)
    dp = jnp.zeros((c, c), jnp.float32)
    inter = jnp.zeros((c, bk), jnp.float32)
    new_state, upd = [], []
    for i in range(ni):
      vi = v_ref[b, ts, h, vss[i]]
      doi = do_ref[b, ts, h, vss[i]]
      if not has_pre:
        dp += rp.mm(doi, vi, tb=True)
      # dq: do S^T (state before the chunk); dk: v dS^T (gradient at the chunk end).
      inter += rp.mm(doi if is_dq else vi, state[i].astype(vi.dtype), tb=True)
      if early:
        new_state.append(dec * state[i] + rp.mm(scaled, vi if is_dq else doi, ta=True))
      else:
        upd.append(vi if is_dq else doi)
    if has_pre:  # the pre-pass spans all of V: only the first value group adds it
      dpd = pre_ref[bh, ts, :]
      dpd = dpd if n_groups == 1 else jnp.where(vg == 0, dpd, jnp.zeros_like(dpd))
    else:
      dpd = (dp * d).astype(other.dtype)
    if is_dq:
      grad = rp.mm(dpd, other) + fq * inter
    else:
      grad = rp.mm(dpd, other, ta=True) + fk * inter
    scaled = scaled if early else scale()
    if partial:
      grad_ref[vg, b, ts, h, ks] = grad
    else:
      grad_ref[b, ts, h, ks] = grad.astype(grad_ref.dtype)
    dot_ref[kb * n_groups + vg, bh, ts] = jnp.sum(own.astype(jnp.float32) * grad, axis=1)
    if not early:
      dec = dec_ref[grow, ci]
      new_state = [dec * state[i] + rp.mm(scaled, upd[i], ta=True) for i in range(ni)]
    return tuple(new_state)

  state = lax.fori_loop(0, n_chunks, body, state)
  if ds0_ref is not None:
    for i in range(ni):
      ds0_ref[b, h, ks, vss[i]] = state[i]


# ----------------------------------------------------------------------------------------------
# dv: tile [K, BV], reverse order.
# ----------------------------------------------------------------------------------------------


def _dv_kernel(*refs, dims, tiles, has_seg, has_pre):
  n_heads, n_chunks, c, dk, _, per_batch = dims
  ins, seg_ref, dht_ref, pre_ref, (dv_ref,) = _unpack(refs, 7, has_seg, True, has_pre)
  q_ref, k_ref, do_ref, cum_ref, lfq_ref, lfk_ref, dec_ref = ins
  bv, sk = tiles.block_v, tiles.sub_k
  nk = dk // sk
  early = tiles.dv_stages == 1  # update each sub-block once read (module doc)
  vb, bh = pl.program_id(0), pl.program_id(1)
  b, h = bh // n_heads, bh % n_heads
  grow = bh if per_batch else h  # row of the gate arrays
  vs = pl.ds(vb * bv, bv)
  ks = [pl.ds(j * sk, sk) for j in range(nk)]
  state = tuple(dht_ref[b, h, ks[j], vs] for j in range(nk))
  gate_refs = (cum_ref, lfq_ref, lfk_ref, seg_ref)

  def body(step, state):
    ci = n_chunks - 1 - step
    t0 = pl.multiple_of(ci * c, c)
    ts = pl.ds(t0, c)
    d, fq, fk = _chunk_gates(gate_refs, grow, b, t0, c, need_d=not has_pre)
    do = do_ref[b, ts, h, vs]
    factors = lambda: ((do * fq).astype(do.dtype), dec_ref[grow, ci])  # dS_j += q_j^T dos
    dos, dec = factors() if early else (None, None)
    scores = jnp.zeros((c, c), jnp.float32)
    inter = jnp.zeros((c, bv), jnp.float32)
    new_state, q_blocks = [], []
    for j in range(nk):
      qj = q_ref[b, ts, h, ks[j]]
      kj = k_ref[b, ts, h, ks[j]]
      if not has_pre:
        scores += rp.mm(qj, kj, tb=True)
      inter += rp.mm(kj, state[j].astype(kj.dtype))
      if early:
        new_state.append(dec * state[j] + rp.mm(qj, dos, ta=True))
      else:
        q_blocks.append(qj)
    scores = pre_ref[bh, ts, :] if has_pre else (scores * d).astype(do.dtype)
    dv = rp.mm(scores, do, ta=True) + fk * inter
    dv_ref[b, ts, h, vs] = dv.astype(dv_ref.dtype)
    if not early:
      dos, dec = factors()
      new_state = [dec * state[j] + rp.mm(q_blocks[j], dos, ta=True) for j in range(nk)]
    return tuple(new_state)

  lax.fori_loop(0, n_chunks, body, state)


# ----------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------


def _gate_args(gates):
  bg, h, _ = gates.cum.shape
  flat = lambda x: x.reshape(bg * h, -1)
  return [flat(gates.cum), flat(gates.log_fq), flat(gates.log_fk), flat(gates.dec)]


def _call(kernel, grid, out_shape, num_warps, num_stages, interpret, name):
  return pl.pallas_call(
      kernel, grid=grid, out_shape=out_shape, interpret=interpret, name=name,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))


def _tiles(q, v, cfg):
  b, _, h, dk = q.shape
  return choose_tiles(dk, v.shape[-1], b * h, cfg.tuning, cfg.chunk, q.dtype.itemsize)


def forward(q, k, v, gates, h0, cfg):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  tiles = _tiles(q, v, cfg)
  dims = (h, t // cfg.chunk, cfg.chunk, dk, dv, gates.cum.shape[0] > 1)
  has_seg, has_h0 = gates.seg is not None, h0 is not None
  args = [q, k, v] + _gate_args(gates)
  args += [gates.seg] if has_seg else []
  args += [h0] if has_h0 else []
  if tiles.precompute:
    args.append(_masked_products(q, k, gates, dims, has_seg, tiles.sub_k, cfg.interpret))
  kernel = functools.partial(_fwd_kernel, dims=dims, tiles=tiles, has_seg=has_seg, has_h0=has_h0,
                             has_pre=tiles.precompute)
  out_shape = (rp.out_struct((b, t, h, dv), v.dtype, q),
               rp.out_struct((b, h, dk, dv), jnp.float32, q))
  return _call(kernel, (dv // tiles.fwd_block_v, b * h), out_shape, tiles.fwd_warps,
               tiles.fwd_stages, cfg.interpret, "retention_fwd")(*args)


def backward(q, k, v, do, gates, h0, dht, cfg):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  tiles = _tiles(q, v, cfg)
  dims = (h, t // cfg.chunk, cfg.chunk, dk, dv, gates.cum.shape[0] > 1)
  has_seg, has_h0, pre = gates.seg is not None, h0 is not None, tiles.precompute
  common = [*_gate_args(gates)] + ([gates.seg] if has_seg else [])
  n_k, n_g = dk // tiles.block_k, dv // tiles.group_v
  grid_qk = (n_k, n_g, b * h)
  grad_shape = lambda x: (rp.out_struct((n_g, b, t, h, dk), jnp.float32, q) if n_g > 1
                          else rp.out_struct((b, t, h, dk), x.dtype, q))
  dot_shape = rp.out_struct((n_k * n_g, b * h, t), jnp.float32, q)
  call = lambda kern, grid, out_shape, stages, name: _call(
      kern, grid, out_shape, tiles.bwd_warps, stages, cfg.interpret, name)
  dpd = [_masked_products(do, v, gates, dims, has_seg, tiles.sub_v, cfg.interpret)] if pre else []
  scores = [_masked_products(q, k, gates, dims, has_seg, tiles.sub_k, cfg.interpret)] if pre else []

  kern = functools.partial(_dqk_kernel, dims=dims, tiles=tiles, has_seg=has_seg, has_h0=has_h0,
                           has_pre=pre, which="dq")
  dq, qdq = call(kern, grid_qk, (grad_shape(q), dot_shape), tiles.dqk_stages, "retention_bwd_dq")(
      q, k, v, do, *common, *([h0] if has_h0 else []), *dpd)

  kern = functools.partial(_dqk_kernel, dims=dims, tiles=tiles, has_seg=has_seg, has_h0=has_h0,
                           has_pre=pre, which="dk")
  out_shape = (grad_shape(k), dot_shape)
  if has_h0:
    out_shape += (rp.out_struct((b, h, dk, dv), jnp.float32, q),)
  outs = call(kern, grid_qk, out_shape, tiles.dqk_stages, "retention_bwd_dk")(
      q, k, v, do, *common, dht, *dpd)
  dk_, kdk = outs[0], outs[1]
  dh0 = outs[2] if has_h0 else None

  kern = functools.partial(_dv_kernel, dims=dims, tiles=tiles, has_seg=has_seg, has_pre=pre)
  dv_ = call(kern, (dv // tiles.block_v, b * h), rp.out_struct(v.shape, v.dtype, q),
             tiles.dv_stages, "retention_bwd_dv")(q, k, do, *common, dht, *scores)

  if n_g > 1:
    dq, dk_ = dq.sum(0).astype(q.dtype), dk_.sum(0).astype(k.dtype)
  to_bht = lambda x: x.sum(0).reshape(b, h, t)
  return dq, dk_, dv_, dh0, to_bht(qdq), to_bht(kdk)
