r"""The lm-evaluation-harness model `dense_ssm` (the `eval` extra: `pip install -e ".[eval]"`).

  python -m dense_ssm.harness --model dense_ssm --model_args pretrained=EXPORT_DIR \
      --tasks hellaswag,arc_easy --batch_size 16 --output_path results/
  python -m dense_ssm.evaluate --model=EXPORT_DIR --tasks=paper        # via run_tasks below

Registration. lm-eval 0.4.13 resolves `--model NAME` only against models imported into its
registry and scans no plugin entry points, so a bare `lm_eval --model dense_ssm` cannot find an
external package. `python -m dense_ssm.harness ARGS` registers the model, then runs lm-eval's own
command line (`lm_eval.__main__.cli_evaluate`) on ARGS (`--model dense_ssm` is added when absent).
The package also declares the model in the `lm_eval.models` entry-point group: an lm-eval that
scans that group (0.4.13 does not) finds it with a bare `lm_eval --model dense_ssm`. From Python:
`run_tasks`, or `lm_eval.simple_evaluate(model=harness.make_lm(EXPORT_DIR), ...)`.

Model arguments (`--model_args k=v,...`): `pretrained` (export directory or training workdir),
`max_length` (tokens per forward pass; default: the Transformer's max_len, else 2048), `pack`
(True), `dtype` (compute dtype, e.g. bfloat16), `max_gen_toks` (256), `seed` (0). `--batch_size`
is the number of rows per forward pass.

Tokenization follows lm-eval's HF causal-LM convention: the context (with BOS when the export
says add_bos) and context + continuation are encoded, and the continuation is what the joint
encoding adds past the context's tokens; trailing spaces of the context move to the
continuation. An empty context is the prefix token (BOS, else EOS).

How requests run.
  loglikelihood: each request is one sequence (context + continuation) scored on the
    continuation's tokens. Sequences are sorted by length and packed first-fit into rows of a
    power-of-two length (at most `max_length`), one segment id per request: the models reset
    their state and positions at every segment start, so a packed request scores as it would
    alone. `pack=False` puts one request per row (same numbers, more passes). A sequence longer
    than `max_length`: the SSM families carry the state (below), the Transformer keeps its last
    `max_length` tokens (as lm-eval's HF model does).
  loglikelihood_rolling: log p(document | prefix token), the document encoded without BOS.
    SSM families (RetNet, Mamba) score a whole document as one sequence: one that fits
    `max_length` is packed like the above; a longer one runs through the model's prefill
    window by window (`max_length` tokens each), every window starting from the recurrent state
    and positions the previous one left, so every token sees the whole document with memory
    bounded by the window. The Transformer scores lm-eval's rolling windows (`max_length`
    tokens, disjoint predictions).
  generate_until: requests grouped by generation arguments, left-padded batches through
    dense_ssm/generate.py's jitted start + decode blocks; after each block of 32 steps the
    rows are decoded and the batch stops once every row has hit EOS or a stop string;
    `until` cuts the text at the first stop string. Greedy unless `do_sample` / temperature.

Without packing the numbers are the same up to float rounding (the same tokens in other places
of the row reach the kernels in other chunk alignments).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Any, Sequence

import numpy as np

MODEL_NAME = "dense_ssm"
INSTALL_HINT = 'lm-eval is not installed; install the eval extra: pip install -e ".[eval]"'
SSM_DEFAULT_MAX_LENGTH = 2048
MIN_ROW = 64  # shortest packed row (rows are powers of two: few distinct compiled shapes)
STOP_CHECK_STEPS = 32  # decode steps between stop-string checks in generate_until

# The paper's zero-shot table (DenseMamba, Tables 4 and 6): two perplexity columns, eleven
# accuracy columns and their mean ("Avg"). Task names are lm-eval 0.4.13's.
PAPER_PPL_TASKS = {"wikitext": "word_perplexity", "lambada_openai": "perplexity"}
# Metric of each accuracy task in the Avg: acc_norm (length-normalised) where the choices are
# multi-token answers whose length varies (the convention of the Mamba paper's tables for
# HellaSwag and ARC-Challenge, and lm-eval's for OpenBookQA), acc elsewhere.
PAPER_AVG_METRIC = {
    "arc_challenge": "acc_norm", "arc_easy": "acc", "boolq": "acc", "copa": "acc",
    "hellaswag": "acc_norm", "piqa": "acc", "winogrande": "acc", "storycloze_2016": "acc",
    "wsc273": "acc", "openbookqa": "acc_norm", "sciq": "acc",
}
PAPER_TASKS = (*PAPER_PPL_TASKS, *PAPER_AVG_METRIC)


# ------------------------------------------------------------------------------ scoring engine


def _bucket(n: int, cap: int, least: int = MIN_ROW) -> int:
  """Smallest power of two >= max(n, least), capped at `cap`."""
  b = least
  while b < n:
    b *= 2
  return min(b, cap)


def pack_rows(lengths: Sequence[int], rows: int, max_len: int,
              pack: bool = True) -> list[tuple[int, list[list[int]]]]:
  """Groups item indices into forward passes of `rows` rows.

  Items are taken longest first; a pass's row length is the power-of-two bucket of its first
  (longest) item; each item goes to the first row with room (`pack`) or to the first empty row
  (not `pack`); an item that fits nowhere closes the pass. Returns [(row_len, items per row)].
  Every length must be in [1, max_len].
  """
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  passes: list[tuple[int, list[list[int]]]] = []
  row_len, content, free = 0, [], []
  for i in order:
    n = lengths[i]
    if not 0 < n <= max_len:
      raise ValueError(f"item of {n} tokens does not fit rows of at most {max_len}.")
    if content:
      r = next((r for r in range(rows) if (free[r] >= n if pack else not content[r])), None)
      if r is not None:
        content[r].append(i)
        free[r] -= n
        continue
      passes.append((row_len, content))
    row_len = _bucket(n, max_len)
    content = [[i]] + [[] for _ in range(rows - 1)]
    free = [row_len - n] + [row_len] * (rows - 1)
  if content:
    passes.append((row_len, content))
  return passes


@functools.lru_cache(maxsize=8)
def _scoring_fns(cfg):
  """Jitted (packed, window) for one inference config, shared by every Scorer of that config.
  Both return per-token target log-probs and argmax matches:
    packed(params, tokens, segment_ids, targets)   packed rows, state reset at each segment
    window(params, cache, tokens, targets)         prefill continuing from `cache` (its state
                                                   and positions); also returns the new cache
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dense_ssm.models import build_model  # pylint: disable=g-import-not-at-top

  model = build_model(cfg)

  def target_scores(logits_BxTxV, targets_BxT):
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return logp_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT

  def packed(params, tokens_BxT, segment_ids_BxT, targets_BxT):
    logits = model.apply({"params": params}, tokens_BxT, segment_ids=segment_ids_BxT)
    return target_scores(logits, targets_BxT)

  def window(params, cache, tokens_BxW, targets_BxW):
    positions_BxW = cache["pos"][:, None] + jnp.arange(tokens_BxW.shape[1])[None]
    logits, cache = model.apply({"params": params}, tokens_BxW, cache, None, positions_BxW,
                                method=model.prefill)
    return (*target_scores(logits, targets_BxW), cache)

  return jax.jit(packed), jax.jit(window, donate_argnums=(1,))


