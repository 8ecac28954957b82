r"""Evaluation: `python -m dense_ssm.evaluate`, and the loss helpers that training uses.

  python -m dense_ssm.evaluate --model=EXPORT_DIR --data=stdlib --max_docs=20
  python -m dense_ssm.evaluate --workdir=DIR --data='text:corpus/*.txt' --context=2048
  python -m dense_ssm.evaluate --model=EXPORT_DIR --tasks=lambada_openai,piqa   # lm-eval

The command scores every token after BOS of each document of --data's split, prints a table
(loss per token, token perplexity, bits per byte, word perplexity, loss by token position) and
writes it as JSON; dense_ssm/scoring.py says how documents are read and defines the metrics.
Recurrent models read a whole document by carrying their state; the Transformer reads rolling
windows. `evaluate_data` is the same from Python.

Training's validation loss (`make_eval_step`, `evaluate`):

  loss = sum_{b,t} w_bt * (logsumexp(z_bt) - z_bt[y_bt]) / sum_{b,t} w_bt,   ppl = exp(loss)

where w is the per-token weight of a batch (0 on padding).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

from dense_ssm import cli, fs


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """Per-token loss logsumexp(z) - z[y], float32 [B,T]."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  gold_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return lse_BxT - gold_BxT


def cross_entropy_sums(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                       weights_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token losses, sum of weights), in float32."""
  weights_BxT = weights_BxT.astype(jnp.float32)
  return (jnp.sum(token_nll(logits_BxTxV, targets_BxT) * weights_BxT), jnp.sum(weights_BxT))


def forward_sums(model, params, batch: Mapping[str, jax.Array], *, deterministic: bool,
                 dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Runs the model on a batch dict and returns `cross_entropy_sums` of its logits."""
  rngs = {} if dropout_key is None else {"dropout": dropout_key}
  logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                       positions=batch["positions"], deterministic=deterministic, rngs=rngs)
  return cross_entropy_sums(logits, batch["targets"], batch["weights"])


def make_eval_step(model) -> Callable:
  """eval_step(params, batch) -> {"loss_sum", "weight_sum"}; jit it with the caller's shardings."""

  def eval_step(params, batch):
    loss_sum, weight_sum = forward_sums(model, params, batch, deterministic=True)
    return {"loss_sum": loss_sum, "weight_sum": weight_sum}

  return eval_step


def evaluate(eval_step: Callable, params: Any, batches: Iterable[Any]) -> dict[str, float]:
  """Mean validation loss and perplexity over `batches` (already-placed device batches)."""
  loss_sum, weight_sum, n = 0.0, 0.0, 0
  for batch in batches:
    out = jax.device_get(eval_step(params, batch))
    loss_sum += float(out["loss_sum"])
    weight_sum += float(out["weight_sum"])
    n += 1
  if weight_sum <= 0:
    raise ValueError("the validation split produced no tokens; add data or lower "
                     "config.data.valid_fraction / config.train.eval_batches.")
  loss = loss_sum / weight_sum
  return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "batches": n, "tokens": weight_sum}


# ------------------------------------------------------------------------------ data


# Data settings a training run's saved config may carry that decide what its documents are.
_RUN_DATA_KEYS = ("valid_fraction", "jsonl_field", "tfds_field", "tfds_train_split",
                  "tfds_valid_split")


