"""Dense hidden connection semantics (SPEC section 2) and its ablation options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssm.models import DenseConfig, build_model
from tests.helpers import init, tiny


def _rms(x, w, eps=1e-6):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(w)


def _silu(x):
  return x / (1 + np.exp(-x))


def _run(cfg, params, tokens):
  logits, state = build_model(cfg).apply({"params": params}, tokens, mutable=["intermediates"])
  return logits, state["intermediates"]


@pytest.mark.parametrize("m", [1, 2, 4])
def test_layer_l_fuses_min_l_m_preceding_prefusion_features(m):
  cfg = tiny("dense_retnet", num_layers=5, dense=DenseConfig(layers=m, r_k=4, r_v=4))
  _, params = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, cfg.vocab_size)
  _, inter = _run(cfg, params, tokens)
  feats = [inter[f"features_{i}"][0] for i in range(cfg.num_layers)]  # (k_l, v_l), pre-fusion
  for l in range(cfg.num_layers):
    mix = inter[f"layers_{l}"]["self_attn"]
    k_fused, v_fused = mix["kv_fused"][0]
    if l == 0:  # layer 0 fuses nothing and has no k/v norm
      np.testing.assert_array_equal(k_fused, feats[0][0])
      np.testing.assert_array_equal(v_fused, feats[0][1])
      assert "gate" not in mix.get("k_fusion", {})
      continue
    p = params[f"layers_{l}"]["self_attn"]
    x_hat = np.asarray(mix["x_hat"][0], np.float64)
    srcs = list(range(max(0, l - m), l))
    assert len(srcs) == min(l, m)
    for kind, idx in (("k_fusion", 0), ("v_fusion", 1)):
      f = p[kind]
      gate = _silu(_silu(x_hat @ np.asarray(f["fc1"]["kernel"])) @ np.asarray(f["fc2"]["kernel"]))
      # The gate comes from the *current* layer's normalised input.
      np.testing.assert_allclose(mix[kind]["gate"][0], gate, rtol=2e-4, atol=2e-6)
      fused = feats[l][idx] + sum(gate * np.asarray(feats[j][idx]) for j in srcs)
      want = _rms(fused, f["norm"]["scale"])
      got = (k_fused, v_fused)[idx]
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_dense_gates_receive_gradients():
  cfg = tiny("dense_retnet", num_layers=4)
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)

  def loss(p):
    logits = model.apply({"params": p}, tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = jax.grad(loss)(params)
  for l in range(cfg.num_layers):
    for kind in ("k_fusion", "v_fusion"):
      g = grads[f"layers_{l}"]["self_attn"][kind]
      norms = [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(g)]
      if l == 0:
        assert max(norms) == 0.0  # owned (as in the reference) but unused
      else:
        assert min(norms) > 0.0, (l, kind, norms)


def test_dense_mamba_gates_receive_gradients_plain_mamba_has_none():
  cfg = tiny("dense_mamba", num_layers=3)
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 20), 0, cfg.vocab_size)
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens) ** 2))(params)
  for l in (1, 2):
    for kind in ("x_fusion", "b_fusion"):
      leaves = jax.tree.leaves(grads[f"layers_{l}"]["self_attn"][kind])
      assert min(float(jnp.linalg.norm(x)) for x in leaves) > 0.0
  plain = tiny("mamba", num_layers=3)
  _, p_plain = init(plain)
  assert "x_fusion" not in p_plain["layers_1"]["self_attn"]


@pytest.mark.parametrize("dense", [
    DenseConfig(layers=2, projection="linear", r_k=4, r_v=4),
    DenseConfig(layers=2, select="linear", r_k=4, r_v=4),
    DenseConfig(layers=2, select="none", r_k=4, r_v=4),
    DenseConfig(layers=2, fusion="concat", r_k=4, r_v=4),
    DenseConfig(layers=2, every=2, r_k=4, r_v=4),
])
def test_ablation_options(dense):
  cfg = tiny("dense_retnet", num_layers=4, dense=dense)
  _, params = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 10), 0, cfg.vocab_size)
  logits, inter = _run(cfg, params, tokens)
  assert bool(jnp.all(jnp.isfinite(logits)))
  for l in range(1, cfg.num_layers):
    fused = inter[f"layers_{l}"]["self_attn"]["kv_fused"][0][0]
    pre = inter[f"features_{l}"][0][0]
    if dense.every > 1 and l % dense.every:
      np.testing.assert_array_equal(fused, pre)  # not a dense layer
    else:
      assert not np.allclose(fused, pre)


def test_bad_dense_option_is_a_clear_error():
  cfg = tiny("dense_retnet", dense=DenseConfig(layers=2, fusion="mul"))
  with pytest.raises(ValueError, match="dense.fusion"):
    init(cfg)
