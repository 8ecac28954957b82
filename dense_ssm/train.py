r"""Trains a language model: `python -m dense_ssm.train --config=configs/default.py --workdir=DIR`.

Overrides: `--config.train.steps=200 --config.mesh.fsdp=4 ...`. `--config=NAME[:VARIANT]` names
a config shipped with the package (configs/NAME.py, e.g. `--config=retnet_1b3:gau`). Each run
writes its resolved config to DIR/config.py, which `--config=DIR/config.py` takes back;
`--print_config` prints that file and exits (dense_ssm/config_file.py). The run resumes from the
newest intact checkpoint in `DIR/checkpoints` (a damaged one is set aside, see
dense_ssm/checkpoint.py); SIGTERM (or Ctrl-C) saves one and exits 0. One trainer per workdir:
each process locks `DIR/.lock.<process index>` for its life (dense_ssm/workdir_lock.py).
Multi-host runs call `jax.distributed.initialize` (TPU pod, SLURM, or --coordinator_address/
--num_processes/--process_id). `--compile_only --topology=v5e:2x2` AOT-compiles the train step for a TPU
slice on this machine and prints per-chip memory and FLOPs (see dense_ssm/compile.py).

Output: process 0 prints the progress lines; metrics also go to TensorBoard events
(DIR/tensorboard; TensorFlow is not needed), DIR/metrics.jsonl and the console log (absl INFO:
add `-v 0` to see it and the libraries' logs). One warning line comes first when an NVIDIA GPU
or a TPU is present but JAX runs on the CPU, and when a config names no data source. `config.train.profile_steps=N` traces N steps into DIR/profile.

Loop invariants: metrics of step s are fetched after step s+1 is dispatched (no host sync
in the hot loop), except before a checkpoint or evaluation, where the last loss is checked
first, so a non-finite state is never saved.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import dense_ssm
from dense_ssm import cli
from dense_ssm import config_file
from dense_ssm import init_from
from dense_ssm import workdir_lock

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
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config as a config file (what the run writes to "
    "WORKDIR/config.py; --config= takes it back) and exit.")
_SIGKILL_AT = flags.DEFINE_integer(
    "testing_sigkill_after_step", 0,
    "Testing only: SIGKILL this process once step N has finished and pending checkpoints "
    "are written (simulates a hard crash).")


class TrainingError(RuntimeError):
  """A run that cannot continue (e.g. a non-finite loss); the message names the step."""


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
  if int(config.data.seq_len) <= 0:
    raise ValueError(f"config.data.seq_len={config.data.seq_len} must be positive (tokens per "
                     "training row), e.g. --config.data.seq_len=256.")
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
  # A Cloud TPU VM (its chips appear as /dev/accel* or /dev/vfio/N): jax asks the metadata
  # server for the other hosts of the slice (a single host initialises as 1 process).
  tpu_vm = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                or "MEGASCALE_COORDINATOR_ADDRESS" in env)
  if not (mode == "on" or explicit or slurm or tpu_vm):
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
  """Creates `workdir` (a local path or a gs:// URL) if needed and checks that it is writable."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  if not workdir:
    raise ValueError("--workdir is required (checkpoints, logs and the tokenizer go there).")
  if "://" not in workdir:
    workdir = os.path.abspath(os.path.expanduser(workdir))
  path = epath.Path(workdir)
  probe = path / f".write_probe_{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} is not writable ({e.strerror or e}); choose "
                          "another directory.") from None
  return workdir


GPU_INSTALL = 'pip install -e ".[gpu]"'
TPU_INSTALL = 'pip install -e ".[tpu]"'