def run_data_config(workdir: str, step: int | None = None) -> dict[str, Any]:
  """The data settings of _RUN_DATA_KEYS saved with checkpoint `step` (default: latest)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from dense_ssm import export  # pylint: disable=g-import-not-at-top

  steps = export.checkpoint_steps(workdir)
  step = steps[-1] if step is None and steps else step
  path = os.path.join(fs.abspath(workdir), "checkpoints", str(step), "config")
  if step is None or not fs.isdir(path):
    return {}
  data = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path).get("data", {}) or {}
  return {k: data[k] for k in _RUN_DATA_KEYS if k in data}


def load_eval_documents(pre, data: str, *, split: str = "valid", max_docs: int = 0,
                        data_overrides: Mapping[str, Any] | None = None
                        ) -> tuple[list[list[int]], list[str | None]]:
  """(ids = [BOS] + tokens, text) of the first `max_docs` (0: all) documents of `split` of the
  data source `data` that have a token to score, read as training reads them
  (dense_ssm/data.py). Text is None for pre-tokenized documents when there is no tokenizer."""
  from dense_ssm import config_lib  # pylint: disable=g-import-not-at-top
  from dense_ssm import data as data_lib  # pylint: disable=g-import-not-at-top

  config = config_lib.base_config()
  config.data.source = data
  for k, v in (data_overrides or {}).items():
    config.data[k] = v
  docs = data_lib.load_documents(config, split)
  n = len(docs.items) if not max_docs else min(max_docs, len(docs.items))
  tok, vocab = pre.tokenizer, pre.cfg.vocab_size
  if tok is None and not docs.pretokenized:
    raise ValueError(f"{pre.source} has no tokenizer to read the text of --data={data}; pass "
                     "--tokenizer=FILE (the tokenizer the model was trained with).")
  bos = [pre.bos_id] if pre.add_bos else []
  ids_out, texts = [], []
  for i in range(n):
    item = docs.items[i]
    if docs.pretokenized:
      ids = [int(t) for t in item]
      text = tok.decode(ids) if tok is not None else None
    else:
      text, ids = item, tok.encode(item)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"--data={data}: token id {bad[0]} is outside the model's vocabulary "
                       f"[0, {vocab}); the data or tokenizer belongs to another model.")
    if len(bos) + len(ids) >= 2:
      ids_out.append(bos + ids)
      texts.append(text)
  if not ids_out:
    raise ValueError(f"--data={data} has no {split} documents with tokens to score; give more "
                     "text or another --split.")
  return ids_out, texts


def evaluate_data(pre, data: str, *, split: str = "valid", max_docs: int = 0, context: int = 0,
                  stride: int = 0, batch_size: int = 8, chunk: int = 2048,
                  data_overrides: Mapping[str, Any] | None = None,
                  show_progress: bool = True) -> dict[str, Any]:
  """Scores `pre` (a `Pretrained`) on a data source; returns the JSON the CLI writes: the
  metrics of `scoring.summarize` plus what was read and how."""
  from dense_ssm import scoring  # pylint: disable=g-import-not-at-top

  plan = scoring.make_plan(pre.cfg, context=context, stride=stride, chunk=chunk)
  if batch_size <= 0:
    raise ValueError(f"--batch_size={batch_size} must be > 0.")
  docs, texts = load_eval_documents(pre, data, split=split, max_docs=max_docs,
                                    data_overrides=data_overrides)
  total = sum(len(d) - 1 for d in docs)
  progress = scoring.Progress(total) if show_progress else None
  t0 = time.perf_counter()
  nlls = scoring.score_documents(pre.cfg, pre.params, docs, plan, batch_size=batch_size,
                                 progress=progress)
  seconds = time.perf_counter() - t0
  metrics = scoring.summarize(nlls, texts, first_position=1 if pre.add_bos else 2)
  return {"model": pre.source, "family": pre.cfg.family, "data": data, "split": split,
          "reading": plan.describe(), "context": context, "window": plan.window,
          "stride": plan.stride, "chunk": plan.chunk if plan.mode == "state" else None,
          **metrics, "seconds": seconds, "tokens_per_second": metrics["tokens"] / seconds}


# ------------------------------------------------------------------------------ CLI

PROG = "dense_ssm.evaluate"


def _define_flags(fv) -> None:
  """The CLI's flags, on their own FlagValues (importing this module defines no global flag)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  d = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "Training run directory: its latest checkpoint (or "
                      "--step) is evaluated.", **d)
  flags.DEFINE_string("model", None, "Export directory (python -m dense_ssm.export) to "
                      "evaluate.", **d)
  flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).", **d)
  flags.DEFINE_string("data", None, "Documents to score, any training data source: stdlib, "
                      "text:GLOB, jsonl:GLOB, tfds:NAME or arrayrecord:GLOB.", **d)
  flags.DEFINE_enum("split", "valid", ["valid", "train"], "Split of --data (tfds: its "
                    "validation/train split; else the hash split training uses).", **d)
  flags.DEFINE_integer("max_docs", 0, "Score the first N documents of the split (0: all).", **d)
  flags.DEFINE_integer("context", 0, "Tokens the model sees: 0 = the whole document (recurrent "
                       "state carried across chunks; the Transformer reads rolling windows of "
                       "its max_len); N > 0 = rolling windows of N tokens.", **d)
  flags.DEFINE_integer("stride", 0, "New tokens scored per rolling window (0: half the "
                       "window).", **d)
  flags.DEFINE_integer("batch_size", 8, "Documents (or windows) per forward pass.", **d)
  flags.DEFINE_integer("chunk", 2048, "Tokens per forward chunk of a recurrent model; memory "
                       "grows with batch_size * chunk * vocab.", **d)
  flags.DEFINE_string("out", None, "JSON file to write (default: eval_<data>_<split>.json in "
                      "the workdir / model directory, or in the current directory if that is "
                      "not writable).", **d)
  flags.DEFINE_string("tokenizer", None, "Tokenizer file (SentencePiece .model or "
                      "tokenizer.json) to use instead of the model's.", **d)
  flags.DEFINE_string("dtype", None, "Compute dtype override, e.g. bfloat16.", **d)
  flags.DEFINE_float("valid_fraction", None, "Fraction of documents in the valid split "
                     "(default: the run's setting with --workdir, else the training default).",
                     **d)
  flags.DEFINE_string("jsonl_field", None, "Text field of jsonl: records (default: the run's, "
                      "else 'text').", **d)
  flags.DEFINE_string("tasks", None, "lm-evaluation-harness tasks, comma-separated (needs the "
                      "eval extra); --data is then optional. With --workdir the checkpoint is "
                      "exported to a temporary directory first.", **d)
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per --tasks request (default: "
                       "each task's).", **d)
  flags.DEFINE_integer("limit", None, "At most N examples per task of --tasks (for quick "
                       "checks).", **d)
  flags.DEFINE_bool("traceback", False, "Show tracebacks of errors.", **d)


