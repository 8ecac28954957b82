"""Models, ops and kernels import only jax, flax and numpy: no data or logging libraries."""

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
