"""Tests of dense_ssm/data.py and dense_ssm/tokenizer.py on tiny temporary corpora."""

import hashlib
import json
import os
import sys

import numpy as np
import pytest

from dense_ssm import config_lib, data, tokenizer as tokenizer_lib

SEQ_LEN = 16
VOCAB = 300  # for trained tokenizers; pre-tokenized tests use ids < 1000


def make_config(source, *, vocab_size=VOCAB, batch_size=4, seq_len=SEQ_LEN, **data_overrides):
  c = config_lib.base_config()
  c.model.vocab_size = vocab_size
  c.train.batch_size = batch_size
  c.data.source = source
  c.data.seq_len = seq_len
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


def synthetic_docs(num_docs=40, seed=0):
  """Document k holds ids 10 + 20k, 11 + 20k, ...: every id names its document and index."""
  lengths = np.random.default_rng(seed).integers(1, 20, size=num_docs)
  return [list(range(10 + 20 * k, 10 + 20 * k + n)) for k, n in enumerate(lengths)]


@pytest.fixture
def record_source(tmp_path):
  docs = synthetic_docs()
  data.write_arrayrecord(str(tmp_path / "part-0.arrayrecord"), docs[:25])
  data.write_arrayrecord(str(tmp_path / "part-1.arrayrecord"), docs[25:])
  return f"arrayrecord:{tmp_path}/part-*.arrayrecord", docs


def reference_pack(docs, seq_len, add_bos=True):
  """Independent packing: rows of seq_len + 1 (token, segment, position), zero padded."""
  rows, row = [], []
  for doc in docs:
    tokens = ([tokenizer_lib.BOS_ID] if add_bos else []) + list(doc)
    while tokens:
      piece, tokens = tokens[:seq_len + 1 - len(row)], tokens[seq_len + 1 - len(row):]
      seg = row[-1][1] + 1 if row else 1
      row += [(t, seg, p) for p, t in enumerate(piece)]
      if len(row) == seq_len + 1:
        rows.append(row)
        row = []
  if row:
    rows.append(row + [(0, 0, 0)] * (seq_len + 1 - len(row)))
  out = []
  for row in rows:
    tok, seg, pos = (np.array(x, np.int32) for x in zip(*row))
    out.append({"inputs": tok[:-1], "targets": tok[1:], "segment_ids": seg[:-1],
                "positions": pos[:-1],
                "weights": ((seg[:-1] != 0) & (seg[1:] == seg[:-1])).astype(np.float32)})
  return out


def unbatch(batches):
  return [{k: b[k][i] for k in b} for b in batches for i in range(len(b["inputs"]))]


def stream_documents(rows, keep_last=False):
  """The documents of a stream of full train rows, in order (split at BOS)."""
  stream = np.concatenate([np.append(r["inputs"], r["targets"][-1]) for r in rows]).tolist()
  docs, cur = [], None
  for t in stream:
    if t == tokenizer_lib.BOS_ID:
      if cur is not None:
        docs.append(cur)
      cur = []
    else:
      cur.append(t)
  return docs + [cur] if keep_last else docs  # the last one may be cut


def assert_rows_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    for k in data.FEATURES:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_eval_packing_matches_reference(record_source):
  source, docs = record_source
  c = make_config(source, vocab_size=1000, valid_fraction=1.0)
  batches = data.make_eval_batches(c, None, process_index=0, process_count=1)
  for b in batches:
    assert set(b) == set(data.FEATURES)
    assert all(b[k].shape == (4, SEQ_LEN) for k in b)
    assert b["weights"].dtype == np.float32 and b["inputs"].dtype == np.int32
  want = reference_pack(docs, SEQ_LEN)
  want += [{k: np.zeros_like(v) for k, v in want[0].items()}] * (-len(want) % 4)  # zero rows
  assert want[-1]["segment_ids"][-1] == 0  # the corpus ends with padding
  assert_rows_equal(unbatch(batches), want)


def test_train_packing_no_cross_document_targets(record_source):
  source, docs = record_source
  c = make_config(source, vocab_size=1000, valid_fraction=0.0)
  it = data.make_train_iterator(c, None, seed=3, process_index=0, process_count=1)
  rows = unbatch([next(it) for _ in range(30)])
  order = stream_documents(rows)
  assert sorted(map(tuple, order[:len(docs)])) == sorted(map(tuple, docs))  # one epoch
  assert order[:len(docs)] != docs  # shuffled
  assert_rows_equal(rows, reference_pack(stream_documents(rows, keep_last=True), SEQ_LEN))
  for r in rows:  # a weighted target is always the next id of the same document
    w = r["weights"] > 0
    assert np.all(r["segment_ids"] > 0)  # train rows never pad
    same_doc = (r["targets"] - 10) // 20 == (r["inputs"] - 10) // 20
    first = r["inputs"] == tokenizer_lib.BOS_ID
    assert np.all(same_doc[w & ~first]) and np.all((r["targets"] - 10)[w & first] % 20 == 0)
    assert np.all(r["weights"][:-1][r["segment_ids"][1:] != r["segment_ids"][:-1]] == 0)


