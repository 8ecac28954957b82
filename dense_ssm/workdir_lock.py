"""One writer per training workdir: an exclusive lock held for the trainer's whole life.

Each process of a job locks its own file, `<workdir>/.lock.<process_index>`, so the processes of
one multi-host job share the workdir while a second job collides with the first (its process i
meets the first job's process i; every job has a process 0). The file holds a holder record,
{"host", "pid", "since", "job"}, that the refusal names:

    workdir DIR is in use by pid N on HOST since T; ...

Two ways to lock, chosen per file:
  - `fcntl.flock` (local disks, and NFSv4, where Linux maps it onto byte-range locks): the kernel
    releases the lock on any exit, kill -9 included, so a crashed holder is never stale. The
    file itself is kept; its record is cleared on release.
  - a holder file, for object stores (`gs://...` workdirs) and mounts that refuse flock: the
    record is refreshed every HEARTBEAT_S seconds and counts as stale when its process is
    dead (same host) or its heartbeat is older than STALE_AFTER_S (any host). This is best
    effort: two processes starting within the same moment can both take it, and a mount that
    grants flock on each host separately (some FUSE file systems) cannot exclude another host.

A process that already holds a workdir's lock gets the same lock again (say, a notebook
re-running training after an error), so the lock excludes other processes, not this one.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import errno
import json
import os
import socket
import threading
import time
from typing import Any

LOCK_PREFIX = ".lock."
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_JOB_ENV = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")


class WorkdirInUseError(ValueError):
  """Another live process holds the workdir; the message names it (host, pid, start, job)."""


def lock_path(workdir: str, process_index: int = 0) -> str:
  return f"{workdir.rstrip('/')}/{LOCK_PREFIX}{process_index}"


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _new_record() -> dict[str, Any]:
  job = next((os.environ[k] for k in _JOB_ENV if os.environ.get(k)), "")
  return {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(), "job": job,
          "heartbeat": time.time()}


def _parse(text: str) -> dict[str, Any] | None:
  try:
    record = json.loads(text)
  except ValueError:
    return None
  return record if isinstance(record, dict) and "pid" in record else None


def describe(record: dict[str, Any] | None) -> str:
  """`pid N on HOST since T (job J)`, or a placeholder when the record is not readable yet."""
  if not record:
    return "another process (its holder record is not written yet)"
  text = f"pid {record.get('pid')} on {record.get('host')} since {record.get('since')}"
  return text + (f" (job {record['job']})" if record.get("job") else "")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _dead_here(record: dict[str, Any]) -> bool:
  """The record names a process of this host that no longer runs."""
  try:
    pid = int(record.get("pid"))
  except (TypeError, ValueError):
    return False
  return pid > 0 and record.get("host") == socket.gethostname() and not _pid_alive(pid)


def is_stale(record: dict[str, Any], stale_after_s: float = STALE_AFTER_S) -> bool:
  """A holder-file record whose process is gone: dead pid on this host, or a silent heartbeat."""
  return _dead_here(record) or time.time() - float(record.get("heartbeat", 0)) > stale_after_s


def _in_use(workdir: str, path: str, record: dict[str, Any] | None, file_mode: bool) -> str:
  msg = (f"workdir {workdir} is in use by {describe(record)}; wait for that run to end or stop "
         "it, or choose another --workdir")
  if file_mode:
    msg += (f" (this file system has no kernel lock: if that run is gone, delete {path}, or "
            f"wait {int(STALE_AFTER_S)} s after its last heartbeat)")
  return msg


@dataclasses.dataclass
class WorkdirLock:
  """A held lock; `release()` (idempotent) gives it up. Also released at interpreter exit."""

  workdir: str
  path: str
  record: dict[str, Any]
  fd: int | None = None  # flock mode
  _stop: threading.Event | None = None  # holder-file mode: ends the heartbeat
  released: bool = False

  def release(self) -> None:
    if self.released:
      return
    self.released = True
    _HELD.pop(self.path, None)
    if self.fd is not None:
      try:
        os.ftruncate(self.fd, 0)  # clear the record while still holding the lock
      finally:
        os.close(self.fd)  # closing the last descriptor drops the flock
      return
    if self._stop is not None:
      self._stop.set()
    try:
      current = _parse(_read(self.path))
      if current and current.get("pid") == self.record["pid"] and \
          current.get("host") == self.record["host"]:
        _path(self.path).unlink()
    except OSError:
      pass


_HELD: dict[str, WorkdirLock] = {}


def _path(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def _read(path: str) -> str:
  if "://" not in path:
    with open(path, encoding="utf-8", errors="replace") as f:
      return f.read()
  return _path(path).read_text()


def acquire(workdir: str, process_index: int = 0) -> WorkdirLock:
  """Locks `workdir` for this process (index `process_index` of its job) or raises
  WorkdirInUseError naming the live holder."""
  path = lock_path(workdir, process_index)
  held = _HELD.get(path)
  if held is not None and not held.released:
    return held
  if "://" not in path:
    lock = _acquire_flock(workdir, path)
    if lock is not None:
      _HELD[path] = lock
      return lock
  lock = _acquire_file(workdir, path)
  _HELD[path] = lock
  atexit.register(lock.release)
  return lock


def _acquire_flock(workdir: str, path: str) -> WorkdirLock | None:
  """The flock lock, or None when this file system does not support flock."""
  import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only

  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  for attempt in range(10):
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      break
    except BlockingIOError:
      record = _parse(_read(path))
      if attempt < 9 and (record is None or _dead_here(record)):
        time.sleep(0.1)  # a holder still writing its record, or a reader probing with
        continue  # `holder()` (the record may be a dead holder's): look again
      os.close(fd)
      raise WorkdirInUseError(_in_use(workdir, path, record, file_mode=False)) from None
    except OSError as e:
      os.close(fd)
      if e.errno in _NO_FLOCK:
        return None
      raise
  record = _new_record()
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(record).encode(), 0)
  return WorkdirLock(workdir, path, record, fd=fd)


def _acquire_file(workdir: str, path: str) -> WorkdirLock:
  """The best-effort holder file with a heartbeat (no kernel lock available)."""
  p = _path(path)
  try:
    existing = _parse(_read(path))
  except (FileNotFoundError, OSError):
    existing = None
  if existing is not None and not is_stale(existing):
    raise WorkdirInUseError(_in_use(workdir, path, existing, file_mode=True))
  record = _new_record()
  p.write_text(json.dumps(record))
  stop = threading.Event()

  def beat():
    while not stop.wait(HEARTBEAT_S):
      record["heartbeat"] = time.time()
      try:
        p.write_text(json.dumps(record))
      except OSError:
        pass  # a missed beat; the next one retries

  threading.Thread(target=beat, name="workdir-lock-heartbeat", daemon=True).start()
  return WorkdirLock(workdir, path, record, _stop=stop)


def holder(workdir: str, process_index: int = 0) -> dict[str, Any] | None:
  """The record of a live holder of `workdir` (this process included), else None. For readers
  (export, generate) that must not modify a workdir while a trainer writes it."""
  path = lock_path(workdir, process_index)
  held = _HELD.get(path)
  if held is not None and not held.released:
    return held.record
  try:
    text = _read(path)
  except (FileNotFoundError, OSError):
    return None
  record = _parse(text)
  if "://" in path:
    return record if record is not None and not is_stale(record) else None
  import fcntl  # pylint: disable=g-import-not-at-top

  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None  # nobody holds it
  except BlockingIOError:
    return record or {}
  except OSError:  # no flock here: judge the record
    return record if record is not None and not is_stale(record) else None
  finally:
    os.close(fd)


__all__ = ["WorkdirInUseError", "WorkdirLock", "acquire", "holder", "describe", "lock_path",
           "is_stale", "HEARTBEAT_S", "STALE_AFTER_S"]
