"""Orbax checkpoints of a training run: train state, data-iterator state and the config.

Layout of `<workdir>/checkpoints/<step>/`:
  state/   params, opt_state and step (tensorstore; restorable onto any mesh)
  data/    process_<i>-of-<n>.json, each host's data-iterator state
  config/  the run's config as JSON (for reading; `--config=<workdir>/config.py` takes it back)

Saving is asynchronous (training continues while the arrays are written); a step
directory only appears once complete, so a crash mid-save leaves the previous
checkpoint as the latest. Retention: the last `keep_last` plus every step that is a
multiple of `keep_every` (0: none).

Damage: `restore_newest` restores the newest intact step. A step whose files are missing
(`state/`, `state/_METADATA`, `config/`, `data/`) or unreadable (a truncated or corrupt
array file, invalid JSON) is reported in one warning line and renamed to
`<step>.damaged-<time>` (never deleted; rename it back by hand to retry it), and the next
older step is tried. Errors that do not prove damage (out of memory, network, permissions)
propagate and move nothing.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import json
import os
import re
import sys
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp
from etils import epath


def _data_state_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DataStateHandler(ocp.CheckpointHandler):
  """Writes each host's data-iterator state (a JSON-able value or bytes) to its own file.

  The state is captured by the caller before `save`, so an asynchronous save cannot
  see a later position of the iterator.
  """

  def save(self, directory: epath.Path, args: "DataStateSave"):
    value = args.state
    if isinstance(value, bytes):
      record = {"bytes_b64": base64.b64encode(value).decode("ascii")}
    else:
      record = {"json": value}
    _data_state_file(directory).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: Optional["DataStateRestore"] = None):
    path = _data_state_file(directory)
    if not path.exists():
      return None  # saved by another number of processes
    record = json.loads(path.read_text())
    if "bytes_b64" in record:
      return base64.b64decode(record["bytes_b64"])
    return record["json"]

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def _keystr(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def first_mismatch(saved_tree: Any, abstract_tree: Any) -> str | None:
  """Describes the first parameter whose presence or shape differs, or None if all match."""
  saved = {_keystr(p): tuple(getattr(v, "shape", ()))
           for p, v in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
  wanted = {_keystr(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]}
  for name in sorted(set(saved) | set(wanted)):
    if name not in saved:
      return f"{name} (shape {wanted[name]}) is not in the checkpoint"
    if name not in wanted:
      return f"{name} (shape {saved[name]}) is in the checkpoint but not in the model"
    if saved[name] != wanted[name]:
      return f"{name} has shape {saved[name]} in the checkpoint but {wanted[name]} in the model"
  return None


class IncompatibleCheckpointError(ValueError):
  """The checkpoint's parameters do not fit the model (a config change, not damage)."""


class DamagedCheckpointError(RuntimeError):
  """A checkpoint step whose files are missing or unreadable; `reason` says which."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"checkpoint step {step} is damaged ({reason})")
    self.step, self.reason = step, reason


# TensorStore status codes that mean the bytes on disk are missing, truncated or corrupt.
_DAMAGE_CODES = ("OUT_OF_RANGE", "FAILED_PRECONDITION", "DATA_LOSS", "NOT_FOUND",
                 "INVALID_ARGUMENT")


def damage_reason(error: BaseException) -> str | None:
  """A short reason when `error` (or an exception it chains) shows missing or corrupt checkpoint
  files; None for anything else (out of memory, network, permissions), which is no proof of
  damage."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
      return f"unreadable JSON: {error}"
    if isinstance(error, FileNotFoundError):
      return f"missing file {error.filename or error}"
    text = str(error).split(" [tensorstore_spec", 1)[0].strip()
    if text.split(":", 1)[0] in _DAMAGE_CODES:
      text = re.sub(r' in \w+ database at [^:]*"', "", text.splitlines()[0])
      return text[:300]
    error = error.__cause__ or error.__context__
  return None


def check_intact(step_dir: str, items: tuple[str, ...] = ("state", "config", "data")) -> None:
  """Raises DamagedCheckpointError when one of the step's `items` (or `state/_METADATA`) is
  missing."""
  path = epath.Path(step_dir)
  step = int(path.name) if path.name.isdigit() else -1
  for item in items:
    if not (path / item).is_dir():
      raise DamagedCheckpointError(step, f"{item}/ is missing")
  if "state" in items:
    for name in ("_METADATA", "manifest.ocdbt"):
      if not (path / "state" / name).exists() and (name == "_METADATA" or any(
          (path / "state").glob("ocdbt.process_*"))):
        raise DamagedCheckpointError(step, f"state/{name} is missing")


