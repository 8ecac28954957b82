"""Pallas chunked retention (dense_ssm/ops/retention_pallas*.py) against a sequential reference.

Values and gradients (q, k, v, log_decay, initial_state) of both kernels, TPU and GPU, run in the
Pallas interpreter on CPU, against a float32 `lax.scan` of the contract recurrence. Tolerances are
relative Frobenius errors; the bf16 bounds are about 4x the errors observed (o, S, dq, dk, dv, dh0
2e-3..3e-3; d log_decay 2.8e-2..3.5e-2: it is a reverse cumulative sum of q.dq - k.dk, which cancel).
Then: the Triton lowering of the GPU kernels runs on CPU (lowering to Triton IR needs no GPU), and
the Mosaic TPU kernels AOT-compile for a v5e 2x2 topology inside shard_map (skipped without libtpu).
"""

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssm.ops.retention_pallas import retention_pallas

TOL = {jnp.float32: dict(out=2e-5, dg=2e-4), jnp.bfloat16: dict(out=1.2e-2, dg=1.2e-1)}
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dh0")


def reference(q, k, v, log_decay, initial_state=None, segment_ids=None):
  """Token-by-token float32 recurrence S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  g = jnp.broadcast_to(log_decay, (b, t, h)) if log_decay.ndim == 1 else log_decay
  keep = jnp.ones((b, t), bool)
  if segment_ids is not None:
    keep = keep.at[:, 1:].set(segment_ids[:, 1:] == segment_ids[:, :-1])
  s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state

  def step(s, x):
    q_t, k_t, v_t, g_t, keep_t = x
    s = (jnp.exp(g_t) * keep_t[:, None])[..., None, None] * s + jnp.einsum(
        "bhk,bhv->bhkv", k_t, v_t, precision="highest")
    return s, jnp.einsum("bhk,bhkv->bhv", q_t, s, precision="highest")

  xs = [jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, g)] + [keep.T]
  s, o = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o, 0, 1), s


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a))
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(b, t, h, dk, dv, dtype, per_token, with_h0, with_seg, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = (jax.random.normal(ks[0], (b, t, h, dk)) * dk ** -0.5).astype(dtype)
  k = (jax.random.normal(ks[1], (b, t, h, dk)) * dk ** -0.5).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
  if per_token:  # GLA / Mamba-2 style, decays down to exp(-softplus(3)) ~ 0.05 per token
    g = -jax.nn.softplus(2.0 * jax.random.normal(ks[3], (b, t, h)) + 1.0)
  else:  # RetNet: log(1 - 2^(-5-h))
    g = jnp.log1p(-jnp.exp2(-5.0 - jnp.arange(h, dtype=jnp.float32)))
  h0 = jax.random.normal(ks[4], (b, h, dk, dv)) if with_h0 else None
  seg = None
  if with_seg:  # packed documents, some of length 1, a start at t=1 and one in the last chunk
    starts = jax.random.uniform(ks[5], (b, t)) < 0.12
    starts = starts.at[:, 1].set(True).at[:, t - 3].set(True)
    seg = jnp.cumsum(starts, axis=1).astype(jnp.int32) * 7  # ids need not be consecutive
  do = jax.random.normal(ks[6], (b, t, h, dv))
  dht = jax.random.normal(ks[7], (b, h, dk, dv))
  return q, k, v, g, h0, seg, do, dht


def _check(backend, b, t, h, dk, dv, dtype=jnp.float32, per_token=False, with_h0=False,
           with_seg=False, chunk_size=64, tuning=()):
  q, k, v, g, h0, seg, do, dht = _inputs(b, t, h, dk, dv, dtype, per_token, with_h0, with_seg)
  argnums = (0, 1, 2, 3, 4) if with_h0 else (0, 1, 2, 3)

  def loss(fn):
    def f(q, k, v, g, h0):
      o, s = fn(q, k, v, g, h0)
      return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s * dht), (o, s)
    return jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))

  kernel = lambda q, k, v, g, h0: retention_pallas(
      q, k, v, g, initial_state=h0, segment_ids=seg, chunk_size=chunk_size, backend=backend,
      interpret=True, _tuning=tuning)
  (_, (o, s)), grads = loss(kernel)(q, k, v, g, h0)
  f32 = lambda x: x.astype(jnp.float32)
  (_, (o_ref, s_ref)), grads_ref = loss(
      lambda q, k, v, g, h0: reference(q, k, v, g, h0, seg))(f32(q), f32(k), f32(v), g, h0)

  assert o.shape == (b, t, h, dv) and o.dtype == v.dtype
  assert s.shape == (b, h, dk, dv) and s.dtype == jnp.float32
  for x, x0 in zip(grads, (q, k, v, g, h0)):
    assert x.shape == x0.shape and x.dtype == x0.dtype
  tol = TOL[dtype]
  errs = {"o": _rel(o, o_ref), "S": _rel(s, s_ref)}
  errs.update({n: _rel(a, r) for n, a, r in zip(GRAD_NAMES, grads, grads_ref)})
  bad = {n: e for n, e in errs.items() if e > (tol["dg"] if n == "dg" else tol["out"])}
  assert not bad, f"errors over tolerance: {bad} (all: {errs})"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_all_options_ragged_packed(backend):
  """Per-token decay, initial state, packed segments, T not a multiple of the chunk."""
  _check(backend, b=2, t=50, h=2, dk=32, dv=64, per_token=True, with_h0=True, with_seg=True,
         chunk_size=16)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_constant_decay_short_sequence(backend):
  """RetNet decays, T < chunk (the chunk shrinks to 16, then T is padded)."""
  _check(backend, b=1, t=9, h=3, dk=16, dv=32)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_bfloat16_inputs(backend):
  _check(backend, b=2, t=40, h=2, dk=32, dv=64, dtype=jnp.bfloat16, per_token=True,
         with_h0=True, with_seg=True, chunk_size=16)


@pytest.mark.parametrize("precompute", [False, True])
def test_gpu_tiling_with_partial_sums(precompute):
  """d_k = 3 x 64 and d_v = 5 x 64 sub-blocks; a small tile budget splits V into 5 groups, so dq
  and dk are float32 partial sums, and the dv tile is 16 wide. With `precompute` the masked chunk
  products q k^T * D and do v^T * D come from a pre-pass kernel (the paper-head default)."""
  _check("gpu", b=1, t=40, h=1, dk=192, dv=320, with_h0=True, with_seg=precompute,
         chunk_size=16, tuning=(("bwd_budget", 4096), ("precompute", precompute)))


@pytest.mark.parametrize("precompute", [False, True])
def test_gpu_unpipelined_tiles(precompute):
  """One pipeline stage (the paper heads' default): each sub-block of a state tile is read and
  updated before the next one loads. [K, BV] tiles of 3 x 64 K sub-blocks; [64, 192] dq / dk tiles
  of 3 x 64 value sub-blocks in 3 value groups (partial sums)."""
  _check("gpu", b=1, t=40, h=1, dk=192, dv=576, with_h0=True, with_seg=precompute,
         chunk_size=16, tuning=(("num_stages", 1), ("block_k", 64), ("group_v", 192),
                                ("precompute", precompute)))


def test_gpu_tile_choice():
  """The H200-measured heads keep their tiles and 3 pipeline stages; the paper heads, whose q and k
  tiles over all of d_k would need 250-370 KB of shared memory at 3 stages, get two stages where
  those fit (both measured faster than one on the H200)."""
  from dense_ssm.ops import retention_pallas_gpu as gpu  # pylint: disable=g-import-not-at-top
  t = gpu.choose_tiles(128, 256, batch_heads=64)
  assert (t.fwd_block_v, t.fwd_warps, t.block_v, t.block_k, t.group_v, t.bwd_warps) == (
      64, 4, 128, 64, 256, 8)
  assert (t.fwd_stages, t.dv_stages, t.dqk_stages, t.precompute) == (3, 3, 3, False)
  for dk, dv, bh, stages in ((320, 1280, 32, (2, 2, 2)), (384, 1536, 16, (2, 2, 2))):
    t = gpu.choose_tiles(dk, dv, batch_heads=bh)
    assert (t.fwd_stages, t.dv_stages, t.dqk_stages, t.precompute) == stages + (True,)
    assert gpu.supports(dk, dv)
  assert gpu.choose_tiles(128, 256, 64, itemsize=4).fwd_stages == 2  # float32 tiles are 2x wider
  # Chunk 128 (the paper RetNet configs): two-stage dk compiles to 239 KB there, over the limit.
  assert gpu.choose_tiles(128, 256, 64, chunk=128).dqk_stages == 1
  assert gpu.choose_tiles(320, 1280, tuning=(("num_stages", 2),)).dqk_stages == 2
  assert not gpu.supports(512, 1536) and not gpu.supports(384, 2048)


def test_auto_impl_on_gpu_up_to_paper_heads(monkeypatch):
  """impl="auto" on a GPU picks the kernel up to the paper's widest heads, chunkwise beyond."""
  from dense_ssm.ops import dispatch  # pylint: disable=g-import-not-at-top
  retention_ops = importlib.import_module("dense_ssm.ops.retention")  # ops.retention is the function
  monkeypatch.setattr(dispatch, "accelerator", lambda: "gpu")
  for dk, dv in ((128, 256), (128, 128), (320, 1280), (384, 1536), (96, 160)):
    assert retention_ops._auto_impl(dk, dv) == "pallas"  # pylint: disable=protected-access
  assert retention_ops._auto_impl(512, 2048) == "chunkwise"  # pylint: disable=protected-access


def test_tpu_value_tiling_and_head_padding():
  """d_v = 640: five 128-lane value blocks in the forward; d_k = 72 is padded to 128 lanes."""
  _check("tpu", b=1, t=32, h=1, dk=72, dv=640, per_token=True, with_h0=True, chunk_size=16)


def test_bad_inputs_raise():
  q = jnp.zeros((1, 8, 2, 16))
  g = jnp.zeros((2,))
  with pytest.raises(ValueError, match="matching B,T,H"):
    retention_pallas(q, q, jnp.zeros((1, 8, 3, 16)), g, backend="gpu", interpret=True)
  with pytest.raises(ValueError, match="log_decay"):
    retention_pallas(q, q, q, jnp.zeros((3,)), backend="gpu", interpret=True)
  with pytest.raises(ValueError, match="chunk_size"):
    retention_pallas(q, q, q, g, chunk_size=48, backend="gpu", interpret=True)
  with pytest.raises(ValueError, match="backend"):
    retention_pallas(q, q, q, g, backend="cuda", interpret=True)
  with pytest.raises(ValueError, match="initial_state"):
    retention_pallas(q, q, q, g, initial_state=jnp.zeros((1, 2, 16, 8)), backend="gpu",
                     interpret=True)
  with pytest.raises(ValueError, match="dtype"):
    retention_pallas(q.astype(jnp.int32), q, q, g, backend="gpu", interpret=True)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="interpret=True"):
      retention_pallas(q, q, q, g)


