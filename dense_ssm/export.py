r"""Export a trained model for inference: `python -m dense_ssm.export --workdir=DIR --out=OUT`.

An export directory holds everything inference needs, and nothing of training:

  OUT/config.json          {"format": "dense_ssm", "model": ModelConfig dict, "add_bos", ...}
  OUT/model.safetensors    the params, flat names such as "layers_0/self_attn/q_proj/kernel"
  OUT/tokenizer.model      the SentencePiece model, or OUT/tokenizer.json, the Hugging Face
                           tokenizer (whichever the run or checkpoint had, if any)
  OUT/serving/             (--serving) jax.export StableHLO of prefill, decode_step and a whole
                           sampling generation, a manifest, and `serve.py`, a loader that
                           imports only jax and numpy (a copy of dense_ssm/serve.py)

`load_pretrained(OUT)` returns a `Pretrained` (config, params, tokenizer) without Orbax or any
training state; `load_workdir(DIR)` reads the params (only) of a training run's newest intact
Orbax checkpoint (a damaged newer step is reported in one line and set aside, as the trainer
does, unless a training run holds the workdir). Both check the params against the config and
name the first mismatch.

Writing never mixes old and new files: an export is written to a temporary sibling directory
and swapped in whole. A non-empty OUT is refused unless `overwrite` (`--overwrite`); then the
old directory is replaced only once the new one is complete. OUT, DIR and the directories read
may be URLs (gs://..., dense_ssm/fs.py); `write_directory` says how an upload replaces OUT.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Mapping

import numpy as np

from dense_ssm import cli, fs
from dense_ssm.models.config import FLOAT_DTYPES, ModelConfig

FORMAT = "dense_ssm"
CONFIG_FILE = "config.json"
PARAMS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass
class Pretrained:
  """A model ready for inference. `tokenizer` is None when none was exported."""

  cfg: ModelConfig
  params: Any  # nested dict of arrays (unboxed)
  tokenizer: Any = None  # dense_ssm.tokenizer.Tokenizer | None
  add_bos: bool = True
  bos_id: int = 1
  eos_id: int = 2
  pad_id: int = 0
  source: str = ""

  @property
  def model(self):
    from dense_ssm.models import build_model  # pylint: disable=g-import-not-at-top
    return build_model(self.cfg)


# ------------------------------------------------------------------------------ flat params


def _flat_leaves(tree, prefix: str = "") -> dict[str, Any]:
  """Nested mapping -> {"a/b/c": leaf}; Flax boxes (logical partitioning) are unwrapped."""
  tree = getattr(tree, "value", tree)
  if not hasattr(tree, "keys"):
    return {prefix[:-1]: tree}
  out = {}
  for k in tree.keys():
    out.update(_flat_leaves(tree[k], f"{prefix}{k}/"))
  return out


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Nested params -> {"a/b/c": numpy array}."""
  return {k: np.asarray(v) for k, v in _flat_leaves(params).items()}


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{flat name: shape} of the params of `cfg` (via jax.eval_shape: nothing is allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from dense_ssm.models import abstract_params  # pylint: disable=g-import-not-at-top

  leaves = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
  return {"/".join(str(k.key) for k in path if hasattr(k, "key")): tuple(v.shape)
          for path, v in leaves}


def check_params(flat: Mapping[str, Any], cfg: ModelConfig, where: str) -> None:
  """Raises ValueError naming the first parameter missing, unexpected or of another shape."""
  want = expected_shapes(cfg)
  have = {k: tuple(np.shape(v)) for k, v in flat.items()}
  for name in sorted(set(want) | set(have)):
    if name not in have:
      problem = f"{name} (shape {want[name]}) is missing"
    elif name not in want:
      problem = f"{name} (shape {have[name]}) is not a parameter of this config"
    elif have[name] != want[name]:
      problem = f"{name} has shape {have[name]} but the config needs {want[name]}"
    else:
      continue
    raise ValueError(f"{where}: params do not match the config ({problem}); export the "
                     "checkpoint again or fix config.json's model section.")


def check_tokenizer(tokenizer, cfg: ModelConfig, where: str) -> None:
  """Inference allows a tokenizer smaller than the embedding (released DenseRetNet checkpoints:
  32,000 pieces, vocab 32,001 with a pad row); a larger one could emit ids the model lacks."""
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} pieces but the model's "
                     f"vocab_size is {cfg.vocab_size}; use the tokenizer the model was trained "
                     "with.")


