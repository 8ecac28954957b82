r"""Dense hidden connection vs its m = 0 baseline at small scale, through the real train CLI.

  python experiments/dense_vs_baseline.py --out=/tmp/repro --seeds=0,1 --parallel=8

Runs `python -m dense_ssm.train --config=configs/repro_small.py:<model>` for every model and
seed (same tokenizer, data order, token budget and hyper-parameters; the seed changes only the
initialisation), `--parallel` runs at a time (several small runs share one GPU: each gets
1/parallel of its memory). One tokenizer is trained first on the train split and passed to all
runs. Then it reads each run's `metrics.jsonl` and writes, under `--out`:
  results.json   per run: params, tokens, the validation curve, tokens/s
  results.md     per family, at the largest token count every run of the pair reached: each
                 variant's validation loss (mean +- half the seed range), the dense-minus-baseline
                 gap, its sign, and whether the seed ranges separate
  curves.png     validation loss against tokens (mean over seeds, band = seed range)
`--report_only` rebuilds the three files from existing run directories. `--tiny` shrinks
everything to a seconds-long CPU smoke run (tests use it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/repro_small.py"
PAIRS = (("dense_retnet", "gau"), ("dense_mamba", "mamba"))  # (dense, its m = 0 baseline)
LABELS = {"dense_retnet": "DenseRetNet (m=2)", "gau": "RetNet (GAU, m=0)",
          "dense_mamba": "DenseMamba (m=4)", "mamba": "Mamba (m=0)"}
TINY = ("model.num_layers=2", "model.hidden_size=64", "model.qk_dim=32", "model.vocab_size=512",
        "model.dtype=float32", "data.source=stdlib", "data.max_chars=400000",
        "data.tokenizer_train_chars=200000", "data.seq_len=64", "data.valid_fraction=0.05",
        "train.batch_size=4", "train.steps=6", "train.eval_every=3", "train.log_every=3",
        "train.eval_batches=2")


def _config(model: str, sets: list[str]):
  """The run config of `model` with KEY=VALUE overrides, as the train CLI builds it."""
  sys.path.insert(0, REPO)
  from dense_ssm import config_file  # pylint: disable=g-import-not-at-top
  return config_file.load(f"{CONFIG}:{model}", sets, root=REPO)


def train_tokenizer(out: str, sets: list[str]) -> str:
  """Trains the shared tokenizer once (on the train split of the runs' data source)."""
  from dense_ssm import data  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, "tokenizer", data.TOKENIZER_FILE)
  if not os.path.exists(path):
    t0 = time.time()
    data.load_tokenizer(_config(PAIRS[0][0], sets), os.path.dirname(path))
    print(f"tokenizer trained in {time.time() - t0:.0f} s: {path}", flush=True)
  return path


def run_one(model: str, seed: int, out: str, sets: list[str], parallel: int) -> dict:
  workdir = os.path.join(out, f"{model}_s{seed}")
  log = os.path.join(out, f"{model}_s{seed}.log")
  cmd = [sys.executable, "-m", "dense_ssm.train", f"--config={os.path.join(REPO, CONFIG)}:{model}",
         f"--workdir={workdir}", f"--config.train.seed={seed}"]
  cmd += [f"--config.{s}" for s in sets]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.3f}")
  t0 = time.time()
  with open(log, "w") as f:
    f.write(" ".join(cmd) + "\n")
    f.flush()
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
  status = "ok" if rc == 0 else f"exit {rc}"
  print(f"{model} seed {seed}: {status} in {time.time() - t0:.0f} s (log {log})", flush=True)
  return {"model": model, "seed": seed, "workdir": workdir, "rc": rc, "wall_s": time.time() - t0}


