"""Dense hidden connection (SPEC section 2): selective transition + hidden fusion.

A layer receives the pre-fusion features of up to `m` shallower layers (same position only) and
fuses them into its own feature of the same kind:

    gate  = select(x_hat)                           computed from the *current* layer's x_hat,
                                                    shared across the m sources
    fused = Norm(x + sum_j gate * proj(x_j))        (fusion "add")
    fused = Norm(W [x, gate * proj(x_1), ...])      (fusion "concat")

select: "mlp"  silu(W2 silu(W1 x_hat)), W1: H -> H/r, W2: H/r -> width (no biases)
        "linear" silu(W x_hat)       "none" the constant 1
projection: "identity" or "linear" (one width x width map shared across sources).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssm.layers.common import Linear, RMSNorm


class DenseFusion(nn.Module):
  """Fuses one feature kind (e.g. the keys) with the same kind from shallower layers."""

  width: int
  hidden_size: int  # H, the width of x_hat
  ratio: int  # bottleneck ratio r (H -> H / r)
  select: str = "mlp"
  projection: str = "identity"
  fusion: str = "add"
  axis_name: str = "mlp"
  norm_eps: float = 1e-6
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    kw = dict(init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.select not in ("mlp", "linear", "none"):
      raise ValueError(f"dense.select={self.select!r} is unknown; use mlp, linear or none.")
    if self.projection not in ("identity", "linear"):
      raise ValueError(f"dense.projection={self.projection!r} is unknown; use identity or linear.")
    if self.fusion not in ("add", "concat"):
      raise ValueError(f"dense.fusion={self.fusion!r} is unknown; use add or concat.")
    if self.select == "mlp":
      self.fc1 = Linear(self.width_hidden, ("embed", "lowrank"), **kw)
      self.fc2 = Linear(self.width, ("lowrank", self.axis_name), **kw)
    elif self.select == "linear":
      self.fc1 = Linear(self.width, ("embed", self.axis_name), **kw)
    if self.projection == "linear":
      self.proj = Linear(self.width, (self.axis_name, None), **kw)
    if self.fusion == "concat":
      self.merge = Linear(self.width, (None, self.axis_name), **kw)
    self.norm = RMSNorm(eps=self.norm_eps, axis_name=self.axis_name, dtype=self.dtype,
                        param_dtype=self.param_dtype)

  @property
  def width_hidden(self) -> int:
    return max(1, self.hidden_size // self.ratio)

  def gate(self, x_hat):
    if self.select == "mlp":
      return jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(x_hat))))
    if self.select == "linear":
      return jax.nn.silu(self.fc1(x_hat))
    return None

  def __call__(self, x_hat, feat, sources: Sequence[jax.Array], num_sources_param: int = 1):
    """x_hat [..., H], feat [..., width], sources: list of [..., width]. Returns fused feature.

    `num_sources_param` fixes the input width of the concat merge (the configured m), so that every
    layer owns parameters of one shape.
    """
    g = self.gate(x_hat)
    self.sow("intermediates", "gate", g if g is not None else jnp.ones((), feat.dtype))
    sel = []
    for s in sources:
      s = self.proj(s) if self.projection == "linear" else s
      sel.append(s if g is None else g.astype(s.dtype) * s)
    if self.fusion == "add":
      fused = feat + sum(sel) if sel else feat
    else:
      pad = [jnp.zeros_like(feat)] * (num_sources_param - len(sel))
      fused = self.merge(jnp.concatenate([feat, *sel, *pad], axis=-1))
    return self.norm(fused)

  def create_params(self, x_hat, feat, num_sources_param: int = 1):
    """Creates this module's parameters without using them (layers that fuse nothing still own
    their gate and norm, as in the reference code)."""
    self.__call__(x_hat, feat, [feat] * max(1, num_sources_param), num_sources_param)
