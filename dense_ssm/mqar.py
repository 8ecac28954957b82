"""Multi-query associative recall (MQAR): a synthetic recall task for the train data pipeline.

The source `mqar:KNOBS` (KNOBS: comma-separated name=value, any subset; `mqar` or `mqar:` uses
the defaults) makes one example per row of T = data.seq_len input tokens:

  vocab=8192    token ids in [0, vocab); keys come from [1, vocab/2), values from
                [vocab/2, vocab), so the two sets are disjoint (0 is never a key)
  pairs=16      P key-value pairs, distinct keys and distinct values, written first:
                k_1 v_1 k_2 v_2 ... k_P v_P  (positions 0 .. 2P-1)
  queries=0     Q queried keys per row (0: Q = P); each is a different key of the row's pairs
  power_a=0.01  where the queries go: the rest of the row is cut into S = (T - 2P) // 2 slots of
                two tokens; Q distinct slots are drawn with probability proportional to
                (g + 1)^(power_a - 1) for slot g (without replacement), so queries cluster
                close to the pairs; slot g holds a queried key at position 2P + 2g and
                its value right after it
  seed=0        the data seed
  valid=1024    validation examples (fewer when train.eval_batches caps them)

Every other position holds a token drawn uniformly from [0, vocab) (noise). The row's features
are the usual five: inputs = tokens[:T], targets = tokens[1:T + 1], segment_ids = 1,
positions = 0..T-1, and weights = 1 exactly at the query positions (whose target is the
answer value), 0 elsewhere; so the loss and the recall accuracy (argmax of the logits equals
the target, over the weighted positions) count answers only. No tokenizer, no BOS/EOS.

Determinism: example `index` of a split depends only on (seed, split, stream, index):
examples are drawn in blocks of BLOCK = 64, block j from one numpy Generator seeded with
(seed, split, stream, j). The train split uses stream = data.shuffle_seed, the validation
split stream 0 under another split tag, so the two never share a random stream. Train batch
k of global batch B holds examples k*B .. k*B + B - 1 (host h of n takes the h-th of n equal
parts); the train stream never repeats an index. Validation is examples 0 .. valid-1.
Needs numpy only.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

TRAIN, VALID = 0, 1  # split tags mixed into each block's seed
BLOCK = 64  # examples drawn together from one Generator (part of the data's definition)


@dataclasses.dataclass(frozen=True)
class MqarSpec:
  """The knobs of a `mqar:` source (see the module docstring)."""

  vocab: int = 8192
  pairs: int = 16
  queries: int = 0  # 0: one query per pair
  power_a: float = 0.01
  seed: int = 0
  valid: int = 1024

  @property
  def num_queries(self) -> int:
    return self.queries or self.pairs


_KNOBS = tuple(f.name for f in dataclasses.fields(MqarSpec))


def parse_spec(source: str) -> MqarSpec:
  """`mqar`, `mqar:` or `mqar:name=value,...` -> MqarSpec; a bad knob is a one-line ValueError."""
  scheme, _, arg = source.partition(":")
  if scheme != "mqar":
    raise ValueError(f"data.source={source!r} is not an mqar source; use mqar:KNOBS")
  values = {}
  for item in filter(None, (s.strip() for s in arg.split(","))):
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or name not in _KNOBS:
      raise ValueError(f"data.source={source!r}: {item!r} is not a knob; use name=value with "
                       f"names from {sorted(_KNOBS)}, e.g. mqar:vocab=8192,pairs=16")
    try:
      values[name] = float(value) if name == "power_a" else int(value)
    except ValueError:
      kind = "a number" if name == "power_a" else "an integer"
      raise ValueError(f"data.source={source!r}: {name}={value!r} must be {kind}") from None
  return MqarSpec(**values)


def check_spec(spec: MqarSpec, seq_len: int, model_vocab: int | None = None,
               source: str = "mqar") -> None:
  """Raises a one-line ValueError if the rows of `seq_len` tokens cannot hold the task."""
  where = f"data.source={source!r}"
  if spec.pairs < 1 or spec.queries < 0 or spec.valid < 1 or spec.power_a <= 0:
    raise ValueError(f"{where}: pairs and valid must be >= 1, queries >= 0, power_a > 0")
  if spec.num_queries > spec.pairs:
    raise ValueError(f"{where}: queries={spec.queries} > pairs={spec.pairs}; each query asks a "
                     "different key, so lower queries")
  half = spec.vocab // 2
  if half - 1 < spec.pairs or spec.vocab - half < spec.pairs:
    raise ValueError(f"{where}: vocab={spec.vocab} holds fewer than pairs={spec.pairs} distinct "
                     f"keys and values; use vocab >= {2 * spec.pairs + 2}")
  slots = (seq_len - 2 * spec.pairs) // 2
  if slots < spec.num_queries:
    need = 2 * spec.pairs + 2 * spec.num_queries
    raise ValueError(f"{where}: data.seq_len={seq_len} cannot hold {spec.pairs} pairs and "
                     f"{spec.num_queries} queries (needs >= {need}); raise data.seq_len or "
                     "lower pairs/queries")
  if model_vocab is not None and model_vocab < spec.vocab:
    raise ValueError(f"{where} uses {spec.vocab} token ids but model.vocab_size={model_vocab}; "
                     f"set model.vocab_size >= {spec.vocab} or lower vocab")


def _distinct(rng: np.random.Generator, lo: int, hi: int, shape: tuple[int, int]) -> np.ndarray:
  """[K, P] ints from [lo, hi), distinct within each row, each row a uniformly random ordered
  P-tuple (duplicates are redrawn; the procedure treats every label alike)."""
  k, p = shape
  if hi - lo <= 4 * p:  # dense: a random permutation prefix
    return lo + np.argsort(rng.random((k, hi - lo)), axis=1)[:, :p]
  x = rng.integers(lo, hi, shape)
  while True:
    order = np.argsort(x, axis=1, kind="stable")
    s = np.take_along_axis(x, order, axis=1)
    r, c = np.nonzero(s[:, 1:] == s[:, :-1])
    if not len(r):
      return x
    x[r, order[r, c + 1]] = rng.integers(lo, hi, len(r))  # the later copy of each repeat


def _block(spec: MqarSpec, seq_len: int, split: int, stream: int,
           block: int) -> tuple[np.ndarray, np.ndarray]:
  """Examples block*BLOCK .. (block+1)*BLOCK - 1: tokens int32 [BLOCK, seq_len + 1] and
  answer bool [BLOCK, seq_len], drawn from one Generator seeded (seed, split, stream, block)."""
  rng = np.random.default_rng([spec.seed, split, stream, block])
  k, p, q, half = BLOCK, spec.pairs, spec.num_queries, spec.vocab // 2
  keys = _distinct(rng, 1, half, (k, p))
  values = _distinct(rng, half, spec.vocab, (k, p))
  tokens = rng.integers(0, spec.vocab, (k, seq_len + 1))
  tokens[:, 0:2 * p:2], tokens[:, 1:2 * p:2] = keys, values
  # Q distinct slots per row with P(g) ~ (g + 1)^(a - 1), without replacement (Gumbel top-k).
  slots = (seq_len - 2 * p) // 2
  score = (spec.power_a - 1.0) * np.log1p(np.arange(slots)) + rng.gumbel(size=(k, slots))
  gaps = np.argsort(-score, axis=1, kind="stable")[:, :q]
  asked = np.argsort(rng.random((k, p)), axis=1)[:, :q]  # which pairs, in random order
  rows, at = np.arange(k)[:, None], 2 * p + 2 * gaps
  tokens[rows, at] = np.take_along_axis(keys, asked, axis=1)
  tokens[rows, at + 1] = np.take_along_axis(values, asked, axis=1)
  answer = np.zeros((k, seq_len), bool)
  answer[rows, at] = True
  return tokens.astype(np.int32), answer


def examples(spec: MqarSpec, seq_len: int, split: int, start: int, stop: int,
             stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Examples start .. stop-1 of a split: (tokens int32 [n, seq_len + 1], answer bool
  [n, seq_len]); answer[i, t] marks the positions t whose next token tokens[i, t + 1] is the
  value of the key tokens[i, t]."""
  stop = max(start, stop)
  blocks = range(start // BLOCK, -(-stop // BLOCK))
  parts = [_block(spec, seq_len, split, stream, b) for b in blocks]
  if not parts:
    return np.zeros((0, seq_len + 1), np.int32), np.zeros((0, seq_len), bool)
  lo = start - blocks.start * BLOCK
  return (np.concatenate([t for t, _ in parts])[lo:lo + stop - start],
          np.concatenate([a for _, a in parts])[lo:lo + stop - start])


def features(tokens: np.ndarray, answer: np.ndarray) -> dict:
  """(tokens [n, T + 1], answer [n, T]) -> the five features, each [n, T]."""
  n, seq_len = answer.shape
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((n, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy(),
          "weights": answer.astype(np.float32)}


class TrainStream(Iterator):
  """Endless train batches of one host; `get_state()` = {"mqar_next_batch": k} resumes them."""

  def __init__(self, spec: MqarSpec, seq_len: int, global_batch: int, process_index: int,
               process_count: int, stream: int):
    self.spec, self.seq_len, self.stream = spec, seq_len, stream
    self.global_batch = global_batch
    self.per_host = global_batch // process_count
    self.offset = process_index * self.per_host
    self.next_batch = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    start = self.next_batch * self.global_batch + self.offset
    self.next_batch += 1
    return features(*examples(self.spec, self.seq_len, TRAIN, start, start + self.per_host,
                              self.stream))

  def get_state(self) -> dict:
    return {"mqar_next_batch": self.next_batch}

  def set_state(self, state: dict) -> None:
    if "mqar_next_batch" not in state:
      raise ValueError("the checkpoint's data state is not from an mqar source; resume with "
                       "the data.source it was trained on")
    self.next_batch = int(state["mqar_next_batch"])

  def close(self) -> None:
    pass


def eval_batches(spec: MqarSpec, seq_len: int, global_batch: int, process_index: int,
                 process_count: int, max_batches: int | None = None) -> list[dict]:
  """Validation examples 0 .. n-1 (n = spec.valid, at most max_batches * global_batch) in
  global batches, the last padded with all-zero rows (weights 0); this host's part of each."""
  n = min(spec.valid, max_batches * global_batch) if max_batches else spec.valid
  num_batches = -(-n // global_batch)
  per_host = global_batch // process_count
  out = []
  for b in range(num_batches):
    start = b * global_batch + process_index * per_host
    mine = features(*examples(spec, seq_len, VALID, start, min(start + per_host, n)))
    pad = per_host - len(mine["inputs"])
    if pad:
      mine = {k: np.concatenate([v, np.zeros((pad, seq_len), v.dtype)]) for k, v in mine.items()}
    out.append(mine)
  return out


__all__ = ["BLOCK", "MqarSpec", "TrainStream", "check_spec", "eval_batches", "examples",
           "features", "parse_spec"]
