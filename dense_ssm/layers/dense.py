"""Dense hidden connection: selective transition + hidden fusion (see docs/model.md).

A layer receives the pre-fusion features of up to `m` shallower layers (same position only),
nearest first (source j is layer l-1-j), and fuses them into its own feature of the same kind:

    s_j   = proj(x_j) * gate_j(x_hat)               gates computed from the *current* layer's x_hat
    fused = Norm(x + sum_j s_j)                     (fusion "add")
    fused = Norm(merge([x, s_1, ..., s_m]))         (fusion "concat"; missing sources are zeros)

select: "mlp"  silu(W2 silu(W1 x_hat)), W1: H -> w, W2: w -> width (no biases), w = H / r unless
               an explicit inner width is given
        "linear" silu(W x_hat)       "none" the constant 1 (no selection)
gates:  "shared" one gate for all m sources (gate_j = gate_0) | "per_source" m separate gates
projection: "identity" or "linear" (one width x width map shared across sources).
concat_merge: "channel" per-channel weights over the m+1 inputs, [(m+1), width], initialised to
        ones (the fusion starts as "add") | "full" a dense (m+1)*width -> width linear map.

Parameter layout: the shared gate is `fc1`/`fc2`; per-source gates are `fc1_j`/`fc2_j`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssm.layers.common import Linear, RMSNorm, dtype_of

SELECTS = ("mlp", "linear", "none")
PROJECTIONS = ("identity", "linear")
FUSIONS = ("add", "concat")
GATES = ("shared", "per_source")
CONCAT_MERGES = ("channel", "full")


def owns_fusion(dense: Any, layer_idx: int) -> bool:
  """Whether layer `layer_idx` owns dense-fusion parameters: every layer l with
  l % every == 0 when m > 0. Layer 0 owns its (unused) gate and norm, as in the reference code;
  layers between dense layers own nothing."""
  return dense.layers > 0 and layer_idx % dense.every == 0


def fuses(dense: Any, layer_idx: int) -> bool:
  """Whether layer `layer_idx` fuses shallower features (an owning layer other than layer 0)."""
  return owns_fusion(dense, layer_idx) and layer_idx >= 1


def fusion_options(dense: Any) -> dict[str, Any]:
  """The DenseFusion keyword arguments a `DenseConfig` sets for every fused feature kind."""
  return dict(select=dense.select, projection=dense.projection, fusion=dense.fusion,
              concat_merge=dense.concat_merge, gates=dense.gates, num_sources=dense.layers)


class DenseFusion(nn.Module):
  """Fuses one feature kind (e.g. the keys) with the same kind from shallower layers."""

  width: int
  hidden_size: int  # H, the width of x_hat
  ratio: int  # bottleneck ratio r of the gate MLP (H -> H / r)
  inner_width: int = 0  # gate MLP inner width; 0: H / r
  num_sources: int = 1  # the configured m: fixes the per-source gates and the concat inputs
  select: str = "mlp"
  projection: str = "identity"
  fusion: str = "add"
  concat_merge: str = "channel"
  gates: str = "shared"
  axis_name: str = "mlp"
  norm_eps: float = 1e-6
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    kw = dict(init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype)
    for key, value, allowed in (("select", self.select, SELECTS),
                                ("projection", self.projection, PROJECTIONS),
                                ("fusion", self.fusion, FUSIONS), ("gates", self.gates, GATES),
                                ("concat_merge", self.concat_merge, CONCAT_MERGES)):
      if value not in allowed:
        raise ValueError(f"dense.{key}={value!r} is unknown; use one of {', '.join(allowed)}.")
    def gate_layers(make):
      return [make() for _ in range(self.num_sources)] if self.gates == "per_source" else make()

    if self.select == "mlp":
      self.fc1 = gate_layers(lambda: Linear(self.width_hidden, ("embed", "lowrank"), **kw))
      self.fc2 = gate_layers(lambda: Linear(self.width, ("lowrank", self.axis_name), **kw))
    elif self.select == "linear":
      self.fc1 = gate_layers(lambda: Linear(self.width, ("embed", self.axis_name), **kw))
    if self.projection == "linear":
      self.proj = Linear(self.width, (self.axis_name, None), **kw)
    if self.fusion == "concat" and self.concat_merge == "full":
      self.merge = Linear(self.width, (None, self.axis_name), **kw)
    elif self.fusion == "concat":
      self.merge_scale = self.param(
          "merge_scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                      (None, self.axis_name)),
          (self.num_sources + 1, self.width), dtype_of(self.param_dtype))
    self.norm = RMSNorm(eps=self.norm_eps, axis_name=self.axis_name, dtype=self.dtype,
                        param_dtype=self.param_dtype)

  @property
  def width_hidden(self) -> int:
    return self.inner_width or max(1, self.hidden_size // self.ratio)

  def gate(self, x_hat, source: int = 0):
    """The gate of source `source` (any source when shared), or None when select is none."""
    if self.select == "none":
      return None
    j = source if self.gates == "per_source" else None
    fc1 = self.fc1 if j is None else self.fc1[j]
    if self.select == "mlp":
      fc2 = self.fc2 if j is None else self.fc2[j]
      return jax.nn.silu(fc2(jax.nn.silu(fc1(x_hat))))
    return jax.nn.silu(fc1(x_hat))

  def __call__(self, x_hat, feat, sources: Sequence[jax.Array]):
    """x_hat [..., H], feat [..., width], sources: up to m arrays [..., width], nearest first.
    Returns the fused, normalised feature."""
    if len(sources) > self.num_sources:
      raise ValueError(f"{len(sources)} dense sources for a fusion configured with m="
                       f"{self.num_sources}.")
    per_source = self.gates == "per_source" and self.select != "none"
    shared = None if per_source else self.gate(x_hat)
    if not per_source:
      self.sow("intermediates", "gate", shared if shared is not None else
               jnp.ones((), feat.dtype))
    sel = []
    for j, s in enumerate(sources):
      s = self.proj(s) if self.projection == "linear" else s
      g = self.gate(x_hat, j) if per_source else shared
      if per_source:
        self.sow("intermediates", "gate", g)  # one entry per source, in source order
      sel.append(s if g is None else g.astype(s.dtype) * s)
    if per_source and self.is_initializing():
      for j in range(len(sources), self.num_sources):  # a layer l < m still owns all m gates
        self.gate(x_hat, j)
    if self.fusion == "add":
      fused = feat + sum(sel) if sel else feat
    else:
      inputs = [feat, *sel] + [jnp.zeros_like(feat)] * (self.num_sources - len(sel))
      if self.concat_merge == "full":
        fused = self.merge(jnp.concatenate(inputs, axis=-1))
      else:
        w = self.merge_scale.astype(feat.dtype)
        fused = sum(w[j] * z for j, z in enumerate(inputs))
    return self.norm(fused)

  def create_params(self, x_hat, feat):
    """Creates this module's parameters without using them (layers that fuse nothing still own
    their gates and norm, as in the reference code)."""
    self.__call__(x_hat, feat, [feat] * max(1, self.num_sources))
