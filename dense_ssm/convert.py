r"""Checkpoint conversion: PyTorch state dicts <-> our params, and the converter CLI.

  - the original DenseRetNet code (names: docs/model.md, 'Reference checkpoint names'):
      params = from_reference(load_state_dict("pytorch_model.bin"), cfg)
      state_dict = to_reference(params, cfg)        # numpy arrays under the reference names
  - Hugging Face `MambaForCausalLM` (and mamba_ssm's own names): from_hf_mamba(state_dict, cfg),
    and to_hf_mamba(params, cfg) the other way, from the same name table
    (`python -m dense_ssm.export --format=hf` writes both layouts: dense_ssm/hf_format.py)

Linear weights are stored [out, in] there and [in, out] here. The CLI writes an export
directory (dense_ssm/export.py) that `dense_ssm.load_pretrained` and `python -m
dense_ssm.generate --model=OUT` read:

  python -m dense_ssm.convert retnet --checkpoint=DIR_OR_FILE --out=OUT [--config=config.json]
      [--tokenizer=tokenizer.model] [--dense_layers=M]
  python -m dense_ssm.convert mamba-hf --checkpoint=DIR --out=OUT [--tokenizer=tokenizer.json]

DIR holds config.json, the weights (model.safetensors, pytorch_model.bin, or shards with their
*.index.json) and the tokenizer: tokenizer.model (SentencePiece, DenseRetNet) or tokenizer.json
(Hugging Face, e.g. the GPT-NeoX tokenizer of state-spaces/mamba-*-hf), which the export
carries. torch (for .bin files) and safetensors are imported only when a file is read; torch is
the optional `convert` extra, the `tokenizers` library (for tokenizer.json) the `hf` extra.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import numpy as np

from dense_ssm import cli
from dense_ssm.models.config import ModelConfig

# (reference name under model.layers.{i}., our path under layers_{i}/, transpose?)
_LAYER_MAP = (
    ("input_layernorm.weight", ("input_layernorm", "scale"), False),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), True),
    ("self_attn.to_hidden.0.weight", ("self_attn", "to_hidden", "kernel"), True),
    ("self_attn.to_out.0.weight", ("self_attn", "to_out", "kernel"), True),
    ("self_attn.group_norm.weight", ("self_attn", "group_norm", "scale"), False),
)
_DENSE_MAP = (
    ("self_attn.k_select.fc1.weight", ("self_attn", "k_fusion", "fc1", "kernel"), True),
    ("self_attn.k_select.fc2.weight", ("self_attn", "k_fusion", "fc2", "kernel"), True),
    ("self_attn.v_select.fc1.weight", ("self_attn", "v_fusion", "fc1", "kernel"), True),
    ("self_attn.v_select.fc2.weight", ("self_attn", "v_fusion", "fc2", "kernel"), True),
    ("self_attn.k_norm.weight", ("self_attn", "k_fusion", "norm", "scale"), False),
    ("self_attn.v_norm.weight", ("self_attn", "v_fusion", "norm", "scale"), False),
)
_TOP_MAP = (
    ("model.embed_tokens.weight", ("embed_tokens", "embedding"), False),
    ("model.norm.weight", ("norm", "scale"), False),
    ("lm_head.weight", ("lm_head", "kernel"), True),
)
_IGNORED_PREFIXES = ("model.retnet_rel_pos.",)


def _name_map(cfg: ModelConfig):
  if cfg.family != "dense_retnet" or cfg.dense.select != "mlp" or cfg.dense.fusion != "add" \
      or cfg.dense.projection != "identity" or cfg.tie_embeddings:
    raise ValueError("reference conversion supports the reference DenseRetNet layout only "
                     "(family=dense_retnet, dense select=mlp, fusion=add, projection=identity, "
                     "untied head).")
  rows = list(_TOP_MAP)
  for i in range(cfg.num_layers):
    for ref, ours, tr in _LAYER_MAP + (_DENSE_MAP if cfg.dense.layers > 0 else ()):
      rows.append((f"model.layers.{i}.{ref}", (f"layers_{i}",) + ours, tr))
  return rows


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return getattr(tree, "value", tree)


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def to_reference(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our params -> a reference-layout state dict of numpy arrays."""
  out = {}
  for ref, ours, tr in _name_map(cfg):
    a = np.asarray(_get(params, ours))
    out[ref] = np.ascontiguousarray(a.T) if tr else a
  return out