class Scorer:
  """Log-likelihoods and generations of a `Pretrained` model on token ids (no lm-eval needed).

  `score(seqs, n_scores)`: for each token list s, (sum of log p(s[t] | s[:t]) over its last
  n_score tokens, whether each of them is the argmax).
  """

  def __init__(self, pre, *, rows: int = 16, max_length: int | None = None, pack: bool = True,
               seed: int = 0):
    from dense_ssm import generate as gen  # pylint: disable=g-import-not-at-top

    self.pre, self.rows, self.pack, self.seed = pre, int(rows), bool(pack), int(seed)
    if self.rows < 1:
      raise ValueError(f"batch_size={rows} must be >= 1.")
    self.cfg = gen.inference_config(pre.cfg)
    self.recurrent = self.cfg.family != "transformer"
    default = SSM_DEFAULT_MAX_LENGTH if self.recurrent else self.cfg.max_len
    self.max_length = int(max_length or default)
    if self.max_length < 2:
      raise ValueError(f"max_length={max_length} must be >= 2.")
    if not self.recurrent and self.cfg.pos_emb == "learned" and \
        self.max_length > self.cfg.max_len:
      raise ValueError(f"max_length={self.max_length} exceeds the model's {self.cfg.max_len} "
                       "learned positions; lower max_length.")
    self._packed, self._window = _scoring_fns(self.cfg)

  # -------------------------------------------------------------------- log-likelihood

  def score(self, seqs: Sequence[Sequence[int]],
            n_scores: Sequence[int]) -> list[tuple[float, bool]]:
    """See the class doc. Each sequence needs >= 2 tokens and n_score <= len - 1. SSM
    sequences longer than max_length + 1 carry the state; Transformer ones are cut on the left
    to max_length + 1 tokens (the scored tail must fit)."""
    seqs = [list(s) for s in seqs]
    for i, (s, n) in enumerate(zip(seqs, n_scores)):
      if len(s) < 2 or not 0 <= n <= len(s) - 1:
        raise ValueError(f"sequence {i}: {len(s)} tokens cannot score {n} of them.")
      if not self.recurrent and len(s) - 1 > self.max_length:
        if n > self.max_length:
          raise ValueError(f"a continuation of {n} tokens is longer than max_length="
                           f"{self.max_length}; raise max_length.")
        seqs[i] = s[-(self.max_length + 1):]
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    short = [i for i, s in enumerate(seqs) if len(s) - 1 <= self.max_length]
    long = [i for i, s in enumerate(seqs) if len(s) - 1 > self.max_length]
    if short:
      for i, r in zip(short, self._score_packed([seqs[i] for i in short],
                                                [n_scores[i] for i in short])):
        out[i] = r
    if long:
      for i, r in zip(long, self._score_carried([seqs[i] for i in long],
                                                [n_scores[i] for i in long])):
        out[i] = r
    return out  # type: ignore[return-value]

  def _score_packed(self, seqs, n_scores):
    pad = self.pre.pad_id
    out = [None] * len(seqs)
    for row_len, content in pack_rows([len(s) - 1 for s in seqs], self.rows, self.max_length,
                                      self.pack):
      tokens = np.full((self.rows, row_len), pad, np.int32)
      targets = np.zeros((self.rows, row_len), np.int32)
      seg = np.zeros((self.rows, row_len), np.int32)
      spans = []
      for r, items in enumerate(content):
        off = 0
        for k, i in enumerate(items):
          s = seqs[i]
          n = len(s) - 1
          tokens[r, off:off + n], targets[r, off:off + n] = s[:-1], s[1:]
          seg[r, off:off + n] = k + 1
          spans.append((i, r, off + n - n_scores[i], off + n))
          off += n
      logp, greedy = (np.asarray(a) for a in self._packed(self.pre.params, tokens, seg, targets))
      for i, r, a, b in spans:
        out[i] = (float(np.sum(logp[r, a:b], dtype=np.float64)), bool(np.all(greedy[r, a:b])))
    return out

  def _score_carried(self, seqs, n_scores):
    """Sequences longer than a window: windows of max_length tokens through the prefill, each
    starting from the state and positions the previous one left (the first from zero)."""
    from dense_ssm.models import init_cache  # pylint: disable=g-import-not-at-top

    w, pad = self.max_length, self.pre.pad_id
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [None] * len(seqs)
    for g in range(0, len(order), self.rows):
      group = order[g:g + self.rows]
      n_windows = math.ceil((len(seqs[group[0]]) - 1) / w)
      tokens = np.full((self.rows, n_windows * w), pad, np.int32)
      targets = np.zeros_like(tokens)
      for r, i in enumerate(group):
        s = seqs[i]
        tokens[r, :len(s) - 1], targets[r, :len(s) - 1] = s[:-1], s[1:]
      cache = init_cache(self.cfg, self.rows, 0)
      logps, greedys = [], []
      for k in range(n_windows):
        sl = slice(k * w, (k + 1) * w)
        logp, greedy, cache = self._window(self.pre.params, cache, tokens[:, sl], targets[:, sl])
        logps.append(np.asarray(logp))
        greedys.append(np.asarray(greedy))
      logp, greedy = np.concatenate(logps, axis=1), np.concatenate(greedys, axis=1)
      for r, i in enumerate(group):
        n = len(seqs[i]) - 1
        a = n - n_scores[i]
        out[i] = (float(np.sum(logp[r, a:n], dtype=np.float64)), bool(np.all(greedy[r, a:n])))
    return out

  # -------------------------------------------------------------------- generation

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               until: Sequence[str] = (), batch_seed: int = 0) -> list[str]:
    """Continuations of token-id prompts as text, cut before the first `until` string; stops at
    EOS. Prompts run longest first in left-padded batches of `rows` (lengths bucketed)."""
    import jax  # pylint: disable=g-import-not-at-top

    from dense_ssm import generate as gen  # pylint: disable=g-import-not-at-top

    # pylint: disable=protected-access  # the same checks and compiled loop as generate_ids
    gen._check_sampling(max_new_tokens, temperature, top_k, top_p)
    pre, until = self.pre, [u for u in until if u]
    if not self.recurrent:
      room = self.max_length - max_new_tokens
      if room < 1:
        raise ValueError(f"max_gen_toks={max_new_tokens} leaves no room for a prompt within "
                         f"max_length={self.max_length}.")
      prompts = [list(p)[-room:] for p in prompts]
    _, start_fn, block_fn = gen._jitted(self.cfg, max_new_tokens, pre.pad_id, temperature <= 0)
    # pylint: enable=protected-access
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [""] * len(prompts)
    for g in range(0, len(order), self.rows):
      group = order[g:g + self.rows]
      batch = [list(prompts[i]) for i in group]
      batch += [batch[0]] * (self.rows - len(batch))
      length = _bucket(len(batch[0]), 1 << 30, least=16)
      if not self.recurrent:
        length = min(length, self.max_length - max_new_tokens)
      tokens, seg = gen.left_pad(batch, pre.pad_id, length)
      key = jax.random.fold_in(jax.random.PRNGKey(self.seed), batch_seed * 1_000_003 + g)
      carry = start_fn(pre.params, tokens, seg, key, temperature, top_k, top_p, pre.eos_id)
      ids = [[int(t)] for t in np.asarray(carry["token"])]
      done = np.asarray(carry["done"]).copy()
      remaining = max_new_tokens - 1
      real = len(group)  # the rows after these repeat a prompt to fill the batch
      while remaining > 0 and not self._finished(ids[:real], done[:real], until):
        carry, new, n = block_fn(pre.params, carry, steps=min(STOP_CHECK_STEPS, remaining))
        n = int(n)
        new = np.asarray(new)[:, :n]
        for r in range(self.rows):
          if not done[r]:
            ids[r].extend(int(t) for t in new[r])
        done = np.asarray(carry["done"]).copy()
        remaining -= n
      for r, i in enumerate(group):
        out[i] = _cut_text(self._text(ids[r]), until)
    return out

  def _text(self, ids: list[int]) -> str:
    eos = self.pre.eos_id
    return self.pre.tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids)

  def _finished(self, ids, done, until) -> bool:
    if not until:
      return bool(np.all(done))
    return all(d or any(u in self._text(row) for u in until) for row, d in zip(ids, done))


