"""`python -m dense_ssm.evaluate` and dense_ssm/scoring.py: the CLI writes every metric; reading a
document chunk by chunk with the recurrent state carried equals one full forward; rolling windows
of the Transformer equal per-window forwards; the metrics follow their definitions from the
per-token losses; bad input is one line and exit status 1."""

import functools
import json
import math
import os
import re
import subprocess
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from absl import flags

import dense_ssm
from dense_ssm import evaluate
from dense_ssm import export
from dense_ssm import scoring
from dense_ssm.models import abstract_params, build_model
from dense_ssm.tokenizer import train_tokenizer
from tests.helpers import tiny
from tests.test_export import make_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300
TEXT = [("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 3 + f"# note {i}\n") * 4
        for i in range(40)]
KEYS = {"model", "family", "data", "split", "reading", "documents", "tokens", "bytes", "words",
        "nll_sum", "loss_per_token", "token_perplexity", "bits_per_byte", "word_perplexity",
        "by_position", "seconds"}


def _params(cfg, std=0.2, seed=0):
  """Random params of `cfg` (norm scales near 1): shapes from jax.eval_shape, values from
  numpy, so no initialiser is compiled."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    x = rng.standard_normal(leaf.shape)
    return (1 + 0.1 * x if "scale" in jax.tree_util.keystr(path) else std * x).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(cfg)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(export dir of a tiny DenseRetNet with a tokenizer, text: data source of 4 documents)."""
  root = tmp_path_factory.mktemp("evaluate")
  tok = train_tokenizer(TEXT, VOCAB)
  cfg = tiny("dense_retnet", vocab_size=VOCAB, num_layers=2)
  params = _params(cfg)
  model_dir = export.save_pretrained(export.Pretrained(cfg, params, tok), str(root / "model"))
  (root / "docs").mkdir()
  for i, doc in enumerate(["hello world  foo\nbar", TEXT[1], TEXT[2][:300] + " é ü", TEXT[3]]):
    (root / "docs" / f"{i}.txt").write_text(doc, encoding="utf-8")
  return model_dir, f"text:{root}/docs/*.txt", root


@functools.lru_cache(maxsize=None)
def _log_probs_fn(cfg):
  model = build_model(cfg)
  return jax.jit(lambda p, t: jax.nn.log_softmax(model.apply({"params": p}, t), axis=-1))


def _direct_nll(cfg, params, ids, pad_to=128):
  """-log p(ids[j+1] | ids[:j+1]) from one full forward (right padding to `pad_to` changes no
  earlier output of a causal model; one compile per config)."""
  n = len(ids) - 1
  tokens = np.zeros((1, max(pad_to, n)), np.int32)
  tokens[0, :n] = ids[:-1]
  logp = np.asarray(_log_probs_fn(cfg)(params, tokens))[0]
  return -logp[np.arange(n), np.asarray(ids[1:])].astype(np.float64)


def _main_error(capsys, *args) -> str:
  with pytest.raises(SystemExit) as e:
    evaluate.main(list(args))
  assert e.value.code == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("dense_ssm.evaluate: error: "), err
  return err


def test_cli_writes_every_metric(setup, capsys):
  model_dir, data, root = setup
  out = str(root / "out.json")
  assert evaluate.main([f"--model={model_dir}", f"--data={data}", "--max_docs=3",
                        "--valid_fraction=1", "--chunk=32", f"--out={out}"]) == 0
  printed = capsys.readouterr()
  with open(out) as f:
    res = json.load(f)
  assert KEYS <= set(res) and res["documents"] == 3 and res["family"] == "dense_retnet"
  assert set(res["by_position"]) == {"1-128", "129-512", "513-2048", "2049+"}
  assert sum(b["tokens"] for b in res["by_position"].values()) == res["tokens"] > 0
  assert res["bytes"] > 0 and res["words"] > 0 and 0 < res["loss_per_token"] < 20
  assert math.isclose(res["token_perplexity"], math.exp(res["loss_per_token"]), rel_tol=1e-9)
  assert "word perplexity" in printed.out and "wrote" in printed.out
  assert "ETA" in printed.err and "100%" in printed.err
  # Without --out the JSON goes next to the model.
  assert evaluate.main([f"--model={model_dir}", f"--data={data}", "--max_docs=3",
                        "--valid_fraction=1", "--chunk=32"]) == 0
  written = [n for n in os.listdir(model_dir) if re.fullmatch(r"eval_text_\w+_valid\.json", n)]
  assert len(written) == 1


@pytest.mark.parametrize("family", ["dense_retnet", "dense_mamba"])
def test_state_carried_across_chunks_equals_full_forward(family):
  cfg = tiny(family, num_layers=2)
  params = _params(cfg)
  rng = np.random.default_rng(0)
  docs = [[1] + rng.integers(3, 97, n).tolist() for n in (70, 37, 5, 1)]
  plan = scoring.make_plan(cfg, chunk=16)
  assert plan.mode == "state"
  nlls = scoring.score_documents(cfg, params, docs, plan, batch_size=2)
  for ids, nll in zip(docs, nlls):
    want = _direct_nll(cfg, params, ids)
    assert nll.shape == want.shape
    np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)
    assert abs(nll.sum() - want.sum()) <= 1e-5 * want.sum()