def test_determinism_and_exact_resume(record_source):
  source, _ = record_source
  c = make_config(source, vocab_size=1000, valid_fraction=0.0, seq_len=8)
  make = lambda seed: data.make_train_iterator(c, None, seed=seed, process_index=0, process_count=1)
  a, b, other = make(1), make(1), make(2)
  first = [next(a) for _ in range(5)]
  for x, y in zip(first, [next(b) for _ in range(5)]):
    assert_rows_equal(unbatch([x]), unbatch([y]))
  assert not all(np.array_equal(x["inputs"], next(other)["inputs"]) for x in first)

  it = make(1)
  saw_empty_remainder = False
  for _ in range(25):
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    saw_empty_remainder |= state["remainder_slices"]["tokens"] == [-1, -1]
    want = [next(it) for _ in range(3)]
    resumed = make(1)
    resumed.set_state(state)
    assert_rows_equal(unbatch([next(resumed) for _ in range(3)]), unbatch(want))
    for _ in range(2):
      next(it)
  assert saw_empty_remainder


def test_hosts_get_disjoint_documents(record_source):
  source, docs = record_source
  c = make_config(source, vocab_size=1000, valid_fraction=0.0, batch_size=4)
  seen = []
  for host in range(2):
    it = data.make_train_iterator(c, None, seed=0, process_index=host, process_count=2)
    batch = next(it)
    assert batch["inputs"].shape == (2, SEQ_LEN)
    rows = unbatch([batch] + [next(it) for _ in range(40)])
    seen.append({tuple(d) for d in stream_documents(rows)})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {tuple(d) for d in docs}
  with pytest.raises(ValueError, match="not divisible"):
    data.make_train_iterator(make_config(source, batch_size=3), None, process_index=0,
                             process_count=2)


def test_eval_batches_same_count_on_every_host(record_source):
  source, _ = record_source
  c = make_config(source, vocab_size=1000, valid_fraction=0.5)
  per_host = [data.make_eval_batches(c, None, process_index=i, process_count=2) for i in range(2)]
  full = data.make_eval_batches(c, None, process_index=0, process_count=1)
  assert len(per_host[0]) == len(per_host[1]) == len(full)
  for b0, b1, f in zip(*per_host, full):
    np.testing.assert_array_equal(np.concatenate([b0["inputs"], b1["inputs"]]), f["inputs"])
  assert len(data.make_eval_batches(c, None, max_batches=1, process_index=0,
                                    process_count=1)) == 1


