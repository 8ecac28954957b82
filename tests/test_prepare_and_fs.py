"""The file layer (dense_ssm/fs.py) on a fake remote filesystem, lazy text/JSONL sources, and
`python -m dense_ssm.prepare`: corpus -> ArrayRecord shards -> the trainer's batches."""

import gzip
import json
import os
import pickle

import numpy as np
import pytest

from dense_ssm import config_lib, data, export, fs, prepare, train_log
from dense_ssm.tokenizer import train_tokenizer
from array_record.python import array_record_module

VOCAB = 300
TEXTS = [f"def function_{i}(x, y):\n    return x * {i} + y  # späť ✓ {i}\n" * (1 + i % 5)
         for i in range(60)]


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(TEXTS, VOCAB)


@pytest.fixture
def memory_fs(monkeypatch):
  """`memory://` URLs served through etils.epath by fsspec's in-memory filesystem, as gs:// is
  served by a remote one (epath has no public hook for a new scheme: its tables are patched)."""
  fsspec = pytest.importorskip("fsspec")
  from etils.epath import backend, gpath, register  # pylint: disable=g-import-not-at-top

  class MemoryBackend(backend._FileSystemSpecBackend):  # pylint: disable=protected-access
    def fs(self, path):
      return fsspec.filesystem("memory")

  monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("memory://",))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"memory"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "memory://", "/memory/")
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "memory", MemoryBackend())
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "memory://", gpath.PosixGPath)
  store = fsspec.filesystem("memory")
  store.store.clear()
  store.pseudo_dirs[:] = [""]
  yield "memory://bucket"
  store.store.clear()
  store.pseudo_dirs[:] = [""]


def make_config(source, **data_overrides):
  c = config_lib.base_config()
  c.model.vocab_size = VOCAB
  c.train.batch_size = 4
  c.data.source = source
  c.data.seq_len = 16
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


# ---------------------------------------------------------------------------------- fs layer


def test_fs_on_memory_remote(memory_fs, tmp_path):
  root = f"{memory_fs}/a"
  fs.makedirs(f"{root}/sub")
  fs.write_text(f"{root}/x.txt", "héllo")
  fs.write_bytes(f"{root}/sub/y.jsonl", b"{}\n")
  assert fs.is_remote(root) and not fs.is_remote(str(tmp_path))
  assert fs.exists(f"{root}/x.txt") and fs.isfile(f"{root}/x.txt") and fs.isdir(root)
  assert not fs.isfile(root) and not fs.exists(f"{root}/nope")
  assert fs.listdir(root) == ["sub", "x.txt"]
  assert fs.read_text(f"{root}/x.txt") == "héllo" and fs.getsize(f"{root}/x.txt") == 6
  assert fs.glob(f"{root}/*") == [f"{root}/x.txt"]  # files only
  assert fs.glob(f"{root}/*/*.jsonl") == [f"{root}/sub/y.jsonl"]
  with pytest.raises(ValueError, match=r"'\*\*' is not supported on remote"):
    fs.glob(f"{root}/**/*.jsonl")
  fs.rmtree(f"{root}/sub")
  assert fs.listdir(root) == ["x.txt"]
  with pytest.raises(FileNotFoundError):
    fs.read_bytes(f"{root}/missing")
  local = tmp_path / "f.bin"  # local writes go through a renamed temporary file
  fs.write_bytes(str(local), b"1")
  fs.write_bytes(str(local), b"22")
  assert local.read_bytes() == b"22" and os.listdir(tmp_path) == ["f.bin"]
  assert fs.glob(str(tmp_path / "**" / "*.bin")) == [str(local)]  # ** on local paths


