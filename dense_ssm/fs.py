"""The file layer for every path a user gives: local paths and URLs (`gs://bucket/dir`) alike.

A path with a scheme (`gs://`, `s3://`, ... anything `etils.epath` has registered) goes
through `epath`, the layer Orbax uses for checkpoints: TensorFlow's `tf.io.gfile` when
TensorFlow is installed, else fsspec (gs:// then needs `pip install gcsfs`). A local path (no
scheme) goes to the `os` module directly, with `~` expanded. Functions take and return `str`.

Rules:
  - `write_bytes` / `write_text` publish whole files: locally through a temporary sibling
    renamed over the target (a reader sees the old file or the new one, never a part); on an
    object store the object appears when its upload completes, which is already all or nothing.
  - `glob` returns the files (not directories) a pattern matches, sorted. Local patterns may use
    `**` (any depth); remote ones may not (one listing request per directory level would be
    needed): use one `*` per level.
  - Object stores have no directories and no rename; `makedirs` is then a no-op where the store
    has nothing to create, and directory trees are copied file by file (`copy_tree`).
"""

from __future__ import annotations

import builtins
import contextlib
import glob as glob_lib
import os
import shutil
import socket
import tempfile
from typing import IO, Iterator


def is_remote(path: str) -> bool:
  """True for a URL with a scheme (gs://...); False for a local path."""
  return "://" in str(path)


def expand(path: str) -> str:
  """A local path with `~` expanded; a URL unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.expanduser(path)


def abspath(path: str) -> str:
  """The absolute local path (`~` expanded), or the URL without a trailing slash."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def _epath(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top

  return epath.Path(path)


def open(path: str, mode: str = "r") -> IO:  # pylint: disable=redefined-builtin
  """Opens a file; text modes are UTF-8. Modes: r, w, a (object stores: r and w), plus b."""
  path = expand(path)
  encoding = None if "b" in mode else "utf-8"
  if not is_remote(path):
    return builtins.open(path, mode, encoding=encoding)
  return _epath(path).open(mode, encoding=encoding)


def exists(path: str) -> bool:
  path = expand(path)
  return os.path.exists(path) if not is_remote(path) else _epath(path).exists()


def isdir(path: str) -> bool:
  path = expand(path)
  return os.path.isdir(path) if not is_remote(path) else _epath(path).is_dir()


def isfile(path: str) -> bool:
  path = expand(path)
  if not is_remote(path):
    return os.path.isfile(path)
  p = _epath(path)
  return p.exists() and not p.is_dir()


def listdir(path: str) -> list[str]:
  """The names in a directory, sorted."""
  path = expand(path)
  if not is_remote(path):
    return sorted(os.listdir(path))
  return sorted(p.name for p in _epath(path).iterdir())


def getsize(path: str) -> int:
  path = expand(path)
  return os.path.getsize(path) if not is_remote(path) else int(_epath(path).stat().length)


def makedirs(path: str) -> None:
  """Creates a directory and its parents; an existing one is fine."""
  path = expand(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
  else:
    _epath(path).mkdir(parents=True, exist_ok=True)


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  """The file decoded as UTF-8 (invalid bytes become U+FFFD)."""
  return read_bytes(path).decode("utf-8", errors="replace")


def write_bytes(path: str, data: bytes) -> None:
  """Writes the whole file at once (module docstring: a reader never sees a part)."""
  path = expand(path)
  if is_remote(path):
    with open(path, "wb") as f:
      f.write(data)
    return
  tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
  try:
    with builtins.open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
  path = expand(path)
  if not is_remote(path):
    os.remove(path)
  else:
    _epath(path).unlink()


def rmtree(path: str) -> None:
  """Deletes a directory tree; a missing one is fine."""
  path = expand(path)
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
  elif _epath(path).exists():
    _epath(path).rmtree()


def glob(pattern: str) -> list[str]:
  """The files `pattern` matches, sorted (module docstring: `**` only on local paths)."""
  pattern = expand(pattern)
  if not is_remote(pattern):
    return sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p))
  prefix, rest = split_glob(pattern)
  if not rest:
    return [pattern] if isfile(pattern) else []
  if "**" in rest:
    raise ValueError(f"{pattern}: '**' is not supported on remote paths (it would list every "
                     "directory below); use one '*' per directory level")
  return sorted(str(p) for p in _epath(prefix).glob(rest) if not p.is_dir())


def split_glob(pattern: str) -> tuple[str, str]:
  """(the leading directories without wildcards, the rest); the rest is '' for a plain path."""
  scheme, sep, body = pattern.rpartition("://")
  parts = body.split("/")
  fixed = 0
  while fixed < len(parts) and not glob_lib.has_magic(parts[fixed]):
    fixed += 1
  if fixed == len(parts):
    return pattern, ""
  head = "/".join(parts[:fixed])
  return scheme + sep + (head or ("/" if body.startswith("/") else "")), "/".join(parts[fixed:])


def copy_tree(local_dir: str, dest: str, *, last: tuple[str, ...] = ()) -> None:
  """Copies the files under `local_dir` into the directory `dest` (any path), file by file;
  the files named in `last` (relative paths) are written after all the others."""
  files = []
  for d, _, names in os.walk(local_dir):
    files += [os.path.relpath(os.path.join(d, n), local_dir) for n in names]
  files.sort(key=lambda rel: (rel in last, last.index(rel) if rel in last else 0, rel))
  made = set()
  for rel in files:
    target = os.path.join(dest, rel)
    parent = os.path.dirname(target)
    if parent not in made:
      makedirs(parent)
      made.add(parent)
    with builtins.open(os.path.join(local_dir, rel), "rb") as src, open(target, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)


@contextlib.contextmanager
def local_output(path: str) -> Iterator[str]:
  """A local path to write `path` through: `path` itself when local; for a URL, a temporary
  file uploaded to `path` when the block ends without error (for writers that only take local
  paths)."""
  path = expand(path)
  if not is_remote(path):
    yield path
    return
  tmp_dir = tempfile.mkdtemp(prefix="dense_ssm_upload_")
  try:
    local = os.path.join(tmp_dir, os.path.basename(path))
    yield local
    with builtins.open(local, "rb") as src, open(path, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)


__all__ = ["abspath", "copy_tree", "exists", "expand", "getsize", "glob", "is_remote", "isdir",
           "isfile", "listdir", "local_output", "makedirs", "open", "read_bytes", "read_text",
           "remove", "rmtree", "split_glob", "write_bytes", "write_text"]
