r"""Trains a language model: `python -m dense_ssm.train --config=configs/default.py --workdir=DIR`.

Overrides: `--config.train.steps=200 --config.mesh.fsdp=4 ...`. The run resumes from the
latest checkpoint in `DIR/checkpoints`; SIGTERM saves one and exits 0. Multi-host runs call
`jax.distributed.initialize` (TPU pod, SLURM, or --coordinator_address/--num_processes/
--process_id). `--compile_only --topology=v5e:2x2` AOT-compiles the train step for a TPU
slice on this machine and prints per-chip memory and FLOPs (see dense_ssm/compile.py).

Loop invariants: metrics of step s are fetched after step s+1 is dispatched (no host sync
in the hot loop), except before a checkpoint or evaluation, where the last loss is checked
first, so a non-finite state is never saved.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, the tokenizer.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False,
                                  "AOT-compile the train step for --topology and exit.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2",
                                "TPU topology for --compile_only, e.g. v5e:2x2, v5p:2x2x2.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize: auto = when SLURM (>1 task), a TPU pod or the coordinator "
    "flags ask for it; on = always (cluster auto-detection); off = never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show tracebacks of configuration errors.")
_SIGKILL_AT = flags.DEFINE_integer(
    "testing_sigkill_after_step", 0,
    "Testing only: SIGKILL this process once step N has finished and pending checkpoints "
    "are written (simulates a hard crash).")


class TrainingError(RuntimeError):
  """A run that cannot continue (e.g. a non-finite loss); the message names the step."""


USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError,
               FileExistsError, TrainingError)


# ------------------------------------------------------------------------------ setup


def _unknown_keys(config, base, prefix="config") -> list[str]:
  out = []
  for key in config.keys():
    if key not in base:
      out.append(f"{prefix}.{key}")
    elif hasattr(config[key], "keys") and hasattr(base[key], "keys") and key != "model":
      out += _unknown_keys(config[key], base[key], f"{prefix}.{key}")
  return out


def validate_config(config):
  """Checks every key against `config_lib.base_config()`; returns the ModelConfig."""
  from dense_ssm import config_lib  # pylint: disable=g-import-not-at-top

  if config is None:
    raise ValueError("--config is required, e.g. --config=configs/default.py")
  unknown = _unknown_keys(config, config_lib.base_config())
  if unknown:
    raise ValueError(f"unknown config key(s) {unknown}; see dense_ssm/config_lib.py for the "
                     "valid keys")
  cfg = config_lib.check_model_config(config)
  t = config.train
  for key in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
    if int(t[key]) <= 0:
      raise ValueError(f"config.train.{key}={t[key]} must be positive.")
  if t.batch_size % t.grad_accum:
    raise ValueError(f"config.train.batch_size={t.batch_size} is not divisible by "
                     f"config.train.grad_accum={t.grad_accum}.")
  return cfg


def maybe_initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when asked to; returns whether it did."""
  import jax  # pylint: disable=g-import-not-at-top

  if mode == "off":
    return False
  explicit = coordinator_address is not None
  env = os.environ
  slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
  tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
  if not (mode == "on" or explicit or slurm or tpu_pod):
    return False
  if explicit:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id too.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def check_workdir(workdir: str | None) -> str:
  """Creates `workdir` if needed and checks that it is writable."""
  if not workdir:
    raise ValueError("--workdir is required (checkpoints, logs and the tokenizer go there).")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} is not writable ({e.strerror}); choose another "
                          "directory.") from None
  return workdir