def _cut_text(text: str, until: Sequence[str]) -> str:
  for u in until:
    text = text.split(u)[0]
  return text


# ------------------------------------------------------------------------------ the lm-eval model


def _lm_eval():
  try:
    import lm_eval  # pylint: disable=g-import-not-at-top
    import lm_eval.api.model  # pylint: disable=g-import-not-at-top,unused-import
    import lm_eval.api.registry  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ImportError(INSTALL_HINT) from None
  return lm_eval


_MODEL_CLASS = None


def model_class():
  """The lm-eval model class (a `TemplateLM`), defined and registered as `dense_ssm` on first
  use: defining it needs lm-eval, which this module otherwise imports only when called."""
  global _MODEL_CLASS
  if _MODEL_CLASS is None:
    lm_eval = _lm_eval()
    import lm_eval.models  # pylint: disable=g-import-not-at-top,unused-import,redefined-outer-name
    # (its built-in models join the registry first: lm-eval loads them only into an empty one)
    cls = _define_model_class(lm_eval.api.model.TemplateLM)
    lm_eval.api.registry.register_model(MODEL_NAME)(cls)
    _MODEL_CLASS = cls
  return _MODEL_CLASS


def register() -> None:
  """Makes `--model dense_ssm` / `simple_evaluate(model="dense_ssm")` resolve in this process."""
  model_class()


