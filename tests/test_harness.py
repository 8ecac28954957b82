"""The lm-eval model `dense_ssm`: lm-eval's own command line runs a multiple-choice and a
rolling-perplexity task defined in tests/lm_eval_tasks (local JSON, offline) on a tiny exported
DenseRetNet; every log-likelihood it reports is the model's own; packing changes nothing;
greedy generate_until is dense_ssm.generate; the other families score long documents right."""

import contextlib
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssm import export, harness
from dense_ssm.models import build_model
from dense_ssm.tokenizer import train_tokenizer
from tests.helpers import tiny

pytest.importorskip("lm_eval", reason='the eval extra: pip install -e ".[eval]"')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join("tests", "lm_eval_tasks")
VOCAB = 300
TEXT = [("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 3 + f"# note {i}\n") * 4
        for i in range(40)]
MAX_LENGTH = 64  # the 199-token document of tiny_ppl continues past one window


def _random_params(cfg, seed=0, std=0.3):
  """Random params of `cfg` (norm scales 1, the rest N(0, std)) without running model.init,
  whose compilation costs seconds on CPU."""
  rng = np.random.default_rng(seed)
  flat = {k: np.ones(shape, np.float32) if k.endswith("scale") else
          rng.normal(0.0, std, shape).astype(np.float32)
          for k, shape in export.expected_shapes(cfg).items()}
  return export.unflatten_params(flat)


def _save(cfg, tokenizer, path):
  return export.save_pretrained(export.Pretrained(cfg, _random_params(cfg), tokenizer), path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("harness")
  cfg = tiny("dense_retnet", vocab_size=VOCAB, num_layers=2)
  return _save(cfg, train_tokenizer(TEXT, VOCAB), str(root / "export")), root


@contextlib.contextmanager
def _offline_local_tasks(root):
  """Offline Hugging Face datasets; the task YAMLs' data paths resolve from the repository;
  lm-eval's TaskManager indexes only the folders it is given (indexing its ~15K built-in task
  files costs ~17 s of CPU and no test here uses them)."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  init_manager = TaskManager.__init__

  def only_included(self, *args, include_defaults=False, **kwargs):
    init_manager(self, *args, include_defaults=include_defaults, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(REPO)
    for k, v in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                 "HF_DATASETS_CACHE": str(root / "hf_datasets")}.items():
      mp.setenv(k, v)
    mp.setattr(TaskManager, "__init__", only_included)
    mp.setattr(harness, "task_manager_for", lambda p=None: TaskManager(include_path=p))
    yield


@pytest.fixture(scope="module")
def cli_run(exported):
  """lm-eval's CLI entry point (through `python -m dense_ssm.harness`'s main), offline."""
  out_dir, root = exported
  with _offline_local_tasks(root):
    harness.main(["--model", "dense_ssm",
                  "--model_args", f"pretrained={out_dir},max_length={MAX_LENGTH}",
                  "--tasks", "dense_ssm_tiny_mc,dense_ssm_tiny_ppl", "--include_path", TASKS,
                  "--batch_size", "4", "--output_path", str(root / "results"), "--log_samples"])
  found = glob.glob(str(root / "results" / "**" / "results_*.json"), recursive=True)
  assert len(found) == 1, found
  with open(found[0]) as f:
    results = json.load(f)
  samples = {}
  for task in ("dense_ssm_tiny_mc", "dense_ssm_tiny_ppl"):
    (path,) = glob.glob(str(root / "results" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    with open(path) as f:
      samples[task] = [json.loads(line) for line in f]
  return results, samples


@pytest.fixture(scope="module")
def lm(exported):
  return harness.make_lm(exported[0], batch_size=4, max_length=MAX_LENGTH)


def _reference(pre, seqs, n_scores):
  """(sum of log-probs of the last n tokens, all argmax) per sequence, from one plain forward
  of the right-padded batch (causal: the padding changes nothing before it): no packing, no
  segments, no carried state."""
  model = build_model(pre.cfg)
  tokens = np.zeros((len(seqs), -(-max(map(len, seqs)) // 64) * 64), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
  logits = jax.jit(model.apply)({"params": pre.params}, jnp.asarray(tokens))
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
  best = np.asarray(jnp.argmax(logits, axis=-1))
  out = []
  for i, (s, n) in enumerate(zip(seqs, n_scores)):
    t = np.arange(len(s) - n - 1, len(s) - 1)
    out.append((float(logp[i, t, np.asarray(s)[t + 1]].sum()),
                bool(np.all(best[i, t] == np.asarray(s)[t + 1]))))
  return out


def _pair(lm, context, continuation):
  """lm-eval's (context ids, continuation ids) of a loglikelihood request."""
  if context:
    return lm._encode_pair(context, continuation)  # pylint: disable=protected-access
  return [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)


def test_cli_results_json_has_both_tasks(cli_run):
  results, samples = cli_run
  mc, ppl = results["results"]["dense_ssm_tiny_mc"], results["results"]["dense_ssm_tiny_ppl"]
  assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0
  assert ppl["word_perplexity,none"] > 1.0 and ppl["bits_per_byte,none"] > 0.0
  assert results["config"]["model"] == "dense_ssm"
  assert len(samples["dense_ssm_tiny_mc"]) == 6 and len(samples["dense_ssm_tiny_ppl"]) == 3


def test_every_loglikelihood_is_the_sum_of_the_models_log_probs(cli_run, lm):
  _, samples = cli_run
  seqs, n_scores, got = [], [], []
  for s in samples["dense_ssm_tiny_mc"]:
    for args, resp in zip(s["arguments"].values(), s["resps"]):
      ctx, cont = _pair(lm, args["arg_0"], args["arg_1"])
      seqs.append(ctx + cont)
      n_scores.append(len(cont))
      got.append((float(resp[0][0]), resp[0][1] == "True"))
  for s in samples["dense_ssm_tiny_ppl"]:
    doc = lm.tok_encode(s["arguments"]["gen_args_0"]["arg_0"], add_special_tokens=False)
    seqs.append([lm.prefix_token_id] + doc)
    n_scores.append(len(doc))
    got.append((float(s["resps"][0][0]), None))
  assert max(len(s) for s in seqs) - 1 > MAX_LENGTH  # one document carried the state
  want = _reference(lm.pre, seqs, n_scores)
  for (g, g_greedy), (w, w_greedy) in zip(got, want):
    assert abs(g - w) <= 1e-4, (g, w)
    assert g_greedy in (None, w_greedy)


def test_packed_rows_give_the_same_numbers_as_one_request_per_row(lm):
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top

  with open(os.path.join(REPO, TASKS, "tiny_mc.jsonl")) as f:
    docs = [json.loads(line) for line in f]
  reqs = [Instance("loglikelihood", d, (d["context"], " " + c), 0)
          for d in docs for c in d["choices"]]
  lengths = [sum(map(len, _pair(lm, *r.args))) - 1 for r in reqs]
  assert len(harness.pack_rows(lengths, 4, MAX_LENGTH)) < \
      len(harness.pack_rows(lengths, 4, MAX_LENGTH, pack=False))
  packed = lm.loglikelihood(reqs, disable_tqdm=True)
  lm.scorer.pack = False
  try:
    alone = lm.loglikelihood(reqs, disable_tqdm=True)
  finally:
    lm.scorer.pack = True
  np.testing.assert_allclose([p[0] for p in packed], [a[0] for a in alone], atol=1e-5, rtol=0)
  assert [p[1] for p in packed] == [a[1] for a in alone]


def test_greedy_generate_until_is_dense_ssm_generate_and_stops(lm):
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  import dense_ssm  # pylint: disable=g-import-not-at-top

  # Four prompts (the LM's rows), the longest of 16 tokens (its padded length): both sides then
  # run the same compiled generation loop (streaming dense_ssm.generate decodes in blocks too).
  prompts = ["def f(x):", "class A:\n    pass\n", "# note", "def f(x):\n    return"]
  assert max(len(lm.tok_encode(p)) for p in prompts) == 16
  want = dense_ssm.generate(lm.pre, prompts, max_new_tokens=8, stream=lambda _: None)
  kw = {"until": [], "max_gen_toks": 8, "do_sample": False}
  got = lm.generate_until([Instance("generate_until", {}, (p, kw), 0) for p in prompts],
                          disable_tqdm=True)
  assert got == want and all(want)
  stop = want[0][2:4]  # a stop string inside the first continuation cuts it there
  cut = lm.generate_until([Instance("generate_until", {}, (prompts[0], {**kw, "until": [stop]}),
                                    0)], disable_tqdm=True)
  assert cut == [want[0].split(stop)[0]]


@pytest.mark.parametrize("name", ["mamba", "transformer"])
def test_long_documents_carry_the_state_or_roll_windows(name, tmp_path, lm):
  """Mamba continues past a window from its carried state, conv and scan (= one plain
  forward); the Transformer scores lm-eval's rolling windows, each a plain forward."""
  cfg = tiny(name, vocab_size=VOCAB, num_layers=1)
  pre = export.load_pretrained(_save(cfg, lm.pre.tokenizer, str(tmp_path / name)))
  other = harness.make_lm(str(tmp_path / name), batch_size=2, max_length=32)
  # pylint: disable=g-import-not-at-top
  from lm_eval.api.instance import Instance
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

  text = TEXT[0][:300]
  doc = other.tok_encode(text, add_special_tokens=False)
  assert len(doc) > 2 * 32
  (got,) = other.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)],
                                       disable_tqdm=True)
  if name == "transformer":
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        doc, other.prefix_token_id, 32, 1)]
    assert len(windows) > 2
    want = sum(r[0] for r in _reference(pre, [c + p for c, p in windows],
                                        [len(p) for _, p in windows]))
  else:
    ((want, _),) = _reference(pre, [[other.prefix_token_id] + doc], [len(doc)])
  assert abs(got - want) <= 1e-4, (got, want)


