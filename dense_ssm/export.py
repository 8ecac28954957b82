r"""Export a trained model for inference: `python -m dense_ssm.export --workdir=DIR --out=OUT`.

An export directory holds everything inference needs, and nothing of training:

  OUT/config.json          {"format": "dense_ssm", "model": ModelConfig dict, "add_bos", ...}
  OUT/model.safetensors    the params, flat names such as "layers_0/self_attn/q_proj/kernel"
  OUT/tokenizer.model      the SentencePiece model (when the run had one)
  OUT/serving/             (--serving) jax.export StableHLO of prefill, decode_step and a whole
                           sampling generation, a manifest, and `serve.py`, a loader that
                           imports only jax and numpy (a copy of dense_ssm/serve.py)

`load_pretrained(OUT)` returns a `Pretrained` (config, params, tokenizer) without Orbax or any
training state; `load_workdir(DIR)` reads the params (only) of a training run's latest Orbax
checkpoint. Both check the params against the config and name the first mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Mapping

import numpy as np

from dense_ssm import cli
from dense_ssm.models.config import ModelConfig

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


def save_pretrained(pre: Pretrained, out: str, *, dtype: str | None = None) -> str:
  """Writes config.json, model.safetensors and tokenizer.model under `out`; returns `out`.

  `dtype` (e.g. "bfloat16") casts floating params for a smaller file; the config's
  param_dtype is updated to match.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  flat = flatten_params(pre.params)
  cfg = pre.cfg
  if dtype:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  # bfloat16 numpy dtype
    np_dtype = jnp.dtype(dtype)
    flat = {k: v.astype(np_dtype) if np.issubdtype(v.dtype, np.floating) or
            v.dtype == jnp.bfloat16 else v for k, v in flat.items()}
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
  check_params(flat, cfg, out)
  os.makedirs(out, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in flat.items()},
            os.path.join(out, PARAMS_FILE), metadata={"format": FORMAT})
  meta = {"format": FORMAT, "version": 1, "model": cfg.to_dict(), "add_bos": pre.add_bos,
          "bos_id": pre.bos_id, "eos_id": pre.eos_id, "pad_id": pre.pad_id,
          "source": pre.source}
  with open(os.path.join(out, CONFIG_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  tok_path = os.path.join(out, TOKENIZER_FILE)
  if pre.tokenizer is not None:
    with open(tok_path, "wb") as f:
      f.write(pre.tokenizer.model_proto)
  elif os.path.exists(tok_path):
    os.remove(tok_path)
  return out


def read_export_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"export directory {directory!r} does not exist; create one with "
                            "`python -m dense_ssm.export --workdir=DIR --out=OUT`.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory!r} has no {CONFIG_FILE}: not an export directory (a "
                            "training run? pass it as --workdir).")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or "model" not in meta:
    raise ValueError(f"{path} is not a dense_ssm export config (needs \"format\": \"{FORMAT}\" "
                     "and a \"model\" section).")
  return meta


def load_pretrained(directory: str, *, dtype: str | None = None) -> Pretrained:
  """Restores config + params (+ tokenizer) from an export directory. Needs jax/flax only.

  `dtype` overrides the compute dtype (e.g. "bfloat16" on accelerators).
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  meta = read_export_config(directory)
  cfg = ModelConfig.from_dict(meta["model"])
  if dtype:
    cfg = dataclasses.replace(cfg, dtype=dtype)
  params_path = os.path.join(directory, PARAMS_FILE)
  if not os.path.exists(params_path):
    raise FileNotFoundError(f"{directory!r} has no {PARAMS_FILE}; export it again.")
  flat = load_file(params_path)
  check_params(flat, cfg, directory)
  tokenizer = None
  tok_path = os.path.join(directory, TOKENIZER_FILE)
  if os.path.exists(tok_path):
    from dense_ssm.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = Tokenizer.from_file(tok_path)
    check_tokenizer(tokenizer, cfg, directory)
  return Pretrained(cfg=cfg, params=unflatten_params(flat), tokenizer=tokenizer,
                    add_bos=bool(meta.get("add_bos", True)), bos_id=int(meta.get("bos_id", 1)),
                    eos_id=int(meta.get("eos_id", 2)), pad_id=int(meta.get("pad_id", 0)),
                    source=directory)


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps of a training run (Orbax renames a step directory when done)."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root)
                if d.isdigit() and os.path.isdir(os.path.join(root, d, "state")))


def load_workdir(workdir: str, step: int | None = None, *,
                 dtype: str | None = None) -> Pretrained:
  """Params (no optimizer state) of checkpoint `step` (default: the latest) of a training run,
  with its config and tokenizer (`config.data.tokenizer`, else `workdir/tokenizer.model`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"--workdir={workdir} has no checkpoint (no {workdir}/checkpoints/"
                            "<step>/state); train first, or pass an export directory as --model.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"--workdir={workdir} has no checkpoint of step {step}; it has "
                            f"{steps}.")
  ckpt = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(ckpt, "config"))
  cfg = ModelConfig.from_dict(config["model"])
  shapes = expected_shapes(cfg)
  meta = ocp.PyTreeCheckpointer().metadata(os.path.join(ckpt, "state"))
  saved = _flat_leaves(getattr(meta, "item_metadata", meta)["params"])
  check_params({k: np.empty(v.shape, np.int8) for k, v in saved.items()}, cfg, ckpt)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  dt = jax.numpy.dtype(cfg.param_dtype)
  target = {"params": unflatten_params(
      {k: jax.ShapeDtypeStruct(s, dt, sharding=sharding) for k, s in shapes.items()})}
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target)
  state = ocp.PyTreeCheckpointer().restore(
      os.path.join(ckpt, "state"),
      args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
  if dtype:
    cfg = dataclasses.replace(cfg, dtype=dtype)
  data = config.get("data", {})
  tok_path = os.path.expanduser(data.get("tokenizer") or "") or os.path.join(workdir,
                                                                            TOKENIZER_FILE)
  tokenizer = None
  if os.path.exists(tok_path):
    from dense_ssm.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = Tokenizer.from_file(tok_path)
    check_tokenizer(tokenizer, cfg, workdir)
  return Pretrained(cfg=cfg, params=state["params"], tokenizer=tokenizer,
                    add_bos=bool(data.get("add_bos", True)), source=f"{workdir}@{step}")


def load_any(path: str, *, dtype: str | None = None) -> Pretrained:
  """An export directory (has config.json) or a training workdir (has checkpoints/)."""
  if os.path.exists(os.path.join(path, CONFIG_FILE)):
    return load_pretrained(path, dtype=dtype)
  if os.path.isdir(os.path.join(path, "checkpoints")):
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


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="python -m dense_ssm.export", description=__doc__.split(
      "\n")[0])
  p.add_argument("--workdir", required=True, help="training run directory (Orbax checkpoints)")
  p.add_argument("--out", required=True, help="export directory to write")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--dtype", default=None, help="cast params, e.g. bfloat16 (default: as saved)")
  p.add_argument("--serving", action="store_true",
                 help="also write serving/: jax.export artifacts and a jax+numpy loader")
  p.add_argument("--serving_batch", type=int, default=0,
                 help="batch size of the artifacts (0: any batch size)")
  p.add_argument("--serving_prompt_len", type=int, default=128,
                 help="prompt length of the artifacts (shorter prompts are left-padded)")
  p.add_argument("--serving_new_tokens", type=int, default=64,
                 help="tokens generated by the serialized generation")
  p.add_argument("--serving_platforms", default="cpu,cuda,tpu",
                 help="comma-separated platforms the artifacts run on ('': this machine's)")
  cli.add_traceback_flag(p)
  a = p.parse_args(argv)
  quiet_logs()
  with cli.user_errors("dense_ssm.export", a.traceback):
    pre = load_workdir(a.workdir, a.step)
    save_pretrained(pre, a.out, dtype=a.dtype)
    print(f"exported {pre.source} ({pre.cfg.family}) to {a.out}")
    if a.serving:
      platforms = tuple(x for x in a.serving_platforms.split(",") if x) or None
      files = export_serving(load_pretrained(a.out), os.path.join(a.out, "serving"),
                             batch=a.serving_batch or None, prompt_len=a.serving_prompt_len,
                             max_new_tokens=a.serving_new_tokens, platforms=platforms)
      print(f"serving artifacts: {', '.join(files)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