def make_lm(pretrained, **kwargs):
  """An instance of the model class: `make_lm(EXPORT_DIR_OR_PRETRAINED, batch_size=16)`."""
  return model_class()(pretrained=pretrained, **kwargs)


def __getattr__(name):
  if name == "DenseSSMLM":  # the entry point `dense_ssm.harness:DenseSSMLM`
    return model_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_model_class(template_lm):
  # pylint: disable=g-import-not-at-top
  from lm_eval.models.utils import normalize_gen_kwargs
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
  from tqdm import tqdm
  # pylint: enable=g-import-not-at-top

  class DenseSSMLM(template_lm):
    """lm-eval model over a dense_ssm export directory or training workdir (module doc)."""

    backend = "causal"

    def __init__(self, pretrained: str, batch_size: int | str = 16, max_length: int | None = None,
                 pack: bool = True, dtype: str | None = None, max_gen_toks: int = 256,
                 seed: int = 0, **unused):
      super().__init__()
      from dense_ssm import export  # pylint: disable=g-import-not-at-top

      for k in unused:
        if k not in ("device", "max_batch_size") and unused[k] is not None:
          print(f"dense_ssm model: ignoring model argument {k}={unused[k]!r}", file=sys.stderr)
      if isinstance(batch_size, str):
        batch_size = int(batch_size) if batch_size.isdigit() else 16  # "auto": the default
      if isinstance(pretrained, export.Pretrained):  # already loaded (python -m dense_ssm.evaluate)
        self.pre = pretrained
      else:
        self.pre = export.load_any(os.fspath(pretrained), dtype=dtype)
      if self.pre.tokenizer is None:
        raise ValueError(f"{self.pre.source} has no tokenizer file; lm-eval scores text, so the "
                         "export needs its tokenizer (export again, or convert with "
                         "--tokenizer=PATH).")
      self.scorer = Scorer(self.pre, rows=int(batch_size), max_length=max_length,
                           pack=_as_bool(pack), seed=int(seed))
      self.max_gen_toks = int(max_gen_toks)
      self.batch_size = int(batch_size)
      self._generate_calls = 0

    # ---- tokenization (TemplateLM builds (context, continuation) ids from these)

    @property
    def eot_token_id(self) -> int:
      return self.pre.eos_id

    @property
    def prefix_token_id(self) -> int:
      return self.pre.bos_id if self.pre.add_bos else self.pre.eos_id

    @property
    def max_length(self) -> int:
      return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
      return os.path.basename(os.path.normpath(self.pre.source)) or MODEL_NAME

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
      del kwargs
      bos = self.pre.add_bos if add_special_tokens is None else add_special_tokens
      return ([self.pre.bos_id] if bos else []) + self.pre.tokenizer.encode(string)

    def tok_decode(self, ids, **kwargs) -> str:
      del kwargs
      return self.pre.tokenizer.decode(list(ids))

    # ---- requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
      del kwargs
      seqs = [list(ctx) + list(cont) for _, ctx, cont in requests]
      n_scores = [len(cont) for _, _, cont in requests]
      results = self.scorer.score(seqs, n_scores)
      for (key, _, _), res in zip(requests, results):
        if key is not None:
          self.cache_hook.add_partial("loglikelihood", key, res)
      return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
      seqs, n_scores, owner = [], [], []
      for idx, (string,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm,
                                           desc="dense_ssm: tokenizing documents")):
        doc = self.tok_encode(string, add_special_tokens=False)
        if not doc:
          continue
        if self.scorer.recurrent:  # the whole document; the state is carried past a window
          seqs.append([self.prefix_token_id] + doc)
          n_scores.append(len(doc))
          owner.append(idx)
          continue
        for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
            token_list=doc, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
            context_len=1)):
          seqs.append(list(ctx) + list(pred))
          n_scores.append(len(pred))
          owner.append(idx)
      totals = [0.0] * len(requests)
      for idx, (logp, _) in zip(owner, self.scorer.score(seqs, n_scores)):
        totals[idx] += logp
      for req, total in zip(requests, totals):
        self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
      return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
      groups: dict[str, list[int]] = {}
      for i, req in enumerate(requests):
        groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
      out = [""] * len(requests)
      for idxs in tqdm(groups.values(), disable=disable_tqdm,
                       desc="dense_ssm: generate_until groups"):
        kw = dict(normalize_gen_kwargs(requests[idxs[0]].args[1], self.max_gen_toks))
        temperature = float(kw.get("temperature") or 0.0)
        sample = bool(kw.get("do_sample")) and temperature > 0
        self._generate_calls += 1
        texts = self.scorer.generate(
            [self.tok_encode(requests[i].args[0]) for i in idxs],
            max_new_tokens=int(kw["max_gen_toks"]),
            temperature=temperature if sample else 0.0,
            top_k=int(kw.get("top_k") or 0) if sample else 0,
            top_p=float(kw.get("top_p") or 1.0) if sample else 1.0,
            until=list(kw.get("until") or []), batch_seed=self._generate_calls)
        for i, text in zip(idxs, texts):
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
      return out

    def get_model_info(self) -> dict:
      return {"model_source": self.pre.source, "family": self.pre.cfg.family,
              "max_length": self.max_length, "pack": self.scorer.pack}

  DenseSSMLM.__module__ = __name__
  DenseSSMLM.__qualname__ = "DenseSSMLM"
  return DenseSSMLM


