"""What the command-line entry points share: bad input is one line on stderr, exit status 1.

    with cli.user_errors("dense_ssm.export", args.traceback):
      ...   # a ValueError("...") here prints "dense_ssm.export: error: ..." and exits 1

`--traceback` re-raises instead, for debugging. Ctrl-C (KeyboardInterrupt) prints
`prog: interrupted` and exits 130. Every `python -m dense_ssm.X` entry point takes absl flags
(`--name=value`, `--flag`/`--noflag`): train and summary parse their global flags with
`absl_flags_parser(prog)` and read `--config` with `config_value`; the others define theirs on
a private FlagValues with `parse_flags`; so flag and config-file errors are one line as well.
(argparse serves the scripts in experiments/ and benchmarks/ and the exported serving loader,
serve.py, which needs only jax and numpy; `python -m dense_ssm.harness` takes lm-eval's own
arguments.)
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

# Errors that mean "the input is wrong" (config, paths, files), never a bug of ours.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               PermissionError)


@contextlib.contextmanager
def user_errors(prog: str, show_traceback: bool = False, extra: tuple = ()):
  """Turns USER_ERRORS (and `extra`) raised in the body into `prog: error: MESSAGE` on stderr
  and SystemExit(1); with show_traceback they propagate unchanged."""
  try:
    yield
  except USER_ERRORS + tuple(extra) as e:
    if show_traceback:
      raise
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
  except KeyboardInterrupt:
    if show_traceback:
      raise
    print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
    raise SystemExit(130) from None


def one_line(e: BaseException) -> str:
  """The message of a flag-parsing error on one line: escaped newlines and whitespace runs
  become one space, the quotes of a KeyError's message are dropped."""
  text = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1].strip()
  return text or type(e).__name__


def absl_flags_parser(prog: str):
  """A `flags_parser` for `absl.app.run` whose errors (unknown flag or config key, bad value,
  a config file whose get_config raises) are one line `prog: error: ...`, exit 1."""

  def parse(argv: list[str]) -> list[str]:
    from absl import flags  # pylint: disable=g-import-not-at-top

    try:
      return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except  # config_flags raises many kinds
      msg = one_line(e)
      if "Traceback" in str(e):  # the config file's get_config raised: keep its last line
        bad = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
        msg = f"--config={bad}: {str(e).strip().splitlines()[-1].strip()}"
      elif isinstance(e, (KeyError, AttributeError)):  # an override of a key the config lacks
        key = re.search(r"'?(\w+)", msg).group(1)
        bad = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                    and a.split("=")[0].endswith(f".{key}")), f"--config...{key}")
        hint = msg[msg.index("Did you mean"):] if "Did you mean" in msg else \
            "see dense_ssm/config_lib.py for the valid keys"
        msg = f"{bad}: unknown config key {bad.rsplit('.', 1)[-1]!r}; {hint}"
      print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
      sys.exit(1)

  return parse


def config_value(holder, example: str = "configs/default.py"):
  """The ConfigDict of a `config_flags` flag; a missing flag or a config file that fails to
  load raises a one-line error (config_flags reports a failed load only on first access)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config = holder.value
  if config is None:
    raise ValueError(f"--{holder.name} is required, e.g. --{holder.name}={example}")
  try:
    config.keys()
  except OSError as e:
    path = config_flags.get_config_filename(flags.FLAGS[holder.name])
    if not os.path.exists(path.split(":")[0]):
      raise FileNotFoundError(f"--{holder.name}={path}: no such file; e.g. "
                              f"--{holder.name}={example}") from None
    raise ValueError(f"--{holder.name}={path} failed to load: {one_line(e)}") from None
  return config


def parse_flags(prog: str, usage: str, define, argv=None):
  """absl flags on a private FlagValues, for the `python -m dense_ssm.X` entry points other than
  train (importing them defines no global flag): `define(fv)` defines the flags, `argv` holds
  the arguments after the program name (None: sys.argv's). Returns (flag values, positional
  arguments). `--help` prints `usage` and every flag, then exits 0; an unknown, malformed or
  missing required flag is one line `prog: error: ...`, exit 1."""
  import textwrap  # pylint: disable=g-import-not-at-top

  from absl import flags  # pylint: disable=g-import-not-at-top

  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  define(fv)
  if any(a in ("-h", "-help", "--help", "--helpshort", "--helpfull") for a in argv):
    lines = [usage.strip(), "", "flags:"]
    for name in fv:
      if name in ("flagfile", "undefok"):
        continue
      f = fv[name]
      default = "" if f.default in (None, [], "") else f" (default: {f.default_as_str})"
      text = " ".join(f.help.split()).replace(".; repeat", "; repeat")  # absl's multi-flag note
      lines += textwrap.wrap(f"--{name}: {text}{default}", 98, initial_indent="  ",
                             subsequent_indent="      ")
    print("\n".join(lines + ["  --help: show this help and exit."]))
    raise SystemExit(0)
  try:
    rest = fv([prog] + argv)
  except flags.Error as e:
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
  return fv, rest[1:]
