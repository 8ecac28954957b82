r"""Text generation with a constant-size decode state.

  python -m dense_ssm.generate --workdir=DIR --prompt="def main(" --max_new_tokens=64
  python -m dense_ssm.generate --model=EXPORT_DIR --prompt_file=prompts.txt --temperature=0.8 \
      --top_p=0.95 --seed=1

From Python (`dense_ssm.generate` is this module, and calling it calls `generate`):

  import dense_ssm
  texts = dense_ssm.generate("EXPORT_DIR", ["a prompt", "another"], max_new_tokens=32)

How it runs. Prompts of different lengths are left-padded into one [B, T] batch, pad tokens in
segment 0 and prompt tokens in segment 1, so every row's state starts at its own first token and
its positions restart there. One jitted `start` runs the prefill (the model's chunkwise or kernel
mode) and samples the first token; then jitted `blocks` each run up to `block_size` decode steps
on the device (no host round trip per token), ending early once every row has emitted EOS.
Sampling key of token i = fold_in(PRNGKey(seed), i), so the output does not depend on the block
size.

Keeping the device busy. Inside a block, steps run in groups of `SYNC_EVERY` as a loop of static
trip count: XLA runs such a loop without copying a loop predicate back to the host after every
step, so the host enqueues the next steps while the device still runs the current one (a
predicate read per step would leave the device idle while the host launches each step's
kernels). The early-stop predicate is read once per group. Likewise greedy decoding is a static
choice (argmax, no `lax.cond` to resolve on the host at each step) whenever the temperature is
known to be 0 when the loop is built; the exported artifact keeps a traced choice.

Streaming prints the text of each finished block: the host is involved once per block, not once
per token (a `jax.debug.callback` per token would synchronise the device with the host at every
step and serialise the loop). Blocks start at `block_size` steps and double while one takes
under STREAM_BLOCK_SECONDS (a block's length is a traced bound, so this compiles once), and
the text is detokenized incrementally (`tokenizer.IncrementalDecoder`): streaming costs about
what generating without it does. Without streaming, one block covers all tokens.

Sampling (`temperature`, `top_k`, `top_p`) is traced from runtime scalars: changing them does
not recompile (switching between greedy, temperature 0, and sampling compiles each once).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import types
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dense_ssm import cli, fs
from dense_ssm.models import build_model, init_cache
from dense_ssm.models.config import ModelConfig

DEFAULT_STREAM_BLOCK = 8
STREAM_BLOCK_SECONDS = 0.1  # streaming: a decode block that runs faster doubles the next one
MAX_STREAM_BLOCK = 1024  # ... up to this many steps
SYNC_EVERY = 16  # decode steps per device-side group between early-stop checks


# ------------------------------------------------------------------------------ sampling


def sample_logits(logits_BxV, key, temperature, top_k, top_p, greedy: bool | None = None):
  """Next token per row. temperature <= 0: argmax. Else softmax(logits / temperature) restricted
  to the `top_k` largest logits (0: all) and to the smallest set of those whose probability
  reaches `top_p` (1: all). All three may be traced scalars; the sort that sampling needs runs
  only when temperature > 0. `greedy` (static) fixes the branch when it is known (True: argmax,
  False: sample); None picks it at run time (lax.cond). Row r draws with fold_in(key, r), so a
  row's sample does not depend on the other rows of the batch."""
  logits_BxV = logits_BxV.astype(jnp.float32)

  def take_argmax(_):
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def draw(_):
    v = logits_BxV.shape[-1]
    x_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    sorted_BxV = -jnp.sort(-x_BxV, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    in_k_V = jnp.arange(v) < k
    sorted_BxV = jnp.where(in_k_V, sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    keep_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < top_p) & in_k_V
    n_keep_B = jnp.maximum(jnp.sum(keep_BxV, axis=-1), 1)
    cutoff_B = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)
    x_BxV = jnp.where(x_BxV >= cutoff_B, x_BxV, -jnp.inf)
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(x_BxV.shape[0]))
    return jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)

  if greedy is not None:
    return take_argmax(None) if greedy else draw(None)
  return jax.lax.cond(temperature > 0, draw, take_argmax, None)


