"""Config files: a run's resolved config as a Python file, and the configs shipped by name.

Every training run writes `WORKDIR/config.py`: a config file whose `get_config()` returns the
run's resolved config (config file, variant and `--config.*` overrides applied, derived values
spelled out) as a literal, so that

  python -m dense_ssm.train --config=WORKDIR/config.py --workdir=NEW_DIR

trains with the same config (`python -m dense_ssm.train --config=... --print_config` prints
the same text without training). A resumed run with changed flags rewrites it. The config
stored in each checkpoint (`checkpoints/STEP/config`) is JSON, for reading, not for `--config`.

The repository's `configs/` directory is the package `dense_ssm.configs` (a link in the source
tree; real files in a wheel), so `--config=NAME[:VARIANT]`, a bare name such as `retnet_1b3` or
`default:dense_mamba`, names `configs/NAME.py` wherever dense_ssm is installed, and so does
`--config=configs/NAME.py` when no such file is in the current directory.
"""

from __future__ import annotations

import math
import os
from typing import Any

_HEADER = '''"""The resolved config of a dense_ssm training run (written by the trainer).

  python -m dense_ssm.train --config={path} --workdir=NEW_DIR

Variants and overrides are applied already, so get_config takes no argument; change values
with --config.SECTION.KEY=VALUE as with any config file.
"""

import ml_collections


def get_config(arg=None):
  if arg:
    raise ValueError(f"this config is resolved and has no variants (got {{arg!r}}); drop ':'"
                     " and what follows it")
  return ml_collections.ConfigDict({body})
'''


def _literal(value: Any, indent: int) -> str:
  if isinstance(value, dict):
    if not value:
      return "{}"
    pad = " " * (indent + 4)
    items = "".join(f"{pad}{k!r}: {_literal(v, indent + 4)},\n" for k, v in value.items())
    return "{\n" + items + " " * indent + "}"
  if isinstance(value, (list, tuple)):
    parts = [_literal(v, indent) for v in value]
    if isinstance(value, tuple):
      return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
    return "[" + ", ".join(parts) + "]"
  if isinstance(value, float) and not math.isfinite(value):
    return f'float("{value}")'
  if value is None or isinstance(value, (bool, int, float, str)):
    return repr(value)
  raise ValueError(f"config value {value!r} ({type(value).__name__}) cannot be written to a "
                   "config file; use numbers, strings, booleans, lists or None")


def to_python(config, path: str = "WORKDIR/config.py") -> str:
  """The text of a config file whose get_config() returns `config` (a ConfigDict) resolved."""
  return _HEADER.format(path=path, body=_literal(config.to_dict(), 2))


def write(workdir: str, config) -> str:
  """Writes `workdir/config.py` (local or gs://, published whole: dense_ssm/fs.py); returns its
  path."""
  from dense_ssm import fs  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, "config.py")
  fs.write_text(path, to_python(config, path))
  return path


# ------------------------------------------------------------------------------ packaged names


def packaged_dir() -> str:
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_names() -> list[str]:
  folder = packaged_dir()
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(n[:-3] for n in names if n.endswith(".py") and not n.startswith("_"))


def resolve(value: str) -> str:
  """A `--config` value with a packaged name (`NAME[:VARIANT]`, or `configs/NAME.py[:VARIANT]`
  that is not a file here) replaced by that file's path; any other value unchanged. Raises
  ValueError for a bare name that is not packaged, and for a JSON file (a checkpoint's config)."""
  path, sep, arg = value.partition(":")
  if os.path.isfile(path):
    with open(path, "rb") as f:
      if f.read(64).lstrip()[:1] == b"{":
        raise ValueError(f"--config={path} is JSON (a checkpoint's copy of a run config); "
                         "config files are Python: use WORKDIR/config.py, which the run wrote")
    return value
  bare = path and os.sep not in path and "/" not in path and not path.endswith(".py")
  name = path if bare else (path[len("configs/"):-3] if path.startswith("configs/") and
                            path.endswith(".py") and path.count("/") == 1 else None)
  if name is None:
    return value
  if name in packaged_names():
    return os.path.join(packaged_dir(), name + ".py") + sep + arg
  if not bare:
    return value  # config_flags reports the missing file
  raise ValueError(f"--config={value}: no such file, and {name!r} is not a packaged config; "
                   f"use a path or one of {', '.join(packaged_names())}")


def load(spec: str, overrides: list[str] = (), root: str = ""):
  """The config of `spec` (`PATH[:VARIANT]` or a packaged name, PATH relative to `root`), then
  each `KEY=VALUE` override (VALUE read as a Python literal, else true/false, else a string):
  what scripts use to build a run's config the way the train CLI does."""
  import ast  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = resolve(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location("dense_ssm_config",
                                                       os.path.join(root, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      value = {"true": True, "false": False}.get(value.lower(), value)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


__all__ = ["load", "packaged_dir", "packaged_names", "resolve", "to_python", "write"]
