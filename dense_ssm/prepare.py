r"""Tokenizes a corpus into ArrayRecord shards that the trainer streams.

    python -m dense_ssm.prepare --source='jsonl:/data/pile/*.jsonl.zst' \
        --tokenizer=/data/llama/tokenizer.model --out=gs://bucket/pile-llama --workers=32

Sources (--source; paths and globs may be URLs such as gs://, dense_ssm/fs.py):
  text:GLOB      each file is one document
  jsonl:GLOB     one document per line, the text in field --field; files ending in .zst
                 (needs zstandard) or .gz are decompressed
  parquet:GLOB   one document per row, the text in column --field (needs pyarrow)
  hf:DIR         a Hugging Face `datasets` dataset written by save_to_disk (a local directory;
                 needs datasets), split --split of a DatasetDict, the text in column --field

Output (--out, a local directory or a URL):
  part-NNNNN.arrayrecord    one record per document: its token ids as raw little-endian int32
                            (`np.asarray(ids, "<i4").tobytes()`), without BOS/EOS, which the
                            trainer adds: the format of data.py's `arrayrecord:` source
  tokenizer.model | tokenizer.json    a copy of --tokenizer
  manifest.json             documents, tokens, empty documents dropped, invalid UTF-8 runs
                            replaced, per-shard counts, the tokenizer's fingerprint (sha256 of
                            its file, vocabulary size, BOS/EOS ids), the source and the flags;
                            written last: a directory without it is incomplete

Train on it (the tokenizer must be the one that made the shards):

    python -m dense_ssm.train --config=... --config.data.source='arrayrecord:DIR/*.arrayrecord' \
        --config.data.tokenizer=DIR/tokenizer.model

The shards hold every document; the trainer makes the train/validation split per record, by
data.valid_fraction (a record is validation iff the hash of its shard name and index is below
it; dense_ssm/data.py), so the same shards serve any valid_fraction.

Work is cut into tasks fixed by the input alone, about --shard_mb MB of input each (text files
grouped in sorted order; an uncompressed JSONL file cut into byte ranges at line starts; a
compressed file whole; parquet row groups grouped; hf rows in ranges), so the shards, their
order and their contents are the same for any --workers. Each task writes one shard; tasks run
in --workers processes; progress goes to stderr. Documents that are empty or whitespace only
are dropped (counted); text is decoded as UTF-8 with invalid bytes replaced (counted).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import json
import os
import sys
import time
from typing import Any, Iterator

import numpy as np

from dense_ssm import cli, fs

SCHEMES = ("text", "jsonl", "parquet", "hf")
MANIFEST = "manifest.json"
SHARD_GLOB = "part-*.arrayrecord"
_REPORT_SECS = 0.5  # how often a worker adds its progress to the shared counters


@dataclasses.dataclass(frozen=True)
class Task:
  """One shard's input: `kind` text (paths), jsonl (one path, bytes [start, end); end -1: to
  the end of a compressed file), parquet (one path, row groups) or hf (rows [start, end))."""

  index: int
  kind: str
  paths: tuple[str, ...]
  start: int = 0
  end: int = -1
  groups: tuple[int, ...] = ()
  units: int = 0  # work units for progress: input bytes, or rows (parquet, hf)


def _install_hint(module: str, what: str) -> ValueError:
  return ValueError(f"{what} needs the {module} package, which is not installed: pip install "
                    f"{module}")


def _compression(path: str) -> str:
  return "zst" if path.endswith(".zst") else "gz" if path.endswith(".gz") else ""


# --------------------------------------------------------------------------------- planning


def plan(source: str, *, field: str = "text", split: str = "train",
         shard_bytes: int = 256 << 20) -> list[Task]:
  """The tasks of `source` (module docstring), each about `shard_bytes` of input."""
  scheme, sep, arg = source.partition(":")
  if scheme not in SCHEMES or not sep or not arg:
    raise ValueError(f"--source={source!r} is unknown; use text:GLOB, jsonl:GLOB, "
                     "parquet:GLOB or hf:DIR")
  if scheme == "hf":
    return _plan_hf(arg, field, split, shard_bytes)
  paths = fs.glob(arg)
  if not paths:
    raise FileNotFoundError(f"--source={source!r} matches no files; fix the path or glob")
  tasks: list[Task] = []
  if scheme == "text":
    group, size = [], 0
    for path in paths:
      group.append(path)
      size += fs.getsize(path)
      if size >= shard_bytes:
        tasks.append(Task(len(tasks), "text", tuple(group), units=size))
        group, size = [], 0
    if group:
      tasks.append(Task(len(tasks), "text", tuple(group), units=size))
  elif scheme == "jsonl":
    for path in paths:
      size = fs.getsize(path)
      if _compression(path):
        tasks.append(Task(len(tasks), "jsonl", (path,), 0, -1, units=size))
        continue
      for start in range(0, max(size, 1), shard_bytes):
        end = min(start + shard_bytes, size)
        tasks.append(Task(len(tasks), "jsonl", (path,), start, end, units=end - start))
  else:
    pq = _import("pyarrow.parquet", "pyarrow", "--source=parquet:...")
    for path in paths:
      with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
      if field not in meta.schema.names:
        raise ValueError(f"{path} has no column {field!r} (columns: {meta.schema.names}); set "
                         "--field to the text column")
      group, size, rows = [], 0, 0
      for g in range(meta.num_row_groups):
        group.append(g)
        size += meta.row_group(g).total_byte_size
        rows += meta.row_group(g).num_rows
        if size >= shard_bytes or g == meta.num_row_groups - 1:
          tasks.append(Task(len(tasks), "parquet", (path,), groups=tuple(group), units=rows))
          group, size, rows = [], 0, 0
  return tasks


def _import(module: str, package: str, what: str):
  import importlib  # pylint: disable=g-import-not-at-top

  try:
    return importlib.import_module(module)
  except ImportError:
    raise _install_hint(package, what) from None


def _load_hf(directory: str, field: str, split: str):
  if fs.is_remote(directory):
    raise ValueError(f"--source=hf:{directory}: a saved dataset is read from a local directory; "
                     "copy it to local disk first")
  datasets = _import("datasets", "datasets", "--source=hf:DIR")
  try:
    ds = datasets.load_from_disk(os.path.expanduser(directory))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"--source=hf:{directory}: no dataset saved there ({e}); give the "
                            "directory passed to save_to_disk") from None
  if isinstance(ds, datasets.DatasetDict):
    if split not in ds:
      raise ValueError(f"--source=hf:{directory} has splits {sorted(ds)}, not {split!r}; set "
                       "--split")
    ds = ds[split]
  if field not in ds.column_names:
    raise ValueError(f"--source=hf:{directory} has no column {field!r} (columns: "
                     f"{ds.column_names}); set --field to the text column")
  return ds


def _plan_hf(directory: str, field: str, split: str, shard_bytes: int) -> list[Task]:
  ds = _load_hf(directory, field, split)
  rows = len(ds)
  nbytes = max(1, int(getattr(ds.data, "nbytes", 0) or rows))
  per_task = max(1, int(rows * shard_bytes / nbytes))
  return [Task(k, "hf", (directory,), start, min(start + per_task, rows),
               units=min(start + per_task, rows) - start)
          for k, start in enumerate(range(0, rows, per_task))]


# --------------------------------------------------------------------------------- reading


def _json_text(line: bytes, where: str, field: str) -> tuple[str | None, int]:
  """(text field, invalid UTF-8 runs replaced) of one JSONL line; None for a blank line."""
  from dense_ssm import data  # pylint: disable=g-import-not-at-top

  if not line.strip():
    return None, 0
  text, replaced = data._decode(line)  # pylint: disable=protected-access
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: invalid JSON ({e.msg}); each line must be one JSON object"
                     ) from None
  if not isinstance(record, dict) or not isinstance(record.get(field), str):
    raise ValueError(f"{where}: no string field {field!r}; set --field to the text field")
  return record[field], replaced


class _Progress:
  """Work units done in this process, added to the shared counters every _REPORT_SECS."""

  def __init__(self, counters):
    self._counters, self._pending, self._last = counters, [0, 0, 0], time.monotonic()

  def add(self, units: int = 0, docs: int = 0, tokens: int = 0, force: bool = False) -> None:
    for k, v in enumerate((units, docs, tokens)):
      self._pending[k] += v
    now = time.monotonic()
    if self._counters is not None and (force or now - self._last >= _REPORT_SECS):
      with self._counters[0].get_lock():
        for counter, v in zip(self._counters, self._pending):
          counter.value += v
      self._pending, self._last = [0, 0, 0], now


def _read_jsonl(task: Task, field: str, progress: _Progress) -> Iterator[tuple[str, int]]:
  path = task.paths[0]
  with fs.open(path, "rb") as raw:
    kind = _compression(path)
    if kind:
      if kind == "zst":
        zstd = _import("zstandard", "zstandard", f"{path} (zstd-compressed JSONL)")
        reader = zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        f = io.BufferedReader(reader)
      else:
        f = gzip.GzipFile(fileobj=raw)
      seen = 0
      for number, line in enumerate(f):
        pos = raw.tell()
        progress.add(units=pos - seen)
        seen = pos
        text, replaced = _json_text(line, f"{path}:{number + 1}", field)
        if text is not None:
          yield text, replaced
      return
    f = raw
    if task.start > 0:
      f.seek(task.start - 1)
      f.readline()  # the line begun before `start` belongs to the previous task
    pos = f.tell()
    while pos < task.end:
      line = f.readline()
      if not line:
        break
      progress.add(units=min(len(line), task.end - pos))
      text, replaced = _json_text(line, f"{path} (line at byte {pos})", field)
      pos += len(line)
      if text is not None:
        yield text, replaced


def _documents(task: Task, field: str, split: str,
               progress: _Progress) -> Iterator[tuple[str, int]]:
  """(text, invalid UTF-8 runs replaced) of the task's documents, in order."""
  from dense_ssm import data  # pylint: disable=g-import-not-at-top

  if task.kind == "text":
    for path in task.paths:
      content = fs.read_bytes(path)
      progress.add(units=len(content))
      yield data._decode(content)  # pylint: disable=protected-access
  elif task.kind == "jsonl":
    yield from _read_jsonl(task, field, progress)
  elif task.kind == "parquet":
    pq = _import("pyarrow.parquet", "pyarrow", "--source=parquet:...")
    with fs.open(task.paths[0], "rb") as f:
      pf = pq.ParquetFile(f)
      for g in task.groups:
        column = pf.read_row_group(g, columns=[field]).column(0)
        for value in column.to_pylist():
          progress.add(units=1)
          yield ("" if value is None else str(value)), 0
  else:
    ds = _load_hf(task.paths[0], field, split)
    for start in range(task.start, task.end, 1000):
      for value in ds[start:min(start + 1000, task.end)][field]:
        progress.add(units=1)
        yield ("" if value is None else str(value)), 0