# ------------------------------------------------------------------------------ pure steps


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B,T], segment_ids [B,T]): rows right-aligned, pads in segment 0, prompt in 1."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("empty prompt: every prompt needs at least one token (with add_bos, even "
                     "'' has BOS; give non-empty text).")
  t = max(len(p) for p in prompts) if length is None else length
  if t < max(len(p) for p in prompts):
    raise ValueError(f"a prompt has {max(len(p) for p in prompts)} tokens, more than {t}.")
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  seg = np.zeros((len(prompts), t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, t - len(p):] = np.asarray(p, np.int32)
    seg[i, t - len(p):] = 1
  return tokens, seg


def inference_config(cfg: ModelConfig) -> ModelConfig:
  """No dropout or rematerialisation; the prefill never uses the O(T^2) parallel form."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  mode = "chunkwise" if cfg.family in ("dense_retnet", "retnet_ffn") else cfg.mode
  return dataclasses.replace(cfg, dropout=0.0, remat=False, mode=mode)


def start(cfg: ModelConfig, params, tokens_BxT, segment_ids_BxT, key, temperature, top_k, top_p,
          eos_id, *, max_new_tokens: int, greedy: bool | None = None):
  """Prefill + first sampled token. Returns the loop carry {"cache", "token" [B] (last emitted),
  "done" [B], "count" (tokens emitted), "key", "sampling", "eos"}. eos_id < 0: never stop."""
  model = build_model(cfg)
  b, t = tokens_BxT.shape
  cache = init_cache(cfg, b, t + max_new_tokens if cfg.family == "transformer" else 0)
  logits_BxTxV, cache = model.apply({"params": params}, tokens_BxT, cache, segment_ids_BxT,
                                    method=model.prefill)
  sampling = (jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
              jnp.asarray(top_p, jnp.float32))
  eos = jnp.asarray(eos_id, jnp.int32)
  tok_B = sample_logits(logits_BxTxV[:, -1], jax.random.fold_in(key, 0), *sampling, greedy=greedy)
  return {"cache": cache, "token": tok_B, "done": tok_B == eos, "count": jnp.ones((), jnp.int32),
          "key": key, "sampling": sampling, "eos": eos}


def decode_block(cfg: ModelConfig, params, carry, limit=None, *, steps: int, pad_id: int,
                 greedy: bool | None = None, sync_every: int = SYNC_EVERY):
  """Up to `steps` decode steps (static: the output's width), in groups of `sync_every`; stops
  after the first group that ends with every row done, or once `limit` steps have run (a
  traced int <= steps, so that one compilation serves blocks of any size; None: `steps`).
  Returns (carry, tokens [B, steps] (pad_id past a row's EOS and past the end), n_new: the
  steps run, a multiple of the group size or `limit`)."""
  model = build_model(cfg)
  b = carry["token"].shape[0]
  group = max(1, min(sync_every, steps))
  if limit is None:  # static: full groups, then a rest of known length
    n_groups, rest = divmod(steps, group)
  else:
    limit = jnp.clip(jnp.asarray(limit, jnp.int32), 0, steps)
    n_groups, rest = limit // group, limit % group

  def step(i, state):
    c, out_BxN = state
    logits_BxV, cache = model.apply({"params": params}, c["token"], c["cache"],
                                    method=model.decode_step)
    tok_B = sample_logits(logits_BxV, jax.random.fold_in(c["key"], c["count"]), *c["sampling"],
                          greedy=greedy)
    tok_B = jnp.where(c["done"], pad_id, tok_B)
    out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, tok_B[:, None], i, axis=1)
    c = {**c, "cache": cache, "token": tok_B, "done": c["done"] | (tok_B == c["eos"]),
         "count": c["count"] + 1}
    return c, out_BxN

  def run_group(g, c, out_BxN, n):  # n static: a loop of known trip count
    return jax.lax.fori_loop(0, n, lambda j, st: step(g * group + j, st), (c, out_BxN))

  def cond(state):
    g, c, _ = state
    return (g < n_groups) & ~jnp.all(c["done"])

  def body(state):
    g, c, out_BxN = state
    c, out_BxN = run_group(g, c, out_BxN, group)
    return g + 1, c, out_BxN

  out = jnp.full((b, steps), pad_id, jnp.int32)
  g, carry, out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), carry, out))
  n = g * group
  if limit is not None or rest:  # the rest runs only when no row is done, so g == n_groups
    skip = jnp.all(carry["done"]) | (rest == 0)
    carry, out = jax.lax.cond(skip, lambda c, o: (c, o),
                              lambda c, o: run_group(g, c, o, rest), carry, out)
    n = jnp.where(skip, n, n + rest)
  return carry, out, n


def generate_tokens(cfg: ModelConfig, params, tokens_BxT, segment_ids_BxT, key, temperature=0.0,
                    top_k=0, top_p=1.0, eos_id=-1, *, max_new_tokens: int, pad_id: int = 0,
                    greedy: bool | None = None):
  """The whole generation as one traceable function (what `jax.export` serialises):
  [B, max_new_tokens] tokens, pad_id after a row's EOS."""
  carry = start(cfg, params, tokens_BxT, segment_ids_BxT, key, temperature, top_k, top_p, eos_id,
                max_new_tokens=max_new_tokens, greedy=greedy)
  first = carry["token"][:, None]
  if max_new_tokens == 1:
    return first
  _, rest, _ = decode_block(cfg, params, carry, steps=max_new_tokens - 1, pad_id=pad_id,
                            greedy=greedy)
  return jnp.concatenate([first, rest], axis=1)


@functools.lru_cache(maxsize=32)
def _jitted(cfg: ModelConfig, max_new_tokens: int, pad_id: int, greedy: bool):
  """(whole generation, start, decode block of N steps), jitted for one configuration."""
  whole_fn = jax.jit(functools.partial(generate_tokens, cfg, max_new_tokens=max_new_tokens,
                                       pad_id=pad_id, greedy=greedy))
  start_fn = jax.jit(functools.partial(start, cfg, max_new_tokens=max_new_tokens, greedy=greedy))
  block_fn = jax.jit(functools.partial(decode_block, cfg, pad_id=pad_id, greedy=greedy),
                     static_argnames=("steps",), donate_argnums=(1,))
  return whole_fn, start_fn, block_fn


# ------------------------------------------------------------------------------ host loop


def generate_ids(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, eos_id: int = 2, pad_id: int = 0,
                 stop_at_eos: bool = True, block_size: int | None = None,
                 on_block: Callable[[list[list[int]]], None] | None = None,
                 block_seconds: float | None = None) -> list[list[int]]:
  """Generates from token-id prompts; returns each row's new ids (EOS included, nothing after).

  Without `on_block`, one jitted call does everything. With it (streaming), `on_block(ids per
  row so far)` is called after the first token and after each block of `block_size` (default 8)
  decode steps. It gets one read-only sequence per row, the ids made so far (a view, not a
  copy: the cost of a call does not grow with the ids). With `block_seconds`, a block that ran
  in less time doubles the next one, up to MAX_STREAM_BLOCK steps, so that a fast model is not
  slowed by a host round trip every few tokens; one compilation serves every block size.
  """
  _check_sampling(max_new_tokens, temperature, top_k, top_p)
  cfg = inference_config(cfg)
  tokens, seg = left_pad(prompts, pad_id)
  if cfg.family == "transformer" and cfg.pos_emb == "learned" and \
      tokens.shape[1] + max_new_tokens > cfg.max_len:
    raise ValueError(f"prompt ({tokens.shape[1]} tokens) + max_new_tokens={max_new_tokens} > "
                     f"max_len={cfg.max_len} learned positions; shorten the prompt or "
                     "max_new_tokens.")
  block_size = block_size or DEFAULT_STREAM_BLOCK
  whole_fn, start_fn, block_fn = _jitted(cfg, max_new_tokens, pad_id, temperature <= 0)
  key = jax.random.PRNGKey(seed)
  eos = eos_id if stop_at_eos else -1
  args = (params, tokens, seg, key, temperature, top_k, top_p, eos)
  if on_block is None:  # one jitted call: prefill and the decode loop
    out = np.asarray(whole_fn(*args))
    return [_cut(row.tolist(), eos) for row in out]
  carry = start_fn(*args)
  outs = [[int(t)] for t in np.asarray(carry["token"])]
  on_block([IdsSoFar(o) for o in outs])
  done = np.asarray(carry["done"])
  remaining = max_new_tokens - 1
  width = block_size if block_seconds is None else max(block_size, MAX_STREAM_BLOCK)
  width = max(1, min(width, remaining))  # the blocks' static output width
  size = block_size
  while remaining > 0 and not done.all():
    t0 = time.perf_counter()
    carry, new, n = block_fn(params, carry, min(size, remaining), steps=width)
    n = int(n)
    new = np.asarray(new)[:, :n]
    if block_seconds is not None and time.perf_counter() - t0 < block_seconds:
      size = min(2 * size, width)
    for row, was_done in enumerate(done):
      if not was_done:
        outs[row].extend(int(t) for t in new[row])
    done = np.asarray(carry["done"])
    remaining -= n
    on_block([IdsSoFar(o) for o in outs])
  return [_cut(o, eos) for o in outs]


class IdsSoFar(Sequence):
  """The first len(ids) ids of a list that only grows: a read-only view that keeps its length
  when the list grows later (slices are lists)."""

  __slots__ = ("_ids", "_n")

  def __init__(self, ids: list[int]):
    self._ids, self._n = ids, len(ids)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self._ids[slice(*i.indices(self._n))]
    if not -self._n <= i < self._n:
      raise IndexError(i)
    return self._ids[i % self._n]

  def __eq__(self, other) -> bool:
    return isinstance(other, Sequence) and list(self) == list(other)

  def __repr__(self) -> str:
    return repr(self._ids[:self._n])


def _cut(ids: list[int], eos_id: int) -> list[int]:
  """Up to and including the first EOS (what follows it is padding)."""
  if eos_id in ids:
    return ids[:ids.index(eos_id) + 1]
  return ids


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 = greedy).")
  if top_k < 0:
    raise ValueError(f"top_k={top_k} must be >= 0 (0 = off).")
  if not 0.0 < top_p <= 1.0:  # also false for NaN
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off).")


def _text(tokenizer, ids: list[int], eos_id: int) -> str:
  """Decoded ids, without EOS and what follows."""
  return tokenizer.decode(_cut(ids, eos_id)[:-1] if eos_id in ids else ids)


class _TextStream:
  """Turns growing id lists into printable text deltas, in time linear in the ids.

  Each row's text is decoded incrementally (a bounded window per call, see
  `tokenizer.IncrementalDecoder`) up to its first EOS; `finish` writes what was held back (an
  unfinished UTF-8 character), so that a row's deltas add up to its non-streamed text.
  """

  def __init__(self, tokenizer, eos_id: int, write: Callable[[list[str]], None]):
    self.tokenizer, self.eos_id, self.write = tokenizer, eos_id, write
    self.rows: list[dict] | None = None

  def _deltas(self, rows: list[list[int]], final: bool) -> list[str]:
    from dense_ssm.tokenizer import IncrementalDecoder  # pylint: disable=g-import-not-at-top

    if self.rows is None:
      self.rows = [{"decoder": IncrementalDecoder(self.tokenizer), "seen": 0, "end": None}
                   for _ in rows]
    deltas = []
    for ids, r in zip(rows, self.rows):
      if r["end"] is None:  # EOS is looked for among the new ids only
        new = ids[r["seen"]:]
        if self.eos_id in new:
          r["end"] = r["seen"] + new.index(self.eos_id)
        r["seen"] = len(ids)
      deltas.append(r["decoder"].update(ids, end=r["end"], final=final))
    return deltas

  def __call__(self, rows: list[list[int]]) -> None:
    self.write(self._deltas(rows, final=False))

  def finish(self, rows: list[list[int]]) -> None:
    """Writes the rest of each row's text; `rows` are the final ids."""
    self.write(self._deltas(rows, final=True))


def generate(source, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_at_eos: bool = True, stream: bool | Callable[[list[str]], None] = False,
             block_size: int | None = None) -> str | list[str]:
  """Generates text continuations.

  Args:
    source: a `Pretrained` (from `load_pretrained` / `load_workdir`), an export directory or a
      training workdir.
    prompts: one string (returns one string) or a list of strings (returns a list).
    stream: True prints each block of new text to stdout as it is made (one prompt), or a
      callable receiving the list of new text per prompt after every block (and once at the
      end with any text held back); its pieces add up to the returned text.
  Returns the continuation(s), without the prompt and without EOS.
  """
  from dense_ssm import export  # pylint: disable=g-import-not-at-top

  pre = source if isinstance(source, export.Pretrained) else export.load_any(os.fspath(source))
  if pre.tokenizer is None:
    raise ValueError(f"{pre.source} has no tokenizer; use generate_ids with token ids, or "
                     "export with the tokenizer.")
  single = isinstance(prompts, str)
  texts = [prompts] if single else list(prompts)
  if not texts:
    raise ValueError("no prompts given.")
  for i, t in enumerate(texts):
    if not t:
      raise ValueError(f"prompt {i} is empty; give some text to continue.")
  ids = [([pre.bos_id] if pre.add_bos else []) + pre.tokenizer.encode(t) for t in texts]
  on_block = None
  if stream:
    write = stream if callable(stream) else _print_deltas
    on_block = _TextStream(pre.tokenizer, pre.eos_id, write)
  out = generate_ids(pre.cfg, pre.params, ids, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     eos_id=pre.eos_id, pad_id=pre.pad_id, stop_at_eos=stop_at_eos,
                     block_size=block_size, on_block=on_block,
                     block_seconds=STREAM_BLOCK_SECONDS if on_block is not None else None)
  if on_block is not None:
    on_block.finish(out)
  decoded = [_text(pre.tokenizer, o, pre.eos_id) for o in out]
  return decoded[0] if single else decoded


def _print_deltas(deltas: list[str]) -> None:
  if len(deltas) == 1:
    sys.stdout.write(deltas[0])
    sys.stdout.flush()


# ------------------------------------------------------------------------------ CLI


def _read_prompt_file(path: str) -> list[str]:
  """Non-blank lines of a UTF-8 file ('-': stdin), with \\n turned into newlines."""
  if path != "-" and fs.isdir(path):
    raise ValueError(f"--prompt_file={path} is a directory; give a text file with one prompt "
                     "per line.")
  if path != "-" and not fs.exists(path):
    raise FileNotFoundError(f"--prompt_file={path} does not exist; fix the path.")
  try:
    if path == "-":
      lines = list(sys.stdin)
    else:
      with fs.open(path) as f:
        lines = list(f)
  except UnicodeDecodeError as e:
    raise ValueError(f"--prompt_file={path} is not UTF-8 text (byte {e.start}); give a text "
                     "file with one prompt per line.") from None
  return [line.rstrip("\n").replace("\\n", "\n") for line in lines if line.strip()]


def _define_flags(fv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  d = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "Training run directory (its latest checkpoint, or "
                      "--step); give this or --model.", **d)
  flags.DEFINE_string("model", None, "Export directory (python -m dense_ssm.export or "
                      "dense_ssm.convert); give this or --workdir.", **d)
  flags.DEFINE_integer("step", None, "Checkpoint step of --workdir.", **d)
  flags.DEFINE_multi_string("prompt", [], "Prompt text (repeat for a batch); \\n is a newline.",
                            **d)
  flags.DEFINE_string("prompt_file", None, "File of prompts, one per line ('-': stdin).", **d)
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.", **d)
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", **d)
  flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens; 0 = off.", **d)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.", **d)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", **d)
  flags.DEFINE_bool("ignore_eos", False, "Always make max_new_tokens tokens.", **d)
  flags.DEFINE_bool("no_stream", False, "Print only when finished.", **d)
  flags.DEFINE_integer("block_size", DEFAULT_STREAM_BLOCK, "Tokens of the first jitted decode "
                       f"blocks when streaming; a block faster than {STREAM_BLOCK_SECONDS} s "
                       f"doubles the next, up to {MAX_STREAM_BLOCK}.", **d)
  flags.DEFINE_string("dtype", None, "Compute dtype override, e.g. bfloat16.", **d)
  flags.DEFINE_bool("traceback", False, "Show tracebacks of errors.", **d)