# ------------------------------------------------------------------------------ save / load


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                        ctypes.c_uint]
  at_fdcwd, rename_exchange = -100, 2
  return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def check_out_dir(out: str, overwrite: bool) -> str:
  """The absolute `out` (or URL); raises unless it is absent, an empty directory, or
  `overwrite`."""
  out = fs.abspath(out)
  if fs.exists(out) and not fs.isdir(out):
    raise FileExistsError(f"--out={out} is a file, not a directory; choose a directory path.")
  if fs.isdir(out) and fs.listdir(out) and not overwrite:
    raise FileExistsError(f"--out={out} is not empty; pass --overwrite (overwrite=True) to "
                          "replace it once the new export is complete, or choose another "
                          "directory.")
  return out


def check_not_inside(out: str, source: str, label: str, *, allow_inside: bool = False) -> None:
  """Refuses an `out` that is `source`, contains it, or (unless `allow_inside`) lies inside it:
  replacing `out` would delete the input or mix the export with it."""
  real = lambda p: fs.abspath(p) if fs.is_remote(p) else os.path.realpath(p)
  o, s = real(out), real(source)
  inside = o.startswith(s + os.sep) and not allow_inside
  if o == s or s.startswith(o + os.sep) or inside:
    where = "is the same as" if o == s else "contains" if s.startswith(o + os.sep) else "is inside"
    raise ValueError(f"--out={out} {where} {label} ({source}); write the export to a "
                     "directory outside it.")


def write_directory(out: str, write: Callable[[str], Any], *, overwrite: bool = False) -> str:
  """Runs `write(tmp)` on a new temporary sibling of `out`, then swaps it in: a crash leaves
  the old or the new directory, never a mix (the old one is deleted after the swap). Refuses a
  non-empty `out` unless `overwrite`. Returns `out`. A URL `out` (gs://...; object stores
  have no rename) is written to a local temporary directory and uploaded file by file, config.json
  last, after deleting the old `out` when `overwrite`: an interrupted upload leaves a directory
  without config.json, which loaders refuse."""
  out = check_out_dir(out, overwrite)
  if fs.is_remote(out):
    tmp = tempfile.mkdtemp(prefix="dense_ssm_export_")
    try:
      write(tmp)
      check_out_dir(out, overwrite)
      fs.rmtree(out)
      fs.copy_tree(tmp, out, last=(CONFIG_FILE,))
      return out
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  if os.path.islink(out):
    out = os.path.realpath(out)  # replace the directory it points to, keep the link
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
    write(tmp)
    if not os.path.exists(out):
      os.rename(tmp, out)
      return out
    check_out_dir(out, overwrite)  # still true now that the export is written?
    if _exchange(tmp, out):
      shutil.rmtree(tmp)  # holds the old directory now
      return out
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rename(out, os.path.join(old, name))  # no swap primitive: two renames, old kept aside
    try:
      os.rename(tmp, out)
    except OSError:
      os.rename(os.path.join(old, name), out)
      raise
    shutil.rmtree(old)
    return out
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained(pre: Pretrained, out: str, *, dtype: str | None = None,
                    overwrite: bool = False) -> str:
  """Writes config.json, model.safetensors and the tokenizer (when there is one) as
  the directory `out`; returns `out`. A non-empty `out` is refused unless `overwrite`, which
  replaces it whole once the new files are written (`write_directory`).

  `dtype` (e.g. "bfloat16") casts floating params for a smaller file; the config's
  param_dtype is updated to match.
  """
  return write_directory(out, lambda tmp: write_export(pre, tmp, dtype=dtype, where=out),
                         overwrite=overwrite)