# --------------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_bytes: bytes, tokenizer_path: str, counters) -> None:
  from dense_ssm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  cls = tokenizer_lib.HFTokenizer if tokenizer_path.endswith(tokenizer_lib.HF_FILE) or \
      tokenizer_bytes.lstrip()[:1] == b"{" else tokenizer_lib.Tokenizer
  _WORKER.update(tokenizer=cls(tokenizer_bytes, path=tokenizer_path), counters=counters)


def shard_name(index: int) -> str:
  return f"part-{index:05d}.arrayrecord"


def _run_task(task: Task, out: str, field: str, split: str) -> dict[str, Any]:
  """Tokenizes the task's documents into `out/part-<index>.arrayrecord`; returns its counts."""
  from dense_ssm import data  # pylint: disable=g-import-not-at-top

  tokenizer, progress = _WORKER["tokenizer"], _Progress(_WORKER.get("counters"))
  counts = {"file": shard_name(task.index), "documents": 0, "tokens": 0, "empty_documents": 0,
            "replaced_chars": 0}

  def records():
    for text, replaced in _documents(task, field, split, progress):
      counts["replaced_chars"] += replaced
      if not text.strip():
        counts["empty_documents"] += 1
        continue
      ids = np.asarray(tokenizer.encode(text), "<i4")
      counts["documents"] += 1
      counts["tokens"] += len(ids)
      progress.add(docs=1, tokens=len(ids))
      yield ids

  data.write_arrayrecord(os.path.join(out, counts["file"]), records())
  progress.add(force=True)
  return counts