def _as_bool(v) -> bool:
  if isinstance(v, str):
    if v.lower() in ("1", "true", "yes"):
      return True
    if v.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"pack={v!r}: use True or False.")
  return bool(v)


# ------------------------------------------------------------------------------ run_tasks


def expand_tasks(tasks: str) -> list[str]:
  """"paper" -> PAPER_TASKS; otherwise a comma-separated list (which may include "paper")."""
  names: list[str] = []
  for t in (s.strip() for s in tasks.split(",")):
    for name in (PAPER_TASKS if t == "paper" else (t,) if t else ()):
      if name not in names:
        names.append(name)
  if not names:
    raise ValueError("--tasks is empty; name lm-eval tasks (e.g. hellaswag,arc_easy) or paper.")
  return names


def _metric(task_result: dict, name: str):
  for key, value in task_result.items():
    if key.split(",")[0] == name and isinstance(value, (int, float)):
      return float(value)
  return None


def paper_average(results: dict) -> dict[str, Any]:
  """The paper's Avg: mean over the PAPER_AVG_METRIC tasks present in `results["results"]`."""
  got = {t: _metric(results["results"][t], m) for t, m in PAPER_AVG_METRIC.items()
         if t in results.get("results", {})}
  got = {t: v for t, v in got.items() if v is not None}
  missing = [t for t in PAPER_AVG_METRIC if t not in got]
  avg = sum(got.values()) / len(got) if got else None
  return {"avg": avg, "tasks": len(got), "metric": {t: PAPER_AVG_METRIC[t] for t in got},
          "missing": missing}