def write_export(pre: Pretrained, out: str, *, dtype: str | None = None,
                 where: str | None = None) -> str:
  """Writes the export files into the existing, empty directory `out` (errors name `where`,
  default `out`)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  flat = flatten_params(pre.params)
  cfg = pre.cfg
  if dtype:
    check_dtype(dtype)
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  # bfloat16 numpy dtype
    np_dtype = jnp.dtype(dtype)
    flat = {k: v.astype(np_dtype) if np.issubdtype(v.dtype, np.floating) or
            v.dtype == jnp.bfloat16 else v for k, v in flat.items()}
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
  check_params(flat, cfg, where or out)
  save_file({k: np.ascontiguousarray(v) for k, v in flat.items()},
            os.path.join(out, PARAMS_FILE), metadata={"format": FORMAT})
  meta = {"format": FORMAT, "version": 1, "model": cfg.to_dict(), "add_bos": pre.add_bos,
          "bos_id": pre.bos_id, "eos_id": pre.eos_id, "pad_id": pre.pad_id,
          "source": pre.source, "architecture": cfg.architecture()}
  with open(os.path.join(out, CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  if pre.tokenizer is not None:
    with open(os.path.join(out, pre.tokenizer.file_name), "wb") as f:
      f.write(pre.tokenizer.to_bytes())
  return out


def read_export_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  if not fs.isdir(directory):
    raise FileNotFoundError(f"export directory {directory!r} does not exist; create one with "
                            "`python -m dense_ssm.export --workdir=DIR --out=OUT`.")
  if not fs.exists(path):
    raise FileNotFoundError(f"{directory!r} has no {CONFIG_FILE}: not an export directory (a "
                            "training run? pass it as --workdir).")
  try:
    with fs.open(path) as f:
      meta = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); export the model again.") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT or \
      not isinstance(meta.get("model"), dict):
    raise ValueError(f"{path} is not a dense_ssm export config (needs \"format\": \"{FORMAT}\" "
                     "and a \"model\" section).")
  return meta


def load_pretrained(directory: str, *, dtype: str | None = None) -> Pretrained:
  """Restores config + params (+ tokenizer) from an export directory. Needs jax/flax only.

  `dtype` overrides the compute dtype (e.g. "bfloat16" on accelerators).
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  meta = read_export_config(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  try:
    cfg = ModelConfig.from_dict(meta["model"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{config_path}: {e}") from None
  ids = {key: _meta_int(meta, key, default, config_path)
         for key, default in (("bos_id", 1), ("eos_id", 2), ("pad_id", 0))}
  if dtype:
    check_dtype(dtype)
    cfg = dataclasses.replace(cfg, dtype=dtype)
  params_path = os.path.join(directory, PARAMS_FILE)
  if not fs.exists(params_path):
    raise FileNotFoundError(f"{directory!r} has no {PARAMS_FILE}; export it again.")
  try:
    flat = load_file(params_path) if not fs.is_remote(params_path) else \
        safetensors_numpy.load(fs.read_bytes(params_path))
  except PermissionError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # safetensors' own error type
    first = " ".join(str(e).split()) or type(e).__name__
    raise ValueError(f"{params_path} cannot be read ({first}): the file is damaged or "
                     "truncated; export the model again.") from None
  check_params(flat, cfg, directory)
  check_architecture(meta, cfg, config_path)  # an edit that keeps every shape
  tokenizer = None
  from dense_ssm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok_path = tokenizer_lib.find_file(directory)
  if tok_path:
    tokenizer = tokenizer_lib.load_file(tok_path)
    check_tokenizer(tokenizer, cfg, directory)
  return Pretrained(cfg=cfg, params=unflatten_params(flat), tokenizer=tokenizer,
                    add_bos=bool(meta.get("add_bos", True)), **ids, source=directory)


def check_dtype(dtype: str) -> None:
  """A `--dtype` value must name a float dtype."""
  if dtype not in FLOAT_DTYPES:
    raise ValueError(f"--dtype={dtype!r} is not a float dtype; use one of "
                     f"{', '.join(FLOAT_DTYPES)}.")


def _meta_int(meta: Mapping[str, Any], key: str, default: int, path: str) -> int:
  value = meta.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{path}: {key}={value!r} must be an integer token id; export the model "
                     "again or fix it.")
  return value


def check_architecture(meta: Mapping[str, Any], cfg: ModelConfig, path: str) -> None:
  """Refuses a config.json whose model section differs from the `architecture` recorded with
  the weights (exports without that record are not checked)."""
  recorded = meta.get("architecture")
  if not isinstance(recorded, dict):
    return
  now = cfg.architecture()
  for key in sorted(set(recorded) | set(now)):
    a, b = recorded.get(key), now.get(key)
    pairs = [(f"{key}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b))] \
        if isinstance(a, dict) and isinstance(b, dict) else [(key, a, b)]
    for name, want, have in pairs:
      if want != have:
        raise ValueError(f"{path}: model.{name} is {have!r} but the weights were trained with "
                         f"{want!r}; set it back to {json.dumps(want)} (the \"architecture\" "
                         "section records the trained values) or export the model again.")


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps of a training run (Orbax renames a step directory when done)."""
  root = os.path.join(workdir, "checkpoints")
  if not fs.isdir(root):
    return []
  return sorted(int(d) for d in fs.listdir(root)
                if d.isdigit() and fs.isdir(os.path.join(root, d, "state")))


def _step_numbers(workdir: str) -> list[int]:
  """Every checkpoint step directory, intact or not (finished steps only: Orbax names a step
  directory once it is complete)."""
  root = os.path.join(workdir, "checkpoints")
  if not fs.isdir(root):
    return []
  return sorted(int(d) for d in fs.listdir(root)
                if d.isdigit() and fs.isdir(os.path.join(root, d)))


def load_workdir(workdir: str, step: int | None = None, *,
                 dtype: str | None = None) -> Pretrained:
  """Params (no optimizer state) of checkpoint `step` (default: the newest intact one) of a
  training run, with its config and tokenizer (`config.data.tokenizer`, else
  `workdir/tokenizer.model`). Without `step`, a damaged step (missing or unreadable files) is
  reported in one warning line, renamed to `<step>.damaged-<time>` unless a training run holds
  the workdir, and the next older step is tried; a damaged `step` given explicitly is an
  error."""
  if dtype:
    check_dtype(dtype)
  steps = _step_numbers(workdir)
  if not steps:
    raise FileNotFoundError(f"--workdir={workdir} has no checkpoint (no {workdir}/checkpoints/"
                            "<step>/state); train first, or pass an export directory as --model.")
  from dense_ssm import checkpoint  # pylint: disable=g-import-not-at-top

  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"--workdir={workdir} has no checkpoint of step {step}; it has "
                              f"{steps}.")
    try:
      return _load_step(workdir, step, dtype)
    except checkpoint.DamagedCheckpointError as e:
      raise ValueError(f"--workdir={workdir}: checkpoint step {step} is damaged ({e.reason}); "
                       f"choose another --step (steps: {steps}).") from None
  for s in reversed(steps):
    try:
      return _load_step(workdir, s, dtype)
    except checkpoint.DamagedCheckpointError as e:
      _skip_damaged(workdir, e)
  raise ValueError(f"--workdir={workdir} has no intact checkpoint (steps {steps} are damaged); "
                   "train again, or pass an export directory as --model.")


def _skip_damaged(workdir: str, error) -> None:
  """One warning line; the step is set aside unless a training run holds the workdir."""
  from dense_ssm import checkpoint, workdir_lock  # pylint: disable=g-import-not-at-top

  step_dir = os.path.join(fs.abspath(workdir), "checkpoints", str(error.step))
  holder = workdir_lock.holder(fs.abspath(workdir))
  if holder is not None:
    where = f"left in place while {workdir_lock.describe(holder)} trains in this workdir"
  else:
    try:
      where = f"moved it to {checkpoint.set_aside(step_dir)}"
    except OSError as e:
      where = f"could not move it aside ({e.strerror or e})"
  checkpoint.warn(f"checkpoint step {error.step} in {os.path.dirname(step_dir)} is damaged "
                  f"({error.reason}); {where}; trying the previous step")


def _guarded(step: int, fn: Callable[..., Any], *args, **kwargs) -> Any:
  """fn(...), with read errors that show damaged files raised as DamagedCheckpointError."""
  from dense_ssm import checkpoint  # pylint: disable=g-import-not-at-top

  try:
    with checkpoint.quiet_read_errors():
      return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # classified just below
    reason = checkpoint.damage_reason(e)
    if reason is None:
      raise
    raise checkpoint.DamagedCheckpointError(step, reason) from None


def _load_step(workdir: str, step: int, dtype: str | None) -> Pretrained:
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from dense_ssm import checkpoint  # pylint: disable=g-import-not-at-top

  ckpt = os.path.join(fs.abspath(workdir), "checkpoints", str(step))
  checkpoint.check_intact(ckpt, ("state", "config"))
  config = _guarded(step, ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore,
                    os.path.join(ckpt, "config"))
  if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
    raise checkpoint.DamagedCheckpointError(step, "config/ has no model section")
  cfg = ModelConfig.from_dict(config["model"])
  shapes = expected_shapes(cfg)
  meta = _guarded(step, ocp.PyTreeCheckpointer().metadata, os.path.join(ckpt, "state"))
  tree = getattr(meta, "item_metadata", meta)
  if not hasattr(tree, "keys") or "params" not in tree:
    raise checkpoint.DamagedCheckpointError(step, "state/ metadata has no params")
  saved = _flat_leaves(tree["params"])
  check_params({k: np.empty(v.shape, np.int8) for k, v in saved.items()}, cfg, ckpt)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  dt = jax.numpy.dtype(cfg.param_dtype)
  target = {"params": unflatten_params(
      {k: jax.ShapeDtypeStruct(s, dt, sharding=sharding) for k, s in shapes.items()})}
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
  state = _guarded(step, ocp.PyTreeCheckpointer().restore, os.path.join(ckpt, "state"),
                   args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                               partial_restore=True))
  if dtype:
    cfg = dataclasses.replace(cfg, dtype=dtype)
  data = config.get("data", {})
  tok_path = fs.expand(data.get("tokenizer") or "") or os.path.join(workdir, TOKENIZER_FILE)
  tokenizer, ids = None, {}
  if fs.exists(tok_path):
    from dense_ssm.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = Tokenizer.from_file(tok_path)
    check_tokenizer(tokenizer, cfg, workdir)
    ids = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}  # what training inserted
  return Pretrained(cfg=cfg, params=state["params"], tokenizer=tokenizer,
                    add_bos=bool(data.get("add_bos", True)), source=f"{workdir}@{step}", **ids)


def load_any(path: str, *, dtype: str | None = None) -> Pretrained:
  """An export directory (has config.json) or a training workdir (has checkpoints/)."""
  if fs.exists(os.path.join(path, CONFIG_FILE)):
    return load_pretrained(path, dtype=dtype)
  if fs.isdir(os.path.join(path, "checkpoints")):
    return load_workdir(path, dtype=dtype)
  raise FileNotFoundError(f"{path!r} is neither an export directory (no {CONFIG_FILE}) nor a "
                          "training workdir (no checkpoints/); check the path.")


# ------------------------------------------------------------------------------ serving


def export_serving(pre: Pretrained, out: str, *, batch: int | None = None, prompt_len: int = 128,
                   max_new_tokens: int = 64,
                   platforms: tuple[str, ...] | None = None) -> list[str]:
  """Writes jax.export artifacts of prefill, decode_step and generate, a manifest and serve.py
  (the jax+numpy loader) to `out`; returns the file names.

  Shapes: batch `batch` (None: symbolic, any batch), prompts padded to `prompt_len`;
  `platforms` (e.g. ("cpu", "cuda", "tpu")) defaults to this machine's backend. The ops use
  their XLA forms (impl=xla), which lower on every platform.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top

  from dense_ssm import generate as gen  # pylint: disable=g-import-not-at-top
  from dense_ssm.models import build_model, init_cache  # pylint: disable=g-import-not-at-top

  cfg = dataclasses.replace(gen.inference_config(pre.cfg), impl="xla")
  model = build_model(cfg)
  b = jax_export.symbolic_shape("b")[0] if batch is None else batch
  cache_len = prompt_len + max_new_tokens if cfg.family == "transformer" else 0
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), pre.params)
  ids = jax.ShapeDtypeStruct((b, prompt_len), jnp.int32)
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt)  # pylint: disable=unnecessary-lambda-assignment

  def prefill(p, tokens_BxT, segment_ids_BxT):
    cache = init_cache(cfg, tokens_BxT.shape[0], cache_len)
    return model.apply({"params": p}, tokens_BxT, cache, segment_ids_BxT, method=model.prefill)

  def decode_step(p, tokens_B, cache):
    return model.apply({"params": p}, tokens_B, cache, method=model.decode_step)

  def generate(p, tokens_BxT, segment_ids_BxT, key, temperature, top_k, top_p, eos_id):
    return gen.generate_tokens(cfg, p, tokens_BxT, segment_ids_BxT, key, temperature, top_k,
                               top_p, eos_id, max_new_tokens=max_new_tokens, pad_id=pre.pad_id)

  kw = {} if platforms is None else {"platforms": tuple(platforms)}
  cache = jax.eval_shape(prefill, params, ids, ids)[1]
  exported = {
      "prefill": jax_export.export(jax.jit(prefill), **kw)(params, ids, ids),
      "decode_step": jax_export.export(jax.jit(decode_step), **kw)(
          params, jax.ShapeDtypeStruct((b,), jnp.int32), cache),
      "generate": jax_export.export(jax.jit(generate), **kw)(
          params, ids, ids, jax.ShapeDtypeStruct((2,), jnp.uint32), scalar(jnp.float32),
          scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.int32)),
  }
  os.makedirs(out, exist_ok=True)
  files = []
  for name, exp in exported.items():
    with open(os.path.join(out, f"{name}.jax"), "wb") as f:
      f.write(exp.serialize())
    files.append(f"{name}.jax")
  manifest = {"prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
              "batch": batch or "any", "platforms": list(exported["generate"].platforms),
              "family": cfg.family, "bos_id": pre.bos_id, "eos_id": pre.eos_id,
              "pad_id": pre.pad_id, "add_bos": pre.add_bos}
  with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"),
                  os.path.join(out, "serve.py"))
  return files + ["manifest.json", "serve.py"]


