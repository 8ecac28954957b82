"""Data pipeline: documents -> token ids -> packed rows -> batches (grain dataset API).

Sources, `config.data.source`:
  stdlib            the *.py files of the running interpreter's standard library (~30 MB, no
                    download; site-packages excluded), one document per file
  pysrc             every *.py file of the running interpreter, standard library and
                    site-packages alike (sysconfig's stdlib/platstdlib/purelib/platlib, the
                    site-packages directories and sys.path entries inside site-/dist-packages),
                    one document per distinct content: files are de-duplicated and ordered by the
                    sha256 of their bytes, blank files dropped, and read lazily (listing hashes
                    each file once per process)
  text:GLOB         each matching file is one document
  jsonl:GLOB        one document per line, the text in field `data.jsonl_field`
  tfds:NAME         `tfds.data_source(NAME, split=data.tfds_train_split | data.tfds_valid_split)`,
                    the text in field `data.tfds_field` (needs the `tfds` extra)
  arrayrecord:GLOB  pre-tokenized: each record is one document given as raw little-endian int32
                    token ids (`np.asarray(ids, "<i4").tobytes()`), without BOS/EOS;
                    `write_arrayrecord` makes such files.
  mqar:KNOBS        synthetic multi-query associative recall, one example per row, no tokenizer
                    (dense_ssm/mqar.py documents the knobs, the rows and their weights)
Files are read in sorted path order; globs and paths may be URLs (gs://..., through
dense_ssm/fs.py; `**` on local paths only). `data.max_chars` (0 = all) caps the characters read
from text sources (stdlib, pysrc, text, jsonl, and tfds when set). With max_chars = 0, text and
jsonl sources are not held in memory: one streaming pass per file indexes the documents (a
JSONL line's byte range; a text file's path) and each is read when used (a JSONL line's JSON is
parsed then); with max_chars set they are read into memory up to the cap. Text is decoded as
UTF-8 with errors="replace"; `DataStats` counts the files and characters replaced (sources read
into memory) and the documents dropped for being empty or whitespace only (for lazy JSONL,
blank lines are skipped but records with empty text are kept).

Train/validation split (tfds uses its own splits): a document is validation iff
u(key) < data.valid_fraction, u = splitmix64(md5(relative path) + index) / 2^64, index = line
(jsonl), record (arrayrecord) or 0 (a file). If that leaves validation empty while
valid_fraction > 0, the document with the smallest u is moved to it. A stdlib / text / jsonl
source of a single non-empty document (e.g. text: with one file) is first cut into about
SINGLE_DOCUMENT_PIECES runs of whole lines, split in the same way (index = piece), so that
neither split is empty. pysrc instead takes u from the document's content (the last 52 bits of
its sha256; the order uses the whole digest), so the split is the same on every machine with the
same files, wherever they are installed; with max_chars the cap applies in hash order, before
the split.

Packing (grain ConcatThenSplit): each document becomes [BOS] ids [EOS] (data.add_bos/add_eos);
documents are concatenated and cut into rows of seq_len + 1 tokens. A document longer than the
space left is split; its continuation opens the next row as a new segment whose positions
restart at 0. Per row (t < seq_len):
  inputs = row[:-1], targets = row[1:], segment_ids[t] = seg[t] (1, 2, ... per document in the
  row, 0 = padding), positions[t] = position of token t in its document piece,
  weights[t] = 1 iff seg[t] != 0 and seg[t + 1] == seg[t]
so padding and targets that cross into the next document (its BOS) have weight 0.
Train rows never pad; the last validation row may.

Train batches come from `make_train_iterator`: documents are split per host (every
process_count-th document), shuffled with the seed (a new order each epoch), repeated forever,
tokenized lazily, packed and batched to [batch_size / process_count, seq_len]. Its
`get_state()` is a JSON-serialisable dict (store it with Orbax `JsonSave`); `set_state` resumes
the exact batch order. `make_eval_batches` returns a fixed list of batches, the same count on
every host.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import site
import sys
import sysconfig
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from dense_ssm import fs
from dense_ssm.tokenizer import BOS_ID, EOS_ID, HF_FILE, Tokenizer, train_tokenizer

Batch = dict[str, np.ndarray]
SCHEMES = ("text", "jsonl", "tfds", "arrayrecord")
TOKENIZER_FILE = "tokenizer.model"
FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")
SINGLE_DOCUMENT_PIECES = 100  # a text source of one document is split in this many pieces


@dataclasses.dataclass
class DataStats:
  """What reading one split found. `empty_documents` (dropped) and `replaced_*` (invalid UTF-8
  turned into U+FFFD; text sources read into memory only) count over everything read, both
  splits."""

  source: str
  split: str
  num_documents: int = 0
  num_chars: int = 0  # -1: unknown (lazy or pre-tokenized source)
  num_bytes: int = 0  # 0: unknown; the split's file bytes for pysrc
  empty_documents: int = 0
  replaced_files: int = 0
  replaced_chars: int = 0


@dataclasses.dataclass
class Documents:
  """One split: `items` is a random-access sequence of str (or int32 id arrays if pretokenized)."""

  items: Sequence[Any]
  pretokenized: bool
  stats: DataStats


# ------------------------------------------------------------------------------------- sources


def _parse_source(source: str) -> tuple[str, str]:
  if source in ("stdlib", "pysrc"):
    return source, ""
  scheme, sep, arg = source.partition(":")
  if scheme not in SCHEMES or not sep or not arg:
    raise ValueError(f"data.source={source!r} is unknown; use stdlib, pysrc, text:GLOB, "
                     "jsonl:GLOB, tfds:NAME or arrayrecord:GLOB")
  return scheme, arg


def _glob(pattern: str, source: str) -> list[tuple[str, str]]:
  """Sorted (path, path relative to the glob's fixed prefix) of the files `pattern` (a local
  path or a URL, dense_ssm/fs.py) matches."""
  pattern = fs.expand(pattern)
  paths = fs.glob(pattern)
  if not paths:
    raise FileNotFoundError(f"data.source={source!r} matches no files; fix the path or glob")
  prefix, rest = fs.split_glob(pattern)
  root = prefix if rest else os.path.dirname(pattern)
  return [(p, os.path.relpath(p, root or ".")) for p in paths]


def _stdlib_files() -> list[tuple[str, str]]:
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for d, subdirs, files in os.walk(root):
    subdirs[:] = [s for s in subdirs if s not in ("site-packages", "dist-packages", "__pycache__")]
    out += [(os.path.join(d, f), os.path.relpath(os.path.join(d, f), root))
            for f in files if f.endswith(".py")]
  return sorted(out, key=lambda x: x[1])


def _pysrc_roots() -> tuple[str, ...]:
  """The directories whose *.py files make up `pysrc` (existing ones, real paths, sorted; none
  inside another)."""
  paths = sysconfig.get_paths()
  roots = [paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
  roots += site.getsitepackages() if hasattr(site, "getsitepackages") else []
  roots += [p for p in sys.path if {"site-packages", "dist-packages"} & set(p.split(os.sep))]
  roots = sorted({os.path.realpath(r) for r in roots if r and os.path.isdir(r)})
  return tuple(r for r in roots if not any(r.startswith(o + os.sep) for o in roots))


@dataclasses.dataclass(frozen=True)
class _PySrcListing:
  """Distinct non-blank *.py contents, sorted by sha256: parallel tuples of hex digest, one path
  holding that content, and its size in bytes; `blank` counts the blank files dropped."""

  digests: tuple[str, ...]
  paths: tuple[str, ...]
  sizes: tuple[int, ...]
  blank: int


@functools.lru_cache(maxsize=4)
def _pysrc_listing(roots: tuple[str, ...]) -> _PySrcListing:
  """Walks `roots` (sorted, symlinked directories not followed, __pycache__ skipped), hashing
  each readable *.py file once; cached per process."""
  seen_paths, by_digest, blank = set(), {}, 0
  for root in roots:
    for d, subdirs, names in os.walk(root):
      subdirs[:] = sorted(s for s in subdirs if s != "__pycache__")
      for name in sorted(n for n in names if n.endswith(".py")):
        path = os.path.realpath(os.path.join(d, name))
        if path in seen_paths:
          continue
        seen_paths.add(path)
        try:
          with open(path, "rb") as f:
            content = f.read()
        except OSError:  # unreadable or a dangling link: not part of the corpus
          continue
        if not content.strip():
          blank += 1
          continue
        by_digest.setdefault(hashlib.sha256(content).hexdigest(), (path, len(content)))
  digests = tuple(sorted(by_digest))
  return _PySrcListing(digests, tuple(by_digest[h][0] for h in digests),
                       tuple(by_digest[h][1] for h in digests), blank)


def _read_bytes(path: str) -> bytes:
  return fs.read_bytes(path)


def _read_text_file(path: str) -> str:
  return _read_bytes(path).decode("utf-8", errors="replace")


def _read_pysrc(d, split: str) -> Documents:
  """The pysrc documents of `split`: lazy (read on access) unless data.max_chars caps them."""
  listing = _pysrc_listing(_pysrc_roots())
  if not listing.digests:
    raise ValueError(f"data.source={d.source!r}: no non-blank *.py files under {list(_pysrc_roots())}; "
                     "use data.source=stdlib or text:GLOB")
  u = np.asarray([int(h[-13:], 16) for h in listing.digests], np.float64) / float(2**52)
  stats = DataStats(source=d.source, split=split, num_chars=-1, empty_documents=listing.blank)
  if d.max_chars:  # eager and bounded: the first documents in hash order, the last one cut
    texts, budget = [], d.max_chars
    for path in listing.paths:
      text, replaced = _decode(_read_bytes(path))
      stats.replaced_files += replaced > 0
      stats.replaced_chars += replaced
      texts.append(text[:budget])
      budget -= len(texts[-1])
      if budget <= 0:
        break
    keep = np.nonzero(_split_mask(u[:len(texts)], d.valid_fraction, split))[0]
    items = [texts[i] for i in keep]
    stats.num_chars = sum(map(len, items))
    stats.num_bytes = sum(len(t.encode("utf-8", errors="replace")) for t in items)
  else:
    keep = np.nonzero(_split_mask(u, d.valid_fraction, split))[0]
    items = _LazyItems(listing.paths, keep, _read_text_file)
    stats.num_bytes = int(sum(listing.sizes[i] for i in keep))
  if not len(items):
    raise ValueError(f"data.source={d.source!r} has no {split} documents; raise data.max_chars "
                     "or change data.valid_fraction")
  stats.num_documents = len(items)
  return Documents(items, pretokenized=False, stats=stats)


def _decode(data: bytes) -> tuple[str, int]:
  """UTF-8 text and how many invalid byte runs became U+FFFD."""
  try:
    return data.decode("utf-8"), 0
  except UnicodeDecodeError:
    text = data.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - data.count("\ufffd".encode())


def _unit_hash(key: str, index: np.ndarray) -> np.ndarray:
  """splitmix64(md5(key) + index) mapped to [0, 1), vectorised over `index`."""
  z = np.full(index.shape, int.from_bytes(hashlib.md5(key.encode()).digest()[:8], "little"),
              dtype=np.uint64)
  z += index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  z ^= z >> np.uint64(31)
  return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def _split_mask(u: np.ndarray, valid_fraction: float, split: str) -> np.ndarray:
  valid = u < valid_fraction
  if valid_fraction > 0 and not valid.any() and len(u) > 1:
    valid[np.argmin(u)] = True
  return valid if split == "valid" else ~valid


def _read_text_docs(scheme: str, arg: str, d, split: str) -> Documents:
  """stdlib / text / jsonl documents of `split`: read lazily (text and jsonl without
  data.max_chars, `_read_lazy_docs`) or eagerly, capped by max_chars (`_read_eager_docs`)."""
  files = _stdlib_files() if scheme == "stdlib" else _glob(arg, d.source)
  if scheme != "stdlib" and not d.max_chars:
    return _read_lazy_docs(scheme, files, d, split)
  return _read_eager_docs(scheme, files, d, split)


def _file_documents(scheme: str, path: str, field: str) -> Iterator[tuple[int, str, int]]:
  """(index, text, invalid UTF-8 runs replaced) of each document of a file, streamed: a text
  file is one document (index 0); a JSONL file one per non-blank line (index = line)."""
  if scheme != "jsonl":
    yield (0, *_decode(fs.read_bytes(path)))
    return
  with fs.open(path, "rb") as f:
    for i, raw in enumerate(f):
      line, replaced = _decode(raw)
      doc = _jsonl_text(line, path, i, field)
      if doc is not None:
        yield i, doc, replaced


def _read_eager_docs(scheme: str, files: list[tuple[str, str]], d, split: str) -> Documents:
  """Reads documents into memory (at most max_chars characters) and keeps `split`."""
  stats = DataStats(source=d.source, split=split)
  texts, hashes, rels, budget = [], [], [], d.max_chars or math.inf
  for path, rel in files:
    docs, idx, file_replaced = [], [], 0
    for i, doc, replaced in _file_documents(scheme, path, d.jsonl_field):
      file_replaced += replaced
      doc = doc[:budget] if budget < len(doc) else doc
      budget -= len(doc)
      docs.append(doc)
      idx.append(i)
      if budget <= 0:
        break
    stats.replaced_files += file_replaced > 0
    stats.replaced_chars += file_replaced
    texts += docs
    hashes += list(_unit_hash(rel, np.asarray(idx, np.int64)))
    rels += [rel] * len(docs)
    if budget <= 0:
      break
  nonempty = [i for i, t in enumerate(texts) if t.strip()]
  stats.empty_documents = len(texts) - len(nonempty)
  if not nonempty:
    raise ValueError(f"data.source={d.source!r} has no non-empty documents; point it at real text")
  if len(nonempty) == 1 and d.valid_fraction > 0:  # one document: split inside it
    one = nonempty[0]
    texts = [p for p in _cut_document(texts[one], SINGLE_DOCUMENT_PIECES) if p.strip()]
    hashes = list(_unit_hash(f"{rels[one]}#pieces", np.arange(len(texts), dtype=np.int64)))
    nonempty = list(range(len(texts)))
  keep = _split_mask(np.asarray(hashes)[nonempty], d.valid_fraction, split)
  items = [texts[i] for i, k in zip(nonempty, keep) if k]
  stats.num_documents, stats.num_chars = len(items), sum(map(len, items))
  if not items:
    raise ValueError(f"data.source={d.source!r} has no non-empty {split} documents; add documents "
                     "or change data.valid_fraction")
  return Documents(items, pretokenized=False, stats=stats)


_INDEX_CHUNK = 1 << 22  # bytes read at a time by the streaming index pass
_IS_SPACE = np.zeros(256, bool)
_IS_SPACE[[9, 10, 11, 12, 13, 32]] = True  # the bytes of ASCII whitespace


def _line_index(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(start, end, line number) of every non-blank line of a file, end excluding its newline:
  one streaming pass over the bytes (lines split at \\n, blank = ASCII whitespace only)."""
  starts, ends, numbers = [], [], []
  offset, line_no, line_start, carried_text = 0, 0, 0, False
  with fs.open(path, "rb") as f:
    while chunk := f.read(_INDEX_CHUNK):
      b = np.frombuffer(chunk, np.uint8)
      nl = np.flatnonzero(b == 10)
      if not len(nl):  # the line goes on
        carried_text = carried_text or not chunk.isspace()
        offset += len(chunk)
        continue
      local = np.concatenate([[0], nl[:-1] + 1])  # starts of the lines ending in this chunk
      nonempty = local < nl
      has_text = nonempty & ~_IS_SPACE[b[np.minimum(local, len(b) - 1)]]  # first byte: text
      for k in np.flatnonzero(nonempty & ~has_text):  # begins with whitespace: read it all
        has_text[k] = not chunk[local[k]:nl[k]].isspace()
      has_text[0] |= carried_text
      keep = np.flatnonzero(has_text)
      line_starts = offset + local
      line_starts[0] = line_start
      starts.append(line_starts[keep])
      ends.append(offset + nl[keep])
      numbers.append(line_no + keep)
      line_no += len(nl)
      line_start = offset + int(nl[-1]) + 1
      tail = chunk[int(nl[-1]) + 1:]
      carried_text = bool(tail) and not tail.isspace()
      offset += len(chunk)
  if carried_text:  # the last line has no newline
    starts.append([line_start])
    ends.append([offset])
    numbers.append([line_no])
  cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)
  return cat(starts), cat(ends), cat(numbers)


