r"""Our models in other ecosystems' layouts, and any model directory read back.

Writing (`python -m dense_ssm.export --format=hf`, or `save_hf`):

  - plain Mamba (family mamba, dense.layers = 0): a transformers `MambaForCausalLM` directory
    (config.json with model_type "mamba", model.safetensors) that
    `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads with no custom code;
  - DenseRetNet (family dense_retnet, dense.layers >= 1, the original code's gate layout): the
    original DenseRetNet code's state dict and config.json keys. That code defines the model
    in a modeling file kept next to the weights (`modeling_dense_gau_retnet.py`, named by
    config.json's auto_map); copy it into OUT to run the files there. It fixes the dense gates'
    widths in that file (H/32 in its 350M file), so the model's r_k / r_v must match the file.

Names and layouts come from the converters' tables (dense_ssm/convert.py), read in the other
direction; `python -m dense_ssm.convert retnet|mamba-hf` reads these directories back.
The tokenizer file (tokenizer.model or tokenizer.json) is copied when the model has one.

Reading (`load_any_format`): a dense_ssm export, a transformers Mamba directory or an original
DenseRetNet directory, told apart by config.json; used by `config.train.init_from`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from dense_ssm.models.config import ModelConfig

SUPPORTED = ("plain Mamba (family=mamba, dense.layers=0; written as transformers "
             "MambaForCausalLM) and DenseRetNet (family=dense_retnet, dense.layers>=1; written "
             "in the original code's layout)")

# Fields that decide what the weights compute, per family (plus COMMON and, when the dense
# connection is on, every dense.* field). Fields a family does not read are left out, so that
# configs differing only there compare equal.
COMMON = ("family", "vocab_size", "num_layers", "hidden_size", "norm_eps", "norm_type",
          "tie_embeddings")
FAMILY_FIELDS = {
    "dense_retnet": ("qk_dim", "v_factor", "num_heads"),
    "retnet_ffn": ("qk_dim", "v_factor", "num_heads", "ffn_dim", "ffn_act"),
    "mamba": ("state_dim", "expand", "conv_width", "dt_rank"),
    "transformer": ("num_heads", "ffn_dim", "ffn_act", "pos_emb", "use_bias", "rope_base"),
}


def architecture(cfg: ModelConfig) -> dict[str, Any]:
  """{"field" or "dense.field": value} of the fields that decide what `cfg`'s weights compute
  (dt_rank resolved; dense.* only when dense.layers > 0)."""
  d = cfg.to_dict()
  d["dt_rank"] = cfg.resolved_dt_rank
  out = {k: d[k] for k in COMMON + FAMILY_FIELDS[cfg.family]}
  dense = d["dense"]
  if dense["layers"] == 0:
    return {**out, "dense.layers": 0}
  if cfg.family != "mamba":
    dense.pop("mamba_level")
  return {**out, **{f"dense.{k}": v for k, v in dense.items()}}


def first_difference(have: ModelConfig, want: ModelConfig) -> tuple[str, Any, Any] | None:
  """(field, have's value, want's value) of the first architecture field that differs."""
  a, b = architecture(have), architecture(want)
  for key in sorted(set(a) | set(b), key=lambda k: (k != "family", k)):
    if a.get(key) != b.get(key):
      return key, a.get(key), b.get(key)
  return None


# ------------------------------------------------------------------------------ writing


def kind_of(cfg: ModelConfig) -> str:
  """"mamba-hf" or "retnet" (the `convert` kind that reads the files back); ValueError naming
  what is supported otherwise."""
  if cfg.family == "mamba" and cfg.dense.layers == 0:
    return "mamba-hf"
  if cfg.family == "dense_retnet" and cfg.dense.layers > 0:
    if cfg.dense.every != 1 or cfg.dense.gates != "shared":
      raise ValueError(f"dense.every={cfg.dense.every}, dense.gates={cfg.dense.gates!r}: the "
                       "original DenseRetNet layout has gates in every layer, shared by the "
                       "sources (every=1, gates=shared); use --format=dense_ssm.")
    return "retnet"
  what = f"family={cfg.family}, dense.layers={cfg.dense.layers}"
  raise ValueError(f"--format=hf cannot write {what}: it supports {SUPPORTED}; use "
                   "--format=dense_ssm for this model.")


def mamba_hf_config(pre, dtype: str) -> dict[str, Any]:
  """transformers MambaConfig keys (the ones `convert.hf_mamba_config` reads, and the fixed
  choices of this implementation: no in/out projection biases, a conv bias, silu)."""
  cfg = pre.cfg
  return {
      "architectures": ["MambaForCausalLM"], "model_type": "mamba",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers, "state_size": cfg.state_dim, "expand": cfg.expand,
      "intermediate_size": cfg.d_inner, "conv_kernel": cfg.conv_width,
      "time_step_rank": cfg.resolved_dt_rank, "layer_norm_epsilon": cfg.norm_eps,
      "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True,
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
      "bos_token_id": pre.bos_id, "eos_token_id": pre.eos_id, "pad_token_id": pre.pad_id,
      "torch_dtype": dtype, "use_cache": True,
  }


def retnet_reference_config(pre, dtype: str) -> dict[str, Any]:
  """The original DenseRetNet code's config.json keys (those `convert.reference_config` reads,
  and the switches that code reads with our model's values)."""
  cfg = pre.cfg
  return {
      "auto_map": {"AutoModelForCausalLM": "modeling_dense_gau_retnet.LlamaForCausalLM"},
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "query_key_dim": cfg.qk_dim, "num_attention_heads": cfg.num_heads,
      "num_hidden_layers": cfg.num_layers, "v_factor": cfg.v_factor,
      "rms_norm_eps": cfg.norm_eps, "dense_block_layers": cfg.dense.layers,
      "max_position_embeddings": cfg.max_len, "hidden_act": "silu",
      "initializer_range": cfg.init_std, "dropout": cfg.dropout, "deepnorm": False,
      "retnorm": False, "tie_word_embeddings": False, "bos_token_id": pre.bos_id,
      "eos_token_id": pre.eos_id, "pad_token_id": pre.pad_id, "torch_dtype": dtype,
      "use_cache": False,
  }


