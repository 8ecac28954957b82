"""Causal multi-head attention with a KV cache (LLaMA / OPT-style baselines), and the FFN."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssm.layers.common import Linear, apply_rotary, constrain, dtype_of, merge_heads
from dense_ssm.layers.common import rope_angles, split_heads


class Attention(nn.Module):
  """Softmax attention. Training: causal within each document. Decode: appends to the cache.

  Cache: {"k", "v": [B, max_len, heads, head_dim], "valid": [B, max_len] bool, "index": int32}.
  """

  cfg: Any
  layer_idx: int

  def setup(self):
    cfg = self.cfg
    kw = dict(init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
              use_bias=cfg.use_bias)
    self.q_proj = Linear(cfg.hidden_size, ("embed", "heads"), **kw)
    self.k_proj = Linear(cfg.hidden_size, ("embed", "heads"), **kw)
    self.v_proj = Linear(cfg.hidden_size, ("embed", "heads"), **kw)
    self.o_proj = Linear(cfg.hidden_size, ("heads", "embed"), **kw)

  def __call__(self, x_hat, sources, segment_ids, positions, state=None, decode: bool = False):
    del sources
    cfg = self.cfg
    h = cfg.num_heads
    q, k, v = (split_heads(p(x_hat), h) for p in (self.q_proj, self.k_proj, self.v_proj))
    if cfg.pos_emb == "rope":
      angles = rope_angles(q.shape[-1], cfg.rope_base)
      q, k = apply_rotary(q, positions, angles), apply_rotary(k, positions, angles)
    scale = q.shape[-1] ** -0.5
    b, t = x_hat.shape[:2]
    if decode:
      idx = state["index"]
      ck = jax.lax.dynamic_update_slice_in_dim(state["k"], k.astype(state["k"].dtype), idx, 1)
      cv = jax.lax.dynamic_update_slice_in_dim(state["v"], v.astype(state["v"].dtype), idx, 1)
      valid = jax.lax.dynamic_update_slice_in_dim(state["valid"], jnp.ones((b, 1), bool), idx, 1)
      mask = valid[:, None, None, :]  # [B,1,1,S]
      new_state = {"k": ck, "v": cv, "valid": valid, "index": idx + 1}
      keys, values = ck, cv
    else:
      causal = jnp.tril(jnp.ones((t, t), bool))
      same = (jnp.ones((b, t, t), bool) if segment_ids is None
              else segment_ids[:, :, None] == segment_ids[:, None, :])
      mask = (causal & same)[:, None]  # [B,1,T,T]
      keys, values = k, v
      new_state = None
      if state is not None:  # prefill: write the prompt into the cache
        last = (jnp.ones((b, t), bool) if segment_ids is None
                else segment_ids == segment_ids[:, -1:])
        new_state = {
            "k": jax.lax.dynamic_update_slice_in_dim(state["k"], k.astype(state["k"].dtype), 0, 1),
            "v": jax.lax.dynamic_update_slice_in_dim(state["v"], v.astype(state["v"].dtype), 0, 1),
            "valid": jax.lax.dynamic_update_slice_in_dim(state["valid"], last, 0, 1),
            "index": jnp.asarray(t, jnp.int32)}
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), keys.astype(jnp.float32))
    logits = jnp.where(mask, logits * scale, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", probs, values.astype(jnp.float32)).astype(x_hat.dtype)
    o = constrain(merge_heads(o), ("batch", "length", "act_mlp"))
    return self.o_proj(o), (), new_state

  def init_state(self, batch_size: int, max_len: int):
    cfg = self.cfg
    hd = cfg.hidden_size // cfg.num_heads
    shape = (batch_size, max_len, cfg.num_heads, hd)
    return {"k": jnp.zeros(shape, dtype_of(cfg.dtype)), "v": jnp.zeros(shape, dtype_of(cfg.dtype)),
            "valid": jnp.zeros((batch_size, max_len), bool), "index": jnp.zeros((), jnp.int32)}


class FFN(nn.Module):
  """swiglu: W2 (silu(W1 x) * W3 x); gelu / relu: W2 act(W1 x)."""

  cfg: Any

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kw = dict(init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
              use_bias=cfg.use_bias)
    if cfg.ffn_act == "swiglu":
      hdn = jax.nn.silu(Linear(cfg.ffn_dim, ("embed", "mlp"), name="gate", **kw)(x))
      hdn = hdn * Linear(cfg.ffn_dim, ("embed", "mlp"), name="up", **kw)(x)
    elif cfg.ffn_act in ("gelu", "relu"):
      act = jax.nn.gelu if cfg.ffn_act == "gelu" else jax.nn.relu
      hdn = act(Linear(cfg.ffn_dim, ("embed", "mlp"), name="up", **kw)(x))
    else:
      raise ValueError(f"model.ffn_act={cfg.ffn_act!r} is unknown; use swiglu, gelu or relu.")
    hdn = constrain(hdn, ("batch", "length", "act_mlp"))
    return Linear(cfg.hidden_size, ("mlp", "embed"), name="down", **kw)(hdn)
