"""The Colab notebooks run end to end on tiny settings (DENSE_SSM_NOTEBOOK_TINY=1).

Each notebook's code cells, except the one tagged "install" (pip in Colab), run in order in a
namespace of their own, with the non-interactive matplotlib backend; one Python process runs
the three notebooks (saving two interpreter starts), and notebooks 2 and 3 reuse the runs of
notebook 1 (one DENSE_SSM_RUNS directory), as they do in Colab.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ["1_train_dense_vs_baseline.ipynb", "2_generate.ipynb", "3_look_inside.ipynb"]


def notebook_code(path: str) -> str:
  with open(path) as f:
    nb = json.load(f)
  cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert "install" in cells[0]["metadata"].get("tags", []), "first code cell must install"
  assert "pip install" in "".join(cells[0]["source"])
  return "\n\n".join("".join(c["source"]) for c in cells[1:])


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
      json.dump(notebook_code(os.path.join(REPO, "notebooks", name)), f)
  r = subprocess.run([sys.executable, "-c", runner, *paths], cwd=str(tmp_path), env=env,
                     capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
  stdout = dict(zip(NOTEBOOKS, r.stdout.split("=== ")[1:]))
  assert "already trained" in stdout[NOTEBOOKS[1]]  # reused notebook 1's run
  assert "same seed, same text: True" in stdout[NOTEBOOKS[1]]
  assert "layer 1: key gate mean" in stdout[NOTEBOOKS[2]]
  runs = os.listdir(tmp_path / "runs")
  assert {"dense_retnet", "gau_retnet", "dense_retnet_export"} <= set(runs)
