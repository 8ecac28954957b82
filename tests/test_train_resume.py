"""Resume exactness after a hard kill, and SIGTERM (preemption) handling, through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp

from dense_ssm import data
from train_testlib import REPO, cli_args, overrides, run_cli, tiny_config, train_losses

# Dropout on, so that the per-step dropout keys are part of what must resume exactly.
RUN = overrides(train__steps=12, train__checkpoint_every=6, model__dropout=0.1)


def _restore(workdir: str, step: int):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)


def _data_state(workdir: str, step: int) -> str:
  with open(os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")) as f:
    return f.read()


def _last_by_step(workdir: str) -> dict[int, float]:
  return train_losses(workdir)  # later rows (the resumed run) overwrite earlier ones


def test_kill9_then_resume_is_bitwise_identical(tmp_path):
  straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
  data.load_tokenizer(tiny_config(), str(tmp_path))  # one tokenizer for both runs
  run = {**RUN, "data.tokenizer": str(tmp_path / "tokenizer.model")}
  p_straight = subprocess.Popen(cli_args(straight, run), cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  p_crash = subprocess.Popen(cli_args(crashed, run, ["--testing_sigkill_after_step=9"]), cwd=REPO,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  out, err = p_crash.communicate(timeout=300)
  assert p_crash.returncode == -signal.SIGKILL, err[-3000:]
  assert sorted(os.listdir(os.path.join(crashed, "checkpoints"))) == ["6"]
  assert max(train_losses(crashed)) >= 8  # it ran past the checkpoint (metrics lag one step)

  resumed = run_cli(crashed, run)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout and "/checkpoints/6" in resumed.stdout
  out, err = p_straight.communicate(timeout=300)
  assert p_straight.returncode == 0, err[-3000:]

  a, b = _last_by_step(straight), _last_by_step(crashed)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]  # exact, same batches
  assert _data_state(straight, 12) == _data_state(crashed, 12)
  sa, sb = _restore(straight, 12), _restore(crashed, 12)
  leaves_a, leaves_b = jax.tree.leaves(sa), jax.tree.leaves(sb)
  assert len(leaves_a) == len(leaves_b) > 10
  assert int(sa["step"]) == int(sb["step"]) == 12
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bitwise


def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
  workdir = str(tmp_path / "w")
  proc = subprocess.Popen(cli_args(workdir, overrides(train__steps=100_000)), cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  rest, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, "".join(lines) + rest
  saved = [l for l in rest.splitlines() if l.startswith("preempted (SIGTERM): saved step")]
  assert len(saved) == 1, rest
  step = int(saved[0].split("saved step ")[1].split()[0])
  assert step >= 3
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(step)]
  assert "final validation loss" not in rest