def set_aside(step_dir: str) -> str:
  """Renames a damaged step directory to `<step>.damaged-<time>` (checkpoint managers skip such
  names); returns the new path."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  dest, n = f"{step_dir}.damaged-{stamp}", 1
  while epath.Path(dest).exists():
    dest, n = f"{step_dir}.damaged-{stamp}-{n}", n + 1
  epath.Path(step_dir).rename(dest)
  return dest


@contextlib.contextmanager
def quiet_read_errors():
  """Orbax reads arrays in coroutines; when several fail, the ones never awaited print
  'Exception ignored in: <coroutine ...>' tracebacks at garbage collection, and late TensorStore
  callbacks find Orbax's event loop closed. Inside this context those are dropped (the caller
  reports the damage once)."""
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    late = isinstance(error, RuntimeError) and "Event loop is closed" in str(error)
    if error is None or not (late or damage_reason(error) is not None):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


def warn(message: str) -> None:
  """A warning line on stderr (process 0 only)."""
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _all_agree(ok: bool) -> bool:
  """True iff `ok` on every process (one tiny collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """A thin wrapper of `ocp.CheckpointManager` for the train state + data state + config."""

  def __init__(self, directory: str, *, keep_last: int = 3, keep_every: int = 0,
               async_save: bool = True):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last if keep_last > 0 else None,
        keep_period=keep_every if keep_every > 0 else None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler(),
                "config": ocp.JsonCheckpointHandler()}
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self.skipped: dict[int, str] = {}  # damaged step -> where it was moved (or why not)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises ValueError naming the first parameter whose shape differs from the model's."""
    meta = self._mngr.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    problem = first_mismatch({"params": tree["params"]}, {"params": abstract_state["params"]})
    if problem:
      raise IncompatibleCheckpointError(
          f"checkpoint {self.directory}/{step} does not fit config.model: {problem}; use a new "
          f"--workdir or the run's own config "
          f"(--config={os.path.dirname(self.directory.rstrip('/'))}/config.py).")

  def save(self, step: int, state: Any, data_state: Any, config_json: dict,
           force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=DataStateSave(data_state),
                              config=ocp.args.JsonSave(config_json))
    saved = self._mngr.save(step, args=args, force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
    """(state placed per `abstract_state`'s shardings, data state or None, config dict)."""
    self.check_compatible(step, abstract_state)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=DataStateRestore(),
        config=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["config"]

  def _inspect(self, step: int, abstract_state: Any) -> None:
    """Raises DamagedCheckpointError (missing files, unreadable metadata) or
    IncompatibleCheckpointError (another model)."""
    check_intact(f"{self.directory}/{step}")
    try:
      with quiet_read_errors():
        self.check_compatible(step, abstract_state)
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # classified just below
      reason = damage_reason(e)
      if reason is None:
        raise
      raise DamagedCheckpointError(step, f"unreadable metadata: {reason}") from None

  def _set_aside(self, error: DamagedCheckpointError, say: Callable[[str], None]) -> None:
    where = ""
    if jax.process_index() == 0:
      try:
        where = f"moved it to {set_aside(f'{self.directory}/{error.step}')}"
      except OSError as e:
        where = f"could not move it aside ({e.strerror or e})"
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{error.step}")
    self.skipped[error.step] = where
    self._mngr.reload()
    say(f"checkpoint step {error.step} in {self.directory} is damaged ({error.reason}); "
        f"{where}; trying the previous step")

  def newest_intact_step(self, abstract_state: Any,
                         say: Callable[[str], None] = warn) -> int | None:
    """The newest step whose files are present, whose metadata reads and whose params fit
    `abstract_state`; damaged newer steps are reported (`say`) and moved aside. None when there
    is no checkpoint; ValueError when there were some but none is intact; a config mismatch
    raises IncompatibleCheckpointError (nothing is moved)."""
    for step in sorted(set(self.all_steps()) - set(self.skipped), reverse=True):
      try:
        self._inspect(step, abstract_state)
        return step
      except DamagedCheckpointError as e:
        self._set_aside(e, say)
    if self.skipped:
      steps = ", ".join(str(s) for s in sorted(self.skipped, reverse=True))
      raise ValueError(
          f"no intact checkpoint in {self.directory}: step(s) {steps} are damaged and were set "
          f"aside as <step>.damaged-<time>; run again to start from step 0, or use another "
          "--workdir")
    return None

  def restore_newest(self, abstract_state: Any, say: Callable[[str], None] = warn
                     ) -> tuple[int, Any, Any, dict] | None:
    """(step, state, data state or None, config) of the newest intact step (see
    `newest_intact_step`; a step whose arrays fail to read is set aside too), or None when the
    directory has no checkpoint."""
    while True:
      step = self.newest_intact_step(abstract_state, say)
      if step is None:
        return None
      error, out = None, None
      try:
        with quiet_read_errors():
          out = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # classified just below
        reason = damage_reason(e)
        if reason is None:
          raise
        error = DamagedCheckpointError(step, reason)
      if _all_agree(error is None):
        return (step, *out)
      self._set_aside(error or DamagedCheckpointError(step, "another process could not read "
                                                            "it"), say)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    # Orbax starts a background thread at construction to clean up temporary directories of
    # earlier runs and awaits it only inside save(); neither wait_until_finished nor close does.
    # A run that stops before its first save (e.g. a bad-input error) must await it too, or the
    # thread races interpreter shutdown and prints a traceback after our one-line error.
    await_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self._mngr.wait_until_finished()
    self._mngr.close()


__all__ = ["Checkpointer", "first_mismatch", "DataStateSave", "DataStateRestore",
           "DamagedCheckpointError", "IncompatibleCheckpointError", "damage_reason",
           "check_intact", "set_aside", "quiet_read_errors"]
