"""Retention implementations agree with the token-by-token reference (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dense_ssm import ops


def _inputs(key, b=2, t=45, h=3, dk=8, dv=6, per_token=False):
  ks = jax.random.split(key, 5)
  q = jax.random.normal(ks[0], (b, t, h, dk))
  k = jax.random.normal(ks[1], (b, t, h, dk)) / np.sqrt(dk)
  v = jax.random.normal(ks[2], (b, t, h, dv))
  s0 = jax.random.normal(ks[3], (b, h, dk, dv))
  ld = (-jax.nn.softplus(jax.random.normal(ks[4], (b, t, h))) if per_token
        else ops.retnet_log_decay(h))
  a, c = t // 4, t // 2
  seg = jnp.array([[1] * a + [2] * (c - a) + [3] * (t - c)] + [[4] * t] * (b - 1))
  return q, k, v, ld, s0, seg


_retention = jax.jit(ops.retention, static_argnames=("impl", "chunk_size"))


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("use_init,use_seg", [(False, False), (True, True)])
@pytest.mark.parametrize("impl,chunk", [("parallel", 0), ("chunkwise", 16), ("chunkwise", 7),
                                        ("chunkwise", 64)])
def test_forms_agree(per_token, use_init, use_seg, impl, chunk):
  q, k, v, ld, s0, seg = _inputs(jax.random.PRNGKey(0), per_token=per_token)
  kw = dict(initial_state=s0 if use_init else None, segment_ids=seg if use_seg else None)
  o_ref, s_ref = _retention(q, k, v, ld, impl="reference", **kw)
  o, s = _retention(q, k, v, ld, impl=impl, chunk_size=chunk, **kw)
  assert _rel(o, o_ref) < 1e-5
  assert _rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("impl", ["parallel", "chunkwise"])
def test_gradients_agree_with_reference(impl):
  q, k, v, ld, s0, seg = _inputs(jax.random.PRNGKey(1), t=29, per_token=True)
  w = jax.random.normal(jax.random.PRNGKey(2), v.shape)

  def loss(fn_impl, q, k, v, ld, s0):
    o, s = ops.retention(q, k, v, ld, initial_state=s0, segment_ids=seg, impl=fn_impl,
                         chunk_size=8)
    return jnp.sum(o * w) + jnp.sum(s ** 2) * 1e-2

  g_ref = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2, 3, 4)))(
      q, k, v, ld, s0)
  g = jax.jit(jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2, 3, 4)))(q, k, v, ld, s0)
  for a, b in zip(g, g_ref):
    assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("impl", ["reference", "parallel", "chunkwise"])
def test_gradients_match_finite_differences_float64(impl):
  with jax.enable_x64(True):
    q, k, v, ld, s0, seg = _inputs(jax.random.PRNGKey(3), b=1, t=9, h=2, dk=3, dv=2,
                                   per_token=True)
    q, k, v, ld, s0 = (a.astype(jnp.float64) for a in (q, k, v, ld, s0))
    f = lambda q, k, v, ld, s0: _retention(q, k, v, ld, initial_state=s0, segment_ids=seg,
                                              impl=impl, chunk_size=4)
    check_grads(f, (q, k, v, ld, s0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_step_matches_scan():
  q, k, v, ld, s0, _ = _inputs(jax.random.PRNGKey(4), t=12)
  o_ref, s_ref = ops.retention(q, k, v, ld, initial_state=s0, impl="reference")
  s, outs = s0, []
  step = jax.jit(ops.retention_step)
  for t in range(q.shape[1]):
    o, s = step(q[:, t], k[:, t], v[:, t], ld, s)
    outs.append(o)
  assert _rel(jnp.stack(outs, 1), o_ref) < 1e-6
  assert _rel(s, s_ref) < 1e-6


def test_normalized_parallel_matches_spec_recurrence_up_to_row_scale():
  """docs/model.md, 'Retention modes': the reference parallel form and recurrence differ by a
  per-(token, head) scalar (the clamp of sum |A|), which the head RMSNorm removes."""
  with jax.enable_x64(True):
    _check_normalized_parallel()


def _check_normalized_parallel():
  q, k, v, ld, _, _ = _inputs(jax.random.PRNGKey(5), b=1, t=24, per_token=False)
  q, k, v = (a.astype(jnp.float64) for a in (q, k, v))
  ld = ld.astype(jnp.float64)
  o_par, _ = ops.retention_parallel_normalized(q, k, v, ld)
  gamma = jnp.exp(ld)
  # The reference recurrence, literally: s_t = gamma s_{t-1} + 1, S_t = S_{t-1} sqrt(s_{t-1})
  # gamma / sqrt(s_t) + k^T v / sqrt(s_t).
  s_prev = jnp.ones_like(gamma)
  S = jnp.einsum("hk,hv->hkv", k[0, 0], v[0, 0])
  outs = [jnp.einsum("hk,hkv->hv", q[0, 0], S)]
  for t in range(1, q.shape[1]):
    s_t = gamma * s_prev + 1
    S = (S * (jnp.sqrt(s_prev) * gamma / jnp.sqrt(s_t))[:, None, None]
         + jnp.einsum("hk,hv->hkv", k[0, t], v[0, t]) / jnp.sqrt(s_t)[:, None, None])
    outs.append(jnp.einsum("hk,hkv->hv", q[0, t], S))
    s_prev = s_t
  o_rec = jnp.stack(outs)[None]
  ratio = o_rec / o_par  # constant along d_v for each (t, h)
  assert float(jnp.max(jnp.abs(ratio - ratio[..., :1]) / jnp.abs(ratio[..., :1]))) < 1e-9
  # The scalar is exactly the clamp: ratio == clamp(sum_j |A_ij|, 1, 5e4), A = (q k^T) * D_norm.
  t = q.shape[1]
  i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  d = jnp.where(j <= i, gamma[:, None, None] ** (i - j), 0.0)  # [H,T,T]
  d = d / jnp.sqrt(d.sum(-1, keepdims=True))
  a = jnp.einsum("ihk,jhk->hij", q[0], k[0]) * d
  clamp = jnp.clip(jnp.abs(a).sum(-1), 1.0, 5e4).T  # [T,H]
  np.testing.assert_allclose(ratio[0, ..., 0], clamp, rtol=1e-9)
  assert float(clamp.max()) > 1.5  # the clamp is active on these inputs, so the check has teeth


def test_bad_shapes_raise_clear_errors():
  q, k, v, ld, s0, seg = _inputs(jax.random.PRNGKey(6))
  with pytest.raises(ValueError, match="log_decay"):
    ops.retention(q, k, v, ld[:2])
  with pytest.raises(ValueError, match="initial_state"):
    ops.retention(q, k, v, ld, initial_state=s0[:, :1])
  with pytest.raises(ValueError, match="segment_ids"):
    ops.retention(q, k, v, ld, segment_ids=seg[:, :3])
  with pytest.raises(ValueError, match="impl"):
    ops.retention(q, k, v, ld, impl="cuda")