def _pct(v: float | None) -> str:
  return "-" if v is None else f"{100 * v:.2f}"


def format_table(results: dict) -> str:
  """acc and acc_norm (percent) and the perplexities per task, then the paper's Avg."""
  lines = [f"{'task':<22} {'acc':>7} {'acc_norm':>9}  other"]
  for task, res in sorted(results.get("results", {}).items()):
    acc, acc_norm = _metric(res, "acc"), _metric(res, "acc_norm")
    other = [f"{m} {v:.2f}" for m in ("word_perplexity", "perplexity")
             if (v := _metric(res, m)) is not None]
    lines.append(f"{task:<22} {_pct(acc):>7} {_pct(acc_norm):>9}  {', '.join(other)}")
  avg = paper_average(results)
  if avg["avg"] is not None:
    used = ", ".join(f"{t}:{m}" for t, m in avg["metric"].items())
    lines.append(f"Avg {100 * avg['avg']:.2f} over {avg['tasks']} accuracy tasks ({used})")
    if avg["missing"]:
      lines.append(f"  (the paper averages 11; missing here: {', '.join(avg['missing'])})")
  return "\n".join(lines)


@functools.lru_cache(maxsize=4)
def task_manager_for(include_path: str | None = None):
  """lm-eval's TaskManager (built-in tasks plus `include_path`), built once per process: it
  indexes every task YAML lm-eval ships, which takes seconds."""
  _lm_eval()
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  return TaskManager(include_path=include_path)


