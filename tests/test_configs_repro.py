"""Reproducible configs: every run writes WORKDIR/config.py, which --config takes back to the
same resolved config; --print_config prints it; packaged configs resolve by bare name."""

import json
import os
import subprocess
import sys

import pytest

from dense_ssm import config_file
from tests import train_testlib

REPO = train_testlib.REPO
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _load(path: str, arg: str | None = None):
  """get_config(arg) of a config file, loaded by path as config_flags does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("loaded_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _train(*flags, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "dense_ssm.train", *flags], cwd=cwd, env=ENV,
                        capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("name,arg", [("default", None), ("default", "dense_mamba"),
                                      ("mqar", "transformer"), ("retnet_1b3", "gau"),
                                      ("mamba_360m", None), ("repro_small", "mamba"),
                                      ("opt_1b3", None)])
def test_written_config_file_gives_back_the_resolved_config(tmp_path, name, arg):
  config = _load(os.path.join(REPO, "configs", f"{name}.py"), arg)
  config.train.lr = 1.25e-4  # an override, and values that need care as literals
  config.data.source = "jsonl:/data/*.jsonl"
  config.train.end_lr_ratio = float("inf")
  path = tmp_path / "config.py"
  path.write_text(config_file.to_python(config))
  again = _load(str(path))
  assert again.to_dict() == config.to_dict()
  assert type(again.train.steps) is int and type(again.train.lr) is float  # pylint: disable=unidiomatic-typecheck
  with pytest.raises(ValueError, match="has no variants"):
    _load(str(path), "gau")


def test_packaged_names_resolve_and_every_config_is_shipped():
  names = config_file.packaged_names()
  shipped = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                   if f.endswith(".py") and not f.startswith("_"))
  assert names == shipped and {"retnet_1b3", "mamba_360m", "default"} <= set(names)
  assert config_file.resolve("retnet_1b3:gau") == os.path.join(
      config_file.packaged_dir(), "retnet_1b3.py") + ":gau"
  assert os.path.samefile(config_file.resolve("retnet_1b3"),
                          os.path.join(REPO, "configs", "retnet_1b3.py"))
  assert config_file.resolve("some/dir/x.py") == "some/dir/x.py"  # paths are left alone
  with pytest.raises(ValueError, match="not a packaged config; use a path or one of default"):
    config_file.resolve("retnet_13b")


def test_bare_name_prints_config_outside_the_repository(tmp_path):
  r = _train("--config=retnet_1b3:gau", "--print_config", "--config.train.steps=7", cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert "names no dataset" in r.stderr  # the data fallback is applied and said, on stderr
  (tmp_path / "printed.py").write_text(r.stdout)
  from dense_ssm import config_lib  # pylint: disable=g-import-not-at-top
  want = config_lib.retnet_config("1b3", "gau")
  want.train.steps, want.data.source = 7, "stdlib"
  assert _load(str(tmp_path / "printed.py")).to_dict() == want.to_dict()
  r = _train("--config=retnet_13b", "--print_config", cwd=tmp_path)
  assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a packaged config" in r.stderr


def test_run_writes_config_py_that_reproduces_the_saved_config(tmp_path):
  """The issue's check: --config=WORKDIR/config.py gives the config the run saved with its
  checkpoint. The run is the trainer's own setup and save (no train-step compile, for speed)."""
  from dense_ssm import train  # pylint: disable=g-import-not-at-top
  work = str(tmp_path / "run")
  config = train_testlib.tiny_config(train__lr=0.002, data__source="")  # "" resolves to stdlib
  trainer = train.Trainer(config, work)
  try:
    trainer.load_data()
    trainer.restore_or_init()
    trainer.save(0, force=True)
  finally:
    trainer.close()
  saved_dir = os.path.join(work, "checkpoints", "0", "config")
  saved_file = os.path.join(saved_dir, os.listdir(saved_dir)[0])
  saved = json.loads(open(saved_file).read())
  assert saved["train"]["lr"] == 0.002 and saved["data"]["source"] == "stdlib"
  written = os.path.join(work, "config.py")
  assert _load(written).to_dict() == saved
  r = _train(f"--config={written}", "--print_config")  # what a run from it would use
  assert r.returncode == 0, r.stderr
  body = lambda text: text.split('"""', 2)[2]  # the docstring names the file's own path
  assert body(r.stdout) == body(open(written).read())
  (tmp_path / "printed.py").write_text(r.stdout)
  assert _load(str(tmp_path / "printed.py")).to_dict() == saved
  # The checkpoint's JSON copy is not a config file: one line naming the file to use.
  r = _train(f"--config={saved_file}", "--print_config")
  assert r.returncode == 1 and "use WORKDIR/config.py" in r.stderr, r.stderr