# --------------------------------------------------------------------------------- driver


def _format_count(n: float) -> str:
  for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= size:
      return f"{n / size:.1f}{unit}"
  return f"{n:.0f}"


class _Bar:
  """One progress line on stderr: redrawn in place on a terminal, else printed every 10 s."""

  def __init__(self, total_units: int, num_tasks: int, stream=None):
    self._total, self._tasks = max(1, total_units), num_tasks
    self._stream = stream or sys.stderr
    self._tty = hasattr(self._stream, "isatty") and self._stream.isatty()
    self._start = self._last = time.monotonic()

  def update(self, units: int, docs: int, tokens: int, done: int, final: bool = False) -> None:
    now = time.monotonic()
    if not final and now - self._last < (0.5 if self._tty else 10.0):
      return
    self._last = now
    frac = 1.0 if final else min(1.0, units / self._total)
    elapsed = now - self._start
    eta = "" if final or frac <= 0 else f" | ETA {_duration(elapsed * (1 - frac) / frac)}"
    bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
    line = (f"[{bar}] {frac:6.1%} | {done}/{self._tasks} shards | {_format_count(docs)} docs | "
            f"{_format_count(tokens)} tokens | {_format_count(tokens / max(elapsed, 1e-9))} "
            f"tok/s{eta}")
    self._stream.write(("\r" + line + ("\n" if final else "")) if self._tty else line + "\n")
    self._stream.flush()


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def _check_out(out: str, overwrite: bool) -> None:
  if fs.exists(out) and not fs.isdir(out):
    raise FileExistsError(f"--out={out} is a file; give a directory")
  if fs.isdir(out) and fs.listdir(out):
    if not overwrite:
      raise FileExistsError(f"--out={out} is not empty; pass --overwrite to replace its shards "
                            "and manifest, or choose another directory")
    old = fs.glob(os.path.join(out, SHARD_GLOB)) + [
        os.path.join(out, n) for n in (MANIFEST, "tokenizer.model", "tokenizer.json")]
    for path in old:
      if fs.exists(path):
        fs.remove(path)


