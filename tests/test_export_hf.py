"""Export to other ecosystems and fine-tuning starts:

  - `export --format=hf` of a plain Mamba run loads in transformers (AutoModelForCausalLM, CPU,
    float32, no custom code) with our logits (<= 1e-4 relative), and reads back exactly;
  - a DenseRetNet run exported in the original code's layout converts back (`convert retnet`)
    to identical logits;
  - other families are a one-line error naming what is supported;
  - `config.train.init_from` starts a new run from an export or a transformers directory with
    exactly the saved params (and its tokenizer), and refuses a mismatching model config.

The transformers test needs the optional `convert` extra (CPU torch + transformers).
"""

import functools
import json
import os

import jax
import numpy as np
import pytest

from dense_ssm import convert, export, hf_format, init_from, train
from dense_ssm.tokenizer import train_tokenizer
from tests.helpers import tiny
from tests.test_export import TEXT, make_workdir
from tests.train_testlib import tiny_config

VOCAB = 300  # room for SentencePiece's byte pieces


def _random_params(cfg, seed=0):
  """Random params of `cfg` (norm scales near 1, the rest N(0, 0.2^2)): no init to run, and
  nothing structured, so that every name and layout mapping matters."""
  rng = np.random.default_rng(seed)
  flat = {name: (1.0 if name.endswith("scale") else 0.0) + 0.2 * rng.standard_normal(shape)
          for name, shape in export.expected_shapes(cfg).items()}
  return export.unflatten_params({k: v.astype(np.float32) for k, v in flat.items()})


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  model = export.Pretrained(cfg, None).model
  return jax.jit(lambda p, t: model.apply({"params": p}, t))


def _logits(cfg, params, tokens):
  return np.asarray(_forward(cfg)(params, tokens))


def _export(capsys, *args):
  """Runs the export CLI in this process; returns (exit code, stderr)."""
  try:
    code = export.main(list(args))
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tokenizer():
  return train_tokenizer(TEXT, VOCAB)


@pytest.fixture(scope="module")
def mamba_hf(tmp_path_factory, tokenizer):
  """(cfg, params, directory) of a tiny tied Mamba exported with --format=hf."""
  root = tmp_path_factory.mktemp("mamba")
  # A norm eps far from transformers' default, so that a dropped layer_norm_epsilon shows.
  cfg = tiny("mamba", vocab_size=VOCAB, num_layers=2, norm_eps=1e-3)
  params = _random_params(cfg)
  work = make_workdir(root / "work", cfg, params, tokenizer)
  out = str(root / "hf")
  assert export.main([f"--workdir={work}", f"--out={out}", "--format=hf"]) == 0
  return cfg, params, out


def test_mamba_hf_export_loads_in_transformers(mamba_hf, tmp_path):
  torch = pytest.importorskip("torch", reason="optional extra: pip install torch")
  transformers = pytest.importorskip("transformers", reason="pip install -e '.[convert]'")
  cfg, params, out = mamba_hf
  meta = json.load(open(os.path.join(out, "config.json")))
  assert meta["model_type"] == "mamba" and meta["layer_norm_epsilon"] == cfg.norm_eps
  assert os.path.exists(os.path.join(out, "tokenizer.model"))
  tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 29))
  want = _logits(cfg, params, tokens)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert type(hf).__name__ == "MambaForCausalLM"
  with torch.no_grad():
    got = hf.eval()(torch.as_tensor(tokens)).logits.numpy()
  assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4
  # Back through the converter's table (the same table, read the other way): the same model
  # and params, tied as here and untied (lm_head, written through the Python API).
  ucfg = tiny("mamba", vocab_size=VOCAB, num_layers=2, tie_embeddings=False)
  uparams = _random_params(ucfg, seed=1)
  uout = hf_format.save_hf(export.Pretrained(ucfg, uparams), str(tmp_path / "untied"))
  for directory, c, p in ((out, cfg, params), (uout, ucfg, uparams)):
    back = convert.read("mamba-hf", directory)
    assert hf_format.first_difference(back.cfg, c) is None
    jax.tree.map(np.testing.assert_array_equal, back.params, p)