def _flag_values():
  from absl import flags  # pylint: disable=g-import-not-at-top

  fv = flags.FlagValues()
  _define_flags(fv)
  return fv


def _check_flags(f) -> None:
  if bool(f.workdir) == bool(f.model):
    raise ValueError("give exactly one of --model=EXPORT_DIR and --workdir=DIR.")
  if f.step is not None and not f.workdir:
    raise ValueError("--step selects a checkpoint of --workdir; an export has one set of params.")
  if not f.data and not f.tasks:
    raise ValueError("nothing to evaluate: give --data=SOURCE (e.g. stdlib) and/or --tasks=....")
  for name, low in (("context", 0), ("stride", 0), ("max_docs", 0), ("batch_size", 1),
                    ("chunk", 1)):
    if f[name].value < low:
      raise ValueError(f"--{name}={f[name].value} must be >= {low}.")
  if f.valid_fraction is not None and not 0.0 <= f.valid_fraction <= 1.0:
    raise ValueError(f"--valid_fraction={f.valid_fraction} must be in [0, 1].")


def _default_out(home: str, name: str) -> str:
  writable = fs.is_remote(home) or os.path.isdir(home) and os.access(home, os.W_OK)
  directory = home if writable else os.getcwd()
  return os.path.join(directory, name)


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "data"


def _run_tasks(f, pre, tasks_out: str | None) -> dict:
  """lm-evaluation-harness through dense_ssm/harness.py (lazily: it needs the eval extra), on
  the model as loaded here (so --dtype and --tokenizer apply to the tasks too)."""
  try:
    from dense_ssm import harness  # pylint: disable=g-import-not-at-top
    return harness.run_tasks(pre, f.tasks, num_fewshot=f.num_fewshot, batch_size=f.batch_size,
                             limit=f.limit, output_path=tasks_out)
  except ImportError as e:
    raise ValueError(f"--tasks needs lm-evaluation-harness and dense_ssm/harness.py ({e}); "
                     "install the extra: pip install -e '.[eval]'.") from None


def run(f) -> dict[str, Any]:
  """Runs the CLI on parsed flags `f`; returns {"data": metrics or None, "tasks": ...}."""
  from dense_ssm import export  # pylint: disable=g-import-not-at-top

  _check_flags(f)
  pre = (export.load_workdir(f.workdir, f.step, dtype=f.dtype) if f.workdir else
         export.load_pretrained(f.model, dtype=f.dtype))
  home = f.workdir or f.model
  if f.tokenizer:
    from dense_ssm.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    pre.tokenizer = Tokenizer.from_file(fs.expand(f.tokenizer))
    export.check_tokenizer(pre.tokenizer, pre.cfg, f"--tokenizer={f.tokenizer}")
  out = {"data": None, "tasks": None}
  if f.data:
    overrides = run_data_config(f.workdir, f.step) if f.workdir else {}
    if f.valid_fraction is not None:
      overrides["valid_fraction"] = f.valid_fraction
    if f.jsonl_field:
      overrides["jsonl_field"] = f.jsonl_field
    result = evaluate_data(pre, f.data, split=f.split, max_docs=f.max_docs, context=f.context,
                           stride=f.stride, batch_size=f.batch_size, chunk=f.chunk,
                           data_overrides=overrides)
    ctx = f"_ctx{f.context}" if f.context else ""
    path = f.out or _default_out(home, f"eval_{_slug(f.data)}_{f.split}{ctx}.json")
    fs.makedirs(os.path.dirname(fs.abspath(path)))
    fs.write_text(path, json.dumps(result, indent=2))
    from dense_ssm import scoring  # pylint: disable=g-import-not-at-top
    print(f"{result['model']} ({result['family']}) on {f.data} [{f.split}]: {result['reading']}")
    print(scoring.format_table(result))
    print(f"{result['tokens'] / result['seconds']:,.0f} tokens/s, {result['seconds']:.1f}s "
          f"incl. compilation; wrote {path}")
    out["data"] = result
  if f.tasks:
    tasks_out = f.out if f.out and not f.data else (
        os.path.splitext(f.out)[0] + "_tasks.json" if f.out else
        _default_out(home, "eval_tasks.json"))
    out["tasks"] = _run_tasks(f, pre, tasks_out)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m dense_ssm.evaluate`; bad input is one line on stderr and exit status 1."""
  fv, rest = cli.parse_flags(PROG, __doc__.split("\n\nTraining's")[0], _define_flags, argv)
  with cli.user_errors(PROG, fv.traceback):
    if rest:
      raise ValueError(f"unexpected arguments {rest}; flags are --name=value.")
    from dense_ssm import export  # pylint: disable=g-import-not-at-top
    export.quiet_logs()
    run(fv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