def _loadable(names: list[str], task_manager) -> list[str]:
  """The paper tasks whose data loads (StoryCloze needs a manual download); one line each for
  the others."""
  from lm_eval.tasks import get_task_dict  # pylint: disable=g-import-not-at-top

  ok = []
  for name in names:
    try:
      get_task_dict([name], task_manager)
      ok.append(name)
    except Exception as e:  # pylint: disable=broad-except  # any dataset failure: skip the task
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      print(f"dense_ssm.harness: skipping {name}: {msg[:200]}", file=sys.stderr)
  return ok


def run_tasks(model_dir, tasks: str, *, num_fewshot: int | None = None,
              batch_size: int = 16, limit: int | None = None, output_path: str | None = None,
              include_path: str | None = None) -> dict:
  """Runs lm-eval tasks on an export directory, training workdir or loaded
  `export.Pretrained`; prints the table.

  `tasks`: comma-separated lm-eval task names; "paper" expands to PAPER_TASKS (tasks whose data
  cannot be loaded are skipped with one line each). Returns lm-eval's results dict (per-task
  metrics under "results", lm-eval's "config" etc.) plus "paper_avg" (`paper_average`);
  `output_path` (a .json file) receives the same as JSON. `include_path`: a folder of extra task
  YAML files (as lm-eval's --include_path).
  """
  lm_eval = _lm_eval()
  names = expand_tasks(tasks)
  task_manager = task_manager_for(include_path)
  unknown = [n for n in names if n not in task_manager.all_tasks]
  if unknown:
    raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; list them with "
                     "`lm_eval ls tasks`.")
  lm = make_lm(model_dir, batch_size=batch_size)
  if "paper" in [t.strip() for t in tasks.split(",")]:
    names = _loadable(names, task_manager)
    if not names:
      raise ValueError("no paper task could be loaded (offline? set HF_DATASETS_OFFLINE=0 and "
                       "check the network).")
  results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot,
                                    limit=limit, task_manager=task_manager, log_samples=False)
  results = dict(results or {})
  results["paper_avg"] = paper_average(results)
  print(format_table(results))
  if output_path:
    from dense_ssm import fs  # pylint: disable=g-import-not-at-top
    fs.makedirs(os.path.dirname(fs.abspath(output_path)))
    fs.write_text(output_path, json.dumps(results, indent=2, default=str))
  return results


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m dense_ssm.harness ARGS`: lm-eval's own command line with this model registered
  (ARGS as for `lm_eval`; `--model dense_ssm` is added when no --model is given). A bad model
  path or argument is one line on stderr (`--traceback` shows the traceback)."""
  from dense_ssm import cli  # pylint: disable=g-import-not-at-top

  args = list(sys.argv[1:] if argv is None else argv)
  show_traceback = "--traceback" in args
  args = [a for a in args if a != "--traceback"]
  with cli.user_errors("dense_ssm.harness", show_traceback, extra=(ImportError,)):
    register()
    from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top

    if args and args[0] not in ("ls", "validate") and "-h" not in args and \
        "--help" not in args and not any(a.split("=")[0] in ("--model", "-M") for a in args):
      at = 1 if args[0] == "run" else 0
      args = [*args[:at], "--model", MODEL_NAME, *args[at:]]
    saved = sys.argv
    sys.argv = ["lm_eval", *args]
    try:
      cli_evaluate()
    finally:
      sys.argv = saved


if __name__ == "__main__":
  from dense_ssm import harness as _self  # the class must live in dense_ssm.harness, not __main__
  _self.main()
