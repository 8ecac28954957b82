"""Models: `build_model(cfg)` returns the Flax module of any family; helpers count parameters
and FLOPs without allocating anything."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dense_ssm.models.config import DenseConfig, ModelConfig
from dense_ssm.models.lm import LanguageModel, init_cache


def build_model(cfg: ModelConfig) -> LanguageModel:
  return LanguageModel(cfg)


def abstract_params(cfg: ModelConfig, seq_len: int = 8):
  """Parameter shapes (boxed with logical axes) via jax.eval_shape: nothing is allocated."""
  model = build_model(cfg)
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]


def count_params(cfg: ModelConfig) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg))))


def mixing_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token of the sequence mixing that 2 * params does not count."""
  if cfg.family in ("dense_retnet", "retnet_ffn"):
    c = seq_len if cfg.mode == "parallel" else min(cfg.chunk_size, seq_len)
    dk, dv = cfg.qk_dim // cfg.num_heads, cfg.v_dim // cfg.num_heads
    intra = 2 * c * (cfg.qk_dim + cfg.v_dim) / 2  # causal half of a C x C block
    inter = 2 * 2 * cfg.num_heads * dk * dv  # q S and the state update
    return cfg.num_layers * (intra + inter)
  if cfg.family == "mamba":
    return cfg.num_layers * 9 * cfg.d_inner * cfg.state_dim
  return cfg.num_layers * 2 * seq_len * cfg.hidden_size  # causal QK^T and PV, halved


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 * non-embedding-lookup params + 3 * forward mixing FLOPs."""
  n = count_params(cfg)
  if not cfg.tie_embeddings:
    n -= cfg.vocab_size * cfg.hidden_size  # the embedding lookup is not a matmul
  return 6.0 * n + 3.0 * mixing_flops_per_token(cfg, seq_len)


__all__ = ["DenseConfig", "ModelConfig", "LanguageModel", "build_model", "init_cache",
           "abstract_params", "count_params", "flops_per_token", "mixing_flops_per_token"]
