r"""MQAR recall accuracy against recurrent-state size, per family and width, via the train CLI.

  python experiments/mqar.py --out=/tmp/mqar --parallel=8

For every family (DenseRetNet, RetNet GAU m=0, DenseMamba, Mamba, Transformer) and width
(`--widths`, default 64,128,256) it runs

  python -m dense_ssm.train --config=configs/mqar.py:<family> --workdir=OUT/runs/<family>_w<W> \
      --config.model.hidden_size=<W> [--config.<KEY>=<VALUE> for each --set KEY=VALUE]

`--parallel` at a time (several small runs share one GPU; each process may take 0.9/parallel of
its memory), then scores the final checkpoint in a second process (`--score=WORKDIR`): recall
accuracy = the fraction of answer positions of the run's validation examples where the argmax
of the logits is the answer. A run whose score exists for the planned step count is skipped;
an unfinished one resumes from its checkpoint.

Recurrent state per layer, in float32 numbers (what decoding carries from token to token):
  RetNet (dense or not)  heads * d_k * d_v = qk_dim * 2H / heads
  Mamba (dense or not)   d_inner * N + d_inner * (conv_width - 1)   (SSM state + conv window)
  Transformer            2 * T * H   (the key and value cache at T = data.seq_len)
Dense connections read shallower layers at the same position, so they add no state.

Writes under --out: results.json (every run: config, params, state, accuracy, validation loss,
wall time), results.md (the table and the command), recall_vs_state.png (accuracy against
state per layer, one line per family). `--report_only` rebuilds them from OUT/runs. `--tiny`
shrinks the task and the models to a seconds-long CPU smoke run (tests use it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "mqar.py")
FAMILIES = ("dense_retnet", "gau", "dense_mamba", "mamba", "transformer")
LABELS = {"dense_retnet": "DenseRetNet (m=2)", "gau": "RetNet GAU (m=0)",
          "dense_mamba": "DenseMamba (m=4)", "mamba": "Mamba (m=0)",
          "transformer": "Transformer"}
SCORE_FILE = "recall.json"
# --tiny: a 32-token task over 64 ids with 4 pairs, 3 steps of batch 4.
TINY_SETS = ("model.vocab_size=64", "model.max_len=32", "model.chunk_size=16",
             "data.seq_len=32", "data.source=mqar:vocab=64,pairs=4,queries=4,valid=8",
             "train.batch_size=4", "train.steps=3", "train.log_every=1", "train.eval_every=1000",
             "train.eval_batches=2", "train.checkpoint_every=3")
TINY_WIDTHS = (16,)


# ------------------------------------------------------------------------------ state size


def state_floats_per_layer(model: dict, seq_len: int) -> int:
  """Numbers a layer carries from one token to the next at inference (see the module doc)."""
  h, family = model["hidden_size"], model["family"]
  if family in ("dense_retnet", "retnet_ffn"):
    heads = model["num_heads"]
    return heads * (model["qk_dim"] // heads) * (model["v_factor"] * h // heads)
  if family == "mamba":
    d_inner = model["expand"] * h
    return d_inner * model["state_dim"] + d_inner * (model["conv_width"] - 1)
  if family == "transformer":
    return 2 * seq_len * h
  raise ValueError(f"model.family={family!r} has no state-size rule")


# ------------------------------------------------------------------------------ scoring


def score(workdir: str) -> dict:
  """Recall accuracy of the latest checkpoint of `workdir` on its validation examples; also
  written to WORKDIR/recall.json."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  import dense_ssm  # pylint: disable=g-import-not-at-top
  from dense_ssm import data, export, models  # pylint: disable=g-import-not-at-top

  dense_ssm.default_to_cpu_without_accelerators()
  step = export.checkpoint_steps(workdir)[-1] if export.checkpoint_steps(workdir) else None
  pre = export.load_workdir(workdir, step)  # a missing checkpoint raises here
  config = ml_collections.ConfigDict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "config")))
  batches = data.make_eval_batches(config, None, max_batches=config.train.eval_batches,
                                   process_index=0, process_count=1)
  model = models.build_model(pre.cfg)

  @jax.jit
  def sums(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"],
                         positions=batch["positions"], deterministic=True)
    w = batch["weights"]
    hit = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    nll = (jax.nn.logsumexp(logits, axis=-1)
           - jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0])
    return jnp.sum(hit * w), jnp.sum(w), jnp.sum(nll * w)

  correct = answers = nll = 0.0
  for b in batches:
    c, n, l = (float(x) for x in jax.device_get(sums(pre.params, b)))
    correct, answers, nll = correct + c, answers + n, nll + l
  model_dict = config.model.to_dict()
  result = {"workdir": workdir, "step": step, "accuracy": correct / answers,
            "answers": int(answers), "answer_loss": nll / answers,
            "params": models.count_params(pre.cfg),
            "state_floats_per_layer": state_floats_per_layer(model_dict, config.data.seq_len),
            "num_layers": model_dict["num_layers"], "hidden_size": model_dict["hidden_size"],
            "source": config.data.source, "seq_len": config.data.seq_len,
            "batch_size": config.train.batch_size}
  with open(os.path.join(workdir, SCORE_FILE), "w") as f:
    json.dump(result, f, indent=1)
  return result


