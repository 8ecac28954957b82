"""Converters through the CLI: a random small transformers MambaForCausalLM gives our logits
(float32, <= 1e-4 relative); a reference-layout DenseRetNet directory converts to identical
logits; bad checkpoints give one-line errors.

The Mamba test needs the optional `convert` extra (CPU torch + transformers):
  pip install torch==2.13.0 && pip install -e '.[convert]'
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dense_ssm import convert, export
from dense_ssm.tokenizer import train_tokenizer
from tests.helpers import init, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "dense_ssm.convert", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=240,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _logits(pre, tokens):
  return np.asarray(jax.jit(lambda p, t: pre.model.apply({"params": p}, t))(pre.params, tokens))


def test_hf_mamba_logits_match(tmp_path):
  torch = pytest.importorskip("torch", reason="optional extra: pip install torch==2.13.0")
  transformers = pytest.importorskip(
      "transformers", reason="optional extra: pip install -e '.[convert]' (after CPU torch)")
  torch.manual_seed(0)
  hf_cfg = transformers.MambaConfig(vocab_size=101, hidden_size=48, state_size=8,
                                    num_hidden_layers=2, expand=2, conv_kernel=4,
                                    layer_norm_epsilon=1e-5, use_cache=False)
  hf = transformers.MambaForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # move every weight away from its init so that each mapping matters
    for name, p in hf.named_parameters():
      p.add_(0.05 * torch.randn_like(p) * (p.abs().mean() + 0.1))
  hf.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors (tied head not saved)
  r = _convert("mamba-hf", f"--checkpoint={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}")
  assert r.returncode == 0, r.stderr
  pre = export.load_pretrained(str(tmp_path / "out"))
  assert pre.cfg.family == "mamba" and pre.cfg.dt_rank == 3 and pre.cfg.tie_embeddings
  tokens = np.random.default_rng(0).integers(0, 101, (2, 37))
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.float().numpy()
  got = _logits(pre, tokens)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4
  # The untied variant maps lm_head too (in-process, from the same state dict).
  sd = {k: v for k, v in hf.state_dict().items()}
  cfg = convert.hf_mamba_config({**hf_cfg.to_dict(), "tie_word_embeddings": False},
                                {**sd, "lm_head.weight": sd["backbone.embeddings.weight"]})
  params = convert.from_hf_mamba({**sd, "lm_head.weight": sd["backbone.embeddings.weight"]}, cfg)
  np.testing.assert_allclose(_logits(export.Pretrained(cfg, params), tokens), got, rtol=1e-5,
                             atol=1e-5)


def _reference_dir(path, cfg, params, vocab_pad=0):
  """A directory laid out like a released DenseRetNet checkpoint."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path)
  sd = convert.to_reference(params, cfg)
  save_file(sd, os.path.join(path, "model.safetensors"))
  ref = {"hidden_size": cfg.hidden_size, "query_key_dim": cfg.qk_dim,
         "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
         "v_factor": cfg.v_factor, "rms_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size,
         "dense_block_layers": cfg.dense.layers, "bos_token_id": 1, "eos_token_id": 2}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(ref, f)
  return path


def test_retnet_cli_converts_a_reference_directory(tmp_path):
  # 300 ids with a 299-piece tokenizer: like the released 32001-row checkpoints.
  cfg = tiny("dense_retnet", vocab_size=300, num_layers=3, dense=dict(layers=2, r_k=8, r_v=4))
  _, params = init(cfg)
  ref = _reference_dir(str(tmp_path / "ref"), cfg, params)
  text = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(50)]
  with open(os.path.join(ref, "tokenizer.model"), "wb") as f:
    f.write(train_tokenizer(text, 299).model_proto)
  r = _convert("retnet", f"--checkpoint={ref}", f"--out={tmp_path / 'out'}")
  assert r.returncode == 0, r.stderr
  pre = export.load_pretrained(str(tmp_path / "out"))
  assert pre.cfg.dense == cfg.dense and pre.tokenizer.vocab_size == 299 and pre.eos_id == 2
  tokens = np.random.default_rng(1).integers(0, 300, (1, 19))
  np.testing.assert_array_equal(_logits(pre, tokens),
                                _logits(export.Pretrained(cfg, params), tokens))


def test_converter_errors_are_one_line(tmp_path):
  cfg = tiny("dense_retnet", num_layers=2)
  _, params = init(cfg)
  ref = _reference_dir(str(tmp_path / "ref"), cfg, params)
  cases = [(["retnet", f"--checkpoint={tmp_path / 'nope'}"], "does not exist")]
  torch = None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    pass
  if torch is not None:  # a torch file that is not a state dict
    torch.save([1, 2, 3], str(tmp_path / "ref" / "list.bin"))
    cases.append((["retnet", f"--checkpoint={tmp_path / 'ref' / 'list.bin'}"],
                  "not a state dict"))
  # config/params mismatch: a config.json with another depth.
  meta = json.load(open(os.path.join(ref, "config.json")))
  with open(tmp_path / "deeper.json", "w") as f:
    json.dump({**meta, "num_hidden_layers": 3}, f)
  cases.append((["retnet", f"--checkpoint={ref}", f"--config={tmp_path / 'deeper.json'}"],
                "lacks"))
  cases.append((["mamba-hf", f"--checkpoint={ref}"], "not a Mamba checkpoint"))
  for args, match in cases:
    r = _convert(*args, f"--out={tmp_path / 'out'}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and match in lines[0], (args, r.stderr)
  # A non-torch file passed as .bin.
  (tmp_path / "junk.bin").write_bytes(b"not a pickle")
  if torch is not None:
    with pytest.raises(ValueError, match="not a loadable torch state dict"):
      convert.load_state_dict(str(tmp_path / "junk.bin"))
