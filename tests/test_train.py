"""End-to-end tests of `python -m dense_ssm.train` (CPU, tiny configs/default.py)."""

from __future__ import annotations

import glob
import os
import subprocess

import numpy as np
import pytest

from train_testlib import cli_args, overrides, read_metrics, run_cli, tiny_config, train_losses, \
    REPO


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny CLI run of 24 steps: checkpoints at 12 and 24, validation at 12 and 24."""
  workdir = str(tmp_path_factory.mktemp("e2e"))
  proc = run_cli(workdir, overrides(train__eval_every=12, train__checkpoint_every=12))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_end_to_end_loss_falls_and_writes_events_and_checkpoints(trained):
  workdir, proc = trained
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 25))
  first, last = np.mean([losses[s] for s in range(1, 5)]), np.mean([losses[s] for s in range(21, 25)])
  assert last < first - 0.5, (first, last)
  valid = [r["valid/loss"] for r in read_metrics(workdir) if "valid/loss" in r]
  assert len(valid) == 2 and valid[1] < valid[0]
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  for step in (12, 24):
    names = set(os.listdir(os.path.join(workdir, "checkpoints", str(step))))
    assert {"state", "data", "config"} <= names, names
  out = proc.stdout
  # Parameter count and compiled memory come before the first step line; the last line is final.
  assert out.index("parameters") < out.index("memory per device") < out.index("step 1/24")
  assert out.strip().splitlines()[-1].startswith("final validation loss")
  assert "perplexity" in out.strip().splitlines()[-1]


def _tree_state(path: str) -> dict[str, float]:
  """{file: mtime} under `path`, except the workdir lock files (each run rewrites its record)."""
  return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, files in os.walk(path) for f in files if not f.startswith(".lock.")}


def test_bad_inputs_fail_with_one_line_and_write_nothing(trained, tmp_path):
  """Each case: non-zero exit, one 'error:' line naming the problem, nothing overwritten."""
  workdir, _ = trained
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  for i in range(3):
    (empty_dir / f"doc{i}.txt").write_text("   \n" if i else "")
  not_a_dir = tmp_path / "a_file"
  not_a_dir.write_text("x")
  tokenizer = os.path.join(workdir, "tokenizer.model")
  cases = {
      "unknown key": (str(tmp_path / "w1"), overrides(), ["--config.train.stpes=3"],
                      "unknown config key 'stpes'"),
      "missing data": (str(tmp_path / "w2"), overrides(data__source="text:/nonexistent/*.txt"), [],
                       "matches no files"),
      "empty dataset": (str(tmp_path / "w3"), overrides(data__source=f"text:{empty_dir}/*.txt"), [],
                        "no non-empty documents"),
      "vocab mismatch": (str(tmp_path / "w4"),
                         overrides(data__tokenizer=tokenizer, model__vocab_size=1024), [],
                         "model.vocab_size=1024"),
      "other model shape": (workdir, overrides(model__hidden_size=96), [],
                            "params/embed_tokens/embedding has shape (512, 64) in the checkpoint "
                            "but (512, 96) in the model"),
      "workdir not writable": (str(not_a_dir / "sub"), overrides(), [], "is not writable"),
  }
  before = _tree_state(workdir)
  procs = {name: subprocess.Popen(cli_args(w, extra, flags), cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name, (w, extra, flags, _) in cases.items()}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=240)
    errors = [line for line in err.splitlines() if "dense_ssm.train: error:" in line]
    assert proc.returncode == 1, (name, err[-2000:])
    assert len(errors) == 1, (name, err[-2000:])
    assert cases[name][3] in errors[0], (name, errors[0])
    assert "Traceback" not in err, (name, err[-2000:])
    assert "step 1/" not in out, name
  assert _tree_state(workdir) == before  # the checkpoint of the other shape is untouched
  for w in ("w1", "w2", "w3", "w4"):  # no checkpoint, events or metrics were written
    assert not glob.glob(str(tmp_path / w / "checkpoints" / "*")), w
    assert not os.path.exists(tmp_path / w / "metrics.jsonl"), w


def test_invalid_utf8_is_replaced_and_counted(trained, tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "retention", "state", "dense", "hidden"]
  for i in range(12):
    text = " ".join(rng.choice(words, 400)).encode()
    (docs / f"d{i}.txt").write_bytes(text + (b"\xff\xfe bad \xc3" if i % 3 == 0 else b""))
  proc = run_cli(str(tmp_path / "w"), overrides(data__source=f"text:{docs}/*.txt",
                                                data__valid_fraction=0.2, train__steps=3,
                                                data__tokenizer=os.path.join(trained[0],
                                                                             "tokenizer.model")))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "invalid UTF-8" in proc.stdout and "replaced" in proc.stdout, proc.stdout


def test_nonfinite_loss_names_step_and_saves_nothing_corrupt(tmp_path, monkeypatch):
  from dense_ssm import data, train  # pylint: disable=g-import-not-at-top

  real = data.make_train_iterator

  class Poisoned:
    """Batch 3 gets NaN weights, so step 3's loss (and update) is NaN."""

    def __init__(self, it):
      self._it, self._n = it, 0

    def __next__(self):
      batch = dict(next(self._it))
      self._n += 1
      if self._n == 3:
        batch["weights"] = np.full_like(batch["weights"], np.nan)
      return batch

    def get_state(self):
      return self._it.get_state()

    def set_state(self, state):
      self._it.set_state(state)

  monkeypatch.setattr(data, "make_train_iterator", lambda *a, **k: Poisoned(real(*a, **k)))
  config = tiny_config(train__steps=8, train__checkpoint_every=2)
  with pytest.raises(train.TrainingError, match=r"non-finite training loss nan .* at step 3"):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_compile_only_for_a_tpu_topology():
  pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")
  from dense_ssm import compile as compile_lib  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  config.mesh.fsdp = 2
  report = compile_lib.compile_for_topology(config, "v5e:2x2", verbose=False)
  assert report["num_devices"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert report["device_kind"].startswith("TPU v5")
  assert 0 < report["memory_bytes"]["total"] < report["hbm_bytes"] and report["fits"]
  # XLA's per-chip FLOPs agree with the 6N + mixing estimate to within a factor of 2.
  ratio = report["xla_flops_per_device"] / report["model_flops_per_device"]
  assert 0.5 < ratio < 2.0, ratio
