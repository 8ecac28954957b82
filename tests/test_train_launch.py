"""launch/ scripts: dry runs print the commands they would run; shellcheck-clean if installed."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

from train_testlib import REPO

LAUNCH = os.path.join(REPO, "launch")
ENV = {"DRY_RUN": "1", "TPU_NAME": "my-tpu", "ZONE": "us-east5-a", "ACCELERATOR": "v5p-16",
       "WORKDIR": "gs://bucket/run"}


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, timeout=60, cwd=REPO,
                        env={**os.environ, **(ENV if env is None else env)})


def test_tpu_scripts_print_the_gcloud_commands():
  out = _run("tpu_create.sh").stdout
  assert "+ gcloud compute tpus tpu-vm create my-tpu --zone=us-east5-a" in out
  assert "--accelerator-type=v5p-16 --version=v2-alpha-tpuv5" in out
  out = _run("tpu_setup.sh").stdout
  assert "tpu-vm scp" in out and "--worker=all" in out and "pip install" in out
  proc = _run("tpu_run.sh", "--config=configs/retnet_1b3.py", "--config.train.steps=10")
  assert proc.returncode == 0, proc.stderr
  ssh = [l for l in proc.stdout.splitlines() if l.startswith("+ gcloud compute tpus tpu-vm ssh")]
  assert len(ssh) == 1 and "--worker=all" in ssh[0]
  assert ("python3 -m dense_ssm.train --distributed=on --workdir=gs://bucket/run "
          "--config=configs/retnet_1b3.py --config.train.steps=10") in ssh[0]
  assert "tpu-vm delete my-tpu" in _run("tpu_delete.sh").stdout


def test_slurm_script_prints_srun():
  proc = _run("slurm_gpu.sbatch", "--config=configs/default.py",
              env={"DRY_RUN": "1", "WORKDIR": "/shared/run"})
  assert proc.returncode == 0, proc.stderr
  assert ("+ srun --kill-on-bad-exit=1 python -m dense_ssm.train --distributed=on "
          "--workdir=/shared/run --config=configs/default.py") in proc.stdout


def test_missing_setting_is_a_one_line_error():
  proc = _run("tpu_run.sh", env={"DRY_RUN": "1"})
  assert proc.returncode == 1 and proc.stderr.strip() == \
      "error: set TPU_NAME (see launch/README.md)"


def test_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  scripts = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) + [os.path.join(LAUNCH,
                                                                           "slurm_gpu.sbatch")])
  proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 0, proc.stdout
