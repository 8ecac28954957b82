"""Retention mixers: GAU retention of DenseRetNet (docs/model.md) and the original multi-scale
retention of RetNet (the "RetNet with FFN" baseline), with the dense hidden connection.

GAURetention_l(x_hat):
  q = silu(x_hat Wq); k = silu(x_hat Wk) * d_k^-0.5; [v | g] = silu(x_hat Wh)
  (k, v) -> dense fusion with shallower layers' pre-fusion (k_j, v_j)        (layers l >= 1)
  rotary shift on q, k; retention with gamma_h = 1 - 2^(-5-h); per-head RMSNorm (one d_v weight)
  out = Wo (merge_heads(o) * g)
Multi-scale retention (gau=False) is the same with no silu on q, k, v and g = silu(x_hat Wg).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssm import ops
from dense_ssm.layers.common import Linear, RMSNorm, apply_rotary, batch_mesh_axes, constrain
from dense_ssm.layers.common import merge_heads
from dense_ssm.layers.common import retnet_angles, split_heads
from dense_ssm.layers.dense import DenseFusion, fusion_options, owns_fusion
from dense_ssm.layers.dense import fuses as dense_fuses


def retnet_row_factor(positions_BxT, log_decay_H):
  """1 / sqrt(sum_{i<=p} gamma^i): the reference's D-row normalisation in closed form [B,T,H]."""
  p = positions_BxT.astype(jnp.float32)[..., None]
  s = -jnp.expm1((p + 1.0) * log_decay_H) / -jnp.expm1(log_decay_H)
  return jax.lax.rsqrt(s)


class RetentionMixer(nn.Module):
  """One retention layer's mixer. Returns (out, (k_l, v_l) pre-fusion features, final state)."""

  cfg: Any  # ModelConfig
  layer_idx: int
  gau: bool = True

  def setup(self):
    cfg = self.cfg
    if cfg.qk_dim % cfg.num_heads or cfg.v_dim % cfg.num_heads:
      raise ValueError(f"qk_dim={cfg.qk_dim} and v_factor*hidden_size={cfg.v_dim} must be "
                       f"divisible by num_heads={cfg.num_heads}.")
    kw = dict(init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.q_proj = Linear(cfg.qk_dim, ("embed", "mlp"), **kw)
    self.k_proj = Linear(cfg.qk_dim, ("embed", "mlp"), **kw)
    if self.gau:
      self.to_hidden = Linear(2 * cfg.v_dim, ("embed", "mlp"), **kw)
    else:
      self.v_proj = Linear(cfg.v_dim, ("embed", "mlp"), **kw)
      self.g_proj = Linear(cfg.v_dim, ("embed", "mlp"), **kw)
    self.to_out = Linear(cfg.hidden_size, ("mlp", "embed"), **kw)
    self.group_norm = RMSNorm(eps=cfg.norm_eps, axis_name="kv", dtype="float32",
                              param_dtype=cfg.param_dtype)
    d = cfg.dense
    if owns_fusion(d, self.layer_idx):
      common = dict(hidden_size=cfg.hidden_size, norm_eps=cfg.norm_eps, **fusion_options(d), **kw)
      self.k_fusion = DenseFusion(cfg.qk_dim, ratio=d.r_k, inner_width=d.gate_width_k, **common)
      self.v_fusion = DenseFusion(cfg.v_dim, ratio=d.r_v, inner_width=d.gate_width_v, **common)

  @property
  def fuses(self) -> bool:
    return dense_fuses(self.cfg.dense, self.layer_idx)

  def __call__(self, x_hat, sources: Sequence[tuple[jax.Array, jax.Array]], segment_ids,
               positions, state=None, decode: bool = False):
    cfg = self.cfg
    act = jax.nn.silu if self.gau else (lambda z: z)
    q = act(self.q_proj(x_hat))
    k = act(self.k_proj(x_hat)) * (cfg.qk_dim // cfg.num_heads) ** -0.5
    if self.gau:
      v, g = jnp.split(jax.nn.silu(self.to_hidden(x_hat)), 2, axis=-1)
    else:
      v, g = self.v_proj(x_hat), jax.nn.silu(self.g_proj(x_hat))
    features = (k, v)  # pre-fusion, handed to deeper layers
    self.sow("intermediates", "x_hat", x_hat)
    if owns_fusion(cfg.dense, self.layer_idx):
      if self.fuses and sources:
        k = self.k_fusion(x_hat, k, [s[0] for s in sources])
        v = self.v_fusion(x_hat, v, [s[1] for s in sources])
      elif self.is_initializing():
        self.k_fusion.create_params(x_hat, k)
        self.v_fusion.create_params(x_hat, v)
    self.sow("intermediates", "kv_fused", (k, v))

    h = cfg.num_heads
    q_h, k_h, v_h = split_heads(q, h), split_heads(k, h), split_heads(v, h)
    angles = retnet_angles(q_h.shape[-1])
    q_h = apply_rotary(q_h, positions, angles)
    k_h = apply_rotary(k_h, positions, angles)
    log_decay = ops.retnet_log_decay(h)

    if decode:
      o, state = ops.retention_step(q_h[:, 0], k_h[:, 0], v_h[:, 0], log_decay, state)
      o = o[:, None].astype(jnp.float32) * retnet_row_factor(positions, log_decay)[..., None]
    elif cfg.mode == "parallel":
      o, state = ops.retention_parallel_normalized(q_h, k_h, v_h, log_decay,
                                                   segment_ids=segment_ids)
    elif cfg.mode == "chunkwise":
      o, state = ops.retention(q_h, k_h, v_h, log_decay, initial_state=state,
                               segment_ids=segment_ids, impl=cfg.impl, chunk_size=cfg.chunk_size,
                               batch_axes=batch_mesh_axes())
      o = o.astype(jnp.float32) * retnet_row_factor(positions, log_decay)[..., None]
    else:
      raise ValueError(f"model.mode={cfg.mode!r} is unknown; use parallel or chunkwise.")
    o = self.group_norm(o.astype(jnp.float32))
    o = merge_heads(o).astype(g.dtype) * g
    o = constrain(o, ("batch", "length", "act_mlp"))
    return self.to_out(o), features, state

  def init_state(self, batch_size: int):
    cfg = self.cfg
    h = cfg.num_heads
    return jnp.zeros((batch_size, h, cfg.qk_dim // h, cfg.v_dim // h), jnp.float32)