def hf_files(pre, dtype: str | None = None) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
  """(convert kind, config.json dict, state dict) of `pre` in its ecosystem's layout; checks
  that reading them back (`convert`) gives the same model, else ValueError naming the field."""
  from dense_ssm import convert  # pylint: disable=g-import-not-at-top

  cfg = pre.cfg
  kind = kind_of(cfg)
  if cfg.norm_type != "rms":
    raise ValueError(f"model.norm_type={cfg.norm_type!r}: the {kind} layout has RMSNorm only.")
  if kind == "mamba-hf":
    sd = convert.to_hf_mamba(pre.params, cfg)
  else:
    sd = convert.to_reference(pre.params, cfg)  # checks the reference gate layout
  if dtype:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  # bfloat16 numpy dtype
    sd = {k: v.astype(jnp.dtype(dtype)) for k, v in sd.items()}
  stored = str(next(iter(sd.values())).dtype)
  meta = (mamba_hf_config if kind == "mamba-hf" else retnet_reference_config)(pre, stored)
  back = (convert.hf_mamba_config(meta, sd) if kind == "mamba-hf" else
          convert.reference_config(meta, sd))
  diff = first_difference(back, cfg)
  if diff:
    raise ValueError(f"model.{diff[0]}={diff[2]!r} cannot be expressed in the {kind} layout "
                     f"(it would read back as {diff[1]!r}); use --format=dense_ssm.")
  return kind, meta, sd


def write_hf(pre, out: str, *, dtype: str | None = None, where: str | None = None) -> str:
  """Writes config.json, model.safetensors (and its tokenizer file) of `pre` in its ecosystem's
  layout into the existing, empty directory `out`; returns `out`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  from dense_ssm import export  # pylint: disable=g-import-not-at-top

  if dtype:
    export.check_dtype(dtype)
  try:
    _, meta, sd = hf_files(pre, dtype)
  except ValueError as e:
    raise ValueError(f"{where or out}: {e}") from None
  save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(meta, f, indent=2)
  if pre.tokenizer is not None:
    with open(os.path.join(out, pre.tokenizer.file_name), "wb") as f:
      f.write(pre.tokenizer.to_bytes())
  return out


def save_hf(pre, out: str, *, dtype: str | None = None, overwrite: bool = False) -> str:
  """`write_hf` as a whole directory `out` (refused when non-empty unless `overwrite`; swapped in
  once complete, as `export.save_pretrained` does)."""
  from dense_ssm import export  # pylint: disable=g-import-not-at-top

  return export.write_directory(out, lambda tmp: write_hf(pre, tmp, dtype=dtype, where=out),
                                overwrite=overwrite)


# ------------------------------------------------------------------------------ reading


def format_of(path: str) -> str:
  """"dense_ssm" | "mamba-hf" | "retnet": the layout of the model directory `path`, from its
  config.json; ValueError (or FileNotFoundError) naming the path otherwise."""
  config = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} is not a directory; give an export directory or a "
                            "Hugging Face / original DenseRetNet checkpoint directory.")
  if not os.path.exists(config):
    raise FileNotFoundError(f"{path!r} has no config.json: not a model directory (a training "
                            "run? export it first: python -m dense_ssm.export --workdir=...).")
  try:
    with open(config, encoding="utf-8") as f:
      meta = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config} is not valid JSON ({e}).") from None
  if not isinstance(meta, dict):
    meta = {}
  if meta.get("format") == "dense_ssm":
    return "dense_ssm"
  if meta.get("model_type") == "mamba" or {"d_model", "n_layer"} <= set(meta):
    return "mamba-hf"
  if "query_key_dim" in meta:
    return "retnet"
  raise ValueError(f"{config} is neither a dense_ssm export, a transformers Mamba config "
                   "(model_type mamba) nor an original DenseRetNet config (query_key_dim).")


def load_any_format(path: str, *, dense_layers: int | None = None):
  """An `export.Pretrained` from a dense_ssm export, a transformers Mamba directory or an
  original DenseRetNet directory (`dense_layers` overrides the latter's dense depth m, which
  released checkpoints' config.json does not state reliably; see docs/model.md)."""
  from dense_ssm import convert, export  # pylint: disable=g-import-not-at-top

  kind = format_of(path)
  if kind == "dense_ssm":
    return export.load_pretrained(path)
  return convert.read(kind, path, dense_layers=dense_layers)


__all__ = ["SUPPORTED", "architecture", "first_difference", "kind_of", "hf_files", "write_hf",
           "save_hf", "format_of", "load_any_format"]