def from_reference(state_dict: Mapping[str, Any], cfg: ModelConfig,
                   dtype=np.float32) -> dict[str, Any]:
  """A reference state dict (arrays or torch tensors) -> our nested params dict.

  Raises ValueError naming missing keys, unexpected keys or the first shape mismatch.
  """
  from dense_ssm.models import abstract_params  # pylint: disable=g-import-not-at-top
  expected = abstract_params(cfg)
  sd = {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED_PREFIXES)}
  rows = _name_map(cfg)
  names = {r for r, _, _ in rows}
  missing = sorted(names - set(sd))
  if missing:
    raise ValueError(f"state dict lacks {len(missing)} reference key(s), first {missing[0]!r}: "
                     "is it a DenseRetNet checkpoint of this config (num_layers, dense.layers)?")
  extra = sorted(set(sd) - names)
  if extra:
    raise ValueError(f"state dict has {len(extra)} unexpected key(s), first {extra[0]!r}: "
                     "check the config (num_layers, dense.layers) matches the checkpoint.")
  params: dict[str, Any] = {}
  for ref, ours, tr in rows:
    a = _to_numpy(sd[ref])
    a = a.T if tr else a
    want = tuple(_get(expected, ours).shape)
    if a.shape != want:
      raise ValueError(f"{ref}: checkpoint shape {a.shape} (as ours) != model shape {want} "
                       f"for {'/'.join(ours)}; fix the config (e.g. vocab_size, hidden_size).")
    _set(params, ours, np.asarray(a, dtype=dtype))
  return params


