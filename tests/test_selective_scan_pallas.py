"""Pallas selective scan vs the sequential `lax.scan` reference of dense_ssm.ops (interpret mode on CPU).

Tolerances (relative, ||out - ref|| / ||ref||): float32 inputs 1e-5 for values and gradients
(observed ~1e-7); bfloat16 inputs 1e-2 on values (observed ~2e-3, the rounding of y to bf16).
A last test AOT-compiles the TPU kernels (forward and backward) for a v5e:2x2 topology with
libtpu on this CPU machine, so that Mosaic lowering errors show up without a TPU.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssm.ops.selective_scan import selective_scan
from dense_ssm.ops.selective_scan_pallas import selective_scan_pallas

F32_TOL = 1e-5
BF16_TOL = 1e-2


def reference(x, dt, A, b, c, **kw):
  """The project's sequential reference (`ops.selective_scan(impl="sequential")`), float32 math."""
  with jax.default_matmul_precision("highest"):
    return selective_scan(x, dt, A, b, c, impl="sequential", **kw)


def make_inputs(seed, bsz, t, d, n, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 9)
  return dict(
      x=jax.random.normal(ks[0], (bsz, t, d), dtype),
      dt=(jax.random.normal(ks[1], (bsz, t, d)) - 1.0).astype(dtype),
      A=-jnp.exp(jax.random.normal(ks[2], (d, n))),
      b=jax.random.normal(ks[3], (bsz, t, n), dtype),
      c=jax.random.normal(ks[4], (bsz, t, n), dtype),
      d_skip=jax.random.normal(ks[5], (d,)),
      z=jax.random.normal(ks[6], (bsz, t, d), dtype),
      dt_bias=0.5 * jax.random.normal(ks[7], (d,)),
      initial_state=jax.random.normal(ks[8], (bsz, d, n)),
  )


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def check_values_and_grads(inputs, static, kernel_kw):
  """Compares y, final state and all gradients of a random projection of both outputs."""
  names = [k for k, v in inputs.items() if v is not None and k != "segment_ids"
           and jnp.issubdtype(v.dtype, jnp.floating)]
  ky, kh = jax.random.split(jax.random.PRNGKey(7))
  x = inputs["x"]
  w_y = jax.random.normal(ky, x.shape)
  w_h = jax.random.normal(kh, (x.shape[0], x.shape[2], inputs["A"].shape[1]))

  def loss(fn, diff):
    y, h = fn(**diff, **{k: v for k, v in inputs.items() if k not in names}, **static)
    return jnp.sum(y * w_y) + jnp.sum(h * w_h), (y, h)

  diff = {k: inputs[k] for k in names}
  ours = lambda **a: selective_scan_pallas(**a, interpret=True, **kernel_kw)
  (_, (y, h)), g = jax.value_and_grad(lambda d: loss(ours, d), has_aux=True)(diff)
  (_, (y_ref, h_ref)), g_ref = jax.value_and_grad(lambda d: loss(reference, d), has_aux=True)(diff)
  assert y.shape == y_ref.shape and y.dtype == x.dtype
  assert h.shape == h_ref.shape and h.dtype == jnp.float32
  assert rel(y, y_ref) < F32_TOL
  assert rel(h, h_ref) < F32_TOL
  for k in names:
    assert g[k].shape == diff[k].shape, k
    assert rel(g[k], g_ref[k]) < F32_TOL, (k, rel(g[k], g_ref[k]))


@pytest.mark.parametrize("backend,prefetch", [("tpu", None), ("gpu", False), ("gpu", True)])
def test_all_options_ragged_segments(backend, prefetch):
  """T=37 (ragged for chunk 8), packed segments, initial state, d_skip, z, dt_bias;
  on GPU with and without loads one body ahead (2 bodies per chunk both ways)."""
  bsz, t, d, n = 2, 37, (128 if backend == "tpu" else 16), 6
  inputs = make_inputs(0, bsz, t, d, n)
  inputs["segment_ids"] = jnp.array([[0] * 9 + [1] * 20 + [2] * 8, [3] * 37], jnp.int32)
  block_d = 128 if backend == "tpu" else 8  # GPU: two channel blocks
  check_values_and_grads(inputs, {}, dict(backend=backend, chunk=8, sub_chunk=4, block_d=block_d,
                                          fwd_sub_chunk=4, prefetch=prefetch,
                                          bwd_prefetch=prefetch))


