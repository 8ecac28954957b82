"""Small shared pieces: dtypes, initialisers, linear layers with logical axes, RMSNorm, rotary."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def dtype_of(name: str):
  return jnp.dtype(name)


def normal_init(std: float):
  return nn.initializers.normal(stddev=std)


def uniform_init(bound: float):
  """U(-bound, bound). (flax's `nn.initializers.uniform(s)` samples [0, s), not this.)"""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Linear(nn.Module):
  """y = x W (+ b), W: [in, out] with logical axes `axes`; W ~ N(0, init_std) unless
  `kernel_init` is given."""

  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = False
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  kernel_init: nn.initializers.Initializer | None = None
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    kinit = self.kernel_init or normal_init(self.init_std)
    w = self.param("kernel", nn.with_logical_partitioning(kinit, self.axes),
                   (x.shape[-1], self.features), dtype_of(self.param_dtype))
    dt = dtype_of(self.dtype)
    y = jnp.einsum("...i,io->...o", x.astype(dt), w.astype(dt))
    if self.use_bias:
      b = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.axes[1:]),
                     (self.features,), dtype_of(self.param_dtype))
      y = y + b.astype(dt)
    return y


class RMSNorm(nn.Module):
  """RMSNorm(z) = w * z / sqrt(mean(z^2) + eps), computed in float32; weight init 1."""

  eps: float = 1e-6
  axis_name: str = "embed"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                         (self.axis_name,)),
                   (x.shape[-1],), dtype_of(self.param_dtype))
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * w.astype(jnp.float32)).astype(dtype_of(self.dtype))


class LayerNorm(nn.Module):
  """LayerNorm with scale and bias (OPT-style baseline), float32."""

  eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1],)
    w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                   shape, dtype_of(self.param_dtype))
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                   shape, dtype_of(self.param_dtype))
    xf = x.astype(jnp.float32)
    mu = xf.mean(-1, keepdims=True)
    var = ((xf - mu) ** 2).mean(-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + self.eps) * w + b
    return y.astype(dtype_of(self.dtype))


def make_norm(cfg, axis_name="embed"):
  if getattr(cfg, "norm_type", "rms") == "layer":
    return LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
  return RMSNorm(eps=cfg.norm_eps, axis_name=axis_name, dtype=cfg.dtype,
                 param_dtype=cfg.param_dtype)


def retnet_angles(head_dim: int) -> jax.Array:
  """RetNet's rotary angles 1 / 10000^linspace(0, 1, d/2) (endpoint included), each twice."""
  a = 1.0 / (10000.0 ** jnp.linspace(0.0, 1.0, head_dim // 2))
  return jnp.repeat(a, 2)


def rope_angles(head_dim: int, base: float = 10000.0) -> jax.Array:
  """Standard RoPE frequencies base^(-2i/d), i < d/2, each repeated twice (interleaved pairs)."""
  a = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  return jnp.repeat(a, 2)


def rotate_every_two(x):
  """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]."""
  x1 = x[..., ::2]
  x2 = x[..., 1::2]
  return jnp.stack([-x2, x1], axis=-1).reshape(x.shape)


def apply_rotary(x_BxTxHxD, positions_BxT, angles_D):
  """x cos(p * angle) + rotate_every_two(x) sin(p * angle), in float32."""
  theta = positions_BxT.astype(jnp.float32)[:, :, None, None] * angles_D
  xf = x_BxTxHxD.astype(jnp.float32)
  y = xf * jnp.cos(theta) + rotate_every_two(xf) * jnp.sin(theta)
  return y.astype(x_BxTxHxD.dtype)


def positions_from_segments(segment_ids_BxT):
  """Position of each token inside its document (restarts at each segment change)."""
  b, t = segment_ids_BxT.shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  start = jnp.concatenate(
      [jnp.ones((b, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - start_idx


def split_heads(x, num_heads: int):
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x):
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def constrain(x, axes: Sequence[str | None]):
  """Activation sharding constraint by logical names (a no-op outside a mesh/rules context)."""
  return nn.with_logical_constraint(x, tuple(axes))


def batch_mesh_axes():
  """Mesh axes that shard the logical "batch" axis under the active rules (None outside them)."""
  try:
    spec = nn.logical_to_mesh_axes(("batch",))
  except Exception:  # pylint: disable=broad-except
    return None
  return None if spec is None else spec[0]