def _fwd_bwd(backend, b, t, h, dk, dv, dtype, per_token=True):
  """A jittable loss-and-grad of the kernel and its argument shapes: per-token decay, initial
  state and segments, or (per_token=False) the RetNet per-head decay with no options."""
  def step(q, k, v, g, h0, seg, do):
    def loss(q, k, v, g, h0):
      o, s = retention_pallas(q, k, v, g, initial_state=h0 if per_token else None,
                              segment_ids=seg if per_token else None, backend=backend)
      return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s)
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, h0)
  shapes = [((b, t, h, dk), dtype), ((b, t, h, dk), dtype), ((b, t, h, dv), dtype),
            ((b, t, h) if per_token else (h,), jnp.float32), ((b, h, dk, dv), jnp.float32),
            ((b, t), jnp.int32), ((b, t, h, dv), jnp.float32)]
  return step, shapes


@pytest.mark.parametrize("dk,dv,kernels", [(128, 256, 4), (320, 1280, 7)])
def test_gpu_kernels_lower_to_triton(dk, dv, kernels):
  """The Triton lowering of the GPU kernels (ragged T) runs on CPU: forward, dq, dk, dv, and for
  the paper heads the three chunk-product pre-passes."""
  step, shapes = _fwd_bwd("gpu", 2, 200, 2, dk, dv, jnp.bfloat16)
  lowered = jax.jit(step).trace(*(jax.ShapeDtypeStruct(s, d) for s, d in shapes)).lower(
      lowering_platforms=("cuda",))
  assert lowered.as_text().count("xla.gpu.triton") == kernels