def prepare(source: str, tokenizer: str, out: str, *, field: str = "text", split: str = "train",
            workers: int = 1, shard_mb: float = 256, overwrite: bool = False,
            progress_stream=None) -> dict[str, Any]:
  """Writes the shards, a copy of the tokenizer and manifest.json (module docstring) to `out`;
  returns the manifest."""
  import multiprocessing  # pylint: disable=g-import-not-at-top

  from dense_ssm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  if workers < 1:
    raise ValueError(f"--workers={workers} must be >= 1")
  if shard_mb <= 0:
    raise ValueError(f"--shard_mb={shard_mb} must be > 0")
  out = fs.abspath(out)
  if not fs.isfile(tokenizer):
    raise FileNotFoundError(f"--tokenizer={tokenizer} is not a file; give the SentencePiece "
                            ".model or tokenizer.json to tokenize with")
  tok = tokenizer_lib.load_file(fs.expand(tokenizer))
  tok_bytes = tok.to_bytes()
  tasks = plan(source, field=field, split=split, shard_bytes=max(1, int(shard_mb * 2**20)))
  _check_out(out, overwrite)
  fs.makedirs(out)
  started = time.time()
  bar = _Bar(sum(t.units for t in tasks), len(tasks), progress_stream)
  results: list[dict[str, Any]] = []
  if workers == 1 or len(tasks) == 1:
    _init_worker(tok_bytes, tok.path, None)
    totals = [0, 0, 0]
    for task in tasks:
      results.append(_run_task(task, out, field, split))
      totals = [totals[0] + task.units, totals[1] + results[-1]["documents"],
                totals[2] + results[-1]["tokens"]]
      bar.update(*totals, len(results))
  else:
    ctx = multiprocessing.get_context("spawn")  # no forked copies of threads or tokenizers
    counters = tuple(ctx.Value("q", 0) for _ in range(3))
    with concurrent.futures.ProcessPoolExecutor(
        min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
        initargs=(tok_bytes, tok.path, counters)) as pool:
      pending = [pool.submit(_run_task, t, out, field, split) for t in tasks]
      try:
        while True:
          finished, _ = concurrent.futures.wait(pending, timeout=0.2)
          bar.update(*(c.value for c in counters), len(finished))
          for future in finished:
            if future.exception() is not None:
              raise future.exception()  # the worker's error, e.g. a bad JSONL line
          if len(finished) == len(pending):
            break
      except BaseException:
        for future in pending:
          future.cancel()
        raise
      results = [future.result() for future in pending]
  totals = {k: sum(r[k] for r in results)
            for k in ("documents", "tokens", "empty_documents", "replaced_chars")}
  bar.update(sum(t.units for t in tasks), totals["documents"], totals["tokens"], len(results),
             final=True)
  fs.write_bytes(os.path.join(out, tok.file_name), tok_bytes)
  manifest = {
      "format": "dense_ssm.prepare", "version": 1,
      "record": "token ids as raw little-endian int32, no BOS/EOS",
      "source": source, "field": field, "split": split if source.startswith("hf:") else None,
      **totals,
      "tokenizer": {"file": tok.file_name, "source": tokenizer,
                    "sha256": hashlib.sha256(tok_bytes).hexdigest(),
                    "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
      "train_source": f"arrayrecord:{out}/{SHARD_GLOB}",
      "shard_mb": shard_mb, "seconds": round(time.time() - started, 3),
      "shards": results,
  }
  fs.write_text(os.path.join(out, MANIFEST), json.dumps(manifest, indent=2) + "\n")
  return manifest


def _define_flags(fv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  d = dict(flag_values=fv)
  flags.DEFINE_string("source", None, "text:GLOB, jsonl:GLOB (.zst/.gz decompressed), "
                      "parquet:GLOB or hf:DIR (a datasets save_to_disk directory).", **d)
  flags.DEFINE_string("tokenizer", None, "The SentencePiece .model or Hugging Face "
                      "tokenizer.json to tokenize with (the one the model trains with).", **d)
  flags.DEFINE_string("out", None, "Directory (local or URL) for the shards and manifest.json.",
                      **d)
  flags.DEFINE_string("field", "text", "The text field (jsonl) or column (parquet, hf).", **d)
  flags.DEFINE_string("split", "train", "The split of an hf: DatasetDict.", **d)
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes tokenizing in parallel.", **d)
  flags.DEFINE_float("shard_mb", 256, "Input megabytes per task (= per shard).", **d)
  flags.DEFINE_bool("overwrite", False, "Replace the shards and manifest of a non-empty --out.",
                    **d)
  flags.DEFINE_bool("traceback", False, "Show tracebacks of errors.", **d)
  flags.mark_flags_as_required(["source", "tokenizer", "out"], flag_values=fv)


def main(argv=None) -> int:
  a, rest = cli.parse_flags("dense_ssm.prepare", __doc__.split("\n\nSources")[0], _define_flags,
                            argv)
  with cli.user_errors("dense_ssm.prepare", a.traceback):
    if rest:
      raise ValueError(f"unexpected arguments {rest}; flags are --name=value")
    m = prepare(a.source, a.tokenizer, a.out, field=a.field, split=a.split, workers=a.workers,
                shard_mb=a.shard_mb, overwrite=a.overwrite)
    print(f"wrote {m['documents']:,} documents, {m['tokens']:,} tokens in {len(m['shards'])} "
          f"shards to {fs.abspath(a.out)} ({m['seconds']:.1f}s); dropped "
          f"{m['empty_documents']:,} empty documents; train with "
          f"--config.data.source='{m['train_source']}' "
          f"--config.data.tokenizer={os.path.join(fs.abspath(a.out), m['tokenizer']['file'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