def _has_text(path: str) -> bool:
  """Whether a file holds anything but ASCII whitespace (reads only until it finds some)."""
  with fs.open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      if not chunk.isspace():
        return True
  return False


def _parallel_map(fn: Callable[[Any], Any], paths: list[Any]) -> list[Any]:
  """fn over paths in threads (file reads, remote ones above all, wait on I/O), in order."""
  if len(paths) < 2:
    return [fn(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(min(16, len(paths))) as pool:
    return list(pool.map(fn, paths))


class _JsonlDocs(Sequence):
  """JSONL documents read on access: item i is the text field of the line at bytes
  [starts[i], ends[i]) of paths[files[i]] (invalid UTF-8 replaced; a bad line raises then)."""

  def __init__(self, paths, files, starts, ends, numbers, field: str):
    self._paths, self._field = list(paths), field
    self._files, self._starts, self._ends, self._numbers = files, starts, ends, numbers
    self._local = threading.local()

  def __len__(self):
    return len(self._starts)

  def _read(self, path: str, start: int, size: int) -> bytes:
    if not fs.is_remote(path):
      with builtins.open(path, "rb") as f:
        f.seek(start)
        return f.read(size)
    handles = self._local.__dict__.setdefault("handles", {})  # per thread: handles seek
    if path not in handles:
      if len(handles) >= 8:
        handles.pop(next(iter(handles))).close()
      handles[path] = fs.open(path, "rb")
    f = handles[path]
    f.seek(start)
    return f.read(size)

  def __getitem__(self, i):
    path = self._paths[self._files[i]]
    start, end = int(self._starts[i]), int(self._ends[i])
    line, _ = _decode(self._read(path, start, end - start))
    return _jsonl_text(line, path, int(self._numbers[i]), self._field)

  def __getstate__(self):  # picklable for data worker processes; handles stay behind
    state = dict(self.__dict__)
    del state["_local"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state, _local=threading.local())


def _read_lazy_docs(scheme: str, files: list[tuple[str, str]], d, split: str) -> Documents:
  """text / jsonl documents of `split` indexed by one streaming pass over each file (in
  threads) and read on access, so memory holds offsets, not text. A JSONL line's text field is
  parsed on access (each file's first record is checked here; a bad later line raises, naming
  its file and line, when read), so records with empty text are kept (they tokenize to
  BOS/EOS only) and
  `empty_documents` counts blank text files; characters and replaced bytes are not counted.
  A source of one non-empty document is read eagerly (it is cut into pieces)."""
  paths = [p for p, _ in files]
  stats = DataStats(source=d.source, split=split, num_chars=-1)
  if scheme == "jsonl":
    index = _parallel_map(_line_index, paths)
    numbers = [n for _, _, n in index]
    file_ids = np.concatenate([np.full(len(n), k, np.int32) for k, n in enumerate(numbers)])
  else:
    has_text = _parallel_map(_has_text, paths)
    stats.empty_documents = has_text.count(False)
    numbers = [np.zeros(int(h), np.int64) for h in has_text]
    file_ids = np.flatnonzero(has_text).astype(np.int32)
  total = len(file_ids)
  if not total:
    raise ValueError(f"data.source={d.source!r} has no non-empty documents; point it at real text")
  if total == 1 and d.valid_fraction > 0:
    return _read_eager_docs(scheme, files, d, split)
  u = np.concatenate([_unit_hash(rel, n) for (_, rel), n in zip(files, numbers)])
  keep = np.flatnonzero(_split_mask(u, d.valid_fraction, split))
  if not len(keep):
    raise ValueError(f"data.source={d.source!r} has no non-empty {split} documents; add documents "
                     "or change data.valid_fraction")
  if scheme == "jsonl":
    starts, ends, numbers = (np.concatenate([x[k] for x in index]) for k in range(3))
    every = _JsonlDocs(paths, file_ids, starts, ends, numbers, d.jsonl_field)
    firsts = np.searchsorted(file_ids, np.unique(file_ids))
    _parallel_map(lambda i: every[i], list(firsts))  # each file's first record: JSON, field
    items = _JsonlDocs(paths, file_ids[keep], starts[keep], ends[keep], numbers[keep],
                       d.jsonl_field)
  else:
    items = _LazyItems(paths, file_ids[keep], _read_text_file)
    stats.num_bytes = int(sum(fs.getsize(paths[k]) for k in file_ids[keep]))
  stats.num_documents = len(items)
  return Documents(items, pretokenized=False, stats=stats)


def _cut_document(text: str, pieces: int) -> list[str]:
  """`text` cut into about `pieces` runs of whole lines (of characters if it has one line)."""
  size = max(1, -(-len(text) // pieces))
  lines = text.splitlines(keepends=True)
  if len(lines) < 2:
    lines = [text[i:i + size] for i in range(0, len(text), size)]
  out, run, run_len = [], [], 0
  for line in lines:
    run.append(line)
    run_len += len(line)
    if run_len >= size:
      out.append("".join(run))
      run, run_len = [], 0
  if run:
    out.append("".join(run))
  return out


def _jsonl_text(line: str, path: str, index: int, field: str) -> str | None:
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{index + 1}: invalid JSON ({e.msg}); each line must be one JSON "
                     "object") from None
  if not isinstance(record, dict) or not isinstance(record.get(field), str):
    raise ValueError(f"{path}:{index + 1}: no string field {field!r}; set data.jsonl_field to "
                     "the text field")
  return record[field]


class _LazyItems(Sequence):
  """items[i] = fn(base[indices[i]]), read on access."""

  def __init__(self, base, indices: np.ndarray, fn: Callable[[Any], Any]):
    self._base, self._indices, self._fn = base, indices, fn

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, i):
    return self._fn(self._base[int(self._indices[i])])


def _tfds_text(example, field: str) -> str:
  value = example[field]
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _read_tfds(name: str, d, split: str) -> Documents:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"data.source='tfds:{name}' needs tensorflow-datasets, which is not "
                     'installed; install the tfds extra: pip install -e ".[tfds]"') from None

  tfds_split = d.tfds_valid_split if split == "valid" else d.tfds_train_split
  try:
    source = tfds.data_source(name, split=tfds_split)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(f"data.source='tfds:{name}' split {tfds_split!r}: {type(e).__name__}: "
                     f"{first}; build it with `tfds build {name}` or fix the name/split") from e
  stats = DataStats(source=d.source, split=split, num_chars=-1)
  items = _LazyItems(source, np.arange(len(source)), lambda ex: _tfds_text(ex, d.tfds_field))
  if d.max_chars:
    capped, budget = [], d.max_chars
    for text in items:
      capped.append(text[:budget])
      budget -= len(capped[-1])
      if budget <= 0:
        break
    items = [t for t in capped if t.strip()]
    stats.empty_documents, stats.num_chars = len(capped) - len(items), sum(map(len, items))
  if not len(items):
    raise ValueError(f"data.source={d.source!r} split {tfds_split!r} has no documents")
  stats.num_documents = len(items)
  return Documents(items, pretokenized=False, stats=stats)


def _read_arrayrecord(pattern: str, d, split: str) -> Documents:
  import grain  # pylint: disable=g-import-not-at-top

  files = _glob(pattern, d.source)
  source = grain.sources.ArrayRecordDataSource([p for p, _ in files])
  u = np.concatenate([_unit_hash(rel, np.arange(len(grain.sources.ArrayRecordDataSource([p]))))
                      for p, rel in files])
  indices = np.nonzero(_split_mask(u, d.valid_fraction, split))[0]
  if not len(indices):
    raise ValueError(f"data.source={d.source!r} has no {split} records; write records or change "
                     "data.valid_fraction")
  items = _LazyItems(source, indices, lambda record: np.frombuffer(record, dtype="<i4"))
  stats = DataStats(source=d.source, split=split, num_documents=len(items), num_chars=-1)
  return Documents(items, pretokenized=True, stats=stats)


def load_documents(config, split: str = "train") -> Documents:
  """The documents of `split` ("train" or "valid") of `config.data.source`."""
  if split not in ("train", "valid"):
    raise ValueError(f"split={split!r} is unknown; use 'train' or 'valid'")
  d = config.data
  if _mqar_spec(config):
    raise ValueError(f"data.source={d.source!r} is a synthetic task of rows, not documents; read "
                     "it with make_train_iterator / make_eval_batches")
  scheme, arg = _parse_source(d.source)
  if scheme == "tfds":
    return _read_tfds(arg, d, split)
  if scheme == "arrayrecord":
    return _read_arrayrecord(arg, d, split)
  if scheme == "pysrc":
    return _read_pysrc(d, split)
  return _read_text_docs(scheme, arg, d, split)


def write_arrayrecord(path: str, documents: Iterable[Sequence[int]]) -> int:
  """Writes pre-tokenized documents, one record each of raw little-endian int32 ids, to a local
  path or a URL (written locally, then uploaded); returns the number of records."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  count = 0
  with fs.local_output(path) as local:
    writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
    for ids in documents:
      writer.write(np.asarray(ids, dtype="<i4").tobytes())
      count += 1
    writer.close()
  return count


# ----------------------------------------------------------------------------------- tokenizer


def _check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
  """A SentencePiece model must fill the embedding exactly (a cached one of another size means
  the config changed); a Hugging Face tokenizer may be smaller (their checkpoints pad the
  embedding, e.g. GPT-NeoX's 50,277 tokens in 50,280 rows), never larger."""
  smaller_ok = tokenizer.file_name == HF_FILE and tokenizer.vocab_size < vocab_size
  if tokenizer.vocab_size != vocab_size and not smaller_ok:
    where, n = tokenizer.path or "the tokenizer", tokenizer.vocab_size
    raise ValueError(f"{where} has {n} pieces but model.vocab_size={vocab_size}; set "
                     f"model.vocab_size={n} or use a tokenizer with {vocab_size} pieces (delete "
                     f"a cached {TOKENIZER_FILE} to retrain)")


def load_tokenizer(config, workdir: str | None = None) -> Tokenizer:
  """`config.data.tokenizer` (a SentencePiece .model or a Hugging Face tokenizer.json) if set;
  else `workdir/tokenizer.model` if present; else trains one (SentencePiece).

  Training uses at most `data.tokenizer_train_chars` characters of the train split (documents
  in a fixed shuffled order), `data.tokenizer_vocab_size` pieces (0: `model.vocab_size`), and
  caches the model in `workdir` (when given). The tokenizer's vocabulary must equal
  `model.vocab_size`. An `mqar:` source needs none: returns None.
  """
  if _mqar_spec(config):
    return None
  d, vocab_size = config.data, config.model.vocab_size
  if d.tokenizer:
    tokenizer = Tokenizer.from_file(fs.expand(d.tokenizer))
  else:
    wanted = d.tokenizer_vocab_size or vocab_size
    if wanted != vocab_size:
      raise ValueError(f"data.tokenizer_vocab_size={wanted} != model.vocab_size={vocab_size}; "
                       "make them equal (or set data.tokenizer_vocab_size=0)")
    path = os.path.join(workdir, TOKENIZER_FILE) if workdir else ""
    if path and fs.exists(path):
      tokenizer = Tokenizer.from_file(path)
    else:
      docs = load_documents(config, "train")
      if docs.pretokenized:
        raise ValueError(f"data.source={d.source!r} is pre-tokenized; set data.tokenizer to the "
                         "tokenizer file (.model or tokenizer.json) that made it")
      order = np.random.default_rng(0).permutation(len(docs.items))
      tokenizer = train_tokenizer((docs.items[i] for i in order), wanted,
                                  max_chars=d.tokenizer_train_chars, path=path)
      if path:
        # Every host trains the same (deterministic) tokenizer and writes it whole (fs.py: a
        # per-host temporary file renamed, or one object upload), so hosts never collide.
        fs.makedirs(workdir)
        fs.write_bytes(path, tokenizer.model_proto)
  _check_vocab(tokenizer, vocab_size)
  return tokenizer


# ------------------------------------------------------------------------------------ pipeline


def _tokens_fn(docs: Documents, config, tokenizer: Tokenizer | None) -> Callable[[Any], dict]:
  """Document -> {"tokens": int32 [BOS] ids [EOS]}; checks pre-tokenized ids against the vocab."""
  d, vocab_size = config.data, config.model.vocab_size
  if tokenizer is None and not docs.pretokenized:
    raise ValueError(f"data.source={d.source!r} is text; pass a tokenizer (load_tokenizer)")
  bos = np.asarray([tokenizer.bos_id if tokenizer else BOS_ID] if d.add_bos else [], np.int32)
  eos = np.asarray([tokenizer.eos_id if tokenizer else EOS_ID] if d.add_eos else [], np.int32)
  for name, ids in (("bos", bos), ("eos", eos)):
    if ids.size and ids[0] < 0:
      raise ValueError(f"{tokenizer.path or 'the tokenizer'} has no {name.upper()} token; set "
                       f"data.add_{name}=false")

  def fn(doc) -> dict:
    if docs.pretokenized:
      ids = doc
      if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids.max() if ids.max() >= vocab_size else ids.min()
        raise ValueError(f"{d.source}: token id {bad} is outside [0, model.vocab_size="
                         f"{vocab_size}); re-tokenize or fix model.vocab_size")
    else:
      ids = np.asarray(tokenizer.encode(doc), np.int32)
    return {"tokens": np.concatenate([bos, ids.astype(np.int32), eos])}

  return fn


def _row_features(row: dict) -> Batch:
  """A packed row of seq_len + 1 tokens -> the five features of SEQ_LEN tokens (see module doc)."""
  tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
  weights = (seg[:-1] != 0) & (seg[1:] == seg[:-1])
  return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": seg[:-1],
          "positions": pos[:-1], "weights": weights.astype(np.float32)}


def _packed_rows(docs_ds, seq_len: int):
  """grain MapDataset of {"tokens"} -> IterDataset of packed rows (`_row_features`)."""
  import grain  # pylint: disable=g-import-not-at-top

  rows = docs_ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  rows = grain.experimental.ConcatThenSplitIterDataset(
      rows, length_struct={"tokens": seq_len + 1}, split_full_length_features=True)
  return rows.map(_row_features)


def _hosts(config, process_index, process_count) -> tuple[int, int, int]:
  """(process_index, process_count, per-host batch size)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index, process_count = jax.process_index(), jax.process_count()
  batch = config.train.batch_size
  if batch % process_count:
    raise ValueError(f"train.batch_size={batch} is not divisible by the {process_count} hosts; "
                     "make it a multiple")
  return process_index, process_count, batch // process_count


def _restore_tuples(state):
  """JSON turns grain's (start, stop) slices into lists; grain compares them to tuples."""
  if isinstance(state, dict):
    return {k: (({s: tuple(v) for s, v in val.items()} if k == "remainder_slices" else
                 _restore_tuples(val))) for k, val in state.items()}
  if isinstance(state, list):
    return [_restore_tuples(v) for v in state]
  return state


class TrainIterator:
  """Endless iterator of train batches (dicts of numpy [per_host_batch, seq_len]).

  `get_state()` returns a JSON-serialisable dict; `set_state(state)` (also from its JSON round
  trip) continues with exactly the batches that followed. With data.num_workers > 0 the order
  depends on num_workers, so resume with the same value. `stats` is the train `DataStats`.
  """

  def __init__(self, dataset, stats: DataStats):
    self._iterator = iter(dataset)
    self.stats = stats

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)

  def get_state(self) -> dict:
    return json.loads(json.dumps(self._iterator.get_state()))

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(_restore_tuples(state))

  def close(self) -> None:
    """Stops data worker processes (data.num_workers > 0)."""
    self._iterator.close()