def test_retnet_round_trip_through_the_original_layout(tmp_path, capsys, tokenizer):
  cfg = tiny("dense_retnet", vocab_size=VOCAB, num_layers=3, dense=dict(layers=2, r_k=8, r_v=4))
  params = _random_params(cfg, seed=2)
  work = make_workdir(tmp_path / "work", cfg, params, tokenizer)
  code, err = _export(capsys, f"--workdir={work}", f"--out={tmp_path / 'ref'}", "--format=hf")
  assert code == 0, err
  meta = json.load(open(tmp_path / "ref" / "config.json"))
  assert meta["query_key_dim"] == cfg.qk_dim and meta["dense_block_layers"] == 2
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  sd = load_file(str(tmp_path / "ref" / "model.safetensors"))
  assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (cfg.qk_dim, cfg.hidden_size)
  assert convert.main(["retnet", f"--checkpoint={tmp_path / 'ref'}",
                       f"--out={tmp_path / 'back'}"]) == 0
  pre = export.load_pretrained(str(tmp_path / "back"))
  assert pre.cfg.dense == cfg.dense and pre.tokenizer.vocab_size == VOCAB
  tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 19))
  assert hf_format.first_difference(pre.cfg, cfg) is None
  np.testing.assert_array_equal(_logits(cfg, pre.params, tokens), _logits(cfg, params, tokens))


def test_unsupported_families_are_one_line_errors(tmp_path, capsys):
  cfg = tiny("transformer", num_layers=2)
  params = _random_params(cfg)
  work = make_workdir(tmp_path / "work", cfg, params)
  code, err = _export(capsys, f"--workdir={work}", f"--out={tmp_path / 'out'}", "--format=hf")
  lines = err.strip().splitlines()
  assert code == 1 and len(lines) == 1 and "supports plain Mamba" in lines[0], err
  assert not (tmp_path / "out").exists()
  for name, kw, match in (("dense_mamba", {}, "dense.layers=2"), ("retnet_ffn", {}, "retnet_ffn"),
                          ("gau_retnet", {}, "dense.layers=0"),
                          ("dense_retnet", dict(dense=dict(layers=2, every=2)), "every=1")):
    with pytest.raises(ValueError, match=match):
      hf_format.kind_of(tiny(name, num_layers=2, **kw))


def _run_config(**model):
  model = {f"model__{k}": v for k, v in model.items()}
  return tiny_config(model__vocab_size=VOCAB, data__seq_len=32, train__batch_size=2, **model)


def test_init_from_starts_a_run_from_saved_params(mamba_hf, tmp_path, tokenizer):
  config = _run_config()  # configs/default.py's DenseRetNet, tiny
  cfg = train.validate_config(config)
  params = _random_params(cfg, seed=3)
  export.save_pretrained(export.Pretrained(cfg, params, tokenizer=tokenizer),
                         str(tmp_path / "exported"))
  config.train.init_from = str(tmp_path / "exported")
  work = str(tmp_path / "run")
  trainer = train.Trainer(config, work)
  try:
    trainer.restore_or_init()
    assert int(trainer.state["step"]) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.state["params"]), params)
  finally:
    trainer.close()
  assert config.data.tokenizer == os.path.join(work, "tokenizer.model")  # copied for resumes
  assert open(config.data.tokenizer, "rb").read() == tokenizer.model_proto
  # A transformers Mamba directory reads with this run's config keys.
  mcfg, mparams, hf_dir = mamba_hf
  mconfig = _run_config(family="mamba", num_layers=2, hidden_size=mcfg.hidden_size,
                        state_dim=mcfg.state_dim, norm_eps=mcfg.norm_eps, tie_embeddings=True,
                        dense__layers=0)
  flat = init_from.load_params(hf_dir, train.validate_config(mconfig))
  jax.tree.map(np.testing.assert_array_equal, export.unflatten_params(flat), mparams)
  # A model config that does not match the saved one: one line naming the key.
  bad = _run_config(norm_eps=1e-5)
  bad.train.init_from = str(tmp_path / "exported")
  with pytest.raises(ValueError, match=r"norm_eps=1e-06 .*--config.model.norm_eps=1e-06"):
    train.Trainer(bad, str(tmp_path / "run_bad"))
  with pytest.raises(ValueError, match="has no config.json"):
    init_from.load_params(str(tmp_path / "run"), cfg)  # a training workdir, not a model
