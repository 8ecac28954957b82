"""Mamba's initialisation follows the reference Mamba-1 code, checked statistically.

Every parameter's sampled range, mean and standard deviation must match its reference
distribution within sampling error (5 sigma for moments; the extremes must lie inside the bound
and within a gap that a uniform sample exceeds with probability ~exp(-20)).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import default as default_config
from dense_ssm import config_lib
from dense_ssm import optim
from dense_ssm.layers.mamba import MambaMixer, _dt_bias_init
from dense_ssm.models import DenseConfig, ModelConfig, build_model, init_cache

Z = 5.0  # sigmas allowed for sample moments
GAP = 20.0  # P(max of n uniforms is more than GAP * width / n below the top) ~ exp(-GAP)


def check_uniform(name, x, lo, hi):
  """x looks like n i.i.d. draws of U(lo, hi)."""
  x = np.asarray(x, np.float64).ravel()
  n, width = x.size, hi - lo
  slack = 1e-6 * max(abs(lo), abs(hi))  # float32 rounding at the ends
  assert lo - slack <= x.min() and x.max() <= hi + slack, (name, x.min(), x.max(), lo, hi)
  assert x.min() - lo < GAP * width / n and hi - x.max() < GAP * width / n, (
      name, x.min(), x.max(), lo, hi)
  sd = width / math.sqrt(12)
  assert abs(x.mean() - (lo + hi) / 2) < Z * sd / math.sqrt(n), (name, x.mean())
  # sd of the sample standard deviation of a uniform: width / sqrt(180 n).
  assert abs(x.std() - sd) < Z * width / math.sqrt(180 * n), (name, x.std(), sd)


def check_normal(name, x, std):
  """x looks like n i.i.d. draws of N(0, std^2)."""
  x = np.asarray(x, np.float64).ravel()
  n = x.size
  assert abs(x.mean()) < Z * std / math.sqrt(n), (name, x.mean())
  assert abs(x.std() - std) < Z * std / math.sqrt(2 * n), (name, x.std(), std)
  assert 3 * std < np.abs(x).max() < 7 * std, (name, np.abs(x).max())


def test_mixer_init_at_360m_width():
  """One DenseMamba layer of the 360M config: hidden 1024, d_inner 2048, N 16, dt_rank 64, in a
  50-layer model (only this layer is built; the out_proj rescale reads cfg.num_layers)."""
  cfg = ModelConfig.from_dict(config_lib.mamba_model("360m", "dense"))
  cfg = dataclasses.replace(cfg, dtype="float32")
  h, di, n, r, layers = (cfg.hidden_size, cfg.d_inner, cfg.state_dim, cfg.resolved_dt_rank,
                         cfg.num_layers)
  assert (h, di, n, r, layers) == (1024, 2048, 16, 64, 50) and cfg.dense.layers > 0
  mixer = MambaMixer(cfg, 1)
  # One decode step builds every parameter (the dense fusion's included) without a scan.
  init = jax.jit(lambda key: mixer.init(key, jnp.zeros((1, 1, h)), (), None, None,
                                        state=mixer.init_state(1), decode=True))
  p = nn.unbox(init(jax.random.PRNGKey(0))["params"])
  check_uniform("in_proj", p["in_proj"]["kernel"], -h ** -0.5, h ** -0.5)
  check_uniform("x_proj", p["x_proj"]["kernel"], -di ** -0.5, di ** -0.5)
  out_bound = di ** -0.5 / math.sqrt(layers)
  check_uniform("out_proj", p["out_proj"]["kernel"], -out_bound, out_bound)
  check_uniform("conv_kernel", p["conv_kernel"], -0.5, 0.5)
  check_uniform("conv_bias", p["conv_bias"], -0.5, 0.5)
  check_uniform("dt_proj", p["dt_proj"]["kernel"], -r ** -0.5, r ** -0.5)
  dt = jax.nn.softplus(p["dt_bias"])
  check_uniform("log dt", jnp.log(dt), math.log(1e-3), math.log(1e-1))
  np.testing.assert_allclose(p["A_log"], np.log(np.broadcast_to(np.arange(1, n + 1), (di, n))),
                             rtol=1e-6)
  np.testing.assert_array_equal(p["D"], np.ones(di))
  fusion = {k: v for k, v in p.items() if k.endswith("_fusion")}
  assert set(p) - set(fusion) == {"in_proj", "x_proj", "out_proj", "dt_proj", "conv_kernel",
                                  "conv_bias", "dt_bias", "A_log", "D"}
  kernels = [v for path, v in jax.tree_util.tree_flatten_with_path(fusion)[0]
             if getattr(path[-1], "key", "") == "kernel"]
  assert kernels
  check_normal("dense fusion", np.concatenate([np.ravel(v) for v in kernels]), cfg.init_std)


def test_dt_bias_floor():
  """dt below 1e-4 is raised to it before the inverse softplus."""
  b = _dt_bias_init(jax.random.PRNGKey(1), (4096,), dt_min=1e-6, dt_max=1e-3)
  dt = np.asarray(jax.nn.softplus(b), np.float64)
  assert dt.min() >= 1e-4 * (1 - 1e-4) and np.isclose(dt, 1e-4, rtol=1e-3).mean() > 0.5


def test_mamba_configs_use_reference_norm_eps():
  for c in (config_lib.mamba_model("360m", "dense"), config_lib.mamba_model("1b3", "plain"),
            default_config.get_config("mamba").model,
            default_config.get_config("dense_mamba").model):
    assert c["norm_eps"] == 1e-5
  assert default_config.get_config("dense_retnet").model.norm_eps == 1e-6


def test_language_model_init():
  """A whole 2-layer Mamba LM: out_proj is rescaled by the model's own layer count, the
  embedding is N(0, 0.02), norms start at 1, and the SSM dynamics are never weight-decayed."""
  cfg = ModelConfig(family="mamba", num_layers=2, hidden_size=64, vocab_size=2048,
                    tie_embeddings=True, norm_eps=1e-5, dense=DenseConfig(layers=0))
  model = build_model(cfg)
  cache = init_cache(cfg, 1)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1,), jnp.int32), cache,
                                        method=model.decode_step))
  p = nn.unbox(init(jax.random.PRNGKey(0))["params"])
  check_normal("embedding", p["embed_tokens"]["embedding"], cfg.init_std)
  out_bound = (cfg.d_inner * cfg.num_layers) ** -0.5
  check_uniform("out_proj", np.stack([p[f"layers_{i}"]["self_attn"]["out_proj"]["kernel"]
                                      for i in range(cfg.num_layers)]), -out_bound, out_bound)
  mask = optim.decay_mask(p)
  mixer_mask = mask["layers_0"]["self_attn"]
  for name in ("A_log", "D", "dt_bias", "conv_bias"):
    assert not mixer_mask[name], name
  assert mixer_mask["in_proj"]["kernel"] and mixer_mask["out_proj"]["kernel"]
  assert not mask["norm"]["scale"]
  np.testing.assert_array_equal(p["norm"]["scale"], np.ones(cfg.hidden_size))
