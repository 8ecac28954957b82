"""Dense hidden connection semantics (docs/model.md) and its ablation options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssm import config_lib
from dense_ssm.models import DenseConfig, ModelConfig, abstract_params, build_model, count_params
from tests.helpers import decode_all, init, rel, replace, tiny


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


def test_per_source_gates_each_gate_its_own_source():
  m = 2
  cfg = tiny("dense_retnet", num_layers=3, mode="parallel",
             dense=DenseConfig(layers=m, gates="per_source", r_k=4, r_v=4))
  model, params = init(cfg)
  for l in range(cfg.num_layers):
    names = set(params[f"layers_{l}"]["self_attn"]["k_fusion"])
    assert names == {"fc1_0", "fc2_0", "fc1_1", "fc2_1", "norm"}, names
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 0, cfg.vocab_size)
  _, inter = _run(cfg, params, tokens)
  feats = [inter[f"features_{i}"][0] for i in range(cfg.num_layers)]
  l = 2
  mix, p = inter[f"layers_{l}"]["self_attn"], params[f"layers_{l}"]["self_attn"]
  x_hat = np.asarray(mix["x_hat"][0], np.float64)
  for kind, idx in (("k_fusion", 0), ("v_fusion", 1)):
    f = p[kind]
    fused = np.asarray(feats[l][idx], np.float64)
    for j in range(m):  # gate j selects source j = layer l-1-j
      gate = _silu(_silu(x_hat @ np.asarray(f[f"fc1_{j}"]["kernel"]))
                   @ np.asarray(f[f"fc2_{j}"]["kernel"]))
      np.testing.assert_allclose(mix[kind]["gate"][j], gate, rtol=2e-4, atol=2e-6)
      fused = fused + gate * np.asarray(feats[l - 1 - j][idx])
    np.testing.assert_allclose(mix["kv_fused"][0][idx], _rms(fused, f["norm"]["scale"]),
                               rtol=2e-4, atol=2e-5)

  grads = jax.jit(jax.grad(lambda q: jnp.sum(model.apply({"params": q}, tokens) ** 2)))(params)

  def norm(l, j):
    g = grads[f"layers_{l}"]["self_attn"]["v_fusion"]
    return float(jnp.linalg.norm(g[f"fc1_{j}"]["kernel"]) +
                 jnp.linalg.norm(g[f"fc2_{j}"]["kernel"]))

  assert norm(1, 0) > 0 and norm(1, 1) == 0  # layer 1 has one source: its second gate is idle
  assert min(norm(2, j) for j in range(m)) > 0


def test_every_k_only_dense_layers_own_fusion_with_the_given_gate_width():
  cfg = tiny("dense_retnet", num_layers=5, mode="parallel",
             dense=DenseConfig(layers=2, every=2, gate_width_k=6, gate_width_v=10))
  params = nn.unbox(abstract_params(cfg))
  for l in range(cfg.num_layers):
    mixer = params[f"layers_{l}"]["self_attn"]
    if l % 2:
      assert "k_fusion" not in mixer and "v_fusion" not in mixer
    else:
      assert mixer["k_fusion"]["fc1"]["kernel"].shape == (cfg.hidden_size, 6)
      assert mixer["v_fusion"]["fc2"]["kernel"].shape == (10, cfg.v_dim)


def test_concat_channel_merge_starts_as_add_and_learns():
  add = tiny("dense_retnet", num_layers=3, mode="parallel",
             dense=DenseConfig(layers=2, r_k=4, r_v=4))
  cat = replace(add, dense=replace(add.dense, fusion="concat"))
  model, params = init(cat)
  merge = params["layers_1"]["self_attn"]["v_fusion"]["merge_scale"]
  assert merge.shape == (3, cat.v_dim)  # (m + 1) inputs, one weight per channel
  _, add_params = init(add)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (1, 10), 0, cat.vocab_size)
  np.testing.assert_allclose(model.apply({"params": params}, tokens),
                             build_model(add).apply({"params": add_params}, tokens),
                             rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda q: jnp.sum(model.apply({"params": q}, tokens) ** 2)))(params)
  g = grads["layers_2"]["self_attn"]["k_fusion"]["merge_scale"]
  assert float(jnp.min(jnp.linalg.norm(g, axis=-1))) > 0  # every input's weights learn


@pytest.mark.parametrize("dense", [
    DenseConfig(layers=2, gates="per_source", r_k=4, r_v=4),
    DenseConfig(layers=2, fusion="concat", r_k=4, r_v=4),
    DenseConfig(layers=2, every=2, gate_width_k=12, gate_width_v=12),
])
def test_new_options_decode_matches_training_call(dense):
  cfg = tiny("dense_retnet", num_layers=3, mode="parallel", dense=dense)
  model, params = init(cfg)
  # Scale each parameter unevenly along its last axis: the concat weights (all ones at init)
  # then differ per channel and input, so that the merge matters.
  params = jax.tree.map(lambda x: x * (1.0 + 0.1 * jnp.arange(x.shape[-1]) / x.shape[-1]),
                        params)
  tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 20), 0, cfg.vocab_size)
  full = model.apply({"params": params}, tokens)
  assert bool(jnp.all(jnp.isfinite(full)))
  dec = decode_all(cfg, params, tokens, 7)
  assert rel(dec, full) < 1e-4


def test_dense_mamba_takes_the_new_options():
  cfg = tiny("dense_mamba", num_layers=3, dense=DenseConfig(
      layers=2, gates="per_source", every=2, gate_width_k=5, gate_width_v=7))
  params = nn.unbox(abstract_params(cfg))
  assert "x_fusion" not in params["layers_1"]["self_attn"]  # not a dense layer
  x_fusion = params["layers_2"]["self_attn"]["x_fusion"]
  assert x_fusion["fc1_1"]["kernel"].shape == (cfg.hidden_size, 7)
  assert params["layers_2"]["self_attn"]["b_fusion"]["fc2_0"]["kernel"].shape == (5, cfg.state_dim)


def test_state_level_mamba_rejects_options_it_cannot_apply():
  cfg = tiny("dense_mamba_state", dense=DenseConfig(layers=2, mamba_level="state",
                                                    gates="per_source"))
  with pytest.raises(ValueError, match="mamba_level='state' supports only"):
    init(cfg)


@pytest.mark.parametrize("value", [dict(every=0), dict(gate_width_k=-1), dict(gates="each")])
def test_bad_new_dense_values_are_clear_errors(value):
  (key,) = value
  with pytest.raises(ValueError, match=rf"dense\.{key}"):
    init(tiny("dense_retnet", dense=DenseConfig(layers=2, **value)))


# The paper keeps these ablations at the default model's size: ours within 1% (shapes only).
@pytest.mark.parametrize("variant", ["concat", "every2", "every4"])
def test_paper_ablations_keep_the_parameter_count(variant):
  default = 367_965_696  # retnet_350m (pinned in test_params_and_convert)
  got = count_params(ModelConfig.from_dict(config_lib.retnet_model("350m", variant)))
  assert abs(got - default) / default < 0.01, got


def test_every_variant_of_retnet_350m_builds():
  for variant in config_lib.RETNET_VARIANTS:
    cfg = config_lib.check_model_config(config_lib.retnet_config("350m", variant))
    assert cfg.family == ("retnet_ffn" if variant == "ffn" else "dense_retnet")
  assert config_lib.retnet_model("350m", "id_mlp") == config_lib.retnet_model("350m", "dense")
  assert config_lib.matched_gate_width("350m", 2, 32) == 96  # 48 * 16 layers / 8 owning
  assert config_lib.matched_gate_width("350m", 4, 32) == 192  # 48 * 16 / 4