# ------------------------------------------------------------------------------ runs


def plan(args) -> list[dict]:
  sets = (list(TINY_SETS) if args.tiny else []) + list(args.set)
  if args.steps:
    sets.append(f"train.steps={args.steps}")
  runs = []
  for family in args.families:
    for width in args.widths:
      name = f"{family}_w{width}"
      workdir = os.path.join(args.out, "runs", name)
      cmd = [sys.executable, "-m", "dense_ssm.train", f"--config={CONFIG}:{family}",
             f"--workdir={workdir}", f"--config.model.hidden_size={width}"]
      cmd += [f"--config.{s}" for s in sets]
      runs.append({"name": name, "family": family, "width": width, "workdir": workdir,
                   "cmd": cmd})
  return runs


def _planned_steps(run: dict) -> int:
  for arg in reversed(run["cmd"]):
    if arg.startswith("--config.train.steps="):
      return int(arg.split("=", 1)[1])
  return _config_steps()


def _config_steps() -> int:
  import importlib.util  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, REPO)
  spec = importlib.util.spec_from_file_location("mqar_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return int(module.get_config().train.steps)


def _read_score(run: dict) -> dict | None:
  path = os.path.join(run["workdir"], SCORE_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def execute(run: dict, parallel: int) -> dict:
  """Trains (or resumes) one run, then scores it; returns {"name", "rc", "wall_s"}."""
  done = _read_score(run)
  if done and done["step"] == _planned_steps(run):
    print(f"{run['name']}: already scored at step {done['step']}, skipped", flush=True)
    return {"name": run["name"], "rc": 0, "wall_s": 0.0}
  os.makedirs(run["workdir"], exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.3f}")
  log = os.path.join(run["workdir"], "train.log")
  score_cmd = [sys.executable, os.path.abspath(__file__), f"--score={run['workdir']}"]
  t0 = time.time()
  with open(log, "w") as f:
    rc = 0
    for cmd in (run["cmd"], score_cmd):
      f.write("$ " + shlex.join(cmd) + "\n")
      f.flush()
      rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
      if rc:
        break
  wall = time.time() - t0
  status = "ok" if rc == 0 else f"FAILED (exit {rc}; see {log})"
  print(f"{run['name']}: {status} in {wall:.0f} s", flush=True)
  return {"name": run["name"], "rc": rc, "wall_s": wall}


def _final_valid_loss(workdir: str) -> float | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  losses = [r["valid/loss"] for r in rows if "valid/loss" in r]
  return losses[-1] if losses else None


def collect(runs: list[dict], walls: dict[str, float]) -> list[dict]:
  out = []
  for run in runs:
    s = _read_score(run)
    row = {"family": run["family"], "label": LABELS[run["family"]], "width": run["width"],
           "command": shlex.join(run["cmd"]), "scored": s is not None}
    if s:
      row.update({k: s[k] for k in ("step", "accuracy", "answers", "answer_loss", "params",
                                    "state_floats_per_layer", "num_layers", "source", "seq_len",
                                    "batch_size")})
      row["state_bytes_per_layer"] = 4 * s["state_floats_per_layer"]
      row["valid_loss"] = _final_valid_loss(run["workdir"])
    if run["name"] in walls:
      row["wall_s"] = round(walls[run["name"]], 1)
    out.append(row)
  return out


# ------------------------------------------------------------------------------ report


def _markdown(rows: list[dict], command: str) -> str:
  scored = [r for r in rows if r["scored"]]
  lines = [f"Command: `{command}`", ""]
  if scored:
    r0 = scored[0]
    lines += [f"Task: `{r0['source']}`, seq_len {r0['seq_len']}, batch {r0['batch_size']}, "
              f"{r0['num_layers']} layers; accuracy over {r0['answers']} validation answers.", ""]
  lines += ["| model | width | params | state / layer (floats) | state / layer (KiB) | steps | "
            "recall accuracy | answer loss |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if not r["scored"]:
      lines.append(f"| {r['label']} | {r['width']} | – | – | – | – | not scored (failed) | – |")
      continue
    lines.append(f"| {r['label']} | {r['width']} | {r['params']:,} | "
                 f"{r['state_floats_per_layer']:,} | {r['state_bytes_per_layer'] / 1024:,.1f} | "
                 f"{r['step']} | {r['accuracy']:.3f} | {r['answer_loss']:.3f} |")
  return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for family in FAMILIES:
    pts = sorted((r["state_floats_per_layer"], r["accuracy"], r["width"]) for r in rows
                 if r["family"] == family and r["scored"])
    if not pts:
      continue
    xs, ys, ws = zip(*pts)
    ax.plot(xs, ys, marker="o", label=LABELS[family])
    for x, y, w in pts:
      ax.annotate(str(w), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("recurrent state per layer (floats; Transformer: KV cache at seq_len)")
  ax.set_ylabel("MQAR recall accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def report(rows: list[dict], out: str, command: str, plot: bool = True) -> None:
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"command": command, "runs": rows}, f, indent=1)
  table = _markdown(rows, command)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
  if plot and any(r["scored"] for r in rows):
    _plot(rows, os.path.join(out, "recall_vs_state.png"))
  print(table, flush=True)
  print(f"wrote {out}/results.json, results.md" + (", recall_vs_state.png" if plot else ""),
        flush=True)


# ------------------------------------------------------------------------------ main


def _csv(kind):
  return lambda s: tuple(kind(x) for x in s.split(",") if x.strip())


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", help="output directory (runs/ and the results files)")
  p.add_argument("--families", type=_csv(str), default=FAMILIES,
                 help=f"comma list from {','.join(FAMILIES)} (default: all)")
  p.add_argument("--widths", type=_csv(int), default=None,
                 help="comma list of model.hidden_size values (default 64,128,256; --tiny 16)")
  p.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
  p.add_argument("--steps", type=int, default=0, help="train.steps of every run (0: the config's)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="extra config override for every run, e.g. --set train.lr=1e-3")
  p.add_argument("--tiny", action="store_true", help="seconds-long CPU smoke run")
  p.add_argument("--report_only", action="store_true", help="rebuild the results from OUT/runs")
  p.add_argument("--no_plot", action="store_true", help="skip the PNG (no matplotlib needed)")
  p.add_argument("--score", metavar="WORKDIR", help=argparse.SUPPRESS)  # internal: one run
  args = p.parse_args(argv)
  if args.score:
    return args
  if not args.out:
    p.error("--out is required")
  bad = sorted(set(args.families) - set(FAMILIES))
  if bad or not args.families:
    p.error(f"--families: unknown {bad}; use a comma list from {','.join(FAMILIES)}")
  if args.widths is None:
    args.widths = TINY_WIDTHS if args.tiny else (64, 128, 256)
  if not args.widths or min(args.widths) < 4 or any(w % 4 for w in args.widths):
    p.error(f"--widths={args.widths}: use positive multiples of 4, e.g. 64,128,256")
  if args.parallel < 1:
    p.error("--parallel must be >= 1")
  bad = [s for s in args.set if "=" not in s]
  if bad:
    p.error(f"--set {bad[0]!r}: use KEY=VALUE, e.g. --set train.lr=1e-3")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.score:
    sys.path.insert(0, REPO)
    from dense_ssm import cli  # pylint: disable=g-import-not-at-top

    with cli.user_errors("experiments/mqar.py --score"):
      r = score(args.score)
    print(f"recall accuracy {r['accuracy']:.4f} over {r['answers']} answers (step {r['step']})")
    return 0
  os.makedirs(args.out, exist_ok=True)
  command = shlex.join(["python", "experiments/mqar.py"] + (sys.argv[1:] if argv is None
                                                             else list(argv)))
  runs = plan(args)
  walls: dict[str, float] = {}
  failed = []
  if not args.report_only:
    steps = _planned_steps(runs[0])
    waves = -(-len(runs) // args.parallel)
    print(f"MQAR: {len(runs)} run(s) ({len(args.families)} families x {len(args.widths)} widths), "
          f"{steps} steps each, {args.parallel} at a time ({waves} wave(s)); logs in "
          f"{args.out}/runs/<run>/train.log", flush=True)
    widest_first = sorted(runs, key=lambda r: -r["width"])  # the longest runs start first
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
      for res in pool.map(lambda r: execute(r, args.parallel), widest_first):
        walls[res["name"]] = res["wall_s"]
        if res["rc"]:
          failed.append(res["name"])
  report(collect(runs, walls), args.out, command, plot=not args.no_plot)
  if failed:
    print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
