"""Hugging Face tokenizer.json behind the Tokenizer interface, built offline in the tests: ids and
BOS/EOS rules, streaming decode, training data, exports, and a converted HF Mamba checkpoint that
generates through `python -m dense_ssm.generate` with its own tokenizer.json.

Needs the `tokenizers` library (the hf or convert extra); the checkpoint test also needs CPU torch
and transformers (the convert extra).
"""

import json
import os
import pickle
import random
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="optional extra: pip install -e '.[hf]'")

from dense_ssm import convert, data, export, tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top,g-multiple-import
from dense_ssm.tokenizer import HFTokenizer, IncrementalDecoder  # pylint: disable=g-import-not-at-top
from tests import helpers, train_testlib  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["hello world, the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1",
         "naïve café 你好 🙂 émoji", "the state space model reads one token at a time"] * 10
TEXT = "the quick fox says 你好 to a naïve café 🙂\n  return x"


def byte_level_bpe(vocab_size=300):
  """A GPT-NeoX-like tokenizer: byte-level BPE, `<|endoftext|>` = 0, `<|padding|>` = 1."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top,g-multiple-import
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def word_level(template=True):
  """A WordLevel tokenizer whose post-processor wraps a sequence as `<s> $A </s>` (or none)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # pylint: disable=g-import-not-at-top,g-multiple-import
  tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  specials = ["[UNK]", "<s>", "</s>"] if template else ["[UNK]"]
  tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=specials,
                                                           show_progress=False))
  if template:
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
  return tok


def save(tok, path):
  tok.save(str(path))
  return str(path)


def test_byte_level_interface_and_bos_rule(tmp_path):
  path = save(byte_level_bpe(), tmp_path / "tokenizer.json")
  tok = tokenizer_lib.load_file(path)
  assert isinstance(tok, HFTokenizer) and tok.file_name == "tokenizer.json"
  assert tok.vocab_size == 300 and tok.pad_id == 0
  assert (tok.bos_id, tok.eos_id) == (0, 0)  # only <|endoftext|>: it opens documents too
  ids = tok.encode(TEXT)
  assert ids and tok.decode(ids) == TEXT and 0 not in ids  # no special token added
  assert tok.decode([0, *ids, 1]) == TEXT  # special tokens are dropped
  assert tok.to_bytes() == open(path, "rb").read()
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode(TEXT) == ids and again.path == path
  assert tokenizer_lib.Tokenizer.from_file(path).encode(TEXT) == ids  # the old entry point


def test_template_names_bos_and_eos_and_none_means_minus_one(tmp_path):
  tok = tokenizer_lib.load_file(save(word_level(), tmp_path / "a.json"))
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.decode(tok.encode("the quick fox")) == "the quick fox"
  assert 1 not in tok.encode("the quick fox")  # add_special_tokens=False
  bare = tokenizer_lib.load_file(save(word_level(template=False), tmp_path / "b.json"))
  assert (bare.bos_id, bare.eos_id) == (-1, -1)
  config = train_testlib.tiny_config(data__tokenizer=bare.path)
  docs = types.SimpleNamespace(items=["the quick fox"], pretokenized=False)
  with pytest.raises(ValueError, match="has no BOS token; set data.add_bos=false"):
    data._tokens_fn(docs, config, bare)  # pylint: disable=protected-access
  config.data.add_bos = False
  row = data._tokens_fn(docs, config, bare)("the quick fox")  # pylint: disable=protected-access
  assert row["tokens"].tolist() == bare.encode("the quick fox")


def test_streaming_decode_matches_decode(tmp_path):
  """Random id sequences (partial UTF-8 pieces, specials, ids past the vocabulary) stream to
  exactly decode(ids), also once the window has moved."""
  tok = tokenizer_lib.load_file(save(byte_level_bpe(), tmp_path / "tokenizer.json"))
  assert tok.plain_piece() is not None
  rng = random.Random(0)
  seqs = [tok.encode(TEXT * 4)] + [[rng.randrange(tok.vocab_size + 4) for _ in range(160)]
                                  for _ in range(40)]
  for seq in seqs:
    dec, out = IncrementalDecoder(tok), ""
    for n in range(1, len(seq) + 1):
      out += dec.update(seq, n)
    out += dec.finish(seq)
    assert out == tok.decode(seq)


