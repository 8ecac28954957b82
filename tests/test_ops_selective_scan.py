"""Selective scan: sequential and associative forms agree (values, gradients); float64 gradients
match finite differences; the decode step matches the scan."""

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

from dense_ssm import ops

_scan = jax.jit(ops.selective_scan, static_argnames=("impl", "chunk_size", "dt_softplus"))


def _inputs(key, b=2, t=37, d=6, n=4):
  k = jax.random.split(key, 9)
  x = jax.random.normal(k[0], (b, t, d))
  dt = jax.random.normal(k[1], (b, t, d))
  a = -jnp.exp(jax.random.normal(k[2], (d, n)))
  bb = jax.random.normal(k[3], (b, t, n))
  c = jax.random.normal(k[4], (b, t, n))
  d_skip = jax.random.normal(k[5], (d,))
  z = jax.random.normal(k[6], (b, t, d))
  bias = jax.random.normal(k[7], (d,))
  h0 = jax.random.normal(k[8], (b, d, n))
  cut = t // 3
  seg = jnp.array([[1] * cut + [2] * (t - cut)] + [[7] * t] * (b - 1))
  return x, dt, a, bb, c, d_skip, z, bias, h0, seg


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("chunk", [5, 16, 128])
@pytest.mark.parametrize("full", [False, True])
def test_associative_matches_sequential(chunk, full):
  x, dt, a, b, c, d_skip, z, bias, h0, seg = _inputs(jax.random.PRNGKey(0))
  kw = dict(d_skip=d_skip, z=z, dt_bias=bias, initial_state=h0, segment_ids=seg) if full else {}
  y0, h0_ = _scan(x, dt, a, b, c, impl="sequential", **kw)
  y1, h1 = _scan(x, dt, a, b, c, impl="associative", chunk_size=chunk, **kw)
  assert _rel(y1, y0) < 1e-5
  assert _rel(h1, h0_) < 1e-5


def test_gradients_agree():
  x, dt, a, b, c, d_skip, z, bias, h0, seg = _inputs(jax.random.PRNGKey(1), t=21)
  w = jax.random.normal(jax.random.PRNGKey(2), x.shape)

  def loss(impl, *args):
    y, h = ops.selective_scan(*args[:5], d_skip=args[5], z=args[6], dt_bias=args[7],
                              initial_state=args[8], segment_ids=seg, impl=impl, chunk_size=8)
    return jnp.sum(y * w) + 0.1 * jnp.sum(h ** 2)

  args = (x, dt, a, b, c, d_skip, z, bias, h0)
  argnums = tuple(range(9))
  g0 = jax.jit(jax.grad(lambda *p: loss("sequential", *p), argnums=argnums))(*args)
  g1 = jax.jit(jax.grad(lambda *p: loss("associative", *p), argnums=argnums))(*args)
  for u, v in zip(g1, g0):
    assert _rel(u, v) < 1e-5


@pytest.mark.parametrize("impl", ["sequential", "associative"])
def test_gradients_match_finite_differences_float64(impl):
  with jax.enable_x64(True):
    args = _inputs(jax.random.PRNGKey(3), b=1, t=7, d=3, n=2)
    x, dt, a, b, c, d_skip, z, bias, h0, seg = (u.astype(jnp.float64) if u.dtype.kind == "f"
                                                else u for u in args)
    f = lambda x, dt, a, b, c, d_skip, z, bias, h0: _scan(
        x, dt, a, b, c, d_skip=d_skip, z=z, dt_bias=bias, initial_state=h0, segment_ids=seg,
        impl=impl, chunk_size=3)
    check_grads(f, (x, dt, a, b, c, d_skip, z, bias, h0), order=1, modes=["rev"], atol=1e-6,
                rtol=1e-6)


def test_step_matches_scan_and_states():
  x, dt, a, b, c, d_skip, z, bias, h0, _ = _inputs(jax.random.PRNGKey(4), t=10)
  y_ref, h_ref = _scan(x, dt, a, b, c, d_skip=d_skip, z=z, dt_bias=bias, initial_state=h0,
                       impl="sequential")
  step = jax.jit(ops.selective_scan_step)
  h, ys = h0, []
  for t in range(x.shape[1]):
    y, h = step(x[:, t], dt[:, t], a, b[:, t], c[:, t], h, d_skip=d_skip, z_BxD=z[:, t],
                dt_bias=bias)
    ys.append(y)
  assert _rel(jnp.stack(ys, 1), y_ref) < 1e-6
  assert _rel(h, h_ref) < 1e-6
  states, h_last = ops.selective_scan_states(x, dt, a, b, dt_bias=bias, initial_state=h0)
  y_plain, _ = _scan(x, dt, a, b, c, dt_bias=bias, initial_state=h0, impl="sequential")
  assert _rel(jnp.einsum("btdn,btn->btd", states, c), y_plain) < 1e-6
  assert _rel(h_last, h_ref) < 1e-6


def test_bad_shapes_raise_clear_errors():
  x, dt, a, b, c, *_ = _inputs(jax.random.PRNGKey(5))
  with pytest.raises(ValueError, match="selective_scan expects"):
    ops.selective_scan(x, dt, a[:, :2], b, c)
  with pytest.raises(ValueError, match="impl"):
    ops.selective_scan(x, dt, a, b, c, impl="cuda")
