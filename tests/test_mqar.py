"""MQAR: the generator (dense_ssm/mqar.py), its data.py hooks, and experiments/mqar.py."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dense_ssm import data, mqar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = mqar.MqarSpec(vocab=512, pairs=16, queries=12)
SEQ_LEN = 128


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(family="gau", source="mqar:vocab=64,pairs=4,queries=3,valid=10", **train):
  c = _load("mqar_config", "configs/mqar.py").get_config(family)
  c.model.hidden_size = 16
  c.model.vocab_size, c.model.max_len, c.model.chunk_size = 64, 32, 16
  c.data.source, c.data.seq_len = source, 32
  c.train.batch_size, c.train.steps = train.get("batch_size", 4), 3
  return c


def test_rows_pair_keys_with_values_and_weight_only_answers():
  tokens, answer = mqar.examples(SPEC, SEQ_LEN, mqar.TRAIN, 0, 70)  # spans two blocks
  half, p = SPEC.vocab // 2, SPEC.pairs
  feats = mqar.features(tokens, answer)
  assert feats["inputs"].shape == (70, SEQ_LEN) and feats["inputs"].dtype == np.int32
  assert feats["weights"].dtype == np.float32
  np.testing.assert_array_equal(feats["weights"], answer.astype(np.float32))
  np.testing.assert_array_equal(feats["targets"][:, :-1], feats["inputs"][:, 1:])
  assert (feats["segment_ids"] == 1).all() and (feats["positions"] == np.arange(SEQ_LEN)).all()
  for row, ans in zip(tokens, answer):
    keys, values = row[0:2 * p:2], row[1:2 * p:2]
    assert ((1 <= keys) & (keys < half)).all() and ((half <= values) & (values < 512)).all()
    assert len(set(keys)) == p and len(set(values)) == p
    pair = dict(zip(keys, values))
    at = np.nonzero(ans)[0]
    assert len(at) == SPEC.queries and (at >= 2 * p).all() and ((at - 2 * p) % 2 == 0).all()
    asked = row[at]
    assert len(set(asked)) == SPEC.queries and set(asked) <= set(keys)
    np.testing.assert_array_equal(row[at + 1], [pair[k] for k in asked])  # the answers
  assert (tokens >= 0).all() and (tokens < SPEC.vocab).all()


def test_deterministic_per_seed_and_index():
  a = mqar.examples(SPEC, SEQ_LEN, mqar.TRAIN, 0, 100)
  b = mqar.examples(SPEC, SEQ_LEN, mqar.TRAIN, 37, 99)  # a slice across a block boundary
  np.testing.assert_array_equal(a[0][37:99], b[0])
  np.testing.assert_array_equal(a[1][37:99], b[1])
  np.testing.assert_array_equal(a[0], mqar.examples(SPEC, SEQ_LEN, mqar.TRAIN, 0, 100)[0])
  for other in (mqar.examples(SPEC, SEQ_LEN, mqar.VALID, 0, 100),
                mqar.examples(SPEC, SEQ_LEN, mqar.TRAIN, 0, 100, stream=1),
                mqar.examples(mqar.MqarSpec(512, 16, 12, seed=1), SEQ_LEN, mqar.TRAIN, 0, 100)):
    assert (other[0][:, :2 * SPEC.pairs] != a[0][:, :2 * SPEC.pairs]).mean() > 0.9


def test_queries_follow_the_power_law():
  spec = mqar.MqarSpec(vocab=512, pairs=8, queries=8, power_a=0.01)
  _, answer = mqar.examples(spec, 256, mqar.TRAIN, 0, 512)
  slot = (np.nonzero(answer)[1] - 16) // 2  # 120 slots; uniform would put 25% in the first 30
  assert (slot < 30).mean() > 0.4
  assert slot.max() > 60  # but the tail is reached


@pytest.mark.parametrize("source,seq_len,match", [
    ("mqar:pairs=4,depth=2", 32, "'depth=2' is not a knob"),
    ("mqar:pairs=four", 32, "pairs='four' must be an integer"),
    ("mqar:pairs=8,queries=9", 64, "queries=9 > pairs=8"),
    ("mqar:vocab=64,pairs=12", 32, "needs >= 48"),
    ("mqar:vocab=16,pairs=8", 64, "use vocab >= 18"),
])
def test_bad_specs_are_one_line(source, seq_len, match):
  with pytest.raises(ValueError, match=match) as e:
    mqar.check_spec(mqar.parse_spec(source), seq_len, source=source)
  assert "\n" not in str(e.value)


def test_train_and_eval_batches_through_data_py():
  c = tiny_config()
  assert data.load_tokenizer(c, None) is None  # pre-tokenized: no tokenizer
  it = data.make_train_iterator(c, None, process_index=0, process_count=1)
  first = [next(it) for _ in range(2)]
  assert set(first[0]) == set(data.FEATURES) and first[0]["inputs"].shape == (4, 32)
  assert first[0]["weights"].sum(1).tolist() == [3, 3, 3, 3]
  state = json.loads(json.dumps(it.get_state()))
  want = next(it)
  it2 = data.make_train_iterator(c, None, process_index=0, process_count=1)
  it2.set_state(state)
  got = next(it2)
  for k in data.FEATURES:
    np.testing.assert_array_equal(got[k], want[k])
  # Two hosts split each global batch in halves.
  h1 = data.make_train_iterator(c, None, process_index=1, process_count=2)
  np.testing.assert_array_equal(next(h1)["inputs"], first[0]["inputs"][2:])
  # Validation: 10 examples -> 3 batches of 4, the last padded with weight-0 rows.
  ev = data.make_eval_batches(c, None, process_index=0, process_count=1)
  assert len(ev) == 3 and ev[2]["weights"][2:].sum() == 0 and ev[2]["weights"][:2].sum() == 6
  assert not np.array_equal(ev[0]["inputs"], first[0]["inputs"])  # a different seed stream
  assert len(data.make_eval_batches(c, None, max_batches=1, process_index=0,
                                    process_count=1)) == 1
  with pytest.raises(ValueError, match="not documents"):
    data.load_documents(c)


def test_model_vocab_smaller_than_task_is_one_line_error():
  c = tiny_config(source="mqar:vocab=128,pairs=4")
  with pytest.raises(ValueError, match=r"model.vocab_size=64; set model.vocab_size >= 128"):
    data.make_train_iterator(c, None, process_index=0, process_count=1)


@pytest.mark.parametrize("family", ["dense_retnet", "dense_mamba", "transformer"])
def test_state_size_matches_the_models_decode_cache(family):
  import jax  # pylint: disable=g-import-not-at-top

  from dense_ssm import models  # pylint: disable=g-import-not-at-top

  exp = _load("mqar_experiment", "experiments/mqar.py")
  c = tiny_config(family)
  cfg = models.ModelConfig.from_dict(c.model.to_dict())
  cache = jax.eval_shape(lambda: models.init_cache(cfg, 1, c.data.seq_len))
  layer = cache["layers"][0]
  floats = sum(int(np.prod(x.shape)) for k, x in layer.items() if k in ("k", "v", "conv", "ssm")
               ) if isinstance(layer, dict) else int(np.prod(layer.shape))
  assert exp.state_floats_per_layer(c.model.to_dict(), c.data.seq_len) == floats


def test_report_writes_table_json_and_plot(tmp_path):
  exp = _load("mqar_experiment", "experiments/mqar.py")
  rows = [{"family": f, "label": exp.LABELS[f], "width": w, "command": "x", "scored": True,
           "step": 10, "accuracy": a, "answers": 32, "answer_loss": 1.0, "params": 1000,
           "state_floats_per_layer": s, "state_bytes_per_layer": 4 * s, "num_layers": 2,
           "source": "mqar:", "seq_len": 32, "batch_size": 4}
          for f, w, a, s in [("gau", 16, 0.5, 128), ("gau", 32, 0.75, 512),
                             ("transformer", 16, 1.0, 1024)]]
  rows.append({"family": "mamba", "label": exp.LABELS["mamba"], "width": 16, "command": "y",
               "scored": False})
  exp.report(rows, str(tmp_path), "python experiments/mqar.py --out=X")
  table = (tmp_path / "results.md").read_text()
  assert "| RetNet GAU (m=0) | 32 | 1,000 | 512 | 2.0 | 10 | 0.750 |" in table
  assert "not scored (failed)" in table and "--out=X" in table
  assert json.loads((tmp_path / "results.json").read_text())["runs"][2]["accuracy"] == 1.0
  assert (tmp_path / "recall_vs_state.png").stat().st_size > 1000


def test_experiment_tiny_trains_with_the_cli_and_scores(tmp_path):
  out = tmp_path / "mqar"
  proc = subprocess.run([sys.executable, "experiments/mqar.py", f"--out={out}", "--tiny",
                         "--families=transformer", "--no_plot"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "MQAR: 1 run(s)" in proc.stdout
  run = json.loads((out / "results.json").read_text())["runs"][0]
  assert run["scored"] and run["step"] == 3 and 0.0 <= run["accuracy"] <= 1.0
  assert run["answers"] == 8 * 4  # valid=8 examples x 4 queries
  assert run["state_floats_per_layer"] == 2 * 32 * 16  # K and V: 2 * seq_len * H
  # The train CLI ran 3 steps on mqar: and its final validation loss (answers only) is the
  # scorer's answer loss on the same examples.
  with open(out / "runs" / "transformer_w16" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
  assert run["valid_loss"] == pytest.approx(run["answer_loss"], abs=1e-4)
  assert "| Transformer | 16 |" in (out / "results.md").read_text()