def make_train_iterator(config, tokenizer: Tokenizer | None, *, seed: int | None = None,
                        process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
  """Shuffled, repeated, packed train batches of this host (seed: data.shuffle_seed if None).

  `tokenizer` may be None only for pre-tokenized (arrayrecord) and mqar sources.
  """
  if _mqar_spec(config):
    return _mqar_train_iterator(config, seed, process_index, process_count)
  import grain  # pylint: disable=g-import-not-at-top

  d = config.data
  process_index, process_count, batch = _hosts(config, process_index, process_count)
  docs = load_documents(config, "train")
  if len(docs.items) < process_count:
    raise ValueError(f"{len(docs.items)} train documents cannot feed {process_count} hosts; "
                     "add data")
  seed = d.shuffle_seed if seed is None else seed
  ds = grain.MapDataset.source(docs.items)[process_index::process_count]
  ds = ds.shuffle(seed=seed % 2**32).repeat().map(_tokens_fn(docs, config, tokenizer))
  ds = _packed_rows(ds, d.seq_len).batch(batch, drop_remainder=True)
  if d.num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app too
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return TrainIterator(ds, docs.stats)


def make_eval_batches(config, tokenizer: Tokenizer | None, *, max_batches: int | None = None,
                      process_index: int | None = None,
                      process_count: int | None = None) -> list[Batch]:
  """The validation split packed in sorted order: this host's part of each global batch.

  At most `max_batches` (None or 0: all) batches; every host gets the same count, the last
  batch padded with all-zero rows (weights 0).
  """
  if _mqar_spec(config):
    return _mqar_eval_batches(config, max_batches, process_index, process_count)
  import grain  # pylint: disable=g-import-not-at-top

  process_index, process_count, batch = _hosts(config, process_index, process_count)
  docs = load_documents(config, "valid")
  ds = grain.MapDataset.source(docs.items).map(_tokens_fn(docs, config, tokenizer))
  num_rows = max_batches * config.train.batch_size if max_batches else None
  rows = list(itertools.islice(_packed_rows(ds, config.data.seq_len), num_rows))
  if not rows:
    raise ValueError(f"data.source={config.data.source!r} has no validation documents; raise "
                     "data.valid_fraction")
  num_batches = -(-len(rows) // config.train.batch_size)
  zero = {k: np.zeros_like(v) for k, v in rows[0].items()}
  rows += [zero] * (num_batches * config.train.batch_size - len(rows))
  out = []
  for b in range(num_batches):
    start = b * config.train.batch_size + process_index * batch
    mine = rows[start:start + batch]
    out.append({k: np.stack([r[k] for r in mine]) for k in FEATURES})
  return out


# ------------------------------------------------------------------------ mqar (synthetic task)


def _mqar_spec(config):
  """The checked `mqar.MqarSpec` of an `mqar:` source, else None."""
  if config.data.source.partition(":")[0] != "mqar":
    return None
  from dense_ssm import mqar  # pylint: disable=g-import-not-at-top

  spec = mqar.parse_spec(config.data.source)
  mqar.check_spec(spec, config.data.seq_len, config.model.vocab_size, config.data.source)
  return spec


def _mqar_train_iterator(config, seed, process_index, process_count) -> TrainIterator:
  from dense_ssm import mqar  # pylint: disable=g-import-not-at-top

  process_index, process_count, _ = _hosts(config, process_index, process_count)
  d, batch = config.data, config.train.batch_size
  stream = d.shuffle_seed if seed is None else seed
  it = mqar.TrainStream(_mqar_spec(config), d.seq_len, batch, process_index, process_count,
                        stream=stream % 2**32)
  drawn = config.train.steps * (batch // process_count)  # fresh examples, never repeated
  return TrainIterator(it, DataStats(source=d.source, split="train", num_documents=drawn,
                                     num_chars=-1))


def _mqar_eval_batches(config, max_batches, process_index, process_count) -> list[Batch]:
  from dense_ssm import mqar  # pylint: disable=g-import-not-at-top

  process_index, process_count, _ = _hosts(config, process_index, process_count)
  return mqar.eval_batches(_mqar_spec(config), config.data.seq_len, config.train.batch_size,
                           process_index, process_count, max_batches)


__all__ = ["Batch", "DataStats", "Documents", "TrainIterator", "Tokenizer", "load_documents",
           "load_tokenizer", "make_train_iterator", "make_eval_batches", "write_arrayrecord"]