def accelerator_warning() -> str | None:
  """One warning line if an NVIDIA GPU (nvidia-smi or /dev/nvidiaN) or a TPU (/dev/accel*,
  /dev/vfio/N) is present while JAX runs on the CPU, naming the install that fixes it; None
  otherwise, and when JAX_PLATFORMS=cpu asks for the CPU. Initialises JAX's backends: call it
  after `jax.distributed.initialize`."""
  import jax  # pylint: disable=g-import-not-at-top

  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return None
  if shutil.which("nvidia-smi") or glob.glob("/dev/nvidia[0-9]*"):
    device, build, fix = "an NVIDIA GPU", "CUDA", GPU_INSTALL
  elif glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    device, build, fix = "a TPU", "TPU", TPU_INSTALL
  else:
    return None
  if jax.default_backend() != "cpu":
    return None
  return (f"warning: this machine has {device} but JAX {jax.__version__} runs on the CPU; "
          f"install JAX's {build} build with: {fix}")


def resolve_data_source(config) -> str | None:
  """Sets an empty `config.data.source` (the paper recipes leave it empty: their corpus is not
  bundled) to the embedded "stdlib" corpus, and returns the one warning line that says so;
  None when the config names a source."""
  d = config.data
  if d.source:
    return None
  d.source = "stdlib"
  tokenizer = ("a tokenizer trained just now on that corpus" if not d.tokenizer else
               f"the tokenizer {d.tokenizer}")
  fix = "real data pass --config.data.source=jsonl:/path/*.jsonl"
  if not d.tokenizer:
    fix = fix.replace(" pass", " and the LLaMA tokenizer pass") + \
        " --config.data.tokenizer=/path/llama/tokenizer.model"
  return (f"warning: this config names no dataset (config.data.source is empty, as in the paper "
          f"recipes), so the paper-size model trains on the embedded demo corpus (the Python "
          f"standard library's source) with {tokenizer}; for {fix}")


def _say(msg: str) -> None:
  """Console output (stdout) of process 0."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    print(msg, flush=True)


# ------------------------------------------------------------------------------ loop


class _Preemption:
  """SIGTERM, or Ctrl-C (SIGINT) in a single-process run -> save at the current step and exit 0
  (all hosts agree on the step). A second Ctrl-C stops at once (KeyboardInterrupt)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top

    self.requested = False
    self.signal_name = "SIGTERM"
    self._multi = jax.process_count() > 1
    self._old = {}
    if not self._multi:
      self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

  def _handler(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:
        return False
    return self.requested

  def close(self):
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}