def test_tokenizer_text_data_export_and_metrics_on_memory_remote(memory_fs, tok):
  """Every path a user gives may be a URL: data globs, the tokenizer (given, or trained and
  cached in the workdir), the export directory, metrics.jsonl."""
  for i, text in enumerate(TEXTS):
    fs.write_text(f"{memory_fs}/txt/doc{i:02d}.txt", text)
  fs.write_bytes(f"{memory_fs}/tok/tokenizer.model", tok.model_proto)
  c = make_config(f"text:{memory_fs}/txt/*.txt", tokenizer=f"{memory_fs}/tok/tokenizer.model")
  train, valid = data.load_documents(c, "train"), data.load_documents(c, "valid")
  assert sorted(list(train.items) + list(valid.items)) == sorted(TEXTS)
  assert train.stats.num_bytes + valid.stats.num_bytes == sum(len(t.encode()) for t in TEXTS)
  loaded = data.load_tokenizer(c)
  assert loaded.model_proto == tok.model_proto
  fs.write_text(f"{memory_fs}/j/part.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  jsonl = [data.load_documents(make_config(f"jsonl:{memory_fs}/j/*.jsonl"), s)
           for s in ("train", "valid")]
  assert sorted(list(jsonl[0].items) + list(jsonl[1].items)) == sorted(TEXTS)  # read lazily
  batch = next(data.make_train_iterator(c, loaded, seed=0, process_index=0, process_count=1))
  assert batch["inputs"].shape == (4, 16)

  c.data.tokenizer = ""  # trained, then cached in a remote workdir and reused
  trained = data.load_tokenizer(c, f"{memory_fs}/work")
  assert fs.read_bytes(f"{memory_fs}/work/tokenizer.model") == trained.model_proto

  from tests.helpers import tiny  # pylint: disable=g-import-not-at-top
  cfg = tiny("dense_retnet", vocab_size=VOCAB, num_layers=1)
  rng = np.random.default_rng(0)  # random params of the right shapes, without compiling
  params = export.unflatten_params({k: rng.normal(size=s).astype(np.float32)
                                    for k, s in export.expected_shapes(cfg).items()})
  pre = export.Pretrained(cfg=cfg, params=params, tokenizer=tok)
  out = f"{memory_fs}/export"
  assert export.save_pretrained(pre, out) == out
  assert fs.listdir(out) == ["config.json", "model.safetensors", "tokenizer.model"]
  with pytest.raises(FileExistsError, match="is not empty"):
    export.save_pretrained(pre, out)
  export.save_pretrained(pre, out, overwrite=True)
  back = export.load_any(out)
  assert back.tokenizer.model_proto == tok.model_proto
  flat, flat_back = export.flatten_params(params), export.flatten_params(back.params)
  assert flat.keys() == flat_back.keys()
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_back[k]), err_msg=k)

  writer = train_log.JsonlWriter(f"{memory_fs}/work/metrics.jsonl", rewrite_secs=3600)
  writer.write_scalars(1, {"loss": 2.5})
  writer.write_scalars(2, {"loss": 2.0})
  writer.close()  # an object store cannot append: the file is rewritten whole
  again = train_log.JsonlWriter(f"{memory_fs}/work/metrics.jsonl")
  again.write_scalars(3, {"loss": 1.5})
  again.close()
  rows = [json.loads(line) for line in fs.read_text(f"{memory_fs}/work/metrics.jsonl").split("\n")
          if line]
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == 1.5


# ------------------------------------------------------------------------------ lazy sources


def write_jsonl_corpus(path):
  """JSONL with blank lines, CRLF endings, invalid UTF-8 and a last line without a newline."""
  lines = []
  for i, text in enumerate(TEXTS):
    line = json.dumps({"text": text, "id": i}, ensure_ascii=i % 2 == 0).encode()
    lines.append(line.replace(b"return", b"r\xffturn") if i == 7 else line)
    lines.append(b"" if i % 3 else b"   ")
  body = b"\r\n".join(lines[:20]) + b"\n" + b"\n".join(lines[20:]).rstrip()
  path.write_bytes(body)
  return f"jsonl:{path}"


@pytest.mark.parametrize("chunk", [7, 1 << 22])  # index pass chunks cutting lines, or whole
def test_lazy_jsonl_yields_the_documents_read_into_memory(tmp_path, monkeypatch, chunk):
  monkeypatch.setattr(data, "_INDEX_CHUNK", chunk)
  source = write_jsonl_corpus(tmp_path / "docs.jsonl")
  seen = []
  for split in ("train", "valid"):
    lazy = data.load_documents(make_config(source, valid_fraction=0.2), split)
    eager = data.load_documents(make_config(source, valid_fraction=0.2, max_chars=10**9), split)
    assert isinstance(lazy.items, data._JsonlDocs)  # pylint: disable=protected-access
    assert list(lazy.items) == eager.items  # same documents, same order, same split
    assert lazy.stats.num_documents == eager.stats.num_documents > 0
    assert lazy.stats.num_chars == -1 and eager.stats.num_chars == sum(map(len, eager.items))
    again = pickle.loads(pickle.dumps(lazy.items))  # data worker processes get a copy
    assert again[len(again) - 1] == lazy.items[-1]
    seen += eager.items
  assert sorted(seen) == sorted(t.replace("return", "r\ufffdturn") if i == 7 else t
                                for i, t in enumerate(TEXTS))


def test_lazy_text_files(tmp_path):
  for i, text in enumerate(TEXTS[:10] + [" \n\t", ""]):
    (tmp_path / f"d{i:02d}.txt").write_text(text)
  source = f"text:{tmp_path}/*.txt"
  lazy = [data.load_documents(make_config(source), s) for s in ("train", "valid")]
  eager = [data.load_documents(make_config(source, max_chars=10**9), s) for s in ("train", "valid")]
  for a, b in zip(lazy, eager):
    assert list(a.items) == b.items and a.stats.empty_documents == b.stats.empty_documents == 2
  one = "".join(f"line {i}\n" for i in range(300))
  (tmp_path / "d00.txt").write_text(one)  # a single document is cut into pieces of lines
  for i in range(1, 10):
    (tmp_path / f"d{i:02d}.txt").unlink()
  docs = [data.load_documents(make_config(source), s).items for s in ("train", "valid")]
  assert docs[0] and docs[1]
  assert sorted("".join(docs[0] + docs[1]).splitlines()) == sorted(one.splitlines())


# ------------------------------------------------------------------------------------ prepare


def read_records(path):
  reader = array_record_module.ArrayRecordReader(path)
  records = [np.frombuffer(r, "<i4").tolist() for r in reader.read_all()]
  reader.close()
  return records


def test_prepare_shards_round_trip_and_feed_the_trainer(tmp_path, tok, capsys):
  tok_path = tmp_path / "tokenizer.model"
  tok_path.write_bytes(tok.model_proto)
  src = tmp_path / "src"
  src.mkdir()
  first, second = TEXTS[:30], TEXTS[30:]
  (src / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in first) +
                               json.dumps({"body": "  "}) + "\n")  # an empty document
  (src / "b.jsonl.gz").write_bytes(gzip.compress(
      "".join(json.dumps({"body": t}) + "\n" for t in second).encode()))
  out = tmp_path / "shards"
  argv = [f"--source=jsonl:{src}/*", f"--tokenizer={tok_path}", f"--out={out}", "--field=body",
          "--workers=2", "--shard_mb=0.002"]
  assert prepare.main(argv) == 0
  stdout = capsys.readouterr().out
  assert "wrote 60 documents" in stdout and "dropped 1 empty" in stdout

  manifest = json.loads((out / "manifest.json").read_text())
  shards = sorted(str(p) for p in out.glob("part-*.arrayrecord"))
  assert [os.path.basename(p) for p in shards] == [s["file"] for s in manifest["shards"]]
  assert len(shards) > 2  # a.jsonl is cut into byte ranges
  records = [r for p in shards for r in read_records(p)]
  assert records == [tok.encode(t) for t in TEXTS]  # input order, no BOS/EOS
  assert manifest["documents"] == 60 and manifest["empty_documents"] == 1
  assert manifest["tokens"] == sum(map(len, records))
  assert manifest["tokenizer"]["vocab_size"] == VOCAB
  import hashlib  # pylint: disable=g-import-not-at-top
  assert manifest["tokenizer"]["sha256"] == hashlib.sha256(tok.model_proto).hexdigest()
  assert (out / "tokenizer.model").read_bytes() == tok.model_proto

  # The same shards with one worker (and so any number of workers).
  again = tmp_path / "again"
  assert prepare.main(argv[:2] + [f"--out={again}"] + argv[3:5] + ["--shard_mb=0.002"]) == 0
  assert [read_records(str(again / os.path.basename(p))) for p in shards] == \
      [read_records(p) for p in shards]

  c = make_config(manifest["train_source"], tokenizer=str(out / "tokenizer.model"),
                  valid_fraction=0.2)
  loaded = data.load_tokenizer(c)
  batch = next(data.make_train_iterator(c, loaded, seed=0, process_index=0, process_count=1))
  assert batch["inputs"].shape == (4, 16) and batch["inputs"][0, 0] == tok.bos_id
  valid = data.make_eval_batches(c, loaded, process_index=0, process_count=1)
  assert valid and valid[0]["inputs"].shape == (4, 16)
  split = [data.load_documents(c, s).items for s in ("train", "valid")]
  assert sorted(list(map(list, split[0])) + list(map(list, split[1]))) == sorted(records)

  # Bad input: one line, exit status 1.
  with pytest.raises(SystemExit) as e:
    prepare.main(argv)  # --out is not empty
  assert e.value.code == 1 and "pass --overwrite" in capsys.readouterr().err
  (src / "c.jsonl").write_text('{"body": "fine"}\n{broken\n')
  with pytest.raises(SystemExit):
    prepare.main([f"--source=jsonl:{src}/c.jsonl"] + argv[1:2] + [f"--out={tmp_path / 'c'}",
                                                                   "--field=body", "--workers=1"])
  err = capsys.readouterr().err.strip()
  assert err.startswith("dense_ssm.prepare: error: ") and "c.jsonl (line at byte 17): invalid " \
      "JSON" in err and "\n" not in err
  for bad, match in ((f"--source=csv:{src}/*", "is unknown"),
                     (f"--source=text:{tmp_path}/none/*", "matches no files")):
    with pytest.raises(SystemExit):
      prepare.main([bad] + argv[1:2] + [f"--out={tmp_path / 'x'}"])
    assert match in capsys.readouterr().err


def test_prepare_text_zst_and_remote_out(tmp_path, tok, memory_fs):
  tok_path = tmp_path / "tokenizer.model"
  tok_path.write_bytes(tok.model_proto)
  for i, text in enumerate(TEXTS[:5]):
    (tmp_path / f"t{i}.txt").write_text(text)
  m = prepare.prepare(f"text:{tmp_path}/t*.txt", str(tok_path), f"{memory_fs}/shards", workers=1)
  assert m["documents"] == 5 and fs.listdir(f"{memory_fs}/shards") == [
      "manifest.json", "part-00000.arrayrecord", "tokenizer.model"]
  local = tmp_path / "copy.arrayrecord"
  local.write_bytes(fs.read_bytes(f"{memory_fs}/shards/part-00000.arrayrecord"))
  assert read_records(str(local)) == [tok.encode(t) for t in TEXTS[:5]]

  zstandard = pytest.importorskip("zstandard")
  frames = b"".join(zstandard.ZstdCompressor().compress(
      (json.dumps({"text": t}) + "\n").encode()) for t in TEXTS[:4])  # one frame per line
  (tmp_path / "z.jsonl.zst").write_bytes(frames)
  m = prepare.prepare(f"jsonl:{tmp_path}/z.jsonl.zst", str(tok_path), str(tmp_path / "z"))
  assert read_records(str(tmp_path / "z" / "part-00000.arrayrecord")) == \
      [tok.encode(t) for t in TEXTS[:4]]


def test_prepare_parquet_and_saved_hf_dataset(tmp_path, tok):
  pq = pytest.importorskip("pyarrow.parquet")
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  tok_path = tmp_path / "tokenizer.model"
  tok_path.write_bytes(tok.model_proto)
  want = [tok.encode(t) for t in TEXTS[:12]]
  pq.write_table(pa.table({"content": TEXTS[:12]}), tmp_path / "a.parquet", row_group_size=5)
  m = prepare.prepare(f"parquet:{tmp_path}/*.parquet", str(tok_path), str(tmp_path / "pq"),
                      field="content", shard_mb=1e-6)  # one shard per row group
  assert len(m["shards"]) == 3
  assert [r for s in m["shards"] for r in read_records(str(tmp_path / "pq" / s["file"]))] == want
  with pytest.raises(ValueError, match="has no column 'text'"):
    prepare.prepare(f"parquet:{tmp_path}/*.parquet", str(tok_path), str(tmp_path / "pq2"))

  datasets = pytest.importorskip("datasets")
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:12]})}).save_to_disk(
      str(tmp_path / "hf"))
  m = prepare.prepare(f"hf:{tmp_path}/hf", str(tok_path), str(tmp_path / "hfout"))
  assert read_records(str(tmp_path / "hfout" / "part-00000.arrayrecord")) == want
  with pytest.raises(ValueError, match="has splits \\['train'\\], not 'test'"):
    prepare.prepare(f"hf:{tmp_path}/hf", str(tok_path), str(tmp_path / "hf2"), split="test")
