"""What the command-line entry points share: bad input is one line on stderr, exit status 1.

    with cli.user_errors("dense_ssm.export", args.traceback):
      ...   # a ValueError("...") here prints "dense_ssm.export: error: ..." and exits 1

`--traceback` (argparse: `add_traceback_flag`) re-raises instead, for debugging.
"""

from __future__ import annotations

import contextlib
import sys

# Errors that mean "the input is wrong" (config, paths, files), never a bug of ours.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               PermissionError)


def add_traceback_flag(parser) -> None:
  parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")


@contextlib.contextmanager
def user_errors(prog: str, show_traceback: bool = False, extra: tuple = ()):
  """Turns USER_ERRORS (and `extra`) raised in the body into `prog: error: MESSAGE` on stderr
  and SystemExit(1); with show_traceback they propagate unchanged."""
  try:
    yield
  except USER_ERRORS + tuple(extra) as e:
    if show_traceback:
      raise
    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
