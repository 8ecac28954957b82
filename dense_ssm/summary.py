"""Model summary: per-module parameter table from shapes alone (jax.eval_shape; nothing is
allocated), then the total parameter count as a plain integer on the last line.

  python -m dense_ssm.summary --config=configs/retnet_1b3.py
"""

from __future__ import annotations

import math

from absl import app
from absl import flags
from ml_collections import config_flags

from dense_ssm import cli
from dense_ssm import config_lib
from dense_ssm.models import abstract_params

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show tracebacks of configuration errors.")


def _leaves(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, prefix + (k,))
  else:
    value = getattr(tree, "value", tree)  # unbox nn.Partitioned
    names = getattr(tree, "names", None)
    yield prefix, tuple(value.shape), names


def summary_lines(cfg) -> list[str]:
  """Rows: each parameter of the first two layers and every non-layer module; one row per layer."""
  rows = list(_leaves(abstract_params(cfg)))
  lines = [f"{'parameter':64s} {'shape':>20s} {'count':>14s}  logical axes"]
  per_layer: dict[str, int] = {}
  for path, shape, names in rows:
    n = math.prod(shape)
    top = path[0]
    if top.startswith("layers_"):
      per_layer[top] = per_layer.get(top, 0) + n
      if int(top.split("_")[1]) > 1:
        continue
    lines.append(f"{'/'.join(path):64s} {str(shape):>20s} {n:>14,d}  {names}")
  if per_layer:
    lines.append("")
    lines.append(f"{'layer':64s} {'':>20s} {'count':>14s}")
    for name in sorted(per_layer, key=lambda s: int(s.split("_")[1])):
      lines.append(f"{name:64s} {'':>20s} {per_layer[name]:>14,d}")
  total = sum(math.prod(s) for _, s, _ in rows)
  lines.append("")
  lines.append(f"family={cfg.family} layers={cfg.num_layers} hidden={cfg.hidden_size} "
               f"dense_m={cfg.dense.layers} vocab={cfg.vocab_size}")
  lines.append(str(total))
  return lines


def main(argv):
  """Errors (flags, config file, model values) are one line `dense_ssm.summary: error: ...`."""
  with cli.user_errors("dense_ssm.summary", _TRACEBACK.value):
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments {argv[1:]}; pass options as --config=FILE and "
                       "--config.model.KEY=VALUE")
    config = cli.config_value(_CONFIG, "configs/retnet_1b3.py")
    cfg = config_lib.check_model_config(config)
    print("\n".join(summary_lines(cfg)))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.absl_flags_parser("dense_ssm.summary"))