def _say(msg: str) -> None:
  """Console output of process 0 (also logged)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ loop


class _Preemption:
  """SIGTERM -> save at the current step and exit 0 (all hosts agree on the step)."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top

    self.requested = False
    self._multi = jax.process_count() > 1
    self._old = None
    if not self._multi:
      self._old = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:
        return False
    return self.requested

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _check_finite(step: int, metrics: dict, last_saved: int | None) -> None:
  loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
  if not (math.isfinite(loss) and math.isfinite(gnorm)):
    saved = f"the latest checkpoint is step {last_saved}" if last_saved else "no checkpoint exists"
    raise TrainingError(
        f"non-finite training loss {loss} (grad norm {gnorm}) at step {step}; nothing was saved "
        f"for it ({saved}); lower config.train.lr or check the data.")


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Runs (or resumes) training; returns the final validation {"loss", "perplexity", ...}."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from dense_ssm import checkpoint, data, evaluate, models, optim, sharding, train_log, \
      train_step  # pylint: disable=g-import-not-at-top,g-multiple-import

  cfg = validate_config(config)
  workdir = check_workdir(workdir)
  t = config.train

  # Model, optimizer, mesh, jitted steps: nothing is allocated yet.
  model = models.build_model(cfg)
  tx, schedule = optim.make_optimizer(t)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divisible(t.batch_size, mesh, jax.process_count())
  fns = train_step.build(model, tx, schedule, mesh, seq_len=config.data.seq_len,
                         grad_accum=t.grad_accum, seed=t.seed)

  # An existing checkpoint must fit the model before anything is written.
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=t.keep_last,
                                 keep_every=t.keep_every)
  latest = ckpt.latest_step()
  if latest is not None:
    ckpt.check_compatible(latest, fns.abstract_state)

  # Data.
  if config.data.source == "stdlib":
    _say("data: the embedded default (this Python's standard library source; no dataset is "
         "configured). Set --config.data.source=jsonl:GLOB|text:GLOB|tfds:NAME|arrayrecord:GLOB "
         "for real data.")
  tokenizer = data.load_tokenizer(config, workdir)
  train_iter = data.make_train_iterator(config, tokenizer, seed=config.data.shuffle_seed,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  eval_batches = [sharding.global_batch(b, mesh) for b in data.make_eval_batches(
      config, tokenizer, max_batches=t.eval_batches, process_index=jax.process_index(),
      process_count=jax.process_count())]

  # State: restore or initialise (sharded).
  if latest is not None:
    state, data_state, _ = ckpt.restore(latest, fns.abstract_state)
    if data_state is None:
      logging.warning("checkpoint %d has no data state for %d processes; data restarts.",
                      latest, jax.process_count())
    else:
      train_iter.set_state(data_state)
    _say(f"resumed from {ckpt.directory}/{latest}")
  else:
    state = fns.init(jax.random.key(t.seed))
  start = int(jax.device_get(state["step"]))

  # Compile before step 0 and report size and memory.
  n_params = train_step.param_count(fns.abstract_state)
  batch_abs = sharding.abstract_batch(t.batch_size, config.data.seq_len, mesh)
  t0 = time.perf_counter()
  compiled = fns.train_step.lower(fns.abstract_state, batch_abs).compile()
  mem = train_log.memory_report(compiled)
  _say(f"model: {cfg.family}, {n_params:,} parameters; mesh {dict(mesh.shape)} over "
       f"{jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} "
       f"process(es); compiled in {time.perf_counter() - t0:.1f}s")
  if mem:
    _say("memory per device: " + ", ".join(f"{k} {train_log.format_bytes(v)}"
                                           for k, v in mem.items()))

  fpt = models.flops_per_token(cfg, config.data.seq_len)
  tokens_per_step = t.batch_size * config.data.seq_len
  progress = train_log.Progress(t.steps, tokens_per_step, fpt, jax.device_count(),
                                train_log.peak_flops_per_device())
  writer = train_log.make_writer(workdir)
  if start == 0 and jax.process_index() == 0:
    writer.write_hparams({"num_params": n_params, **_flat(config.to_dict())})
  config_json = json.loads(config.to_json_best_effort())
  preempt = _Preemption()
  last_saved = latest
  pending: list[tuple[int, Any]] = []

  def drain() -> None:
    """Fetches queued step metrics, checks them, writes them at log steps."""
    while pending:
      step, metrics = pending.pop(0)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      _check_finite(step, metrics, last_saved)
      if step % t.log_every == 0 or step == t.steps:
        rates = progress.rates(step)
        writer.write_scalars(step, {**{f"train/{k}": v for k, v in metrics.items()},
                                    **{f"perf/{k}": v for k, v in rates.items()}})
        _say(progress.line(step, metrics["loss"], rates))

  def save(step: int, force: bool = False) -> None:
    nonlocal last_saved
    drain()  # checks the loss of `step` first: a non-finite state is never saved
    if ckpt.save(step, state, train_iter.get_state(), config_json, force=force):
      last_saved = step

  def run_eval(step: int) -> dict[str, float]:
    drain()
    result = evaluate.evaluate(fns.eval_step, state["params"], eval_batches)
    writer.write_scalars(step, {"valid/loss": result["loss"],
                                "valid/perplexity": result["perplexity"]})
    _say(f"step {step}/{t.steps} | validation loss {result['loss']:.4f} | "
         f"perplexity {result['perplexity']:.2f}")
    progress.start(step)  # throughput excludes evaluation
    return result

  profile_at = start + 3 if t.profile_steps > 0 else -1
  profiling = False
  progress.start(start)
  try:
    for step in range(start + 1, t.steps + 1):  # `step` = number of updates after this one
      if preempt.reached(step - 1):
        save(step - 1, force=True)
        ckpt.wait()
        _say(f"preempted (SIGTERM): saved step {step - 1} to {ckpt.directory}; exiting")
        return {"preempted_at": float(step - 1)}
      if step == profile_at:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        profiling = True
      batch = sharding.global_batch(next(train_iter), mesh)
      state, metrics = compiled(state, batch)
      if profiling and step == profile_at + t.profile_steps - 1:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        profiling = False
        _say(f"profile of steps {profile_at}..{step} written to {workdir}/profile")
      drain()  # metrics of the previous step; this step is already queued
      pending.append((step, metrics))
      if step % t.checkpoint_every == 0 or step == t.steps:
        save(step, force=step == t.steps)
      if step % t.eval_every == 0 and step != t.steps:
        run_eval(step)
      if step == _SIGKILL_AT.value:
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    drain()
    final = run_eval(t.steps)
  finally:
    preempt.close()
    writer.flush()
    if profiling:
      jax.profiler.stop_trace()
    ckpt.close()  # a save in flight holds a good (checked) state: let it finish
  _say(f"final validation loss {final['loss']:.4f}, perplexity {final['perplexity']:.2f} "
       f"(step {t.steps})")
  return final


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float, str, bool)):
      out[f"{prefix}{k}"] = v
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # console: our lines + warnings; -v 0 for all logs
    logging.set_verbosity(logging.WARNING)
  try:
    config = _CONFIG.value
    if _COMPILE_ONLY.value:
      from dense_ssm import compile as compile_lib  # pylint: disable=g-import-not-at-top

      validate_config(config)
      compile_lib.compile_for_topology(config, _TOPOLOGY.value)
      return
    validate_config(config)
    maybe_initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                 _PROCESS_ID.value)
    train_and_evaluate(config, _WORKDIR.value)
  except USER_ERRORS as e:
    if _TRACEBACK.value:
      raise
    print(f"dense_ssm.train: error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