@pytest.mark.parametrize("per_token", [True, False])
def test_tpu_kernels_aot_compile(per_token):
  """Forward + backward Mosaic kernels compile for a v5e 2x2 slice, inside shard_map over the
  batch (check_vma=True; a replicated per-head log_decay gets its gradient summed over shards)."""
  pytest.importorskip("libtpu", reason="libtpu (the `tpu` extra) is needed to compile for TPU")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  mesh = Mesh(np.array(topo.devices).reshape(4), ("data",))
  # DenseRetNet-350M heads (d_k 384, d_v 1536), bf16, ragged T; batch over the 4 chips.
  step, shapes = _fwd_bwd("tpu", 4, 200, 2, 384, 1536, jnp.bfloat16, per_token)
  specs = [P("data")] * 7
  specs[3] = P("data") if per_token else P()
  def sharded_step(*xs):
    loss, grads = step(*xs)
    return jax.lax.psum(loss, "data"), grads
  fn = jax.jit(jax.shard_map(sharded_step, mesh=mesh, in_specs=tuple(specs),
                             out_specs=(P(), tuple(specs[:5]))))
  args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, sp))
          for (s, d), sp in zip(shapes, specs)]
  compiled = fn.lower(*args).compile()
  assert compiled.as_text().count("tpu_custom_call") == 3  # forward, dq, dk+dv
