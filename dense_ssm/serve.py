r"""Standalone loader of a dense_ssm serving export: needs only jax and numpy (this file is
copied to OUT/serving/serve.py by `python -m dense_ssm.export ... --serving`).

  import serve                                  # OUT/serving on sys.path
  m = serve.load("OUT")
  logits_BxTxV, cache = m.prefill(tokens_BxT, segment_ids_BxT)   # T = m.prompt_len
  logits_BxV, cache = m.decode_step(tokens_B, cache)              # constant-size state
  ids = m.generate([[1, 415, 2936], [1, 9]], temperature=0.8, top_p=0.95, seed=0)

  python OUT/serving/serve.py OUT --ids 1,415,2936 [--temperature 0.8 --top_k 40 --seed 0]

The artifacts are `jax.export` serialisations (StableHLO) of the model's prefill, decode step
and whole sampling generation, with the params as an argument (read from OUT/model.safetensors).
Any batch size works; prompts are left-padded to `prompt_len` (pads in segment 0, so the result
does not depend on the padding); the Transformer's KV cache holds prompt_len + max_new_tokens.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file -> {name: array} (the format: u64 header size, JSON header, bytes).
  A truncated or damaged file raises ValueError."""
  with open(path, "rb") as f:
    blob = f.read()
  try:
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    out = {}
    for name, info in header.items():
      if name == "__metadata__":
        continue
      begin, end = info["data_offsets"]
      if end > len(data):
        raise ValueError(f"{name} ends at byte {end} of {len(data)}")
      out[name] = np.frombuffer(data[begin:end], dtype=_DTYPES[info["dtype"]]).reshape(
          info["shape"])
  except (struct.error, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
    raise ValueError(f"{path} is damaged or truncated ({e}); export the model again.") from None
  return out


def _nest(flat: dict[str, np.ndarray]) -> dict:
  # Same as dense_ssm.export.unflatten_params, repeated on purpose: this file runs where
  # dense_ssm is not installed (a test imports it in such a process).
  out: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


class ServingModel:
  """The three exported functions bound to the params of an export directory."""

  def __init__(self, directory: str):
    serving = os.path.join(directory, "serving")
    with open(os.path.join(serving, "manifest.json")) as f:
      self.manifest = json.load(f)
    self.prompt_len = int(self.manifest["prompt_len"])
    self.max_new_tokens = int(self.manifest["max_new_tokens"])
    self.eos_id, self.pad_id = int(self.manifest["eos_id"]), int(self.manifest["pad_id"])
    self.bos_id, self.add_bos = int(self.manifest["bos_id"]), bool(self.manifest["add_bos"])
    params = read_safetensors(os.path.join(directory, "model.safetensors"))
    self.params = jax.tree.map(jnp.asarray, _nest(params))
    self._fns = {}
    for name in ("prefill", "decode_step", "generate"):
      with open(os.path.join(serving, f"{name}.jax"), "rb") as f:
        self._fns[name] = jax.export.deserialize(bytearray(f.read()))

  def pad(self, prompts):
    """Left-pads id lists to [B, prompt_len]; returns (tokens, segment_ids) int32."""
    b, t = len(prompts), self.prompt_len
    tokens = np.full((b, t), self.pad_id, np.int32)
    seg = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
      if not 0 < len(p) <= t:
        raise ValueError(f"prompt {i} has {len(p)} tokens; it needs 1..{t} (export again with "
                         "a larger --serving_prompt_len).")
      tokens[i, t - len(p):] = p
      seg[i, t - len(p):] = 1
    return tokens, seg

  def prefill(self, tokens_BxT, segment_ids_BxT=None):
    if segment_ids_BxT is None:
      segment_ids_BxT = np.ones_like(tokens_BxT)
    return self._fns["prefill"].call(self.params, jnp.asarray(tokens_BxT, jnp.int32),
                                     jnp.asarray(segment_ids_BxT, jnp.int32))

  def decode_step(self, tokens_B, cache):
    return self._fns["decode_step"].call(self.params, jnp.asarray(tokens_B, jnp.int32), cache)

  def generate(self, prompts, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_at_eos=True):
    """prompts: lists of ids (BOS included if the model expects it). Returns each row's new
    ids, up to and including EOS."""
    if not (math.isfinite(temperature) and temperature >= 0):
      raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 = greedy).")
    if top_k < 0:
      raise ValueError(f"top_k={top_k} must be >= 0 (0 = off).")
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off).")
    tokens, seg = self.pad(prompts)
    eos = self.eos_id if stop_at_eos else -1
    out = self._fns["generate"].call(
        self.params, tokens, seg, jax.random.PRNGKey(seed), np.float32(temperature),
        np.int32(top_k), np.float32(top_p), np.int32(eos))
    rows = np.asarray(out).tolist()
    return [r[:r.index(eos) + 1] if eos in r else r for r in rows]


def load(directory: str) -> ServingModel:
  return ServingModel(directory)


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(description="Generate from a dense_ssm serving export.")
  p.add_argument("directory")
  p.add_argument("--ids", required=True, help="comma-separated prompt ids (BOS included)")
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  try:
    ids = [int(x) for x in a.ids.split(",") if x.strip()]
    m = load(a.directory)
    print(",".join(map(str, m.generate([ids], a.temperature, a.top_k, a.top_p, a.seed)[0])))
  except (ValueError, OSError) as e:  # bad input: one line
    print(f"serve.py: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
