"""The Colab notebooks: they run end to end on tiny settings, their install cell finds a checkout
or a URL without running pip in test mode, and notebooks 1 and 3 are committed with their plots.

Test mode is DENSE_SSM_NOTEBOOK_TINY=1: the demo size is forced to "tiny" (seconds) whatever the
notebook asks, and the install cell prints its pip command instead of running it. Each
notebook's code cells run in order in a namespace of their own, with the non-interactive
matplotlib backend; one Python process runs the three notebooks (saving two interpreter starts),
and notebooks 2 and 3 reuse the runs of notebook 1 (one DENSE_SSM_RUNS directory), as they do in
Colab.
"""

import base64
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ["1_train_dense_vs_baseline.ipynb", "2_generate.ipynb", "3_look_inside.ipynb"]
WITH_FIGURES = NOTEBOOKS[0], NOTEBOOKS[2]


def load(name: str) -> dict:
  with open(os.path.join(REPO, "notebooks", name)) as f:
    return json.load(f)


def code_cells(name: str) -> list[str]:
  cells = [c for c in load(name)["cells"] if c["cell_type"] == "code"]
  assert "install" in cells[0]["metadata"].get("tags", []), "first code cell must install"
  return ["".join(c["source"]) for c in cells]


def test_notebooks_run_on_tiny_settings(tmp_path):
  pytest.importorskip("matplotlib", reason="optional extra: pip install -e '.[notebooks]'")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg",
         "DENSE_SSM_NOTEBOOK_TINY": "1", "DENSE_SSM_RUNS": str(tmp_path / "runs")}
  runner = "\n".join([
      "import json, sys",
      "for path in sys.argv[1:]:",
      "  print('=== ' + path, flush=True)",
      "  exec(compile(json.loads(open(path).read()), path, 'exec'), {'__name__': '__main__'})",
  ])
  paths = []
  for name in NOTEBOOKS:
    paths.append(str(tmp_path / f"{name}.json"))
    with open(paths[-1], "w") as f:
      json.dump("\n\n".join(code_cells(name)), f)
  r = subprocess.run([sys.executable, "-c", runner, *paths], cwd=str(tmp_path), env=env,
                     capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
  stdout = dict(zip(NOTEBOOKS, r.stdout.split("=== ")[1:]))
  for name in NOTEBOOKS:  # no checkout above tmp_path and no REPO_URL: the cell only reports
    assert "dense_ssm is already installed" in stdout[name], stdout[name][:2000]
    assert "demo size: tiny" in stdout[name]
  assert "already trained" in stdout[NOTEBOOKS[1]]  # reused notebook 1's run
  assert "same seed, same text: True" in stdout[NOTEBOOKS[1]]
  assert "layer 1: key gate mean" in stdout[NOTEBOOKS[2]]
  runs = os.listdir(tmp_path / "runs" / "tiny")
  assert {"dense_retnet", "gau_retnet", "dense_retnet_export"} <= set(runs)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_finds_a_checkout_or_the_url(name, tmp_path, monkeypatch, capsys):
  cell = code_cells(name)[0]
  assert "OWNER" not in cell and 'REPO_URL = ""' in cell
  monkeypatch.setenv("DENSE_SSM_NOTEBOOK_TINY", "1")
  monkeypatch.setattr(sys, "path", list(sys.path))
  checkout = tmp_path / "checkout"
  (checkout / "notebooks").mkdir(parents=True)
  (checkout / "setup.cfg").write_text("[metadata]\nname = dense_ssm\n")
  monkeypatch.chdir(checkout / "notebooks")
  exec(compile(cell, name, "exec"), {})
  out = capsys.readouterr().out
  assert f"-m pip install -q -e {checkout}[notebooks]" in out and "test mode: not run" in out
  assert sys.path[0] == str(checkout)

  monkeypatch.chdir(tmp_path)
  exec(compile(cell.replace('REPO_URL = ""', 'REPO_URL = "https://example.org/x/dense_ssm"'),
               name, "exec"), {})
  out = capsys.readouterr().out
  assert "dense_ssm[notebooks] @ git+https://example.org/x/dense_ssm" in out
  assert "test mode: not run" in out


@pytest.mark.parametrize("name", WITH_FIGURES)
def test_demo_notebooks_carry_their_figures(name):
  assert os.path.getsize(os.path.join(REPO, "notebooks", name)) < 1_000_000
  pngs = [base64.b64decode(o["data"]["image/png"])
          for c in load(name)["cells"] if c["cell_type"] == "code"
          for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert pngs, f"{name} has no plot in its outputs; re-make its outputs (the command is in its first cell)"
  assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 5_000 for p in pngs)
