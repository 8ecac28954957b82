"""Model configuration: a frozen dataclass, so that it can be a Flax module attribute.

Model code depends only on this file, never on ml_collections: `ModelConfig.from_dict`
turns the `config.model` ConfigDict of a training config into one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

FAMILIES = ("dense_retnet", "retnet_ffn", "mamba", "transformer")
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
# ModelConfig fields that say how a model is trained or computed, not what its weights compute.
COMPUTE_FIELDS = ("dropout", "init_std", "max_len", "mode", "impl", "chunk_size", "dtype",
                  "param_dtype", "remat")


def _check_int(name: str, value: Any, minimum: int) -> None:
  """`value` must be an int (not a bool, float or None) >= minimum; the error names the key."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}; fix it in the config.")
  if value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}; fix it in the config.")


def _check_float(name: str, value: Any, low: float, high: float = math.inf,
                 low_open: bool = False) -> None:
  """`value` must be a finite number in [low, high) (or (low, high) when low_open)."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and \
      math.isfinite(value) and (value > low if low_open else value >= low) and value < high
  if not ok:
    bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high < math.inf else "")
    raise ValueError(f"{name}={value!r} must be a finite number {bound}; fix it in the config.")


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  """Dense hidden connection (docs/model.md). `layers` is the dense depth m (0 = off)."""

  layers: int = 2  # m: how many shallower layers feed each layer.
  every: int = 1  # only layers l with l % every == 0 fuse, and only they own fusion parameters
  projection: str = "identity"  # identity | linear
  select: str = "mlp"  # mlp | linear | none
  fusion: str = "add"  # add | concat
  concat_merge: str = "channel"  # concat only: channel (per-channel weights) | full (linear)
  gates: str = "shared"  # shared (one gate for all m sources) | per_source (one gate each)
  r_k: int = 32  # bottleneck ratio of the key gate (H -> H / r_k)
  r_v: int = 32  # bottleneck ratio of the value gate
  gate_width_k: int = 0  # inner width of the key gate MLP; 0: H / r_k
  gate_width_v: int = 0  # inner width of the value gate MLP; 0: H / r_v
  mamba_level: str = "input"  # DenseMamba: input (fuse x and B) | state (readout of h_j)

  def __post_init__(self):
    for key in ("layers", "gate_width_k", "gate_width_v"):
      _check_int(f"dense.{key}", getattr(self, key), 0)
    for key in ("every", "r_k", "r_v"):
      _check_int(f"dense.{key}", getattr(self, key), 1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every model family reads the fields it needs and ignores the rest."""

  family: str = "dense_retnet"
  vocab_size: int = 32000
  num_layers: int = 2
  hidden_size: int = 256
  norm_eps: float = 1e-6
  dropout: float = 0.0
  tie_embeddings: bool = False
  init_std: float = 0.02
  # Retention (dense_retnet / retnet_ffn): qk = total query/key width, E = v_factor * H.
  qk_dim: int = 128
  v_factor: int = 2
  num_heads: int = 2
  # FFN (retnet_ffn, transformer): ffn_act in swiglu | gelu | relu.
  ffn_dim: int = 1024
  ffn_act: str = "swiglu"
  # Transformer baseline: norm rms | layer, positions rope | learned, use_bias.
  norm_type: str = "rms"
  pos_emb: str = "rope"
  use_bias: bool = False
  max_len: int = 2048
  rope_base: float = 10000.0
  # Mamba.
  state_dim: int = 16
  expand: int = 2
  conv_width: int = 4
  dt_rank: int = 0  # 0: ceil(H / 16)
  # Dense connection.
  dense: DenseConfig = dataclasses.field(default_factory=DenseConfig)
  # Computation.
  mode: str = "chunkwise"  # parallel | chunkwise (training-time sequence mixing)
  impl: str = "auto"  # ops impl, shared by all families: auto | xla | pallas | reference
  # (also pallas_interpret for CPU tests; retention-only: parallel, chunkwise)
  chunk_size: int = 64
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"model.family={self.family!r} is unknown; use one of {FAMILIES}.")
    if isinstance(self.dense, Mapping):
      object.__setattr__(self, "dense", DenseConfig(**self.dense))
    self._check_fields()

  def _check_fields(self) -> None:
    """Sizes are positive integers, rates finite and in range, switches booleans, names str."""
    for key in ("vocab_size", "num_layers", "hidden_size", "qk_dim", "v_factor", "num_heads",
                "ffn_dim", "max_len", "state_dim", "expand", "conv_width", "chunk_size"):
      _check_int(f"model.{key}", getattr(self, key), 1)
    _check_int("model.dt_rank", self.dt_rank, 0)
    _check_float("model.norm_eps", self.norm_eps, 0.0, low_open=True)
    _check_float("model.rope_base", self.rope_base, 0.0, low_open=True)
    _check_float("model.init_std", self.init_std, 0.0)
    _check_float("model.dropout", self.dropout, 0.0, 1.0)
    for key in ("tie_embeddings", "use_bias", "remat"):
      if not isinstance(getattr(self, key), bool):
        raise ValueError(f"model.{key}={getattr(self, key)!r} must be true or false.")
    for key in ("ffn_act", "norm_type", "pos_emb", "mode", "impl"):
      if not isinstance(getattr(self, key), str):
        raise ValueError(f"model.{key}={getattr(self, key)!r} must be a string.")
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in FLOAT_DTYPES:
        raise ValueError(f"model.{key}={getattr(self, key)!r} is not a float dtype; use one of "
                         f"{FLOAT_DTYPES}.")
    if not isinstance(self.dense, DenseConfig):
      raise ValueError(f"model.dense={self.dense!r} must be a mapping of dense options.")
    if self.family == "transformer" and self.hidden_size % self.num_heads:
      raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                       f"model.num_heads={self.num_heads}.")

  @property
  def v_dim(self) -> int:
    return self.v_factor * self.hidden_size

  @property
  def d_inner(self) -> int:
    return self.expand * self.hidden_size

  @property
  def resolved_dt_rank(self) -> int:
    return self.dt_rank or -(-self.hidden_size // 16)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a (possibly nested) mapping; unknown keys are an error naming the key."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"config.model has unknown key(s) {unknown}; valid keys: {sorted(names)}.")
    dense = dict(d.pop("dense", {}) or {})
    dnames = {f.name for f in dataclasses.fields(DenseConfig)}
    bad = sorted(set(dense) - dnames)
    if bad:
      raise ValueError(f"config.model.dense has unknown key(s) {bad}; valid keys: {sorted(dnames)}.")
    return cls(dense=DenseConfig(**dense), **d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def architecture(self) -> dict[str, Any]:
    """The fields that decide what trained weights compute: `to_dict()` without
    COMPUTE_FIELDS. Exports record it; loading refuses a config that differs from it."""
    return {k: v for k, v in self.to_dict().items() if k not in COMPUTE_FIELDS}