def test_gpu_kernels_lower_for_cuda():
  """The GPU kernels (inline lg2.approx included) lower to Triton calls without a GPU."""
  inputs = make_inputs(0, 1, 32, 16, 4)
  inputs["z"] = inputs["x"]

  def loss(x):
    y, h = selective_scan_pallas(**{**inputs, "x": x}, backend="gpu", chunk=16, prefetch=True,
                                 bwd_prefetch=True)
    return jnp.sum(y) + jnp.sum(h)

  text = jax.jit(jax.grad(loss)).trace(inputs["x"]).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2  # forward and backward kernels


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_no_options_short_sequence(backend):
  """No optional inputs, dt used as is, T=5 < chunk, N=5 and D=20 that need padding."""
  inputs = make_inputs(1, 1, 5, 20, 5)
  inputs = {k: inputs[k] for k in ("x", "dt", "A", "b", "c")}
  inputs["dt"] = jax.nn.softplus(inputs["dt"])  # positive step sizes
  kernel_kw = dict(backend=backend, chunk=8, sub_chunk=4, reduce_batch=4)
  if backend == "gpu":
    kernel_kw["block_d"] = 16
  check_values_and_grads(inputs, {"dt_softplus": False}, kernel_kw)


def test_bfloat16_inputs():
  inputs = make_inputs(2, 2, 24, 32, 8, jnp.bfloat16)
  y, h = selective_scan_pallas(**inputs, backend="gpu", interpret=True, chunk=8, block_d=16)
  y_ref, h_ref = reference(**{k: (v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v)
                              for k, v in inputs.items()})
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  assert rel(y.astype(jnp.float32), y_ref) < BF16_TOL
  assert rel(h, h_ref) < 1e-4  # the state stays float32


def test_bad_input_errors():
  inputs = make_inputs(0, 1, 8, 16, 4)
  with pytest.raises(ValueError, match="b has shape"):
    selective_scan_pallas(**{**inputs, "b": inputs["b"][:, :4]}, interpret=True)
  with pytest.raises(ValueError, match="backend"):
    selective_scan_pallas(**inputs, backend="cuda", interpret=True)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="interpret=True"):
      selective_scan_pallas(**inputs)


def test_tpu_kernels_aot_compile():
  """Forward + backward Mosaic kernels compile for a v5e 2x2 slice, inside shard_map."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pytest.skip("libtpu is not installed (pip install -e .[tpu])")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  mesh = Mesh(np.array(topo.devices), ("data",))
  bsz, t, d, n = 4, 200, 256, 16

  def step(x, dt, A, b, c, d_skip, z, dt_bias, h0, seg):
    def loss(x, dt, A, b, c, d_skip, z, dt_bias, h0):
      y, h = selective_scan_pallas(x, dt, A, b, c, d_skip=d_skip, z=z, dt_bias=dt_bias,
                                   initial_state=h0, segment_ids=seg, backend="tpu",
                                   block_d=128, chunk=32)
      return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)
    return jax.grad(loss, argnums=tuple(range(9)))(x, dt, A, b, c, d_skip, z, dt_bias, h0)

  data, rep = P("data"), P()
  specs = (data, data, rep, data, data, rep, data, rep, data, data)
  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=specs[:9],
                             check_vma=False))
  for dtype in (jnp.float32, jnp.bfloat16):
    shapes = [((bsz, t, d), dtype), ((bsz, t, d), dtype), ((d, n), jnp.float32),
              ((bsz, t, n), dtype), ((bsz, t, n), dtype), ((d,), jnp.float32),
              ((bsz, t, d), dtype), ((d,), jnp.float32), ((bsz, d, n), jnp.float32),
              ((bsz, t), jnp.int32)]
    args = [jax.ShapeDtypeStruct(s, dt, sharding=NamedSharding(mesh, sp))
            for (s, dt), sp in zip(shapes, specs)]
    compiled = fn.lower(*args).compile()
    assert compiled is not None
