"""experiments/dense_vs_baseline.py: the equal-token comparison and one tiny end-to-end run."""

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SPEC = importlib.util.spec_from_file_location(
    "dense_vs_baseline", os.path.join(REPO, "experiments", "dense_vs_baseline.py"))
exp = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(exp)


def _run(model, seed, losses, step_tokens=100):
  curve = [((i + 1) * step_tokens, l) for i, l in enumerate(losses)]
  return {"model": model, "seed": seed, "params": 10, "tokens": curve[-1][0],
          "planned_tokens": 500, "curve": curve, "tokens_per_s_median": 1.0}


def test_pairs_are_compared_at_the_largest_common_token_count(tmp_path):
  runs = [_run("dense_retnet", 0, [3.0, 2.5]), _run("dense_retnet", 1, [3.1, 2.6]),
          _run("gau", 0, [3.2, 2.9, 2.0]), _run("gau", 1, [3.3, 2.8, 2.1, 2.0])]
  rows, gaps = exp.summarize(runs)
  by_model = {r["model"]: r for r in rows}
  # The baseline ran longer, but both are read at 200 tokens, the last point every run has.
  assert by_model["gau"]["compared_at_tokens"] == 200
  assert by_model["gau"]["losses"] == [2.9, 2.8]
  assert abs(by_model["dense_retnet"]["loss_mean"] - 2.55) < 1e-12
  assert abs(by_model["dense_retnet"]["loss_half_range"] - 0.05) < 1e-12
  (gap,) = gaps
  assert abs(gap["gap"] - (2.55 - 2.85)) < 1e-12
  assert gap["dense_better"] and gap["ranges_separate"]
  # Overlapping seed ranges are reported as unresolved.
  runs[1] = _run("dense_retnet", 1, [3.1, 2.85])
  _, (gap,) = exp.summarize(runs)
  assert gap["dense_better"] and not gap["ranges_separate"]
  text = exp.write_report(str(tmp_path), runs, "test")
  assert "not resolved" in text and "at 0.0M tokens" in text
  assert (tmp_path / "curves.png").stat().st_size > 1000


def test_tiny_run_end_to_end(tmp_path):
  """One tiny run through the real train CLI, then the report built from its metrics."""
  rc = exp.main(["--out", str(tmp_path), "--tiny", "--models=gau", "--seeds=0"])
  assert rc == 0
  results = json.loads((tmp_path / "results.json").read_text())
  (run,) = results["runs"]
  assert run["model"] == "gau" and run["steps"] == 6 and len(run["curve"]) == 2
  assert 0 < run["curve"][-1][1] < 10
  assert (tmp_path / "tokenizer" / "tokenizer.model").exists()
  assert (tmp_path / "results.md").read_text().startswith("| model |")