def test_rolling_windows_equal_per_window_forwards():
  cfg = tiny("transformer", num_layers=2, max_len=16, pos_emb="learned")
  params = _params(cfg)
  rng = np.random.default_rng(1)
  docs = [[1] + rng.integers(3, 97, n).tolist() for n in (50, 12, 16)]
  for context, stride in ((0, 0), (12, 5)):
    plan = scoring.make_plan(cfg, context=context, stride=stride)
    window, stride = plan.window, plan.stride
    assert plan.mode == "rolling" and window == (context or cfg.max_len)
    nlls = scoring.score_documents(cfg, params, docs, plan, batch_size=3)
    for ids, nll in zip(docs, nlls):
      n = len(ids) - 1
      want = np.zeros(n)
      # Target j >= window is scored by window k = (j - window) // stride + 1, which reads
      # inputs [k * stride, k * stride + window); the first window scores targets < window.
      for j in range(n):
        start = 0 if j < window else ((j - window) // stride + 1) * stride
        end = min(start + window, n)
        assert start <= j < end and j - start >= min(j, window - stride)
        want[j] = _direct_nll(cfg, params, ids[start:end + 1], pad_to=window)[j - start]
      np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-5)


def test_rolling_window_spans():
  for n, w, s in ((1, 4, 2), (10, 4, 2), (10, 4, 4), (9, 5, 3), (3, 8, 4)):
    spans = scoring.rolling_windows(n, w, s)
    scored = [t for _, end, frm in spans for t in range(frm, end)]
    assert scored == list(range(n))
    assert all(end - start <= w and frm >= start for start, end, frm in spans)


def test_metrics_follow_their_definitions_from_token_losses():
  rng = np.random.default_rng(2)
  nlls = [rng.uniform(0, 0.02, n) for n in (3000, 100, 600)]
  texts = ["a b\tc\n\nd ", "ünïcödé  text", "x"]
  m = scoring.summarize(nlls, texts)
  total = sum(float(n.sum()) for n in nlls)
  n_bytes = sum(len(t.encode("utf-8")) for t in texts)
  words = sum(len(re.split(r"\s+", t)) for t in texts)
  assert (m["tokens"], m["bytes"], m["words"]) == (3700, n_bytes, 5 + 2 + 1)
  assert math.isclose(m["loss_per_token"], total / 3700, rel_tol=1e-12)
  assert math.isclose(m["bits_per_byte"], total / math.log(2) / n_bytes, rel_tol=1e-12)
  assert math.isclose(m["word_perplexity"], math.exp(total / words), rel_tol=1e-12)
  buckets = {"1-128": [], "129-512": [], "513-2048": [], "2049+": []}
  for n in nlls:
    for j, x in enumerate(n):
      pos = j + 1
      name = ("1-128" if pos <= 128 else "129-512" if pos <= 512 else
              "513-2048" if pos <= 2048 else "2049+")
      buckets[name].append(x)
  for name, xs in buckets.items():
    assert m["by_position"][name]["tokens"] == len(xs)
    assert math.isclose(m["by_position"][name]["loss_per_token"], np.mean(xs), rel_tol=1e-9)
  # Pre-tokenized documents without text: no bytes, no words, the rest as before.
  bare = scoring.summarize(nlls, [None] * 3)
  assert bare["bits_per_byte"] is None and bare["word_perplexity"] is None
  assert bare["loss_per_token"] == m["loss_per_token"]


def test_evaluate_data_matches_direct_computation(setup):
  model_dir, data, _ = setup
  pre = export.load_pretrained(model_dir)
  res = evaluate.evaluate_data(pre, data, max_docs=3, chunk=32, data_overrides={
      "valid_fraction": 1.0}, show_progress=False)  # the shapes of the CLI test: no compile
  docs, texts = evaluate.load_eval_documents(pre, data, max_docs=3,
                                             data_overrides={"valid_fraction": 1.0})
  assert all(d[0] == pre.bos_id for d in docs) and texts[0] == "hello world  foo\nbar"
  total = sum(_direct_nll(pre.cfg, pre.params, d, pad_to=512).sum() for d in docs)
  assert res["tokens"] == sum(len(d) - 1 for d in docs)
  assert abs(res["nll_sum"] - total) <= 1e-5 * total
  n_bytes = sum(len(t.encode()) for t in texts)
  assert math.isclose(res["bits_per_byte"], total / math.log(2) / n_bytes, rel_tol=1e-5)