# ------------------------------------------------------------------------------ CLI


def quiet_logs() -> None:
  """CLI consoles show our lines and errors, not Orbax's informational absl warnings."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)


def _define_flags(fv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  d = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "Training run directory (Orbax checkpoints).", **d)
  flags.DEFINE_string("out", None, "Export directory to write.", **d)
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out (swapped in once the new "
                    "export is complete).", **d)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", **d)
  flags.DEFINE_string("dtype", None, "Cast params, e.g. bfloat16 (default: as saved).", **d)
  flags.DEFINE_enum("format", FORMAT, [FORMAT, "hf"], "dense_ssm: this package's export; hf: "
                    "transformers MambaForCausalLM (plain Mamba) or the original DenseRetNet "
                    "code's layout (dense_ssm/hf_format.py).", **d)
  flags.DEFINE_bool("serving", False, "Also write serving/: jax.export artifacts and a "
                    "jax+numpy loader.", **d)
  flags.DEFINE_integer("serving_batch", 0, "Batch size of the artifacts (0: any batch size).",
                       **d)
  flags.DEFINE_integer("serving_prompt_len", 128, "Prompt length of the artifacts (shorter "
                       "prompts are left-padded).", **d)
  flags.DEFINE_integer("serving_new_tokens", 64, "Tokens generated by the serialized "
                       "generation.", **d)
  flags.DEFINE_string("serving_platforms", "cpu,cuda,tpu", "Comma-separated platforms the "
                      "artifacts run on ('': this machine's).", **d)
  flags.DEFINE_bool("traceback", False, "Show tracebacks of errors.", **d)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def main(argv=None) -> int:
  a, rest = cli.parse_flags("dense_ssm.export", __doc__.split("\n\n")[0], _define_flags, argv)
  quiet_logs()
  with cli.user_errors("dense_ssm.export", a.traceback):
    if rest:
      raise ValueError(f"unexpected arguments {rest}; flags are --name=value.")
    if a.format == "hf" and a.serving:
      raise ValueError("--serving writes artifacts of a dense_ssm export; drop --serving or use "
                       "--format=dense_ssm.")
    check_out_dir(a.out, a.overwrite)  # before the (slow) work
    check_not_inside(a.out, a.workdir, "--workdir", allow_inside=True)
    check_not_inside(a.out, os.path.join(a.workdir, "checkpoints"), "the checkpoints of --workdir")
    pre = load_workdir(a.workdir, a.step)
    files = []

    def write(tmp):
      if a.format == "hf":
        from dense_ssm import hf_format  # pylint: disable=g-import-not-at-top
        hf_format.write_hf(pre, tmp, dtype=a.dtype, where=a.out)
        return
      write_export(pre, tmp, dtype=a.dtype, where=a.out)
      if a.serving:
        platforms = tuple(x for x in a.serving_platforms.split(",") if x) or None
        files.extend(export_serving(
            load_pretrained(tmp), os.path.join(tmp, "serving"), batch=a.serving_batch or None,
            prompt_len=a.serving_prompt_len, max_new_tokens=a.serving_new_tokens,
            platforms=platforms))

    write_directory(a.out, write, overwrite=a.overwrite)
    print(f"exported {pre.source} ({pre.cfg.family}) to {a.out}")
    if files:
      print(f"serving artifacts: {', '.join(files)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