def main(argv=None) -> int:
  a, rest = cli.parse_flags("dense_ssm.generate", __doc__.split("\n\nFrom Python")[0],
                            _define_flags, argv)
  from dense_ssm import export  # pylint: disable=g-import-not-at-top
  export.quiet_logs()
  with cli.user_errors("dense_ssm.generate", a.traceback):
    if rest:
      raise ValueError(f"unexpected arguments {rest}; flags are --name=value.")
    if bool(a.workdir) == bool(a.model):
      raise ValueError("give exactly one of --model=EXPORT_DIR and --workdir=DIR.")
    prompts = [s.replace("\\n", "\n") for s in a.prompt]
    if a.prompt_file:
      prompts += _read_prompt_file(a.prompt_file)
    if not prompts:
      raise ValueError("no prompt: give --prompt=TEXT or --prompt_file=FILE.")
    _check_sampling(a.max_new_tokens, a.temperature, a.top_k, a.top_p)
    pre = (export.load_workdir(a.workdir, a.step, dtype=a.dtype) if a.workdir else
           export.load_pretrained(a.model, dtype=a.dtype))
    stream = not a.no_stream and len(prompts) == 1
    if stream:
      sys.stdout.write(prompts[0])
      sys.stdout.flush()
    t0 = time.perf_counter()
    outs = generate(pre, prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_at_eos=not a.ignore_eos,
                    stream=stream, block_size=a.block_size if stream else None)
    dt = time.perf_counter() - t0
    if stream:
      print()
    else:
      for i, (prompt, out) in enumerate(zip(prompts, outs)):
        print(f"--- [{i}] ---\n{prompt}{out}")
    print(f"[{len(prompts)} prompt(s), {dt:.2f}s incl. compilation, {pre.source}]",
          file=sys.stderr)
  return 0


class _CallableModule(types.ModuleType):
  """`dense_ssm.generate` is this module once imported; calling it calls `generate`."""

  def __call__(self, *args, **kwargs):
    return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  sys.exit(main())
