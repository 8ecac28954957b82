"""Tiny model configs shared by the model tests."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssm.models import DenseConfig, ModelConfig, build_model, init_cache

FAMILIES = {
    "dense_retnet": dict(family="dense_retnet", dense=DenseConfig(layers=2, r_k=4, r_v=4)),
    "gau_retnet": dict(family="dense_retnet", dense=DenseConfig(layers=0)),
    "retnet_ffn": dict(family="retnet_ffn", dense=DenseConfig(layers=0), ffn_act="gelu"),
    "mamba": dict(family="mamba", dense=DenseConfig(layers=0), tie_embeddings=True),
    "dense_mamba": dict(family="mamba", dense=DenseConfig(layers=2, r_k=4, r_v=4),
                        tie_embeddings=True),
    "dense_mamba_state": dict(family="mamba", tie_embeddings=True,
                              dense=DenseConfig(layers=2, r_k=4, r_v=4, mamba_level="state")),
    "transformer": dict(family="transformer", dense=DenseConfig(layers=0)),
}


def tiny(name, **kw) -> ModelConfig:
  base = dict(vocab_size=97, num_layers=3, hidden_size=32, qk_dim=16, num_heads=2, ffn_dim=64,
              state_dim=4, chunk_size=64, max_len=1024)
  base.update(FAMILIES[name])
  base.update(kw)
  return ModelConfig(**base)


def init(cfg, t=8, seed=0):
  model = build_model(cfg)
  tokens = jnp.zeros((1, t), jnp.int32)
  return model, nn.unbox(model.init(jax.random.PRNGKey(seed), tokens)["params"])


def decode_all(cfg, params, tokens_BxT, prefix=0):
  """Prefill `prefix` tokens (if any), then decode the rest one token at a time (lax.scan)."""
  model = build_model(cfg)
  b, t = tokens_BxT.shape
  cache = init_cache(cfg, b, t + 1)
  outs = []
  if prefix:
    logits, cache = model.apply({"params": params}, tokens_BxT[:, :prefix], cache,
                                method=model.prefill)
    outs.append(logits)

  def step(cache, tok_B):
    logits, cache = model.apply({"params": params}, tok_B, cache, method=model.decode_step)
    return cache, logits

  _, logits_TxBxV = jax.lax.scan(step, cache, tokens_BxT[:, prefix:].T)
  outs.append(jnp.moveaxis(logits_TxBxV, 0, 1))
  return jnp.concatenate(outs, axis=1)


def rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


replace = dataclasses.replace
