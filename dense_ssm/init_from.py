r"""`config.train.init_from=DIR`: start a new training run from saved weights (fine-tuning).

DIR is a dense_ssm export (`python -m dense_ssm.export` or `convert`), a transformers
`MambaForCausalLM` directory or an original DenseRetNet checkpoint directory
(dense_ssm/hf_format.py tells them apart by config.json). Rules:

  - Only a run without a checkpoint reads DIR: a resumed run continues from its own checkpoint
    and ignores the weights in DIR.
  - The saved model must be the run's model: the fields that decide what the weights compute
    (family, sizes, norm eps, dense options, ...; hf_format.architecture) and every parameter's
    shape must match `config.model`; the first difference is one error line naming the key to
    set. Compute-only fields (dtype, param_dtype, mode, impl, dropout, ...) may differ; params
    are cast to the run's param_dtype. An original DenseRetNet directory is read at the run's
    dense depth m (released checkpoints' config.json does not state it reliably).
  - The optimizer state and the step start fresh, as for a new run.
  - With `config.data.tokenizer` empty, the run uses DIR's tokenizer file, copied into the
    workdir on the first start so that a resumed run finds the same one; without one there, a
    warning says that a new tokenizer's ids will not match the pretrained embeddings.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dense_ssm import fs


def load_params(path: str, cfg) -> dict[str, np.ndarray]:
  """{flat name: array} of the model saved in `path`, checked against the run's ModelConfig
  `cfg`; ValueError (one line naming the config key) when they differ."""
  from dense_ssm import export, hf_format  # pylint: disable=g-import-not-at-top

  where = f"config.train.init_from={path}"
  try:
    pre = hf_format.load_any_format(path, dense_layers=cfg.dense.layers or None)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"{where}: {e}") from None
  diff = hf_format.first_difference(pre.cfg, cfg)
  if diff:
    key, saved, run = diff
    raise ValueError(f"{where} holds a model with {key}={saved!r} but this run's "
                     f"config.model.{key}={run!r}; set --config.model.{key}={saved} to fine-tune "
                     "it, or choose a matching init_from.")
  flat = export.flatten_params(pre.params)
  want = export.expected_shapes(cfg)
  for name in sorted(set(want) | set(flat)):
    have = tuple(flat[name].shape) if name in flat else None
    if have != want.get(name):
      raise ValueError(f"{where}: parameter {name} has shape {have} there but this run's model "
                       f"needs {want.get(name)}; make config.model match the saved model.")
  return flat


def place(params: Any, flat: dict[str, np.ndarray]) -> Any:
  """`params` (a tree of jax arrays) with each leaf replaced by `flat`'s array of the same
  name, cast to the leaf's dtype and laid out with its sharding (every process holds `flat`)."""
  import jax  # pylint: disable=g-import-not-at-top

  def put(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    host = np.asarray(flat[name]).astype(leaf.dtype)
    return jax.make_array_from_callback(host.shape, leaf.sharding, lambda idx: host[idx])

  return jax.tree_util.tree_map_with_path(put, params)


def adopt_tokenizer(config, workdir: str, fresh: bool) -> str | None:
  """Points an empty `config.data.tokenizer` at init_from's tokenizer (copied into `workdir`
  on a fresh start; a resumed run reuses that copy). Returns the console line to print."""
  from dense_ssm import tokenizer  # pylint: disable=g-import-not-at-top

  path = config.train.init_from
  if not path or config.data.tokenizer:
    return None
  src = tokenizer.find_file(path) if fs.isdir(path) else None
  if fresh and src:
    local = os.path.join(workdir, os.path.basename(src))
    fs.write_bytes(local, fs.read_bytes(src))  # atomic: hosts may share the workdir
  else:
    local = (None if fresh else tokenizer.find_file(workdir)) or src
  if local is None:
    return (f"warning: config.train.init_from={path} has no tokenizer file and "
            "config.data.tokenizer is empty, so a new tokenizer is trained: its ids do not "
            "match the pretrained embeddings; set config.data.tokenizer to the model's tokenizer")
  config.data.tokenizer = local
  return f"tokenizer: {local} (the tokenizer of config.train.init_from)"


def prepare(config, cfg, workdir: str, fresh: bool, say) -> dict[str, np.ndarray] | None:
  """The trainer's hook, before anything is written: the checked params of
  `config.train.init_from` for a `fresh` run (None when unset or resuming); adopts its
  tokenizer (`adopt_tokenizer`). `say` prints a console line."""
  path = config.train.init_from
  if not path:
    return None
  flat = load_params(path, cfg) if fresh else None
  if not fresh:
    say(f"config.train.init_from={path} is ignored: the run resumes from its own checkpoint")
  line = adopt_tokenizer(config, workdir, fresh)
  if line:
    say(line)
  return flat