def _check_param_dtype(directory: str, step: int | None, abstract_state: Any) -> None:
  """The params of checkpoint `step` must have the model's param_dtype: a restore would cast
  the params but not the optimizer state, which the compiled step then refuses."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  if step is None:
    return
  try:
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(f"{directory}/{step}/state"))
    saved = {str(getattr(v, "dtype", "")) for v in jax.tree.leaves(tree["params"])}
  except Exception:  # pylint: disable=broad-except  # unreadable: the restore reports it
    return
  wanted = {str(v.dtype) for v in jax.tree.leaves(abstract_state["params"])}
  if saved and saved != wanted:
    have, want = ", ".join(sorted(saved)), ", ".join(sorted(wanted))
    raise ValueError(
        f"checkpoint {directory}/{step} holds {have} params but config.model.param_dtype asks "
        f"for {want}; resume with --config.model.param_dtype={sorted(saved)[0]} or start a new "
        "--workdir.")


def _check_finite(step: int, metrics: dict, last_saved: int | None) -> None:
  loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
  if not (math.isfinite(loss) and math.isfinite(gnorm)):
    saved = f"the latest checkpoint is step {last_saved}" if last_saved else "no checkpoint exists"
    raise TrainingError(
        f"non-finite training loss {loss} (grad norm {gnorm}) at step {step}; nothing was saved "
        f"for it ({saved}); lower config.train.lr or check the data.")


class Trainer:
  """One training run: built by `__init__` (nothing written except the workdir probe), then
  `load_data`, `restore_or_init`, `compile`, `train`; `close` always."""

  def __init__(self, config, workdir: str):
    import jax  # pylint: disable=g-import-not-at-top

    from dense_ssm import checkpoint, models, optim, sharding, \
        train_step  # pylint: disable=g-import-not-at-top,g-multiple-import

    self.config, self.t = config, config.train
    self.cfg = validate_config(config)
    self.workdir = check_workdir(workdir)
    self.lock = workdir_lock.acquire(self.workdir, jax.process_index())  # one writer per workdir
    self.ckpt = None
    try:
      t = self.t
      # Model, optimizer, mesh, jitted steps: nothing is allocated yet.
      self.model = models.build_model(self.cfg)
      tx, schedule = optim.make_optimizer(t)
      self.mesh = sharding.make_mesh(config.mesh)
      sharding.check_batch_divisible(t.batch_size, self.mesh, jax.process_count())
      self.fns = train_step.build(self.model, tx, schedule, self.mesh,
                                  seq_len=config.data.seq_len, grad_accum=t.grad_accum,
                                  seed=t.seed)
      # An existing checkpoint must fit the model before anything is written.
      self.ckpt = checkpoint.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                          keep_last=t.keep_last, keep_every=t.keep_every)
      self.latest = self.ckpt.newest_intact_step(self.fns.abstract_state)  # damaged: set aside
      _check_param_dtype(self.ckpt.directory, self.latest, self.fns.abstract_state)
      self.init_params = init_from.prepare(config, self.cfg, self.workdir,  # fine-tuning start
                                           fresh=self.latest is None, say=_say)
      self.last_saved = self.latest
      self.writer = None
      self.pending: list[tuple[int, Any]] = []
    except BaseException:
      if self.ckpt is not None:
        self.ckpt.close()
      self.lock.release()  # a run that never started leaves the workdir free
      raise

  def load_data(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top

    from dense_ssm import data, sharding  # pylint: disable=g-import-not-at-top

    c = self.config
    warning = resolve_data_source(c)
    if warning:
      _say(warning)
    elif c.data.source == "stdlib":
      _say("data: the embedded default (the Python standard library source of this "
           "interpreter, no download).")
    elif c.data.source == "pysrc":
      _say("data: pysrc, every distinct *.py file of this interpreter (standard library and "
           "site-packages, no download); listing hashes each file once.")
    if jax.process_index() == 0:
      config_file.write(self.workdir, c)  # the resolved config, for --config=WORKDIR/config.py
    hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
    tokenizer = data.load_tokenizer(c, self.workdir)
    self.train_iter = data.make_train_iterator(c, tokenizer, seed=c.data.shuffle_seed, **hosts)
    _say(_data_line(c.data.source, getattr(self.train_iter, "stats", None)))
    self.eval_batches = [sharding.global_batch(b, self.mesh) for b in data.make_eval_batches(
        c, tokenizer, max_batches=self.t.eval_batches, **hosts)]

  def restore_or_init(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top

    restored = None if self.latest is None else self.ckpt.restore_newest(
        self.fns.abstract_state)
    if restored is None:
      self.state = self.fns.init(jax.random.key(self.t.seed))
      if self.init_params is not None:
        self.state["params"] = init_from.place(self.state["params"], self.init_params)
        self.init_params = None
        _say(f"initialised the params from {self.t.init_from}")
    else:
      self.latest, self.state, data_state, _ = restored
      self.last_saved = self.latest
      if data_state is None:
        _data_replay(self.ckpt.directory, self.latest, self.t.allow_data_replay)
      else:
        self.train_iter.set_state(data_state)
      _say(f"resumed from {self.ckpt.directory}/{self.latest}")
    self.start = int(jax.device_get(self.state["step"]))

  def compile(self) -> None:
    """AOT-compiles the step (before step 0) and prints the parameter count and memory."""
    import jax  # pylint: disable=g-import-not-at-top

    from dense_ssm import models, sharding, train_log, \
        train_step  # pylint: disable=g-import-not-at-top,g-multiple-import

    t, c = self.t, self.config
    n_params = train_step.param_count(self.fns.abstract_state)
    batch_abs = sharding.abstract_batch(t.batch_size, c.data.seq_len, self.mesh)
    t0 = time.perf_counter()
    self.compiled = self.fns.train_step.lower(self.fns.abstract_state, batch_abs).compile()
    _say(f"model: {self.cfg.family}, {n_params:,} parameters; mesh {dict(self.mesh.shape)} over "
         f"{jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} "
         f"process(es); compiled in {time.perf_counter() - t0:.1f}s")
    mem = train_log.memory_report(self.compiled)
    if mem:
      _say("memory per device: " + ", ".join(f"{k} {train_log.format_bytes(v)}"
                                             for k, v in mem.items()))
    self.progress = train_log.Progress(
        t.steps, t.batch_size * c.data.seq_len, models.flops_per_token(self.cfg, c.data.seq_len),
        jax.device_count(), train_log.peak_flops_per_device())
    self.writer = train_log.make_writer(self.workdir)
    if self.start == 0 and jax.process_index() == 0:
      self.writer.write_hparams({"num_params": n_params, **_flat(c.to_dict())})

  def drain(self) -> None:
    """Fetches queued step metrics, checks them, writes them at log steps."""
    import jax  # pylint: disable=g-import-not-at-top

    t = self.t
    while self.pending:
      step, metrics = self.pending.pop(0)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      _check_finite(step, metrics, self.last_saved)
      if step % t.log_every == 0 or step == t.steps:
        rates = self.progress.rates(step)
        self.writer.write_scalars(step, {**{f"train/{k}": v for k, v in metrics.items()},
                                         **{f"perf/{k}": v for k, v in rates.items()}})
        _say(self.progress.line(step, metrics["loss"], rates))

  def save(self, step: int, force: bool = False) -> None:
    self.drain()  # checks the loss of `step` first: a non-finite state is never saved
    config_json = json.loads(self.config.to_json_best_effort())
    if self.ckpt.save(step, self.state, self.train_iter.get_state(), config_json, force=force):
      self.last_saved = step

  def evaluate(self, step: int) -> dict[str, float]:
    from dense_ssm import evaluate  # pylint: disable=g-import-not-at-top

    self.drain()
    result = evaluate.evaluate(self.fns.eval_step, self.state["params"], self.eval_batches)
    self.writer.write_scalars(step, {"valid/loss": result["loss"],
                                     "valid/perplexity": result["perplexity"]})
    _say(f"step {step}/{self.t.steps} | validation loss {result['loss']:.4f} | "
         f"perplexity {result['perplexity']:.2f}")
    self.progress.start(step)  # throughput excludes evaluation
    return result

  def train(self, sigkill_after_step: int = 0) -> dict[str, float]:
    """The loop; returns the final validation metrics (or {"preempted_at": step})."""
    import jax  # pylint: disable=g-import-not-at-top

    from dense_ssm import sharding  # pylint: disable=g-import-not-at-top

    t = self.t
    preempt = _Preemption()
    profile_at = self.start + 3 if t.profile_steps > 0 else -1
    profiling = False
    self.progress.start(self.start)
    try:
      for step in range(self.start + 1, t.steps + 1):  # `step` = updates done after this one
        if preempt.reached(step - 1):
          self.save(step - 1, force=True)
          self.ckpt.wait()
          _say(f"preempted ({preempt.signal_name}): saved step {step - 1} to "
               f"{self.ckpt.directory}; exiting")
          return {"preempted_at": float(step - 1)}
        if step == profile_at:
          jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
          profiling = True
        batch = sharding.global_batch(next(self.train_iter), self.mesh)
        self.state, metrics = self.compiled(self.state, batch)
        if profiling and step == profile_at + t.profile_steps - 1:
          jax.block_until_ready(self.state)
          jax.profiler.stop_trace()
          profiling = False
          _say(f"profile of steps {profile_at}..{step} written to {self.workdir}/profile")
        self.drain()  # metrics of the previous step; this step is already queued
        self.pending.append((step, metrics))
        if step % t.checkpoint_every == 0 or step == t.steps:
          self.save(step, force=step == t.steps)
        if step % t.eval_every == 0 and step != t.steps:
          self.evaluate(step)
        if step == sigkill_after_step:
          self.ckpt.wait()
          os.kill(os.getpid(), signal.SIGKILL)
      self.drain()
      final = self.evaluate(t.steps)
    finally:
      preempt.close()
      if profiling:
        jax.profiler.stop_trace()
    _say(f"final validation loss {final['loss']:.4f}, perplexity {final['perplexity']:.2f} "
         f"(step {t.steps})")
    return final

  def close(self) -> None:
    """Waits for a save in flight (it holds a checked, good state) and closes the writers."""
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
    self.ckpt.close()
    self.lock.release()


def train_and_evaluate(config, workdir: str, *, sigkill_after_step: int = 0) -> dict[str, float]:
  """Runs (or resumes) training; returns the final validation {"loss", "perplexity", ...}.

  `sigkill_after_step` (testing): SIGKILL this process after that step, once pending
  checkpoints are written, as a hard crash would.
  """
  warning = accelerator_warning()
  if warning:
    _say(warning)
  trainer = Trainer(config, workdir)
  try:
    trainer.load_data()
    trainer.restore_or_init()
    trainer.compile()
    return trainer.train(sigkill_after_step)
  finally:
    trainer.close()


def _data_replay(directory: str, step: int, allowed: bool) -> None:
  """A checkpoint without this run's data-iterator state (saved by another number of
  processes) would replay the data from its start: an error unless `allowed`."""
  import jax  # pylint: disable=g-import-not-at-top

  n = jax.process_count()
  what = (f"checkpoint {directory}/{step} has no data-iterator state for {n} process(es) (it "
          "was saved by another number of processes), so the data would restart from its "
          "beginning")
  if not allowed:
    raise ValueError(f"{what}; resume with the original number of processes, or pass "
                     "--config.train.allow_data_replay=true to accept replaying data")
  _say(f"warning: {what} (config.train.allow_data_replay=true)")


def _data_line(source: str, stats: Any) -> str:
  line = f"data: {source}"
  if stats is None:
    return line
  line += f", {stats.num_documents:,} train documents (this host)"
  if stats.num_chars > 0:
    line += f", {stats.num_chars:,} characters"
  if stats.num_bytes > 0:
    line += f", {stats.num_bytes:,} bytes"
  if stats.replaced_chars:
    line += (f"; {stats.replaced_chars:,} invalid UTF-8 sequences replaced (U+FFFD) in "
             f"{stats.replaced_files} file(s)")
  return line


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float, str, bool)):
      out[f"{prefix}{k}"] = v
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors (unknown config key, bad value) are one line, exit 1; a
  packaged config name given to --config becomes its file's path first."""

  argv = list(argv)
  try:
    for i, arg in enumerate(argv):
      if arg.startswith(("--config=", "-config=")):
        flag, value = arg.split("=", 1)
        argv[i] = f"{flag}={config_file.resolve(value)}"
      elif arg in ("--config", "-config") and i + 1 < len(argv):
        argv[i + 1] = config_file.resolve(argv[i + 1])
  except ValueError as e:
    print(f"dense_ssm.train: error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  return cli.absl_flags_parser("dense_ssm.train")(argv)


def _load_config():
  """The --config ConfigDict; a config file that fails to load is a one-line error."""
  return cli.config_value(_CONFIG)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  dense_ssm.default_to_cpu_without_accelerators()  # flags may have imported jax first
  if not flags.FLAGS["verbosity"].present:  # console: our lines + warnings; -v 0 for all logs
    logging.set_verbosity(logging.WARNING)
  with cli.user_errors("dense_ssm.train", _TRACEBACK.value, extra=(TrainingError,)):
    config = _load_config()
    if _PRINT_CONFIG.value:

      validate_config(config)
      warning = resolve_data_source(config)  # as the run would (its warning goes to stderr)
      if warning:
        print(warning, file=sys.stderr, flush=True)
      sys.stdout.write(config_file.to_python(config))
      return
    if _COMPILE_ONLY.value:
      from dense_ssm import compile as compile_lib  # pylint: disable=g-import-not-at-top

      validate_config(config)
      compile_lib.compile_for_topology(config, _TOPOLOGY.value)
      return
    validate_config(config)
    maybe_initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                 _PROCESS_ID.value)
    train_and_evaluate(config, _WORKDIR.value, sigkill_after_step=_SIGKILL_AT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