def read_run(model: str, seed: int, out: str, sets: list[str]) -> dict | None:
  """One run's numbers from its metrics.jsonl (None if the run left none)."""
  from dense_ssm import models  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, f"{model}_s{seed}", "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = [json.loads(line) for line in open(path) if line.strip()]
  config = _config(model, sets)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  curve = [(r["step"] * tokens_per_step, r["valid/loss"]) for r in rows if "valid/loss" in r]
  rates = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r]
  if not curve:
    return None
  cfg = models.ModelConfig.from_dict(config.model.to_dict())
  last_step = max(r["step"] for r in rows)
  return {"model": model, "seed": seed, "params": models.count_params(cfg),
          "steps": last_step, "tokens": last_step * tokens_per_step,
          "planned_tokens": config.train.steps * tokens_per_step,
          "final_valid_loss": curve[-1][1], "curve": curve,
          "tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None}


def _loss_at(run: dict, tokens: int) -> float:
  return dict(run["curve"])[tokens]


def summarize(runs: list[dict]) -> tuple[list[dict], list[dict]]:
  """Per family: both variants' validation loss at the largest token count that every run of the
  pair reached (runs cut short still compare at equal tokens), mean and half range over seeds,
  the dense-minus-baseline gap, and whether the seed ranges separate."""
  rows, gaps = [], []
  for dense, base in PAIRS:
    pair = [r for r in runs if r["model"] in (dense, base)]
    if not pair:
      continue
    common = set.intersection(*(set(dict(r["curve"])) for r in pair))
    if not common:
      continue
    tokens = max(common)
    losses = {}
    for model in (dense, base):
      rs = [r for r in pair if r["model"] == model]
      if not rs:
        continue
      losses[model] = [_loss_at(r, tokens) for r in rs]
      rows.append({"model": model, "seeds": len(rs), "params": rs[0]["params"],
                   "compared_at_tokens": tokens, "planned_tokens": rs[0]["planned_tokens"],
                   "reached_tokens": [r["tokens"] for r in rs],
                   "loss_mean": sum(losses[model]) / len(rs),
                   "loss_half_range": (max(losses[model]) - min(losses[model])) / 2,
                   "losses": losses[model],
                   "tokens_per_s": [r["tokens_per_s_median"] for r in rs]})
    if len(losses) == 2:
      d, b = losses[dense], losses[base]
      gap = sum(d) / len(d) - sum(b) / len(b)
      gaps.append({"dense": dense, "baseline": base, "tokens": tokens, "gap": gap,
                   "dense_better": gap < 0,
                   "ranges_separate": max(d) < min(b) or min(d) > max(b)})
  return rows, gaps


def write_report(out: str, runs: list[dict], command: str) -> str:
  rows, gaps = summarize(runs)
  json.dump({"command": command, "runs": runs, "models": rows, "gaps": gaps},
            open(os.path.join(out, "results.json"), "w"), indent=1)
  lines = ["| model | seeds | params | tokens planned / reached per seed | valid loss at the "
           "pair's common tokens (mean ± half range) | tokens/s per run (median) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    tps = ", ".join(f"{t:,.0f}" for t in r["tokens_per_s"] if t)
    reached = ", ".join(f"{t / 1e6:.1f}M" for t in r["reached_tokens"])
    lines.append(f"| {LABELS.get(r['model'], r['model'])} | {r['seeds']} | "
                 f"{r['params'] / 1e6:.1f}M | {r['planned_tokens'] / 1e6:.1f}M / {reached} | "
                 f"{r['loss_mean']:.4f} ± {r['loss_half_range']:.4f} at "
                 f"{r['compared_at_tokens'] / 1e6:.1f}M | {tps} |")
  lines.append("")
  for g in gaps:
    verdict = "lower (same sign as the paper)" if g["dense_better"] else "higher (opposite sign)"
    sep = ("the seed ranges do not overlap" if g["ranges_separate"]
           else "the seed ranges overlap: not resolved at this scale")
    lines.append(f"- {LABELS[g['dense']]} vs {LABELS[g['baseline']]} at {g['tokens'] / 1e6:.1f}M "
                 f"tokens: gap {g['gap']:+.4f} nats, dense is {verdict}; {sep}.")
  text = "\n".join(lines) + "\n"
  open(os.path.join(out, "results.md"), "w").write(text)
  plot(out, runs)
  return text


def plot(out: str, runs: list[dict]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  families = [p for p in PAIRS if any(r["model"] in p for r in runs)]
  fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4), squeeze=False)
  for ax, pair in zip(axes[0], families):
    for model, color in zip(pair, ("tab:red", "tab:blue")):
      rs = [r for r in runs if r["model"] == model]
      if not rs:
        continue
      n = min(len(r["curve"]) for r in rs)
      xs = [rs[0]["curve"][i][0] / 1e6 for i in range(n)]
      ys = [[r["curve"][i][1] for r in rs] for i in range(n)]
      ax.plot(xs, [sum(y) / len(y) for y in ys], color=color, marker="o", markersize=3,
              label=f"{LABELS[model]} ({len(rs)} seeds)")
      ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.25)
    values = [p[1] for r in runs if r["model"] in pair for p in r["curve"]]
    ax.set_ylim(min(values) - 0.05, max(values) + 0.05)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (runs, logs, results)")
  p.add_argument("--models", default="dense_retnet,gau,dense_mamba,mamba",
                 help="comma-separated variants of configs/repro_small.py")
  p.add_argument("--seeds", default="0,1", help="comma-separated train.seed values")
  p.add_argument("--parallel", type=int, default=1, help="runs at a time")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, e.g. --set train.steps=2000")
  p.add_argument("--tiny", action="store_true", help="seconds-long CPU smoke run")
  p.add_argument("--report_only", action="store_true", help="only rebuild the report")
  args = p.parse_args(argv)
  models_ = [m for m in args.models.split(",") if m]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  unknown = [m for m in models_ if m not in LABELS]
  if unknown or not seeds or args.parallel < 1:
    p.error(f"--models must name variants of {CONFIG} ({', '.join(LABELS)}), --seeds at least "
            f"one integer, --parallel >= 1 (got models {unknown or models_}, seeds {seeds})")
  sets = (list(TINY) if args.tiny else []) + args.set
  os.makedirs(args.out, exist_ok=True)
  command = " ".join([os.path.relpath(sys.argv[0], REPO)] + (argv or sys.argv[1:]))
  if not args.report_only:
    sets.append(f"data.tokenizer={train_tokenizer(args.out, sets)}")
    jobs = [(m, s) for s in seeds for m in models_]
    print(f"{len(jobs)} runs, {args.parallel} at a time", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
      done = list(pool.map(lambda j: run_one(*j, args.out, sets, args.parallel), jobs))
    failed = [d for d in done if d["rc"] != 0]
    for d in failed:
      print(f"FAILED: {d['model']} seed {d['seed']} ({d['workdir']})", file=sys.stderr)
  runs = [r for m in models_ for s in seeds if (r := read_run(m, s, args.out, sets)) is not None]
  if not runs:
    print("no finished runs to report", file=sys.stderr)
    return 1
  print(write_report(args.out, runs, command))
  return 0 if args.report_only or not failed else 1


if __name__ == "__main__":
  sys.exit(main())