def write_text_files(root, texts):
  root.mkdir(parents=True, exist_ok=True)
  for i, text in enumerate(texts):
    (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
  return f"text:{root}/*.txt"


CORPUS = [f"def function_{i}(x, y):\n    return x * {i} + y  # späť ✓ {i}\n" * (1 + i % 5)
          for i in range(30)]


def test_tokenizer_train_cache_reload(tmp_path, monkeypatch):
  c = make_config(write_text_files(tmp_path / "txt", CORPUS))
  tok = data.load_tokenizer(c, str(tmp_path / "work"))
  assert os.path.exists(tmp_path / "work" / "tokenizer.model")
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (VOCAB, 1, 2, 0)
  text = "  indented\n\ttabs → 中文 🙂\n\n"
  assert tok.decode(tok.encode(text)) == text  # byte fallback: any text round-trips
  monkeypatch.setattr(data, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
  again = data.load_tokenizer(c, str(tmp_path / "work"))
  assert again.model_proto == tok.model_proto and again.encode(text) == tok.encode(text)
  c.data.tokenizer = str(tmp_path / "work" / "tokenizer.model")
  assert data.load_tokenizer(c).encode(text) == tok.encode(text)
  c.model.vocab_size = 512
  with pytest.raises(ValueError, match="has 300 pieces but model.vocab_size=512"):
    data.load_tokenizer(c)
  c.data.tokenizer, c.data.tokenizer_vocab_size = "", 256
  with pytest.raises(ValueError, match="tokenizer_vocab_size=256 != model.vocab_size=512"):
    data.load_tokenizer(c, str(tmp_path / "work"))


def test_text_and_jsonl_sources(tmp_path):
  text_source = write_text_files(tmp_path / "txt", CORPUS)
  tok = data.load_tokenizer(make_config(text_source), None)
  jsonl = tmp_path / "docs.jsonl"
  jsonl.write_text("".join(json.dumps({"body": t, "id": i}) + "\n\n" for i, t in enumerate(CORPUS)))
  for c in (make_config(text_source), make_config(f"jsonl:{jsonl}", jsonl_field="body")):
    train, valid = data.load_documents(c, "train"), data.load_documents(c, "valid")
    assert train.stats.num_documents + valid.stats.num_documents == len(CORPUS)
    assert valid.stats.num_documents >= 1 and set(train.items).isdisjoint(valid.items)
    assert sorted(list(train.items) + list(valid.items)) == sorted(CORPUS)  # lazy sequences
    batch = next(data.make_train_iterator(c, tok, seed=0, process_index=0, process_count=1))
    assert batch["inputs"].shape == (4, SEQ_LEN)
    piece = tok.decode(batch["inputs"][0][batch["segment_ids"][0] == 2][1:])
    assert any(piece in t for t in CORPUS)
    assert data.make_eval_batches(c, tok, process_index=0, process_count=1)


def test_stdlib_source_with_max_chars():
  c = make_config("stdlib", max_chars=300_000, valid_fraction=0.1)
  train, valid = data.load_documents(c, "train"), data.load_documents(c, "valid")
  total = train.stats.num_chars + valid.stats.num_chars
  assert 250_000 < total <= 300_000 and valid.stats.num_documents >= 1
  assert set(train.items).isdisjoint(valid.items)
  assert any("import" in t for t in train.items)


def write_py_tree(root, files):
  """files: {relative path: text}; returns the root as a str."""
  for rel, text in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text, encoding="utf-8")
  return str(root)


def content_u(text):
  return int(hashlib.sha256(text.encode()).hexdigest()[-13:], 16) / 2**52


def test_pysrc_dedupes_by_content_and_counts(tmp_path, monkeypatch):
  files = {f"pkg/mod{i}.py": t for i, t in enumerate(CORPUS)}
  files.update({"other/copy_of_3.py": CORPUS[3], "pkg/sub/again_7.py": CORPUS[7],
                "pkg/__init__.py": "", "other/__init__.py": " \n",
                "pkg/__pycache__/cached.py": "cached = 1\n", "pkg/notes.txt": "not python\n"})
  root = write_py_tree(tmp_path / "lib", files)
  monkeypatch.setattr(data, "_pysrc_roots", lambda: (root,))
  c = make_config("pysrc", valid_fraction=0.2)
  train, valid = data.load_documents(c, "train"), data.load_documents(c, "valid")
  assert train.stats.num_documents + valid.stats.num_documents == len(CORPUS)
  assert sorted(list(train.items) + list(valid.items)) == sorted(CORPUS)
  assert train.stats.empty_documents == 2  # the two blank __init__.py
  assert train.stats.num_bytes + valid.stats.num_bytes == sum(len(t.encode()) for t in CORPUS)
  assert train.stats.num_bytes == sum(len(t.encode()) for t in train.items)
  for docs in (train, valid):  # documents in content-hash order
    digests = [hashlib.sha256(t.encode()).hexdigest() for t in docs.items]
    assert digests == sorted(digests)
  assert valid.stats.num_documents >= 1
  assert all(content_u(t) < 0.2 for t in valid.items)
  assert all(content_u(t) >= 0.2 for t in train.items)
  tok = data.load_tokenizer(c, None)
  batch = next(data.make_train_iterator(c, tok, seed=0, process_index=0, process_count=1))
  assert batch["inputs"].shape == (4, SEQ_LEN)


def test_pysrc_split_is_stable_across_layouts_and_respects_max_chars(tmp_path, monkeypatch):
  """The same contents under other paths and names give the same splits, in the same order."""
  a = write_py_tree(tmp_path / "a", {f"m{i}.py": t for i, t in enumerate(CORPUS)})
  b = write_py_tree(tmp_path / "b", {f"x/{len(CORPUS) - i}/z.py": t for i, t in enumerate(CORPUS)})
  c = make_config("pysrc", valid_fraction=0.2)
  splits = []
  for root in (a, b):
    monkeypatch.setattr(data, "_pysrc_roots", lambda root=root: (root,))
    splits.append([list(data.load_documents(c, s).items) for s in ("train", "valid")])
  assert splits[0] == splits[1]
  monkeypatch.setattr(data, "_pysrc_roots", lambda: (a,))
  c.data.max_chars = 500
  train, valid = data.load_documents(c, "train"), data.load_documents(c, "valid")
  assert train.stats.num_chars + valid.stats.num_chars == 500
  by_hash = sorted(CORPUS, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
  got = list(train.items) + list(valid.items)
  k = len(got)
  assert set(by_hash[:k - 1]) < set(got)  # the first documents in hash order, whole...
  (cut,) = set(got) - set(by_hash[:k - 1])
  assert by_hash[k - 1].startswith(cut)  # ...and the next one cut at the budget


def test_tfds_source():
  tfds = pytest.importorskip("tensorflow_datasets")
  c = make_config("tfds:lm1b")
  with tfds.testing.mock_data(num_examples=6):
    train = data.load_documents(c, "train")
    assert len(train.items) == 6 and isinstance(train.items[3], str)
    c.data.max_chars = 10
    assert sum(map(len, data.load_documents(c, "valid").items)) <= 10


def test_tfds_source_without_tensorflow_datasets_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
  with pytest.raises(ValueError, match=r'needs tensorflow-datasets.*pip install -e "\.\[tfds\]"'):
    data.load_documents(make_config("tfds:lm1b"))


def test_non_utf8_is_counted_not_fatal(tmp_path):
  root = tmp_path / "txt"
  source = write_text_files(root, CORPUS[:3])
  (root / "bad.txt").write_bytes(b"caf\xe9 and \xff\xfe bytes, plus a real \xef\xbf\xbd\n")
  (root / "empty.txt").write_text(" \n")
  lazy = data.load_documents(make_config(source, valid_fraction=0.0), "train")
  assert (lazy.stats.num_documents, lazy.stats.empty_documents) == (4, 1)
  assert any("caf\ufffd and \ufffd\ufffd bytes" in t for t in lazy.items)
  # Read into memory (max_chars set), the replacements are counted: \xe9, \xff and \xfe are
  # replaced; the real U+FFFD is not counted.
  docs = data.load_documents(make_config(source, valid_fraction=0.0, max_chars=10**6), "train")
  assert (docs.stats.num_documents, docs.stats.empty_documents) == (4, 1)
  assert (docs.stats.replaced_files, docs.stats.replaced_chars) == (1, 3)
  assert sorted(docs.items) == sorted(lazy.items)


@pytest.mark.parametrize("source, error, match", [
    ("text:/no/such/dir/*.txt", FileNotFoundError, "matches no files"),
    ("text:/no/such/file.txt", FileNotFoundError, "matches no files"),
    ("parquet:/x/*.parquet", ValueError, "is unknown"),
    ("text:", ValueError, "is unknown"),
    ("tfds:no_such_dataset_xyz", ValueError, "tfds"),
])
def test_bad_sources(source, error, match):
  with pytest.raises(error, match=match):
    data.load_documents(make_config(source))


def test_bad_inputs(tmp_path, record_source):
  empty = write_text_files(tmp_path / "empty", ["", "  \n", ""])
  with pytest.raises(ValueError, match="no non-empty documents"):
    data.load_documents(make_config(empty))
  bad_json = tmp_path / "bad.jsonl"
  bad_json.write_text('{"text": "fine"}\n{not json\n')
  with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):  # read into memory
    data.load_documents(make_config(f"jsonl:{bad_json}", max_chars=1000))
  lazy = data.load_documents(make_config(f"jsonl:{bad_json}", valid_fraction=0.0))
  with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):  # lazy: when read
    list(lazy.items)
  for max_chars in (0, 1000):  # a file's first record is checked when the source is opened
    with pytest.raises(ValueError, match="no string field 'body'"):
      data.load_documents(make_config(f"jsonl:{bad_json}", jsonl_field="body",
                                      max_chars=max_chars))
  source, _ = record_source
  it = data.make_train_iterator(make_config(source, vocab_size=100), None, process_index=0,
                                process_count=1)
  with pytest.raises(ValueError, match=r"outside \[0, model.vocab_size=100\)"):
    next(it)
  with pytest.raises(ValueError, match="pre-tokenized; set data.tokenizer"):
    data.load_tokenizer(make_config(source))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_tokenizer(make_config(source, tokenizer=str(tmp_path / "missing.model")))
  tiny = write_text_files(tmp_path / "tiny", ["ab ab ab\n"])
  with pytest.raises(ValueError, match="supports at most .* pieces but vocab_size=300"):
    data.load_tokenizer(make_config(tiny))


def test_worker_processes_resume_exactly(tmp_path):
  c = make_config(write_text_files(tmp_path / "txt", CORPUS), num_workers=2)
  tok = data.load_tokenizer(c, None)
  make = lambda: data.make_train_iterator(c, tok, seed=0, process_index=0, process_count=1)
  it, resumed = make(), make()
  for _ in range(3):
    next(it)
  resumed.set_state(json.loads(json.dumps(it.get_state())))
  want = unbatch([next(it) for _ in range(4)])
  assert_rows_equal(unbatch([next(resumed) for _ in range(4)]), want)
  it.close()
  resumed.close()