def _to_numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def load_state_dict(path: str) -> dict[str, Any]:
  """Reads a safetensors file or a pickled `pytorch_model.bin` (torch weights_only=True)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass a .safetensors or .bin.")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading a PyTorch .bin needs torch: pip install -e '.[convert]', or "
                      "convert the file to safetensors.") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path!r} is not a loadable torch state dict ({type(e).__name__}: {e}).")
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path!r} holds a {type(sd).__name__}, not a state dict of tensors.")
  bad = next((k for k, v in sd.items() if not hasattr(v, "shape")), None)
  if bad is not None:
    raise ValueError(f"{path!r} is a dict but {bad!r} holds a {type(sd[bad]).__name__}, not a "
                     "tensor: not a state dict (a training checkpoint? save its model's "
                     "state_dict()).")
  return dict(sd)


def reference_vocab_size(state_dict: Mapping[str, Any]) -> int:
  """Released checkpoints use 32001 (a pad token appended); read it off the embedding."""
  return int(_to_numpy(state_dict["model.embed_tokens.weight"]).shape[0])


# ------------------------------------------------------------------------------ files and configs


def load_checkpoint(path: str) -> dict[str, Any]:
  """A weights file, or a directory with model.safetensors / pytorch_model.bin or sharded
  weights listed by a *.index.json."""
  if not os.path.isdir(path):
    return load_state_dict(path)
  for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    if os.path.exists(os.path.join(path, index)):
      sd: dict[str, Any] = {}
      for shard in shard_files(os.path.join(path, index)):
        sd.update(load_state_dict(shard))
      return sd
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.exists(os.path.join(path, name)):
      return load_state_dict(os.path.join(path, name))
  raise FileNotFoundError(f"{path!r} has no model.safetensors, pytorch_model.bin or shard index; "
                          "pass the weights file as --checkpoint.")


def shard_files(index_path: str) -> list[str]:
  """The shard paths listed by a *.index.json ("weight_map": {tensor name: shard file}). An
  index is untrusted input: shard names must be relative paths inside the index's directory
  (no absolute paths, no ".."); symbolic links there are followed (the Hugging Face cache links
  each file to its blob)."""
  folder = os.path.dirname(index_path)
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    names = sorted(set(weight_map.values()))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{index_path} is not a shard index (needs \"weight_map\": {{tensor: "
                     f"file}}): {type(e).__name__}: {e}") from None
  for name in names:
    parts = name.replace("\\", "/").split("/") if isinstance(name, str) else [""]
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in parts or \
        ":" in parts[0]:
      raise ValueError(f"{index_path} lists shard {name!r}, which is not a file name inside "
                       f"{folder}; refusing to read it (shards must sit next to the index).")
  return [os.path.join(folder, name) for name in names]


def read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"config {path!r} does not exist; pass --config=PATH/config.json.")
  with open(path) as f:
    return json.load(f)


def _rows(state_dict, name) -> int:
  return int(_to_numpy(state_dict[name]).shape[0])


def reference_config(ref: Mapping[str, Any], state_dict: Mapping[str, Any],
                     dense_layers: int | None = None) -> ModelConfig:
  """ModelConfig of a DenseRetNet checkpoint from its config.json (keys of the reference code:
  hidden_size, query_key_dim, num_attention_heads, num_hidden_layers, v_factor, rms_norm_eps,
  dense_block_layers). vocab_size and the gate ratios r_k, r_v come from the weights' shapes
  (released checkpoints: vocab 32001; ratios differ by size)."""
  from dense_ssm.models.config import DenseConfig  # pylint: disable=g-import-not-at-top

  missing = [k for k in ("hidden_size", "query_key_dim", "num_attention_heads",
                         "num_hidden_layers") if k not in ref]
  if missing:
    raise ValueError(f"config.json lacks {missing}: is it a DenseRetNet config (keys "
                     "hidden_size, query_key_dim, num_attention_heads, num_hidden_layers)?")
  if "model.embed_tokens.weight" not in state_dict:
    raise ValueError("state dict has no model.embed_tokens.weight: not a DenseRetNet checkpoint.")
  h = int(ref["hidden_size"])
  m = int(ref.get("dense_block_layers", 2)) if dense_layers is None else dense_layers
  fc1 = "model.layers.0.self_attn.{}_select.fc1.weight"
  r_k = h // _rows(state_dict, fc1.format("k")) if fc1.format("k") in state_dict else 32
  r_v = h // _rows(state_dict, fc1.format("v")) if fc1.format("v") in state_dict else 32
  return ModelConfig(
      family="dense_retnet", vocab_size=reference_vocab_size(state_dict),
      num_layers=int(ref["num_hidden_layers"]), hidden_size=h, qk_dim=int(ref["query_key_dim"]),
      num_heads=int(ref["num_attention_heads"]), v_factor=int(ref.get("v_factor", 2)),
      norm_eps=float(ref.get("rms_norm_eps", 1e-6)), tie_embeddings=False,
      max_len=int(ref.get("max_position_embeddings", 2048)),
      dense=DenseConfig(layers=m, r_k=r_k, r_v=r_v))


# ------------------------------------------------------------------------------ HF Mamba


def _mamba_prefix(state_dict: Mapping[str, Any]) -> str:
  for p in ("backbone.", ""):
    if any(k.startswith(p + "layers.0.mixer.") for k in state_dict):
      return p
  raise ValueError("state dict has no backbone.layers.0.mixer.* keys: not a Mamba checkpoint "
                   "(MambaForCausalLM names).")


def _mamba_embedding_key(state_dict, prefix) -> str:
  for name in ("embeddings.weight", "embedding.weight"):
    if prefix + name in state_dict:
      return prefix + name
  raise ValueError(f"state dict has no {prefix}embeddings.weight: not a Mamba checkpoint.")


def hf_mamba_config(hf: Mapping[str, Any], state_dict: Mapping[str, Any]) -> ModelConfig:
  """ModelConfig of a Mamba-1 checkpoint from its config.json (transformers' MambaConfig keys,
  or mamba_ssm's d_model / n_layer). vocab_size comes from the embedding's shape."""
  from dense_ssm.models.config import DenseConfig  # pylint: disable=g-import-not-at-top

  if hf.get("use_bias", False):
    raise ValueError("config.json has use_bias=true (biases on in_proj/out_proj): not supported "
                     "by this Mamba implementation.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only silu is supported.")
  h = int(hf.get("hidden_size", hf.get("d_model", 0)))
  layers = int(hf.get("num_hidden_layers", hf.get("n_layer", 0)))
  if not h or not layers:
    raise ValueError("config.json lacks hidden_size/d_model or num_hidden_layers/n_layer: is it "
                     "a Mamba config?")
  ssm = hf.get("ssm_cfg", {}) or {}
  expand = hf.get("expand", ssm.get("expand", 2))
  rank = hf.get("time_step_rank", ssm.get("dt_rank", "auto"))
  rank = math.ceil(h / 16) if rank == "auto" else int(rank)
  prefix = _mamba_prefix(state_dict)
  return ModelConfig(
      family="mamba", vocab_size=_rows(state_dict, _mamba_embedding_key(state_dict, prefix)),
      num_layers=layers, hidden_size=h, state_dim=int(hf.get("state_size",
                                                             ssm.get("d_state", 16))),
      expand=int(expand), conv_width=int(hf.get("conv_kernel", ssm.get("d_conv", 4))),
      dt_rank=rank, norm_eps=float(hf.get("layer_norm_epsilon", hf.get("norm_epsilon", 1e-5))),
      tie_embeddings=bool(hf.get("tie_word_embeddings", hf.get("tie_embeddings", True))),
      dense=DenseConfig(layers=0))


# (name under backbone.layers.{i}., our path under layers_{i}/, layout): "T" = a linear weight
# ([out, in] there, [in, out] here), "conv" = the depthwise conv ([d_inner, 1, W] there, [W,
# d_inner] here), "" = as is. One table for both directions (from_hf_mamba, to_hf_mamba).
_MAMBA_LAYER_MAP = (
    ("norm.weight", ("input_layernorm", "scale"), ""),
    ("mixer.in_proj.weight", ("self_attn", "in_proj", "kernel"), "T"),
    ("mixer.conv1d.weight", ("self_attn", "conv_kernel"), "conv"),
    ("mixer.conv1d.bias", ("self_attn", "conv_bias"), ""),
    ("mixer.x_proj.weight", ("self_attn", "x_proj", "kernel"), "T"),
    ("mixer.dt_proj.weight", ("self_attn", "dt_proj", "kernel"), "T"),
    ("mixer.dt_proj.bias", ("self_attn", "dt_bias"), ""),
    ("mixer.A_log", ("self_attn", "A_log"), ""),
    ("mixer.D", ("self_attn", "D"), ""),
    ("mixer.out_proj.weight", ("self_attn", "out_proj", "kernel"), "T"),
)
_MAMBA_CONV_BIAS = "mixer.conv1d.bias"  # optional in checkpoints: zeros when absent


def _mamba_name_map(cfg: ModelConfig, prefix: str = "backbone.",
                    embedding: str = "backbone.embeddings.weight"):
  """Rows (checkpoint name, our path, layout) of a Mamba-1 model without dense connection."""
  rows = [(embedding, ("embed_tokens", "embedding"), ""), (prefix + "norm_f.weight",
                                                           ("norm", "scale"), "")]
  if not cfg.tie_embeddings:
    rows.append(("lm_head.weight", ("lm_head", "kernel"), "T"))
  for i in range(cfg.num_layers):
    rows += [(f"{prefix}layers.{i}.{name}", (f"layers_{i}",) + ours, how)
             for name, ours, how in _MAMBA_LAYER_MAP]
  return rows


def from_hf_mamba(state_dict: Mapping[str, Any], cfg: ModelConfig,
                  dtype=np.float32) -> dict[str, Any]:
  """A MambaForCausalLM state dict -> our params (family mamba, no dense connection).

  Names: backbone.embeddings, backbone.layers.{i}.norm, backbone.layers.{i}.mixer.{in_proj,
  conv1d, x_proj, dt_proj, A_log, D, out_proj}, backbone.norm_f, lm_head (when untied).
  """
  from dense_ssm.export import check_params  # pylint: disable=g-import-not-at-top

  prefix = _mamba_prefix(state_dict)
  sd = {k: _to_numpy(v) for k, v in state_dict.items()}
  flat = {}
  for name, ours, how in _mamba_name_map(cfg, prefix, _mamba_embedding_key(state_dict, prefix)):
    if name not in sd and name.endswith(_MAMBA_CONV_BIAS):
      a = np.zeros(cfg.d_inner, np.float32)
    elif name not in sd:
      raise ValueError(f"state dict lacks {name!r}: is it a Mamba checkpoint of this config "
                       f"(num_layers={cfg.num_layers})?")
    else:
      a = sd.pop(name)
    flat["/".join(ours)] = a.T if how == "T" else a.reshape(cfg.d_inner, -1).T if \
        how == "conv" else a
  extra = sorted(k for k in sd if not (cfg.tie_embeddings and k == "lm_head.weight"))
  if extra:
    raise ValueError(f"state dict has {len(extra)} unexpected key(s), first {extra[0]!r}: check "
                     "that config.json matches the checkpoint (num_hidden_layers, use_bias).")
  check_params(flat, cfg, "Mamba checkpoint")
  params: dict[str, Any] = {}
  for name, a in flat.items():
    _set(params, tuple(name.split("/")), np.ascontiguousarray(a, dtype=dtype))
  return params


def to_hf_mamba(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our params (family mamba, dense.layers = 0) -> a MambaForCausalLM state dict of numpy
  arrays (lm_head.weight only when untied, as transformers saves it)."""
  if cfg.family != "mamba" or cfg.dense.layers:
    raise ValueError("MambaForCausalLM holds plain Mamba only (family=mamba, dense.layers=0).")
  out = {}
  for name, ours, how in _mamba_name_map(cfg):
    a = np.asarray(_get(params, ours))
    out[name] = np.ascontiguousarray(a.T if how == "T" else a.T[:, None, :] if how == "conv"
                                     else a)
  return out


# ------------------------------------------------------------------------------ CLI


def _find_tokenizer(checkpoint: str, given: str | None):
  """`given`, else tokenizer.model or tokenizer.json next to the weights, else None."""
  from dense_ssm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  if given:
    return tokenizer_lib.load_file(given)
  folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
  path = tokenizer_lib.find_file(folder)
  return tokenizer_lib.load_file(path) if path else None


def read(kind: str, checkpoint: str, *, config: str | None = None, tokenizer: str | None = None,
         dense_layers: int | None = None):
  """A checkpoint (`kind` retnet | mamba-hf: a directory with config.json, or a weights file
  with `config`) as an `export.Pretrained` with float32 numpy params."""
  from dense_ssm import export  # pylint: disable=g-import-not-at-top

  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"--checkpoint={checkpoint} does not exist.")
  folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
  meta = read_json(config or os.path.join(folder, "config.json"))
  sd = load_checkpoint(checkpoint)
  if kind == "retnet":
    cfg = reference_config(meta, sd, dense_layers)
    params = from_reference(sd, cfg)
  elif kind == "mamba-hf":
    cfg = hf_mamba_config(meta, sd)
    params = from_hf_mamba(sd, cfg)
  else:
    raise ValueError(f"unknown checkpoint kind {kind!r}; use retnet or mamba-hf.")
  tok = _find_tokenizer(checkpoint, tokenizer)
  ids = {"bos_id": tok.bos_id, "eos_id": tok.eos_id} if tok is not None else {}
  ids.update({k.replace("_token", ""): meta[k] for k in ("bos_token_id", "eos_token_id")
              if isinstance(meta.get(k), int)})  # the checkpoint's own ids win
  export.check_tokenizer(tok, cfg, checkpoint)
  return export.Pretrained(cfg=cfg, params=params, tokenizer=tok, add_bos=kind == "retnet",
                           source=os.path.abspath(checkpoint), **ids)


