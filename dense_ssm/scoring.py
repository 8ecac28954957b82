"""Scores whole documents: per-token negative log-likelihood, and the metrics derived from it.

A document is scored as `ids = [BOS] + tokens`: inputs ids[:-1], targets ids[1:], so
nll[j] = -log p(ids[j+1] | what the model sees of ids[:j+1]); every token after BOS is scored.

What the model sees (`plan`):
  state     (context 0, recurrent families) the whole document: it runs through `prefill` in
            chunks of `chunk` tokens, each chunk starting from the cache (recurrent state) the
            previous chunk left, so memory is bounded by the chunk, not the document.
  rolling   (context > 0, or the Transformer, whose cache grows with the context: window =
            context or max_len) windows of `window` inputs advancing by `stride`; each window
            starts from an empty state and scores only its targets not scored before (the first
            window scores all of its own), so every scored token past the first window sees at
            least window - stride tokens. Recurrent families run a window in chunks too.

Metrics (`summarize`), N = total NLL in nats over T scored tokens:
  loss_per_token = N / T,  token_perplexity = exp(N / T),
  bits_per_byte = N / ln 2 / (UTF-8 bytes of the documents' text),
  word_perplexity = exp(N / words), words = len(re.split(r"\\s+", text)) per document
  (lm-evaluation-harness' count), and the loss by token position within its document
  (position 1 = the first token after BOS) in the buckets of POSITION_BUCKETS.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from dense_ssm.evaluate import token_nll
from dense_ssm.models import build_model, init_cache
from dense_ssm.models.config import ModelConfig

POSITION_BUCKETS = ((1, 128), (129, 512), (513, 2048), (2049, None))
MIN_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class Plan:
  """How documents are read: mode "state" (window 0) or "rolling" (window, stride)."""

  mode: str
  window: int = 0
  stride: int = 0
  chunk: int = 2048

  def describe(self) -> str:
    if self.mode == "state":
      return f"whole documents, recurrent state carried across chunks of {self.chunk} tokens"
    return f"rolling windows of {self.window} tokens, stride {self.stride}"


def make_plan(cfg: ModelConfig, *, context: int = 0, stride: int = 0, chunk: int = 2048) -> Plan:
  """The reading plan for `cfg`; bad values raise ValueError naming the flag."""
  if context < 0:
    raise ValueError(f"--context={context} must be >= 0 (0 = the whole document).")
  if stride < 0:
    raise ValueError(f"--stride={stride} must be >= 0 (0 = half the window).")
  if chunk <= 0:
    raise ValueError(f"--chunk={chunk} must be > 0.")
  transformer = cfg.family == "transformer"
  if context == 0 and not transformer:
    return Plan("state", chunk=chunk)
  window = context or cfg.max_len
  if transformer and cfg.pos_emb == "learned" and window > cfg.max_len:
    raise ValueError(f"--context={context} exceeds the model's max_len={cfg.max_len} learned "
                     "positions; use --context <= max_len.")
  stride = stride or max(1, window // 2)
  if stride > window:
    raise ValueError(f"--stride={stride} exceeds the window of {window} tokens; use a stride "
                     "<= the window.")
  return Plan("rolling", window=window, stride=stride, chunk=chunk)


def rolling_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
  """(start, end, score_from) over n inputs: inputs [start, end) are read, targets
  [score_from, end) scored; consecutive windows score contiguous, disjoint ranges covering [0, n)."""
  out, start, scored = [], 0, 0
  while scored < n:
    end = min(start + window, n)
    out.append((start, end, scored))
    scored, start = end, start + stride
  return out


# ------------------------------------------------------------------------------ device


@functools.lru_cache(maxsize=8)
def _jitted(cfg: ModelConfig):
  """(forward(params, tokens, targets) -> nll, step(params, cache, tokens, positions, targets)
  -> (nll, cache)): one whole sequence, and one chunk continuing from `cache`."""
  model = build_model(cfg)

  def forward(params, tokens_BxT, targets_BxT):
    return token_nll(model.apply({"params": params}, tokens_BxT), targets_BxT)

  def step(params, cache, tokens_BxT, positions_BxT, targets_BxT):
    logits, cache = model.apply({"params": params}, tokens_BxT, cache, None, positions_BxT,
                                method=model.prefill)
    return token_nll(logits, targets_BxT), cache

  donate = () if jax.default_backend() == "cpu" else (1,)
  return jax.jit(forward), jax.jit(step, donate_argnums=donate)


def _pow2_at_least(n: int) -> int:
  return max(MIN_CHUNK, 1 << max(0, n - 1).bit_length())


def score_documents(cfg: ModelConfig, params: Any, docs: Sequence[Sequence[int]], plan: Plan, *,
                    batch_size: int = 8, progress: "Progress | None" = None) -> list[np.ndarray]:
  """Per-token NLL (float64 [len(ids) - 1]) of each document `ids` (BOS first), read as `plan`
  says. Pieces are batched longest first; lengths round up to powers of two (few compiles)."""
  if batch_size <= 0:
    raise ValueError(f"--batch_size={batch_size} must be > 0.")
  from dense_ssm.generate import inference_config  # pylint: disable=g-import-not-at-top

  cfg = inference_config(cfg)
  docs = [np.asarray(d, np.int32) for d in docs]
  out = [np.zeros(max(0, len(d) - 1), np.float64) for d in docs]
  pieces = []  # (doc, start, end, score_from) in input coordinates
  for i, d in enumerate(docs):
    n = len(d) - 1
    if n <= 0:
      continue
    spans = [(0, n, 0)] if plan.mode == "state" else rolling_windows(n, plan.window, plan.stride)
    pieces += [(i, *s) for s in spans]
  pieces.sort(key=lambda p: p[1] - p[2])  # longest (end - start) first
  recurrent = cfg.family != "transformer"
  forward, step = _jitted(cfg)
  batch_size = min(batch_size, max(1, len(pieces)))  # fewer pieces: a smaller batch
  for b in range(0, len(pieces), batch_size):
    batch = pieces[b:b + batch_size]
    longest = max(end - start for _, start, end, _ in batch)
    if recurrent:
      chunk = min(plan.chunk, _pow2_at_least(longest))
      total = -(-longest // chunk) * chunk
    else:
      chunk = total = min(plan.window, _pow2_at_least(longest))
    inputs = np.zeros((batch_size, total), np.int32)
    targets = np.zeros((batch_size, total), np.int32)
    scored = np.zeros((batch_size, total), bool)
    for r, (i, start, end, score_from) in enumerate(batch):
      inputs[r, :end - start] = docs[i][start:end]
      targets[r, :end - start] = docs[i][start + 1:end + 1]
      scored[r, score_from - start:end - start] = True
    positions = np.broadcast_to(np.arange(total, dtype=np.int32), inputs.shape)
    if recurrent:
      cache = init_cache(cfg, batch_size)
      parts, pending = [], None
      for c in range(0, total, chunk):
        sl = slice(c, c + chunk)
        nll, cache = step(params, cache, inputs[:, sl], positions[:, sl], targets[:, sl])
        if pending is not None:  # fetch the previous chunk while this one runs
          parts.append(np.asarray(pending[0]))
          _advance(progress, scored[:, pending[1]])
        pending = (nll, sl)
      parts.append(np.asarray(pending[0]))
      _advance(progress, scored[:, pending[1]])
      nll_BxT = np.concatenate(parts, axis=1)
    else:
      nll_BxT = np.asarray(forward(params, inputs, targets))
      _advance(progress, scored)
    for r, (i, start, end, score_from) in enumerate(batch):
      out[i][score_from:end] = nll_BxT[r, score_from - start:end - start]
  if progress is not None:
    progress.close()
  return out


def _advance(progress, scored_mask) -> None:
  if progress is not None:
    progress.update(int(scored_mask.sum()))


# ------------------------------------------------------------------------------ metrics


def count_words(text: str) -> int:
  """Words as lm-evaluation-harness counts them for word perplexity."""
  return len(re.split(r"\s+", text))


def _exp(x: float) -> float:
  return math.exp(x) if x < 700 else math.inf


def _bucket_name(lo: int, hi: int | None) -> str:
  return f"{lo}-{hi}" if hi else f"{lo}+"


def summarize(nlls: Sequence[np.ndarray], texts: Sequence[str | None] | None = None, *,
              first_position: int = 1) -> dict[str, Any]:
  """The metrics of the module doc from per-document token NLLs. `texts` (the documents' text;
  None where unknown) give bytes and words; `first_position` is the position of each document's
  first scored token (1 with BOS; 2 without, whose first token is context only)."""
  nlls = [np.asarray(n, np.float64) for n in nlls]
  tokens = int(sum(len(n) for n in nlls))
  if tokens == 0:
    raise ValueError("no tokens were scored; give documents with at least one token.")
  total = float(sum(n.sum() for n in nlls))
  known = texts is not None and all(t is not None for t in texts)
  n_bytes = sum(len(t.encode("utf-8")) for t in texts) if known else None
  words = sum(count_words(t) for t in texts) if known else None
  edges = np.asarray([hi for _, hi in POSITION_BUCKETS[:-1]])
  sums, counts = np.zeros(len(POSITION_BUCKETS)), np.zeros(len(POSITION_BUCKETS), np.int64)
  for n in nlls:
    idx = np.searchsorted(edges, first_position + np.arange(len(n)), side="left")
    sums += np.bincount(idx, weights=n, minlength=len(POSITION_BUCKETS))
    counts += np.bincount(idx, minlength=len(POSITION_BUCKETS))
  by_position = {_bucket_name(lo, hi): {"tokens": int(c), "loss_per_token": s / c if c else None}
                 for (lo, hi), s, c in zip(POSITION_BUCKETS, sums, counts)}
  loss = total / tokens
  return {
      "documents": len(nlls), "tokens": tokens, "bytes": n_bytes, "words": words,
      "nll_sum": total, "loss_per_token": loss, "token_perplexity": _exp(loss),
      "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None,
      "byte_perplexity": _exp(total / n_bytes) if n_bytes else None,
      "word_perplexity": _exp(total / words) if words else None,
      "by_position": by_position,
  }


def format_table(m: dict[str, Any]) -> str:
  """The metrics of `summarize` as an aligned text table."""

  def num(v, fmt):
    if v is None:
      return "n/a"
    return format(v, fmt) if abs(v) < 1e9 else format(v, ".4g")

  rows = [("documents", f"{m['documents']:,}"), ("tokens", f"{m['tokens']:,}"),
          ("bytes", num(m["bytes"], ",")), ("words", num(m["words"], ",")),
          ("loss / token (nats)", f"{m['loss_per_token']:.4f}"),
          ("token perplexity", num(m["token_perplexity"], ".3f")),
          ("bits per byte", num(m["bits_per_byte"], ".4f")),
          ("word perplexity", num(m["word_perplexity"], ".3f"))]
  lines = [f"  {k:<22}{v:>14}" for k, v in rows]
  lines.append(f"  {'position':<12}{'tokens':>12}{'loss':>12}{'ppl':>12}")
  for name, b in m["by_position"].items():
    loss = b["loss_per_token"]
    lines.append(f"  {name:<12}{b['tokens']:>12,}{num(loss, '.4f'):>12}"
                 f"{num(None if loss is None else _exp(loss), '.3f'):>12}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------ progress


class Progress:
  """A one-line progress bar with rate and ETA, redrawn in place (\\r) at most every
  `interval` seconds."""

  def __init__(self, total: int, *, label: str = "scoring", stream=None, interval: float = 0.2,
               width: int = 24):
    self.total, self.label, self.width, self.interval = max(total, 1), label, width, interval
    self.stream = sys.stderr if stream is None else stream
    self.done, self.start, self.last, self.drawn = 0, time.perf_counter(), 0.0, -1

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if now - self.last >= self.interval or self.done >= self.total:
      self.last = now
      self._draw(now)

  def _draw(self, now: float) -> None:
    self.drawn = self.done
    frac = min(self.done / self.total, 1.0)
    elapsed = now - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else math.nan
    bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
    self.stream.write(f"\r{self.label} [{bar}] {frac:4.0%} {self.done:,}/{self.total:,} tokens "
                      f"{rate:,.0f} tok/s  elapsed {_clock(elapsed)}  ETA {_clock(eta)} ")
    self.stream.flush()

  def close(self) -> None:
    if self.drawn != self.done:
      self._draw(time.perf_counter())
    self.stream.write("\n")
    self.stream.flush()


def _clock(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "--:--"
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


__all__ = ["POSITION_BUCKETS", "Plan", "Progress", "count_words", "format_table", "make_plan",
           "rolling_windows", "score_documents", "summarize"]
