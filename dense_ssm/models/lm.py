"""The language models: DenseRetNet, RetNet with FFN, (Dense)Mamba and the Transformer baseline.

One `LanguageModel` class; the family picks the mixer of each pre-norm residual block:

    h <- h + dropout(mixer_l(norm(h), sources_l))            (+ h <- h + dropout(ffn(norm(h))))

`sources_l` are the pre-fusion features of layers l-1 ... l-m (the dense hidden connection; same
position only, never across time). Entry points:

  __call__(tokens, segment_ids, positions)   training / scoring (parallel or chunkwise mode)
  init_cache(batch, max_len)                 zero decode state (per-layer size independent of
                                             context for the SSMs; a KV cache for attention)
  prefill(tokens, cache, segment_ids, ...)   run a prompt, return logits and the filled cache
  decode_step(tokens_B, cache)               one token per row, constant work per token
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dense_ssm.layers.attention import FFN, Attention
from dense_ssm.layers.common import Linear, constrain, dtype_of, make_norm, normal_init
from dense_ssm.layers.common import positions_from_segments
from dense_ssm.layers.mamba import MambaMixer
from dense_ssm.layers.retention import RetentionMixer
from dense_ssm.models.config import ModelConfig


def _mixer(cfg: ModelConfig, idx: int, name: str | None, **kw):
  if cfg.family == "dense_retnet":
    return RetentionMixer(cfg, idx, gau=True, name=name, **kw)
  if cfg.family == "retnet_ffn":
    return RetentionMixer(cfg, idx, gau=False, name=name, **kw)
  if cfg.family == "mamba":
    return MambaMixer(cfg, idx, name=name, **kw)
  return Attention(cfg, idx, name=name, **kw)


class Block(nn.Module):
  """Pre-norm residual block; parameter names follow the reference DenseRetNet code."""

  cfg: ModelConfig
  layer_idx: int

  def setup(self):
    cfg = self.cfg
    self.input_layernorm = make_norm(cfg)
    self.self_attn = _mixer(cfg, self.layer_idx, "self_attn")
    if cfg.family in ("retnet_ffn", "transformer"):
      self.post_attention_layernorm = make_norm(cfg)
      self.mlp = FFN(cfg)
    self.drop = nn.Dropout(cfg.dropout)

  def __call__(self, h, sources, segment_ids, positions, state, decode, deterministic):
    out, feats, state = self.self_attn(self.input_layernorm(h), sources, segment_ids, positions,
                                       state, decode)
    h = h + self.drop(out, deterministic=deterministic)
    if self.cfg.family in ("retnet_ffn", "transformer"):
      h = h + self.drop(self.mlp(self.post_attention_layernorm(h)), deterministic=deterministic)
    return constrain(h, ("batch", "length", "act_embed")), feats, state


class LanguageModel(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size,
        embedding_init=nn.with_logical_partitioning(normal_init(cfg.init_std), ("vocab", "embed")),
        param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.dtype))
    if cfg.family == "transformer" and cfg.pos_emb == "learned":
      self.embed_positions = self.param(
          "embed_positions", nn.with_logical_partitioning(normal_init(cfg.init_std),
                                                          (None, "embed")),
          (cfg.max_len, cfg.hidden_size), dtype_of(cfg.param_dtype))
    # static: decode, deterministic (flax counts `self` as argument 0).
    block = nn.remat(Block, static_argnums=(6, 7)) if cfg.remat else Block
    self.layers = [block(cfg, i, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.norm = make_norm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), init_std=cfg.init_std,
                            dtype=cfg.dtype, param_dtype=cfg.param_dtype)

  def _forward(self, tokens_BxT, segment_ids, positions, states, decode, deterministic):
    cfg = self.cfg
    h = self.embed_tokens(tokens_BxT)
    if cfg.family == "transformer" and cfg.pos_emb == "learned":
      h = h + jnp.take(self.embed_positions, positions, axis=0).astype(h.dtype)
    h = constrain(h, ("batch", "length", "act_embed"))
    m = cfg.dense.layers
    history = []  # pre-fusion features of every layer so far (only the last m are read)
    new_states = []
    for i, layer in enumerate(self.layers):
      sources = tuple(reversed(history[max(0, i - m):i])) if m > 0 else ()
      h, feats, st = layer(h, sources, segment_ids, positions,
                           None if states is None else states[i], decode, deterministic)
      if m > 0:
        history.append(feats)
        self.sow("intermediates", f"features_{i}", feats)
      new_states.append(st)
    h = self.norm(h)
    if cfg.tie_embeddings:
      logits = self.embed_tokens.attend(h)
    else:
      logits = self.lm_head(h)
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
    return logits, new_states

  def __call__(self, tokens_BxT, segment_ids=None, positions=None, deterministic=True):
    """Logits [B,T,V] (float32). segment_ids mark packed documents; positions restart per doc."""
    if positions is None:
      positions = (positions_from_segments(segment_ids) if segment_ids is not None else
                   jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape))
    logits, _ = self._forward(tokens_BxT, segment_ids, positions, None, False, deterministic)
    return logits

  def prefill(self, tokens_BxT, cache, segment_ids=None, positions=None):
    """Runs a prompt; returns (logits [B,T,V], cache ready to decode after the last token).

    Rows of different lengths: left-pad them with segment id 0 and give the prompt id 1; the
    state restarts at the prompt's first token.
    """
    if positions is None:
      positions = (positions_from_segments(segment_ids) if segment_ids is not None else
                   jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape))
    logits, states = self._forward(tokens_BxT, segment_ids, positions, cache["layers"], False,
                                   True)
    return logits, {"layers": states, "pos": positions[:, -1].astype(jnp.int32) + 1}

  def decode_step(self, tokens_B, cache):
    """One token per row: returns (logits [B,V], new cache)."""
    pos = cache["pos"]
    logits, states = self._forward(tokens_B[:, None], None, pos[:, None], cache["layers"], True,
                                   True)
    return logits[:, 0], {"layers": states, "pos": pos + 1}

  def init_cache(self, batch_size: int, max_len: int = 0):
    return init_cache(self.cfg, batch_size, max_len)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int = 0) -> dict[str, Any]:
  """Zero decode cache. `max_len` only matters for the Transformer's KV cache."""
  layers = []
  for i in range(cfg.num_layers):
    mixer = _mixer(cfg, i, None, parent=None)  # unbound: only its state shapes are read
    if cfg.family == "transformer":
      if max_len <= 0:
        raise ValueError("init_cache(max_len=...) must be > 0 for the Transformer's KV cache.")
      layers.append(mixer.init_state(batch_size, max_len))
    else:
      layers.append(mixer.init_state(batch_size))
  return {"layers": layers, "pos": jnp.zeros((batch_size,), jnp.int32)}