def convert(kind: str, checkpoint: str, out: str, *, config: str | None = None,
            tokenizer: str | None = None, dense_layers: int | None = None,
            dtype: str | None = None, overwrite: bool = False) -> str:
  """Converts a checkpoint (`kind` retnet | mamba-hf) to an export directory; returns `out`.
  A non-empty `out` is refused unless `overwrite` (then replaced whole once the new export is
  written), and so is an `out` that is, contains or lies inside the checkpoint."""
  from dense_ssm import export  # pylint: disable=g-import-not-at-top

  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"--checkpoint={checkpoint} does not exist.")
  export.check_not_inside(out, checkpoint, "--checkpoint")
  export.check_out_dir(out, overwrite)
  pre = read(kind, checkpoint, config=config, tokenizer=tokenizer, dense_layers=dense_layers)
  return export.save_pretrained(pre, out, dtype=dtype, overwrite=overwrite)


_KINDS = ("retnet", "mamba-hf")


def _define_flags(fv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  d = dict(flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "Checkpoint directory or weights file.", **d)
  flags.DEFINE_string("out", None, "Export directory to write.", **d)
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out (swapped in once the new "
                    "export is complete).", **d)
  flags.DEFINE_string("config", None, "config.json (default: next to the weights).", **d)
  flags.DEFINE_string("tokenizer", None, "SentencePiece .model or Hugging Face tokenizer.json "
                      "(default: tokenizer.model or tokenizer.json next to the weights).", **d)
  flags.DEFINE_integer("dense_layers", None, "retnet: dense depth m (default: the config's "
                       "dense_block_layers, else 2).", **d)
  flags.DEFINE_string("dtype", None, "Store params as this dtype, e.g. bfloat16.", **d)
  flags.DEFINE_bool("traceback", False, "Show tracebacks of errors.", **d)
  flags.mark_flags_as_required(["checkpoint", "out"], flag_values=fv)


def main(argv=None) -> int:
  usage = ("Convert PyTorch checkpoints to a dense_ssm export:\n\n  python -m dense_ssm.convert "
           "KIND --checkpoint=DIR_OR_FILE --out=OUT\n\nKIND: retnet (the original DenseRetNet "
           "code) | mamba-hf (transformers MambaForCausalLM).")
  a, rest = cli.parse_flags("dense_ssm.convert", usage, _define_flags, argv)
  with cli.user_errors("dense_ssm.convert", a.traceback, extra=(ImportError,)):  # no torch
    if len(rest) != 1 or rest[0] not in _KINDS:
      raise ValueError(f"give one checkpoint kind, {' or '.join(_KINDS)} (python -m "
                       "dense_ssm.convert mamba-hf --checkpoint=DIR --out=OUT); got "
                       f"{' '.join(rest) or 'none'}.")
    kind = rest[0]
    out = convert(kind, a.checkpoint, a.out, config=a.config, tokenizer=a.tokenizer,
                  dense_layers=a.dense_layers, dtype=a.dtype, overwrite=a.overwrite)
  print(f"converted {a.checkpoint} ({kind}) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
