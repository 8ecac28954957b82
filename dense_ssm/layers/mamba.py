"""Mamba-1 mixer with the DenseMamba hidden connection (docs/model.md, 'Mamba and DenseMamba').

  [x | z] = in_proj(x_hat);  x = silu(causal_depthwise_conv(x))        (width d_inner)
  [dt_r | B | C] = x_proj(x); dt = dt_proj(dt_r)
  y = selective_scan(x, dt, A = -exp(A_log), B, C, D, dt_bias) * silu(z);  out = out_proj(y)

DenseMamba (the paper leaves this open; docs/model.md, 'Decisions where the paper is silent'):
  level "input": x (the value, width d_inner) and B (the key, width N) are fused with the same
      features of up to m shallower layers (pre-fusion, same position), gates from x_hat.
  level "state": the literal state-level form: y += gate * (C_l . sum_j h_j), with h_j the
      per-token states of the shallower layers (memory-heavy; for ablations).

Initialisation follows the reference Mamba-1 code (PyTorch defaults plus its overrides):
  in_proj, x_proj ~ U(+-1/sqrt(fan_in)); out_proj ~ U(+-1/sqrt(d_inner)) / sqrt(num_layers)
  (one residual branch per layer); depthwise conv weight and bias ~ U(+-1/sqrt(conv_width));
  dt_proj ~ U(+-dt_rank^-0.5); dt_bias = softplus^-1(dt), dt log-uniform in [1e-3, 0.1]
  (floored at 1e-4); A_log[d, n] = log(n + 1); D = 1. The dense-connection parameters keep the
  project's N(0, init_std).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dense_ssm import ops
from dense_ssm.layers.common import Linear, batch_mesh_axes, constrain, dtype_of, uniform_init
from dense_ssm.layers.dense import DenseFusion, fusion_options, owns_fusion
from dense_ssm.layers.dense import fuses as dense_fuses


def _dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1):
  """Inverse softplus of dt ~ log-uniform(dt_min, dt_max), as in Mamba."""
  u = jax.random.uniform(key, shape)
  dt = jnp.exp(u * (np.log(dt_max) - np.log(dt_min)) + np.log(dt_min))
  dt = jnp.maximum(dt, 1e-4)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log_init(key, shape, dtype=jnp.float32):
  del key
  d, n = shape
  return jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n))).astype(dtype)


def causal_conv(x_BxTxD, w_WxD, b_D, segment_ids_BxT):
  """y_t = b + sum_s w[s] x_{t-(W-1)+s}, using only inputs from the same document as t."""
  width = w_WxD.shape[0]
  t = x_BxTxD.shape[1]
  y = jnp.zeros_like(x_BxTxD) + b_D
  for s in range(width):
    shift = width - 1 - s
    xs = jnp.pad(x_BxTxD, ((0, 0), (shift, 0), (0, 0)))[:, :t]
    if segment_ids_BxT is not None and shift:
      seg = jnp.pad(segment_ids_BxT, ((0, 0), (shift, 0)), constant_values=-1)[:, :t]
      xs = xs * (seg == segment_ids_BxT)[..., None]
    y = y + xs * w_WxD[s]
  return y


class MambaMixer(nn.Module):
  """One Mamba layer's mixer. Returns (out, pre-fusion features, state)."""

  cfg: Any  # ModelConfig
  layer_idx: int

  def setup(self):
    cfg = self.cfg
    di, n, r = cfg.d_inner, cfg.state_dim, cfg.resolved_dt_rank
    kw = dict(init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    pd = dtype_of(cfg.param_dtype)
    lin = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.in_proj = Linear(2 * di, ("embed", "mlp"),
                          kernel_init=uniform_init(cfg.hidden_size ** -0.5), **lin)
    conv_bound = cfg.conv_width ** -0.5  # depthwise: fan_in = conv_width
    self.conv_w = self.param(
        "conv_kernel", nn.with_logical_partitioning(uniform_init(conv_bound), ("conv", "mlp")),
        (cfg.conv_width, di), pd)
    self.conv_b = self.param("conv_bias", nn.with_logical_partitioning(
        uniform_init(conv_bound), ("mlp",)), (di,), pd)
    self.x_proj = Linear(r + 2 * n, ("mlp", None), kernel_init=uniform_init(di ** -0.5), **lin)
    self.dt_proj = Linear(di, (None, "mlp"), kernel_init=uniform_init(r ** -0.5), **lin)
    self.dt_bias = self.param("dt_bias", nn.with_logical_partitioning(_dt_bias_init, ("mlp",)),
                              (di,), pd)
    self.a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init, ("mlp", "state")),
                            (di, n), pd)
    self.d_skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                               ("mlp",)), (di,), pd)
    self.out_proj = Linear(cfg.hidden_size, ("mlp", "embed"), kernel_init=uniform_init(
        (di * cfg.num_layers) ** -0.5), **lin)
    d = cfg.dense
    if d.layers > 0:
      if d.mamba_level not in ("input", "state"):
        raise ValueError(f"dense.mamba_level={d.mamba_level!r} is unknown; use input or state.")
      if d.mamba_level == "state" and (d.projection, d.fusion, d.gates) != (
          "identity", "add", "shared"):
        raise ValueError("dense.mamba_level='state' supports only projection=identity, "
                         "fusion=add and gates=shared; use mamba_level='input' for the others.")
      common = dict(hidden_size=cfg.hidden_size, norm_eps=cfg.norm_eps, **fusion_options(d), **kw)
      self.x_fusion = DenseFusion(di, ratio=d.r_v, inner_width=d.gate_width_v, **common)
      if d.mamba_level == "input":
        self.b_fusion = DenseFusion(n, ratio=d.r_k, inner_width=d.gate_width_k,
                                    axis_name="state", **common)

  @property
  def fuses(self) -> bool:
    return dense_fuses(self.cfg.dense, self.layer_idx)

  def _conv(self, x, segment_ids, conv_state, decode):
    w, b = self.conv_w.astype(x.dtype), self.conv_b.astype(x.dtype)
    if decode:
      window = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)  # [B,W,D]
      return jnp.einsum("bwd,wd->bd", window, w)[:, None] + b, window[:, 1:]
    wm1 = self.cfg.conv_width - 1
    if conv_state is not None:  # prefill continues the cached inputs (in the first token's doc)
      x = jnp.concatenate([conv_state.astype(x.dtype), x], axis=1)
      if segment_ids is not None:
        segment_ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], wm1, axis=1), segment_ids],
                                      axis=1)
      y, tail = self._conv(x, segment_ids, None, False)
      return y[:, wm1:], tail
    y = causal_conv(x, w, b, segment_ids)
    # Decode state: the last W-1 inputs of the last document (zeros before its start).
    tail = jnp.pad(x, ((0, 0), (wm1, 0), (0, 0)))[:, -wm1:]
    if segment_ids is not None:
      seg = jnp.pad(segment_ids, ((0, 0), (wm1, 0)), constant_values=-1)[:, -wm1:]
      tail = tail * (seg == segment_ids[:, -1:])[..., None]
    return y, tail

  def __call__(self, x_hat, sources: Sequence[tuple[jax.Array, ...]], segment_ids, positions,
               state=None, decode: bool = False):
    del positions
    cfg = self.cfg
    n, r = cfg.state_dim, cfg.resolved_dt_rank
    x, z = jnp.split(self.in_proj(x_hat), 2, axis=-1)
    x, conv_state = self._conv(x, segment_ids, None if state is None else state["conv"], decode)
    x = jax.nn.silu(x)
    x = constrain(x, ("batch", "length", "act_mlp"))
    dt_r, b, c = jnp.split(self.x_proj(x), [r, r + n], axis=-1)
    dt = self.dt_proj(dt_r)
    level = cfg.dense.mamba_level
    features = (b, x)
    if cfg.dense.layers > 0 and level == "input":
      if self.fuses and sources:
        x = self.x_fusion(x_hat, x, [s[1] for s in sources])
        b = self.b_fusion(x_hat, b, [s[0] for s in sources])
      elif self.is_initializing() and owns_fusion(cfg.dense, self.layer_idx):
        self.x_fusion.create_params(x_hat, x)
        self.b_fusion.create_params(x_hat, b)
    a = -jnp.exp(self.a_log.astype(jnp.float32))
    h0 = None if state is None else state["ssm"]
    state_level = cfg.dense.layers > 0 and level == "state"
    z_in = None if state_level else z
    if decode:
      y, h = ops.selective_scan_step(x[:, 0], dt[:, 0], a, b[:, 0], c[:, 0], h0,
                                     d_skip=self.d_skip, z_BxD=z_in if z_in is None
                                     else z_in[:, 0], dt_bias=self.dt_bias)
      y = y[:, None]
      h_all = h[:, None] if state_level else None
    else:
      y, h = ops.selective_scan(x, dt, a, b, c, d_skip=self.d_skip, z=z_in, dt_bias=self.dt_bias,
                                initial_state=h0, segment_ids=segment_ids, impl=cfg.impl,
                                chunk_size=cfg.chunk_size, batch_axes=batch_mesh_axes())
      h_all = None
      if state_level:
        h_all, _ = ops.selective_scan_states(x, dt, a, b, dt_bias=self.dt_bias, initial_state=h0,
                                             segment_ids=segment_ids, chunk_size=cfg.chunk_size)
    if state_level:
      features = (h_all,)
      if self.fuses and sources:
        g = self.x_fusion.gate(x_hat)
        g = jnp.ones_like(y) if g is None else g
        self.sow("intermediates", "gate", g)
        h_sum = sum(s[0] for s in sources)
        y = y + (g * jnp.einsum("btdn,btn->btd", h_sum, c.astype(jnp.float32))).astype(y.dtype)
      elif self.is_initializing() and owns_fusion(cfg.dense, self.layer_idx):
        self.x_fusion.gate(x_hat)
      y = y * jax.nn.silu(z)
    return self.out_proj(y), features, {"conv": conv_state, "ssm": h}

  def init_state(self, batch_size: int):
    cfg = self.cfg
    return {"conv": jnp.zeros((batch_size, cfg.conv_width - 1, cfg.d_inner), dtype_of(cfg.dtype)),
            "ssm": jnp.zeros((batch_size, cfg.d_inner, cfg.state_dim), jnp.float32)}
