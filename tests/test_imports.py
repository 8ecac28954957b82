"""Models, ops and kernels import only jax, flax and numpy: no data or logging libraries."""

import pathlib
import subprocess
import sys

HEAVY = ("ml_collections", "grain", "tensorflow", "tensorflow_datasets", "clu", "orbax",
         "sentencepiece", "torch", "transformers")


def test_core_imports_are_light():
  code = ("import sys; import dense_ssm.models, dense_ssm.ops, dense_ssm.ops.retention_pallas, "
          "dense_ssm.ops.selective_scan_pallas; "
          f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_paper_model_sections_need_no_ml_collections():
  """The decode/kernel benchmarks build the paper's models from plain dicts: config_lib's model
  sections work with ml_collections unimportable, and equal the config files' model sections."""
  code = ("import sys; sys.modules['ml_collections'] = None; import json; "
          "from dense_ssm import config_lib; from dense_ssm.models import ModelConfig; "
          "d = {'r': config_lib.retnet_model('1b3'), 'm': config_lib.mamba_model('360m', 'plain')}; "
          "[ModelConfig.from_dict(x) for x in d.values()]; print(json.dumps(d))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  import json  # pylint: disable=g-import-not-at-top
  from dense_ssm import config_lib  # pylint: disable=g-import-not-at-top
  got = json.loads(out.stdout)
  assert got["r"] == config_lib.retnet_config("1b3").model.to_dict()
  assert got["m"] == config_lib.mamba_config("360m", "plain").model.to_dict()


def test_code_and_readme_cite_docs_not_an_internal_spec():
  """Users get docs/model.md; no package file or the README points to a spec they do not have."""
  root = pathlib.Path(__file__).resolve().parent.parent
  files = [root / "README.md"] + [p for p in sorted((root / "dense_ssm").rglob("*"))
                                  if p.is_file() and p.suffix in (".py", ".md", ".txt", ".json")]
  assert len(files) > 20, files
  bad = [f"{p.relative_to(root)}:{i}" for p in files
         for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
         if "SPEC.md" in line or "SPEC section" in line]
  assert not bad, f"cite docs/model.md instead: {bad}"
  assert (root / "docs" / "model.md").is_file() and (root / "LICENSE").is_file()
