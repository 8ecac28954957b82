"""Reference-checkpoint conversion (SPEC section 6): PyTorch state dicts of the original DenseRetNet
code <-> our params. Linear weights are stored [out, in] there and [in, out] here.

  params = from_reference(load_state_dict("pytorch_model.bin"), cfg)
  state_dict = to_reference(params, cfg)          # numpy arrays under the reference names

torch (for .bin files) and safetensors are imported only when a file is read.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

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
    raise ImportError("reading a PyTorch .bin needs torch: pip install -e '.[torch]', or "
                      "convert the file to safetensors.") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path!r} is not a loadable torch state dict ({type(e).__name__}: {e}).")
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path!r} holds a {type(sd).__name__}, not a state dict of tensors.")
  return dict(sd)


def reference_vocab_size(state_dict: Mapping[str, Any]) -> int:
  """Released checkpoints use 32001 (a pad token appended); read it off the embedding."""
  return int(_to_numpy(state_dict["model.embed_tokens.weight"]).shape[0])