def test_tasks_delegate_to_the_harness(setup, monkeypatch, capsys):
  model_dir, _, root = setup
  calls = []

  def run_tasks(pre, tasks, *, num_fewshot, batch_size, limit, output_path):
    calls.append((pre.source, tasks, num_fewshot, batch_size, limit, output_path))
    return {"results": {}}

  fake = types.ModuleType("dense_ssm.harness")
  fake.run_tasks = run_tasks
  monkeypatch.setitem(sys.modules, "dense_ssm.harness", fake)
  monkeypatch.setattr(dense_ssm, "harness", fake, raising=False)
  out = str(root / "tasks.json")
  assert evaluate.main([f"--model={model_dir}", "--tasks=piqa,arc_easy", "--num_fewshot=4",
                        "--limit=10", "--batch_size=2", f"--out={out}"]) == 0
  assert calls == [(model_dir, "piqa,arc_easy", 4, 2, 10, out)]


def test_workdir_and_tasks_from_a_workdir(setup, monkeypatch, tmp_path):
  model_dir, data, _ = setup
  pre = export.load_pretrained(model_dir)
  work = make_workdir(tmp_path / "run", pre.cfg, pre.params, pre.tokenizer)
  seen = []

  def run_tasks(loaded, tasks, **kw):
    seen.append((loaded.cfg, tasks, kw["output_path"]))
    return {}

  fake = types.ModuleType("dense_ssm.harness")
  fake.run_tasks = run_tasks
  monkeypatch.setitem(sys.modules, "dense_ssm.harness", fake)
  monkeypatch.setattr(dense_ssm, "harness", fake, raising=False)
  assert evaluate.main([f"--workdir={work}", f"--data={data}", "--split=train", "--max_docs=1",
                        "--valid_fraction=0", "--tasks=piqa"]) == 0
  with open(os.path.join(work, f"eval_{evaluate._slug(data)}_train.json")) as f:
    assert json.load(f)["model"] == f"{work}@5"
  assert seen == [(pre.cfg, "piqa", os.path.join(work, "eval_tasks.json"))]


def test_bad_input_is_one_line(setup, capsys, tmp_path):
  model_dir, data, root = setup
  m = f"--model={model_dir}"
  assert "does not exist" in _main_error(capsys, "--model=/no/such/dir", "--data=stdlib")
  (tmp_path / "run").mkdir()
  assert "no checkpoint" in _main_error(capsys, f"--workdir={tmp_path}/run", "--data=stdlib")
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "a.txt").write_text("  \n\n")
  assert "no non-empty" in _main_error(capsys, m, f"--data=text:{tmp_path}/blank/*.txt")
  assert "matches no files" in _main_error(capsys, m, f"--data=text:{tmp_path}/none/*.txt")
  # A tokenizer with more pieces than the model's vocabulary.
  small_cfg = tiny("mamba", num_layers=1)
  small = export.save_pretrained(export.Pretrained(small_cfg, _params(small_cfg)),
                                 str(tmp_path / "small"))
  err = _main_error(capsys, f"--model={small}", f"--data={data}",
                    f"--tokenizer={model_dir}/tokenizer.model")
  assert "300 pieces" in err and "vocab_size is 97" in err
  assert "no tokenizer" in _main_error(capsys, f"--model={small}", f"--data={data}")
  assert "--context=-1" in _main_error(capsys, m, f"--data={data}", "--context=-1")
  assert "--batch_size=0" in _main_error(capsys, m, f"--data={data}", "--batch_size=0")
  assert "--chunk=0" in _main_error(capsys, m, f"--data={data}", "--chunk=0")
  assert "context" in _main_error(capsys, m, f"--data={data}", "--context=abc")
  assert "unknown" in _main_error(capsys, m, f"--data={data}", "--nope=1").lower()
  assert "exactly one" in _main_error(capsys, m, f"--workdir={root}", f"--data={data}")
  assert "nothing to evaluate" in _main_error(capsys, m)
  assert "split" in _main_error(capsys, m, f"--data={data}", "--split=test")


def test_help_documents_every_flag():
  r = subprocess.run([sys.executable, "-m", "dense_ssm.evaluate", "--help"], cwd=REPO,
                     capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr
  fv = flags.FlagValues()
  evaluate._define_flags(fv)
  names = [n for n in fv if n not in ("flagfile", "undefok")]
  assert len(names) >= 18
  for name in names:
    assert re.search(rf"^  --{name}: \S", r.stdout, re.M), name
