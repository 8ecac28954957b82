"""Export: training workdir -> export directory -> load_pretrained reproduces the logits exactly;
the jax.export artifacts reproduce them in a fresh process that cannot import dense_ssm; the
generate CLI streams text; bad input gives one-line errors."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssm import export
from dense_ssm import generate as gen
from dense_ssm.checkpoint import Checkpointer
from dense_ssm.tokenizer import train_tokenizer
from tests.helpers import init, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300  # room for SentencePiece's byte pieces
TEXT = [("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 3 + f"# note {i}\n") * 4
        for i in range(40)]


def _run(*args, **kw):
  return subprocess.run([sys.executable, *args], cwd=kw.pop("cwd", REPO), capture_output=True,
                        text=True, timeout=240, env={**os.environ, "JAX_PLATFORMS": "cpu"}, **kw)


def make_workdir(path, cfg, params, tokenizer=None, step=5):
  """A training workdir as dense_ssm.train leaves it (Orbax checkpoint + tokenizer)."""
  ckpt = Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  state = {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": {}}
  ckpt.save(step, state, {"pos": 0}, {"model": cfg.to_dict(), "data": {"add_bos": True}})
  ckpt.close()
  if tokenizer is not None:
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
      f.write(tokenizer.model_proto)
  return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(cfg, params, export dir) of a tiny DenseRetNet exported through the CLI with --serving."""
  root = tmp_path_factory.mktemp("export")
  cfg = tiny("dense_retnet", vocab_size=VOCAB, num_layers=2, init_std=0.3)
  _, params = init(cfg)
  tok = train_tokenizer(TEXT, VOCAB)
  work = make_workdir(root / "work", cfg, params, tok)
  out = str(root / "out")
  r = _run("-m", "dense_ssm.export", f"--workdir={work}", f"--out={out}", "--serving",
           "--serving_prompt_len=16", "--serving_new_tokens=6", "--serving_platforms=cpu")
  assert r.returncode == 0, r.stderr
  return cfg, params, out


def test_load_pretrained_reproduces_logits_exactly(exported, tmp_path):
  cfg, params, out = exported
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 21), 0, VOCAB)
  model, _ = init(cfg)
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t))
  pre = export.load_pretrained(out)
  assert pre.cfg == cfg and pre.tokenizer.vocab_size == VOCAB and pre.add_bos
  np.testing.assert_array_equal(fwd(pre.params, tokens), fwd(params, tokens))
  # A tied-embedding Mamba through the Python API, and a bfloat16 export.
  mcfg = tiny("dense_mamba", num_layers=2)
  mmodel, mparams = init(mcfg)
  back = export.load_pretrained(export.save_pretrained(
      export.Pretrained(mcfg, mparams), str(tmp_path / "m")))
  mfwd = jax.jit(lambda p, t: mmodel.apply({"params": p}, t))
  np.testing.assert_array_equal(mfwd(back.params, tokens % 97), mfwd(mparams, tokens % 97))
  half = export.load_pretrained(export.save_pretrained(pre, str(tmp_path / "bf16"),
                                                       dtype="bfloat16"))
  assert half.cfg.param_dtype == "bfloat16"
  assert half.params["norm"]["scale"].dtype == jnp.bfloat16


def test_serving_artifacts_match_in_a_process_without_dense_ssm(exported, tmp_path):
  cfg, params, out = exported
  prompts = [[1, 40, 50, 60, 70, 80, 90], [1, 33]]
  tokens, seg = gen.left_pad(prompts, length=16)
  icfg = gen.inference_config(cfg)
  model, _ = init(icfg)
  logits, _ = model.apply({"params": params}, tokens, model.init_cache(2), seg,
                          method=model.prefill)
  greedy = gen.generate_ids(cfg, params, prompts, max_new_tokens=6, stop_at_eos=False)
  np.savez(tmp_path / "want.npz", logits=np.asarray(logits), tokens=tokens, seg=seg,
           greedy=np.asarray(greedy))
  script = textwrap.dedent(f"""
      import sys
      sys.modules["dense_ssm"] = None  # any import of dense_ssm now fails
      sys.path.insert(0, {os.path.join(out, "serving")!r})
      import numpy as np, serve
      want = np.load({str(tmp_path / "want.npz")!r})
      m = serve.load({out!r})
      logits, cache = m.prefill(want["tokens"], want["seg"])
      np.testing.assert_allclose(np.asarray(logits), want["logits"], rtol=1e-5, atol=1e-5)
      logits1, cache = m.decode_step(np.argmax(np.asarray(logits)[:, -1], -1), cache)
      assert logits1.shape == (2, {VOCAB})
      got = m.generate([{prompts[0]}, {prompts[1]}], stop_at_eos=False)
      assert got == want["greedy"].tolist(), (got, want["greedy"])
      assert not any(k.startswith("dense_ssm") and v is not None for k, v in sys.modules.items())
      print("OK")
  """)
  r = _run("-c", script, cwd=str(tmp_path))
  assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]


def test_generate_cli_streams_text(exported):
  _, _, out = exported
  r = _run("-m", "dense_ssm.generate", f"--model={out}", "--prompt=def f(x):",
           "--max_new_tokens=12", "--block_size=4")
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("def f(x):") and len(r.stdout) > len("def f(x):\n")
  texts = export.load_pretrained(out)
  assert gen.generate(texts, "def f(x):", max_new_tokens=12) == r.stdout[len("def f(x):"):-1]


def _one_line_error(r, match):
  assert r.returncode == 1
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and match in lines[0], r.stderr


def test_bad_input_gives_one_line_errors(exported, tmp_path):
  cfg, params, out = exported
  _one_line_error(_run("-m", "dense_ssm.generate", f"--workdir={tmp_path}/nope", "--prompt=x"),
                  "has no checkpoint")
  _one_line_error(_run("-m", "dense_ssm.generate", f"--model={out}", "--prompt="), "empty")
  # config/params mismatch: an edited config.json.
  bad = tmp_path / "bad"
  bad.mkdir()
  for f in ("model.safetensors", "tokenizer.model"):
    (bad / f).write_bytes(open(os.path.join(out, f), "rb").read())
  meta = json.load(open(os.path.join(out, "config.json")))
  meta["model"]["hidden_size"] = 48
  (bad / "config.json").write_text(json.dumps(meta))
  _one_line_error(_run("-m", "dense_ssm.generate", f"--model={bad}", "--prompt=x"),
                  "params do not match the config")
  # A tokenizer with more pieces than the model's vocabulary (fewer is fine: padded vocab).
  (bad / "config.json").write_bytes(open(os.path.join(out, "config.json"), "rb").read())
  (bad / "tokenizer.model").write_bytes(train_tokenizer(TEXT, VOCAB + 20).model_proto)
  with pytest.raises(ValueError, match=f"the tokenizer has {VOCAB + 20} pieces but the model's "
                     f"vocab_size is {VOCAB}"):
    export.load_pretrained(str(bad))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export.load_pretrained(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="has no checkpoint of step 7"):
    export.load_workdir(make_workdir(tmp_path / "w", cfg, params), step=7)