def test_paper_preset_names_installed_tasks_and_averages_accuracy():
  from lm_eval import tasks  # pylint: disable=g-import-not-at-top

  names = harness.expand_tasks("paper")
  assert len(names) == 13 and names[:2] == ["wikitext", "lambada_openai"]
  folders = ["wikitext", "lambada", "arc", "super_glue/boolq", "super_glue/copa", "hellaswag",
             "piqa", "winogrande", "storycloze", "wsc273", "openbookqa", "sciq"]
  installed = tasks.TaskManager(include_defaults=False, include_path=[
      os.path.join(os.path.dirname(tasks.__file__), f) for f in folders])  # a slice: fast
  assert not set(names) - set(installed.all_tasks)
  fake = {"results": {t: {"acc,none": 0.5, "acc_norm,none": 0.7 if m == "acc_norm" else 0.1}
                      for t, m in harness.PAPER_AVG_METRIC.items()}}
  fake["results"]["wikitext"] = {"word_perplexity,none": 30.0}
  avg = harness.paper_average(fake)
  assert avg["tasks"] == 11 and not avg["missing"]
  n_norm = sum(m == "acc_norm" for m in harness.PAPER_AVG_METRIC.values())
  assert avg["avg"] == pytest.approx((0.7 * n_norm + 0.5 * (11 - n_norm)) / 11)
  table = harness.format_table(fake)
  assert "word_perplexity 30.00" in table and f"Avg {100 * avg['avg']:.2f}" in table


def test_run_tasks_prints_and_writes_json(exported, tmp_path, capsys):
  out_dir, root = exported
  with _offline_local_tasks(root):
    res = harness.run_tasks(out_dir, "dense_ssm_tiny_mc", num_fewshot=None, batch_size=4,
                            limit=3, output_path=str(tmp_path / "r.json"),
                            include_path=TASKS)
    with pytest.raises(ValueError, match="unknown lm-eval task"):
      harness.run_tasks(out_dir, "no_such_task_xyz", batch_size=4, include_path=TASKS)
  printed = capsys.readouterr().out
  assert "dense_ssm_tiny_mc" in printed and "acc_norm" in printed
  with open(tmp_path / "r.json") as f:
    saved = json.load(f)
  assert saved["results"]["dense_ssm_tiny_mc"]["acc,none"] == res["results"][
      "dense_ssm_tiny_mc"]["acc,none"]
