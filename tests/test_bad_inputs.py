"""Bad input ends in one line `dense_ssm.<cli>: error: ...` (exit 1) naming the file or key and
the fix, never in a traceback or a silently wrong result; streamed generation is linear in the
tokens and prints exactly the non-streamed text."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from dense_ssm import cli, data, export, train
from dense_ssm import generate as gen
from dense_ssm.models.config import ModelConfig
from dense_ssm import tokenizer as tokenizer_lib
from dense_ssm.tokenizer import Tokenizer, train_tokenizer
from tests import train_testlib
from tests.helpers import init, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320  # room for SentencePiece's 256 byte pieces
TEXT = [("def f(x):\n    return x + 1\n\nclass Ä:\n    pass  # ünïcode ✓ 日本\n" * 3 +
         f"# note {i}\n") * 4 for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
  return train_tokenizer(TEXT, VOCAB)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
  """An export directory of a random tiny DenseRetNet with a tokenizer."""
  cfg = tiny("dense_retnet", vocab_size=VOCAB, num_layers=2, init_std=0.3)
  _, params = init(cfg)
  out = str(tmp_path_factory.mktemp("bad") / "export")
  export.save_pretrained(export.Pretrained(cfg, params, tokenizer), out)
  return out


def _one_line_error(capsys, prog, match, fn, *args):
  with pytest.raises(SystemExit) as e:
    fn(*args)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 1, err
  assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
  assert match in err, err
  return err


def _copy_export(src, dst, edit=None):
  os.makedirs(dst)
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
      g.write(f.read())
  if edit:
    path = os.path.join(dst, export.CONFIG_FILE)
    with open(path) as f:
      meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
      json.dump(meta, f)
  return dst


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("changes, match", [
    ({"vocab_size": 0}, "model.vocab_size=0 must be >= 1"),
    ({"num_layers": -1}, "model.num_layers=-1"),
    ({"hidden_size": None}, "model.hidden_size=None must be an integer"),
    ({"num_heads": 2.5}, "model.num_heads=2.5 must be an integer"),
    ({"dropout": math.nan}, "model.dropout=nan"),
    ({"dtype": "float33"}, "model.dtype='float33' is not a float dtype"),
    ({"remat": "yes"}, "model.remat='yes' must be true or false"),
    ({"dense": {"layers": None}}, "dense.layers=None must be an integer"),
    ({"family": "transformer", "hidden_size": 30, "num_heads": 4}, "not divisible"),
])
def test_model_config_refuses_nonsense(changes, match):
  with pytest.raises(ValueError, match=re.escape(match)):
    ModelConfig.from_dict(changes)


def test_train_config_refuses_bad_seq_len():
  for seq_len in (0, -8):
    with pytest.raises(ValueError, match=r"config\.data\.seq_len=.* must be positive"):
      train.validate_config(train_testlib.tiny_config(data__seq_len=seq_len))


def test_summary_errors_are_one_line():
  cases = [(["--config=configs/nope.py"], "no such file"),
           (["--config=configs/default.py", "--config.model.vocab_size=0"], "model.vocab_size=0"),
           (["--config=configs/retnet_1b3.py:bogus"], "variant 'bogus' is unknown"),
           (["--config=configs/default.py", "--config.model.bogus=1"], "unknown config key")]
  for args, match in cases:
    r = subprocess.run([sys.executable, "-m", "dense_ssm.summary", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    err = [l for l in r.stderr.splitlines() if l.startswith("dense_ssm.summary")]
    assert r.returncode == 1 and len(err) == 1 and match in err[0], (args, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------------------ data


def test_binary_training_text_is_a_one_line_error(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / "blob.bin").write_bytes(rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes())
  config = train_testlib.tiny_config(data__source=f"text:{tmp_path}/blob.bin",
                                     data__valid_fraction=0.0)
  with pytest.raises(ValueError, match="distinct characters.*binary.*UTF-8 text"):
    data.load_tokenizer(config, str(tmp_path / "w"))


def test_tokenizer_file_that_is_not_sentencepiece(tmp_path):
  junk = tmp_path / "tokenizer.model"
  junk.write_text("not a model\n")
  with pytest.raises(ValueError, match="is not a SentencePiece model"):
    Tokenizer.from_file(str(junk))
  with pytest.raises(ValueError, match="is a directory"):
    Tokenizer.from_file(str(tmp_path))


def test_single_file_text_source_has_both_splits(tmp_path):
  path = tmp_path / "book.txt"
  path.write_text("".join(f"line {i} of the only document\n" for i in range(2000)))
  for max_chars in (0, 400_000):  # read lazily / into memory
    config = train_testlib.tiny_config(data__source=f"text:{path}", data__max_chars=max_chars)
    train_docs = list(data.load_documents(config, "train").items)
    valid_docs = list(data.load_documents(config, "valid").items)
    assert train_docs and valid_docs
    assert sorted(train_docs + valid_docs) == sorted(data._cut_document(path.read_text(), 100))
  assert "".join(data._cut_document(path.read_text(), 100)) == path.read_text()


# ------------------------------------------------------------------------------ exports


def test_edited_architecture_in_export_is_refused(exported, tmp_path):
  assert export.load_pretrained(exported).cfg.dense.layers == 2

  def fewer_dense_layers(meta):
    meta["model"]["dense"]["layers"] = 1

  out = _copy_export(exported, str(tmp_path / "edited"), fewer_dense_layers)
  with pytest.raises(ValueError, match=r"model\.dense\.layers is 1 but the weights were trained "
                                       r"with 2"):
    export.load_pretrained(out)


@pytest.mark.parametrize("key, value, match", [
    ("hidden_size", None, "hidden_size=None must be an integer"),
    ("num_layers", "2", "num_layers='2' must be an integer"),
    ("eos_id", None, "eos_id=None must be an integer"),
    ("bos_id", 1.5, "bos_id=1.5 must be an integer"),
])
def test_bad_fields_in_export_config(exported, tmp_path, key, value, match):
  def edit(meta):
    (meta if key.endswith("_id") else meta["model"])[key] = value

  out = _copy_export(exported, str(tmp_path / "e"), edit)
  with pytest.raises(ValueError, match=match) as e:
    export.load_pretrained(out)
  assert export.CONFIG_FILE in str(e.value)


def test_truncated_safetensors_is_one_line(exported, tmp_path, capsys):
  out = _copy_export(exported, str(tmp_path / "cut"))
  path = os.path.join(out, export.PARAMS_FILE)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  _one_line_error(capsys, "dense_ssm.generate", "damaged or truncated", gen.main,
                  [f"--model={out}", "--prompt=x"])


def test_generate_bad_flags_are_one_line(exported, tmp_path, capsys):
  model = f"--model={exported}"
  for flags, match in [(["--temperature=nan"], "temperature=nan"),
                       (["--temperature=inf"], "temperature=inf"),
                       (["--top_p=nan"], "top_p=nan"),
                       (["--top_p=0"], "top_p=0.0"),
                       (["--dtype=float33"], "--dtype='float33' is not a float dtype")]:
    _one_line_error(capsys, "dense_ssm.generate", match, gen.main, [model, "--prompt=x", *flags])
  _one_line_error(capsys, "dense_ssm.generate", "is a directory", gen.main,
                  [model, f"--prompt_file={tmp_path}"])
  (tmp_path / "p.txt").write_bytes(b"\xff\xfe bad\n")
  _one_line_error(capsys, "dense_ssm.generate", "not UTF-8", gen.main,
                  [model, f"--prompt_file={tmp_path / 'p.txt'}"])


def test_user_errors_turn_ctrl_c_into_one_line(capsys):
  try:
    with pytest.raises(SystemExit) as e:
      with cli.user_errors("dense_ssm.x"):
        raise KeyboardInterrupt
  except KeyboardInterrupt:  # would end the whole pytest session
    pytest.fail("KeyboardInterrupt escaped cli.user_errors")
  assert e.value.code == 130 and capsys.readouterr().err.strip() == "dense_ssm.x: interrupted"


# ------------------------------------------------------------------------------ training


def test_sigint_requests_a_save_like_sigterm():
  before = signal.getsignal(signal.SIGINT)
  preempt = train._Preemption()
  try:
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the loop saves and exits 0
    assert preempt.reached(5) and preempt.signal_name == "SIGINT"
  except KeyboardInterrupt:  # would end the whole pytest session
    pytest.fail("SIGINT raised KeyboardInterrupt instead of requesting a save")
  finally:
    preempt.close()
  assert signal.getsignal(signal.SIGINT) is before


def test_resume_with_another_param_dtype_names_it(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "w")
  first = train.Trainer(train_testlib.tiny_config(), workdir)
  try:
    first.ckpt.save(1, first.fns.init(jax.random.key(0)), {}, {}, force=True)
    first.ckpt.wait()
  finally:
    first.close()
  with pytest.raises(ValueError, match=r"holds float32 params but config\.model\.param_dtype "
                                       r"asks for bfloat16; resume with "
                                       r"--config\.model\.param_dtype=float32"):
    train.Trainer(train_testlib.tiny_config(model__param_dtype="bfloat16"), workdir)


def test_compile_only_out_of_memory_is_one_line():
  pytest.importorskip("libtpu")
  from dense_ssm import compile as compile_lib  # pylint: disable=g-import-not-at-top

  config = train_testlib.tiny_config(model__vocab_size=32000, model__num_layers=1,
                                     train__batch_size=128, data__seq_len=8192)
  with pytest.raises(ValueError) as e:
    compile_lib.compile_for_topology(config, "v5e:2x2", verbose=False)
  msg = str(e.value)
  assert "\n" not in msg and "does not fit v5e:2x2" in msg, msg
  assert "HBM" in msg and "remat=true" in msg and "grad_accum" in msg and "topology" in msg, msg


# ------------------------------------------------------------------------------ streaming


class _CountingTokenizer:
  """A tokenizer that counts the ids it decodes."""

  def __init__(self, tokenizer):
    self._tok, self.decoded = tokenizer, 0

  def __getattr__(self, name):
    return getattr(self._tok, name)

  def decode(self, ids):
    self.decoded += len(ids)
    return self._tok.decode(ids)


def _stream(tokenizer, ids, block, eos_id=-1):
  out = []
  stream = gen._TextStream(tokenizer, eos_id, lambda deltas: out.append(deltas[0]))
  rows = [[]]
  for i in range(0, len(ids), block):
    rows[0].extend(ids[i:i + block])
    stream(rows)
  stream.finish(rows)
  return "".join(out)


def test_streaming_decodes_linearly_and_exactly(tokenizer):
  rng = random.Random(0)
  ids = [rng.randrange(VOCAB) for _ in range(4000)]
  counts = []
  for n in (2000, 4000):
    counting = _CountingTokenizer(tokenizer)
    assert _stream(counting, ids[:n], 8) == tokenizer.decode(ids[:n])
    counts.append(counting.decoded)
  assert counts[1] < 2.3 * counts[0], counts  # the old stream re-decoded everything: ~4x
  assert counts[1] < 40 * 4000, counts
  # Text, byte pieces and control ids in any mix and any block size.
  for trial in range(200):
    pool = [rng.randrange(VOCAB) for _ in range(8)] + [0, 1, 2] + tokenizer.encode("é ✓ 日")
    ids = [rng.choice(pool) if trial % 2 else rng.randrange(VOCAB)
           for _ in range(rng.randrange(300))]
    eos = rng.choice([-1, 2])
    want = tokenizer.decode(ids[:ids.index(2)] if eos == 2 and 2 in ids else ids)
    assert _stream(tokenizer, ids, rng.randint(1, 9), eos) == want
  lead = [tokenizer.byte_values.index(0xE6)]  # the first byte of a 3-byte UTF-8 character
  decoder = tokenizer_lib.IncrementalDecoder(tokenizer)
  assert decoder.update(lead) == "" and decoder.finish(lead) == tokenizer.decode(lead)


def test_streamed_generation_equals_non_streamed(exported):
  pre = export.load_pretrained(exported)
  kw = dict(max_new_tokens=300, temperature=1.0, seed=3, stop_at_eos=False)
  deltas = []
  streamed = gen.generate(pre, "def f(x):", stream=lambda d: deltas.append(d[0]), block_size=7,
                          **kw)
  assert "".join(deltas) == streamed == gen.generate(pre, "def f(x):", **kw)
  assert len(deltas) > 4  # first token, blocks of 7, 14, 28, ... tokens, the rest