def test_bad_files_are_one_clear_error(tmp_path):
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
  with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
    tokenizer_lib.load_file(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="is a directory.*tokenizer.json"):
    tokenizer_lib.load_file(str(tmp_path))


def test_training_data_and_export_carry_the_hf_tokenizer(tmp_path):
  path = save(byte_level_bpe(), tmp_path / "tokenizer.json")
  # A padded embedding (HF checkpoints round the vocabulary up) is fine; a smaller one is not.
  config = train_testlib.tiny_config(data__tokenizer=path, model__vocab_size=304)
  tok = data.load_tokenizer(config, str(tmp_path / "work"))
  assert isinstance(tok, HFTokenizer) and not os.path.exists(tmp_path / "work" / "tokenizer.model")
  batch = next(iter(data.make_eval_batches(config, tok, max_batches=1)))
  assert batch["inputs"].max() < 300 and (batch["inputs"] == tok.bos_id).any()
  with pytest.raises(ValueError, match="has 300 pieces but model.vocab_size=256"):
    data.load_tokenizer(train_testlib.tiny_config(data__tokenizer=path, model__vocab_size=256))
  cfg = helpers.tiny("mamba", vocab_size=304)
  params = export.unflatten_params({k: np.zeros(shape, np.float32)
                                    for k, shape in export.expected_shapes(cfg).items()})
  pre = export.Pretrained(cfg=cfg, params=params, tokenizer=tok, add_bos=False,
                          bos_id=tok.bos_id, eos_id=tok.eos_id)
  out = export.save_pretrained(pre, str(tmp_path / "export"))
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
  back = export.load_pretrained(out)
  assert isinstance(back.tokenizer, HFTokenizer) and back.tokenizer.encode(TEXT) == tok.encode(TEXT)
  assert (back.bos_id, back.eos_id, back.add_bos) == (0, 0, False)


def test_converted_hf_mamba_generates_with_its_tokenizer_json(tmp_path):
  """The issue's check: a random transformers MambaForCausalLM saved with save_pretrained and a
  tokenizer.json converts, carries the tokenizer, and `python -m dense_ssm.generate` prints the
  text transformers' own greedy generation gives."""
  torch = pytest.importorskip("torch", reason="optional extra: pip install torch==2.13.0")
  transformers = pytest.importorskip("transformers", reason="pip install -e '.[convert]'")
  hf_tok = byte_level_bpe()
  torch.manual_seed(0)
  hf = transformers.MambaForCausalLM(transformers.MambaConfig(
      vocab_size=304, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
      conv_kernel=4, use_cache=True)).eval()  # 300 tokens, embedding padded to 304 as HF does
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.5 * torch.randn_like(p) * (p.abs().mean() + 0.1))
  hf.save_pretrained(tmp_path / "hf")
  save(hf_tok, tmp_path / "hf" / "tokenizer.json")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=REPO, env=env, timeout=240,
                                  capture_output=True, text=True)
  convert.convert("mamba-hf", str(tmp_path / "hf"), str(tmp_path / "out"))  # the CLI's work
  assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
      (tmp_path / "hf" / "tokenizer.json").read_bytes()
  meta = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (meta["bos_id"], meta["eos_id"], meta["add_bos"]) == (0, 0, False)

  prompt, new = "the quick brown", 12
  ids = hf_tok.encode(prompt, add_special_tokens=False).ids
  with torch.no_grad():
    want = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                       eos_token_id=0, pad_token_id=0)[0, len(ids):].tolist()
  want_text = hf_tok.decode(want[:want.index(0)] if 0 in want else want,
                            skip_special_tokens=True)
  r = run("dense_ssm.generate", f"--model={tmp_path / 'out'}", f"--prompt={prompt}",
          f"--max_new_tokens={new}")
  assert r.returncode == 0, r.stderr
  assert r.stdout.rstrip("\n") == prompt + want_text, (r.stdout, want, want_text)
  assert len(want_text) > 0
