"""Orbax checkpoints of a training run: train state, data-iterator state and the config.

Layout of `<workdir>/checkpoints/<step>/`:
  state/   params, opt_state and step (tensorstore; restorable onto any mesh)
  data/    process_<i>-of-<n>.json, each host's data-iterator state
  config/  the run's config as JSON (for humans and for `--config` reproduction)

Saving is asynchronous (training continues while the arrays are written); a step
directory only appears once complete, so a crash mid-save leaves the previous
checkpoint as the latest. Retention: the last `keep_last` plus every step that is a
multiple of `keep_every` (0: none).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any, Optional

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
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not fit config.model: {problem}; use a new "
          f"--workdir or the checkpoint's own config ({self.directory}/{step}/config).")

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


__all__ = ["Checkpointer", "first_mismatch", "DataStateSave", "DataStateRestore"]
