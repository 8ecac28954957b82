"""Reliability: one writer per workdir, no silent overwrite, falling back past a damaged
checkpoint, and untrusted inputs (shard indexes, launch variables) kept in their place.

One tiny training workdir (checkpoints 2, 4 and 6, written without training, so nothing is
compiled) is shared by the module; each test damages its own copy.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dense_ssm import checkpoint, convert, export, train, workdir_lock
from dense_ssm import generate as gen
from train_testlib import REPO, run_cli, tiny_config

STEPS = (2, 4, 6)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
  """A workdir as `dense_ssm.train` (tiny configs/default.py) leaves it: tokenizer, checkpoints
  2, 4, 6 whose state["step"] is the step and whose float arrays are random (incompressible)."""
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  trainer = train.Trainer(tiny_config(), workdir)
  try:
    trainer.load_data()
    for step in STEPS:
      rng = np.random.default_rng(step)
      trainer.state = jax.tree.map(
          lambda a, s=step, r=rng: r.standard_normal(a.shape).astype(a.dtype)
          if np.issubdtype(a.dtype, np.floating) else np.full(a.shape, s, a.dtype),
          trainer.fns.abstract_state)
      trainer.save(step, force=True)
  finally:
    trainer.close()
  return workdir


def _copy(run_dir: str, tmp_path) -> str:
  dest = str(tmp_path / "w")
  shutil.copytree(run_dir, dest)
  return dest


def _truncate_arrays(step_dir: str) -> None:
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


DAMAGE = {
    "truncated_array_file": (_truncate_arrays, "OUT_OF_RANGE"),
    "deleted_metadata": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
                         "state/_METADATA is missing"),
    "deleted_state": (lambda d: shutil.rmtree(os.path.join(d, "state")), "state/ is missing"),
}


def _damage(workdir: str, step: int, kind: str) -> str:
  fn, reason = DAMAGE[kind]
  fn(os.path.join(workdir, "checkpoints", str(step)))
  return reason


def _warnings(err: str) -> list[str]:
  return [l for l in err.splitlines() if l.startswith("warning: checkpoint step")]


def _resume(workdir: str, **changes) -> train.Trainer:
  """A Trainer as the CLI builds it, restored (or initialised) but not compiled."""
  trainer = train.Trainer(tiny_config(**changes), workdir)
  try:
    trainer.load_data()
    trainer.restore_or_init()
  finally:
    trainer.close()
  return trainer


# ------------------------------------------------------------------------------ 3. damage


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_resume_falls_back_past_a_damaged_step(run_dir, tmp_path, capsys, kind):
  workdir = _copy(run_dir, tmp_path)
  reason = _damage(workdir, 6, kind)
  trainer = _resume(workdir)
  assert trainer.latest == 4 and trainer.start == 4
  warned = _warnings(capsys.readouterr().err)
  assert len(warned) == 1 and "step 6" in warned[0] and reason in warned[0], warned
  names = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert names[:2] == ["2", "4"] and len(names) == 3 and names[2].startswith("6.damaged-")
  assert names[2] in warned[0]  # says where it went; nothing is deleted
  if kind != "deleted_state":
    assert os.path.isdir(os.path.join(workdir, "checkpoints", names[2], "state"))


def test_export_and_generate_fall_back_and_none_intact_is_one_line(run_dir, tmp_path, capsys):
  workdir = _copy(run_dir, tmp_path)
  _damage(workdir, 6, "truncated_array_file")
  out = str(tmp_path / "export")
  assert export.main([f"--workdir={workdir}", f"--out={out}"]) == 0
  captured = capsys.readouterr()
  assert len(_warnings(captured.err)) == 1 and "@4 " in captured.out, captured
  assert json.load(open(os.path.join(out, "config.json")))["source"].endswith("@4")

  _damage(workdir, 4, "deleted_metadata")  # generate: step 4 is damaged now, 2 is intact
  assert gen.main([f"--workdir={workdir}", "--prompt=def", "--max_new_tokens=1",
                   "--no_stream"]) == 0
  warned = _warnings(capsys.readouterr().err)
  assert len(warned) == 1 and "step 4" in warned[0], warned

  _damage(workdir, 2, "deleted_state")  # nothing intact: one error line after the warning
  with pytest.raises(SystemExit) as e:
    export.main([f"--workdir={workdir}", f"--out={tmp_path / 'export2'}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1 and len(err) == 2 and "step 2" in err[0], err
  assert err[1].startswith("dense_ssm.export: error:") and "no intact checkpoint" in err[1]
  assert sorted(d.split(".")[0] for d in os.listdir(os.path.join(workdir, "checkpoints"))) == \
      ["2", "4", "6"]  # all three kept, set aside


def test_trainer_with_no_intact_step_says_so(run_dir, tmp_path, capsys):
  workdir = _copy(run_dir, tmp_path)
  for step in STEPS:
    _damage(workdir, step, "deleted_metadata")
  with pytest.raises(ValueError, match="no intact checkpoint") as e:
    _resume(workdir)
  assert "\n" not in str(e.value)
  assert len(_warnings(capsys.readouterr().err)) == 3


def test_lost_data_state_is_an_error_unless_replay_is_allowed(run_dir, tmp_path, capsys):
  workdir = _copy(run_dir, tmp_path)
  data_dir = os.path.join(workdir, "checkpoints", "6", "data")
  os.rename(os.path.join(data_dir, "process_0-of-1.json"),
            os.path.join(data_dir, "process_0-of-2.json"))  # as saved by 2 processes
  with pytest.raises(ValueError, match="allow_data_replay=true") as e:
    _resume(workdir)
  assert "no data-iterator state for 1 process" in str(e.value)
  trainer = _resume(workdir, train__allow_data_replay=True)
  assert trainer.latest == 6 and "data would restart" in capsys.readouterr().out


def test_damage_reason_ignores_errors_that_prove_no_damage():
  assert checkpoint.damage_reason(RuntimeError("RESOURCE_EXHAUSTED: out of memory")) is None
  assert checkpoint.damage_reason(PermissionError(13, "denied")) is None
  wrapped = Exception("read failed")
  wrapped.__cause__ = ValueError('DATA_LOSS: Error reading "params.w/0.0" in OCDBT database at '
                                 'local file "/x/": bad checksum')
  assert checkpoint.damage_reason(wrapped) == 'DATA_LOSS: Error reading "params.w/0.0": bad ' \
                                             'checksum'


# ------------------------------------------------------------------------------ 1. lock

_HOLD = ("import sys, time; from dense_ssm import workdir_lock as w; "
         "w.acquire(sys.argv[1], int(sys.argv[2])); print('held', flush=True); time.sleep(120)")


def _holder(workdir: str, index: int = 0) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, workdir, str(index)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_trainer_is_refused_and_a_killed_holder_frees_the_workdir(tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  first = _holder(workdir)
  try:
    r = run_cli(workdir, flags=["--config.train.steps=1"], timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"dense_ssm.train: error: workdir {workdir} is in use by pid "
                               f"{first.pid} on {socket.gethostname()} since "), lines
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # wrote nothing
    # Another process index of a job shares the workdir; the same index collides.
    other = workdir_lock.acquire(workdir, 1)
    other.release()
    with pytest.raises(workdir_lock.WorkdirInUseError, match=f"pid {first.pid}"):
      workdir_lock.acquire(workdir, 0)
    assert workdir_lock.holder(workdir)["pid"] == first.pid
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert workdir_lock.holder(workdir) is None  # the kernel dropped the dead holder's lock
  lock = workdir_lock.acquire(workdir)
  assert workdir_lock.acquire(workdir) is lock  # re-entrant within one process
  lock.release()


def test_holder_file_without_flock_detects_stale_holders(tmp_path, monkeypatch):
  """Object stores and mounts without flock: a holder file whose process is dead (this host)
  or whose heartbeat is old (any host) is taken over; a live one refuses."""
  monkeypatch.setattr(workdir_lock, "_acquire_flock", lambda workdir, path: None)
  workdir = str(tmp_path)
  path = workdir_lock.lock_path(workdir)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  here, now = socket.gethostname(), time.time()
  cases = [({"host": here, "pid": int(dead.stdout), "heartbeat": now}, True),
           ({"host": "elsewhere", "pid": 7, "heartbeat": now - 3600}, True),
           ({"host": "elsewhere", "pid": 7, "heartbeat": now, "since": "T", "job": "42"}, False),
           ({"host": here, "pid": os.getppid(), "heartbeat": now}, False)]
  for record, stale in cases:
    with open(path, "w") as f:
      json.dump(record, f)
    if stale:
      lock = workdir_lock.acquire(workdir)
      assert json.load(open(path))["pid"] == os.getpid()
      lock.release()
      assert not os.path.exists(path)
    else:
      with pytest.raises(workdir_lock.WorkdirInUseError, match=f"pid {record['pid']} on "
                         f"{record['host']}.*delete {path}"):
        workdir_lock.acquire(workdir)


# ------------------------------------------------------------------------------ 2. overwrite


def test_export_refuses_a_non_empty_out_and_overwrite_swaps_it_whole(run_dir, tmp_path, capsys,
                                                                    monkeypatch):
  out = tmp_path / "out"
  out.mkdir()
  (out / "tokenizer.model").write_bytes(b"the user's own tokenizer")
  pre = export.load_workdir(run_dir)
  bare = export.Pretrained(cfg=pre.cfg, params=pre.params, tokenizer=None)
  with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
    export.save_pretrained(bare, str(out))  # used to delete tokenizer.model
  with pytest.raises(SystemExit) as e:
    export.main([f"--workdir={run_dir}", f"--out={out}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1 and len(err) == 1 and "--overwrite" in err[0], err
  assert (out / "tokenizer.model").read_bytes() == b"the user's own tokenizer"

  # A crash while writing leaves the old directory as it was and no temporary directory.
  def crash(tmp):
    export.write_export(bare, tmp)
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    export.write_directory(str(out), crash, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out"]
  assert os.listdir(out) == ["tokenizer.model"]

  assert export.main([f"--workdir={run_dir}", f"--out={out}", "--overwrite"]) == 0
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
  assert (out / "tokenizer.model").read_bytes() != b"the user's own tokenizer"
  assert sorted(os.listdir(tmp_path)) == ["out"]  # the old directory is gone, not left aside
  monkeypatch.setattr(export, "_exchange", lambda a, b: False)  # no atomic swap: two renames
  export.write_directory(str(out), lambda tmp: open(os.path.join(tmp, "x"), "w").close(),
                         overwrite=True)
  assert os.listdir(out) == ["x"] and sorted(os.listdir(tmp_path)) == ["out"]
  for bad in (run_dir, os.path.join(run_dir, "checkpoints", "x")):
    with pytest.raises(SystemExit):
      export.main([f"--workdir={run_dir}", f"--out={bad}", "--overwrite"])
    assert "--workdir" in capsys.readouterr().err
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4", "6"]


def test_convert_refuses_its_own_checkpoint_directory_and_a_non_empty_out(tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_text("{}")
  (ckpt / "model.safetensors").write_bytes(b"weights")
  full = tmp_path / "full"
  full.mkdir()
  (full / "notes.txt").write_text("keep")
  cases = [(ckpt, "is the same as --checkpoint"), (ckpt / "sub", "is inside --checkpoint"),
           (tmp_path, "contains --checkpoint"), (full, "not empty; pass --overwrite")]
  for out, match in cases:
    with pytest.raises(SystemExit) as e:
      convert.main(["retnet", f"--checkpoint={ckpt}", f"--out={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and match in err[0], (out, err)
  assert (ckpt / "model.safetensors").read_bytes() == b"weights"
  assert (full / "notes.txt").read_text() == "keep"


# ------------------------------------------------------------------------------ 5. untrusted


def test_shard_index_names_stay_inside_the_checkpoint_directory(tmp_path, capsys):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "outside.safetensors"))
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "config.json").write_text("{}")
  save_file({"v": np.ones(2, np.float32)}, str(ckpt / "inside.safetensors"))
  for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors"),
                "sub/../../outside.safetensors"):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"v": "inside.safetensors", "w": shard}}))
    with pytest.raises(ValueError, match="not a file name inside"):
      convert.load_checkpoint(str(ckpt))
    with pytest.raises(SystemExit):
      convert.main(["retnet", f"--checkpoint={ckpt}", f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to read it" in err[0], err
  (ckpt / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"v": "inside.safetensors"}}))
  assert list(convert.load_checkpoint(str(ckpt))) == ["v"]


@pytest.mark.parametrize("script", ["tpu_run.sh", "tpu_setup.sh"])
def test_launch_scripts_quote_remote_values(script):
  remote_dir = "my runs;touch PWNED $(id)"
  env = {**os.environ, "DRY_RUN": "1", "TPU_NAME": "t", "ZONE": "z", "WORKDIR": "gs://b/r x",
         "REMOTE_DIR": remote_dir}
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", script)], capture_output=True,
                        text=True, timeout=60, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr
  ssh = [l for l in proc.stdout.splitlines() if l.startswith("+ gcloud compute tpus tpu-vm ssh")]
  command = next(a for a in shlex.split(ssh[0][2:]) if a.startswith("--command="))
  lexer = shlex.shlex(command[len("--command="):], posix=True, punctuation_chars=True)
  lexer.whitespace_split = True  # words as the remote shell splits them; ; & | apart
  words = list(lexer)
  cd = words.index("cd")
  assert words[cd + 1] == remote_dir and "touch" not in words, words
  if script == "tpu_run.sh":
    assert "--workdir=gs://b/r x" in words
