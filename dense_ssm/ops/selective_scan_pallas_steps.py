"""Per-step math of the Pallas selective scan, shared by its TPU and GPU kernels.

The kernels (selective_scan_pallas_tpu.py, selective_scan_pallas_gpu.py) walk time in
unrolled bodies of a few steps; these functions are those bodies' math, written once for both
state representations. `get(name, i)` returns step i's row of an input ("x", "dt", "b", "c",
"z", "dy", "keep", "valid"); `p` holds the per-program constants (A as "a_nat" and "a_exp",
d_skip as "d", dt_bias as "bias"). The math is in selective_scan_pallas.py's docstring.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
F32 = jnp.float32


# ------------------------------------------------------------------------------
# State representation.
#   TPU: an [N, block_d] array; d-vectors are rows [1, bd], n-vectors columns
#        [N, 1], broadcasting does the rest.
#   GPU: `Cols`, a tuple of N per-channel vectors [bd] (one per state index n),
#        so that every thread owns all N states of its channels: sums over n are
#        register adds and per-channel math (softplus, gates) is not replicated.
#        n-vectors (b_t, c_t) are Cols of N scalars.


@jax.tree_util.register_pytree_node_class
class Cols(tuple):
  """Elementwise arithmetic over a tuple of arrays (broadcasting non-Cols operands)."""

  def _zip(self, other, op):
    if isinstance(other, Cols):
      return Cols(op(a, b) for a, b in zip(self, other))
    return Cols(op(a, other) for a in self)

  def __add__(self, other):
    return self._zip(other, lambda a, b: a + b)

  def __mul__(self, other):
    return self._zip(other, lambda a, b: a * b)

  def __sub__(self, other):
    return self._zip(other, lambda a, b: a - b)

  __radd__ = __add__
  __rmul__ = __mul__

  def tree_flatten(self):
    return tuple(self), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(children)


def map_cols(f, s):
  return Cols(f(v) for v in s) if isinstance(s, Cols) else f(s)


def sum_n(cfg, s):
  """Sum over the state index n -> d-vector."""
  if cfg.cols:
    return functools.reduce(lambda a, b: a + b, s)
  return jnp.sum(s, axis=0, keepdims=True)


def sigmoid(v):
  return 1.0 / (1.0 + jnp.exp(-v))


def softplus(cfg, v):
  """softplus(v) = max(v, 0) + log(1 + e^-|v|).

  On GPU through exp2 / log2 (single MUFU instructions): libdevice's log1pf
  branches, and a branch per step splits the unrolled body into basic blocks
  that the compiler cannot hoist the next step's loads across (one memory
  latency per step: 1.5 us on the H200, benchmarks/RESULTS.md). log(1 + e) for
  e < 2^-24 rounds to 0, an absolute error below 6e-8.
  """
  if cfg.backend == "tpu":
    return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))
  return jnp.maximum(v, 0.0) + log2(cfg, 1.0 + jnp.exp2(-jnp.abs(v) * LOG2E)) * LN2


def log2(cfg, v):
  """log2 of a float32 >= 1 on GPU: one lg2.approx (relative error ~2^-22).

  jnp.log2 lowers to libdevice's logf, whose special-value branch would split
  the body (see softplus); the interpreter uses jnp.log2.
  """
  if cfg.interpret:
    return jnp.log2(v)
  from jax.experimental.pallas import triton as pltr  # pylint: disable=g-import-not-at-top
  [out] = pltr.elementwise_inline_asm(
      "lg2.approx.ftz.f32 $0, $1;", args=[v], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, v.dtype)])
  return out


# ------------------------------------------------------------------------------
# Shared per-step math (both backends).


def step_delta(cfg, p, dt, valid):
  """(delta, v = dt + bias); padded steps get delta = 0 (a = 1, u = 0: identities)."""
  v = dt + p["bias"] if cfg.has_bias else dt
  delta = softplus(cfg, v) if cfg.softplus else v
  if valid is not None:
    delta = jnp.where(valid, delta, 0.0)
  return delta, v


def step_inputs(cfg, get, i, p):
  """Discretised inputs of step i: (x, v = dt + bias, delta, b, a, dx = delta*x)."""
  x, dt, b = get("x", i), get("dt", i), get("b", i)
  delta, v = step_delta(cfg, p, dt, get("valid", i) if cfg.masked else None)
  # exp(delta A); on GPU p["a_exp"] holds A * log2(e) and exp2 is used.
  a = map_cols(jnp.exp if cfg.backend == "tpu" else jnp.exp2, delta * p["a_exp"])
  if cfg.has_seg:
    a = a * get("keep", i)
  return x, v, delta, b, a, delta * x


def gated_output(cfg, p, yc, x, z):
  """y = (yc + d_skip x) * silu(z)."""
  y = yc + p["d"] * x if cfg.has_d else yc
  return y * (z * sigmoid(z)) if cfg.has_z else y


def advance(cfg, get, h, p, steps):
  """State after `steps` (static) steps from h."""
  for i in range(steps):
    _, _, _, b, a, dx = step_inputs(cfg, get, i, p)
    h = a * h + b * dx
  return h


def forward_steps(cfg, get, h, p, steps):
  """Returns (state after `steps` steps, per-step y_t = (h_t c_t + d x_t) silu(z_t)).

  Callers store the ys after the loop, so no load is ordered after a store.
  """
  ys = []
  for i in range(steps):
    x, _, _, b, a, dx = step_inputs(cfg, get, i, p)
    h = a * h + b * dx
    ys.append(gated_output(cfg, p, sum_n(cfg, h * get("c", i)), x,
                           get("z", i) if cfg.has_z else None))
  return h, ys


def backward_steps(cfg, get, h0, g, d_a, p, steps, finish):
  """Reverse scan over `steps` (static) steps whose start state is h0.

  g is the adjoint of the state after the steps; returns (adjoint of h0, d_a).
  For each step (walking backwards) calls finish(i, step, prods) with the
  step's d-vectors (x, v, delta, z, dy) and the state-shaped products whose
  sums give the outputs: sum_n of "yc" = h c, "gb" = g b, "wa" = w A and sum_d
  of "dc" = h dy', "db" = g delta x  (w = g a h_{t-1}, dy' = dy * silu(z)).
  """
  ins, hs = [], [h0]
  for i in range(steps):  # recompute the states (b, c are re-read below, from L1)
    step = step_inputs(cfg, get, i, p)
    ins.append(step[:3] + step[4:] + (get("dy", i), get("z", i) if cfg.has_z else None))
    hs.append(step[4] * hs[-1] + step[3] * step[5])
  for i in reversed(range(steps)):
    (x, v, delta, a, dx, dy, z), b, c = ins[i], get("b", i), get("c", i)
    h, h_prev = hs[i + 1], hs[i]
    dyg = dy * (z * sigmoid(z)) if cfg.has_z else dy
    g = g + c * dyg
    w = g * a * h_prev
    prods = {"dc": h * dyg, "db": g * dx, "gb": g * b, "wa": w * p["a_nat"]}
    if cfg.has_z:
      prods["yc"] = h * c
    finish(i, (x, v, delta, z, dy), prods)
    d_a = d_a + w * delta
    g = g * a
  return g, d_a


def grad_outputs(cfg, p, step, valid, red):
  """Per-(t, d) gradients of one step from its d-vectors and the n-sums `red`.

  Returns (dx, ddt, dz or None, d_skip term dy' x, dt_bias term ddt).
  """
  x, v, delta, z, dy = step
  dz = None
  dyg = dy
  if cfg.has_z:
    s = sigmoid(z)
    dyg = dy * z * s
    yd = red["yc"] + p["d"] * x if cfg.has_d else red["yc"]
    dz = dy * yd * s * (1.0 + z * (1.0 - s))
  dx = red["gb"] * delta + (dyg * p["d"] if cfg.has_d else 0.0)
  ddelta = red["wa"] + red["gb"] * x
  if valid is not None:
    ddelta = jnp.where(valid, ddelta, 0.0)
  ddt = ddelta * sigmoid(v) if cfg.softplus else ddelta
  return dx, ddt, dz, dyg * x, ddt
