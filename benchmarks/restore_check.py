"""Checkpoint portability: a train state saved on n devices restores on other device sets (one
GPU, the CPU, another mesh) and the next step gives the same loss.

    python benchmarks/restore_check.py save --config configs/default.py --batch 8 --seq 512 \
        --steps 3 --mesh fsdp=-1 --ckpt DIR
    CUDA_VISIBLE_DEVICES=0 python benchmarks/restore_check.py restore --ckpt DIR --out OUT
    JAX_PLATFORMS=cpu python benchmarks/restore_check.py restore --ckpt DIR --out OUT

`save` builds the real sharded train step (`dense_ssm.train_step`, as `dense_ssm.train` runs it)
on all devices under --mesh, initialises it (`StepFns.init`), trains --steps steps on fixed
random batches, saves the state with `dense_ssm.checkpoint.Checkpointer` (Orbax), then runs one
more step and stores its loss with the run's settings in DIR/expected.json. `restore` builds the
same step on this process's devices (data parallel by default), restores the checkpoint into
that mesh, runs the same next step and compares its loss: it prints one line and writes
OUT/restore_check_*.json, and exits 1 unless the restored state is bitwise the saved one and the
loss is within --rtol. Use float32 compute (the default here) for a tight tolerance: the GPU
runs the Pallas kernels and the CPU the XLA chunkwise form, so bf16 losses differ at the bf16
rounding level. (Large models: the jitted init of a 1.3B model compiles for minutes on a GPU.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # pylint: disable=g-import-not-at-top,wrong-import-position
from dense_ssm import checkpoint  # pylint: disable=wrong-import-position


def batch_at(step: int, batch: int, seq: int, vocab: int, mesh) -> dict:
  """The fixed batch of a step (the same on every device set): rows of a random period-16
  pattern, which the model learns within a few steps, so that the loss moves."""
  pattern = np.random.default_rng(1000 + step).integers(0, vocab, (batch, 16))
  return tt.token_batch(np.tile(pattern, (1, seq // 16 + 2))[:, :seq + 1], mesh)


def fingerprint(state) -> str:
  """sha256 of every leaf's bytes in tree order (gathered to the host)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(state):
    h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()


def build(run: dict, mesh_spec: str):
  return tt.build_step(tt.load_config(run["config"], run["set"]), run["batch"], run["seq"],
                       tt.parse_mesh(mesh_spec))


def save(args) -> None:
  run = {"config": args.config, "set": args.set, "batch": args.batch, "seq": args.seq,
         "steps": args.steps}
  fns, cfg, mesh = build(run, args.mesh)
  state = fns.init(jax.random.key(0))  # the real (jitted, sharded) init
  losses = []
  for step in range(args.steps):
    state, metrics = fns.train_step(state, batch_at(step, args.batch, args.seq, cfg.vocab_size,
                                                    mesh))
    losses.append(float(metrics["loss"]))
  ckpt = checkpoint.Checkpointer(args.ckpt, async_save=False)
  ckpt.save(args.steps, state, None, run, force=True)
  ckpt.close()
  digest = fingerprint(state)
  _, metrics = fns.train_step(state, batch_at(args.steps, args.batch, args.seq, cfg.vocab_size,
                                              mesh))
  run.update(losses=losses, next_loss=float(metrics["loss"]), state_sha256=digest,
             devices=mesh.devices.size, mesh=tt.mesh_name(mesh),
             platform=jax.devices()[0].platform)
  with open(os.path.join(args.ckpt, "expected.json"), "w") as f:
    json.dump(run, f, indent=1)
  print(f"saved step {args.steps} on {run['devices']} {run['platform']} device(s) "
        f"({run['mesh']}); losses {[round(x, 6) for x in losses]}, next step loss "
        f"{run['next_loss']:.6f}")


def restore(args) -> None:
  with open(os.path.join(args.ckpt, "expected.json")) as f:
    run = json.load(f)
  fns, cfg, mesh = build(run, args.mesh)
  ckpt = checkpoint.Checkpointer(args.ckpt, async_save=False)
  state, _, _ = ckpt.restore(run["steps"], fns.abstract_state)
  ckpt.close()
  state_equal = fingerprint(state) == run["state_sha256"]
  _, metrics = fns.train_step(state, batch_at(run["steps"], run["batch"], run["seq"],
                                              cfg.vocab_size, mesh))
  loss = float(metrics["loss"])
  rel = abs(loss - run["next_loss"]) / abs(run["next_loss"])
  # What the tolerance must tell apart: the smallest loss change between consecutive steps.
  losses = run["losses"] + [run["next_loss"]]
  step_change = min(abs(a - b) / abs(b) for a, b in zip(losses[1:], losses[:-1]))
  result = {"saved_on": f"{run['devices']} {run['platform']} ({run['mesh']})",
            "restored_on": f"{mesh.devices.size} {jax.devices()[0].platform} "
                           f"({tt.mesh_name(mesh)})",
            "state_bitwise_equal": state_equal, "expected_loss": run["next_loss"], "loss": loss,
            "rel_diff": rel, "rtol": args.rtol, "min_rel_step_change": step_change,
            "ok": state_equal and rel <= args.rtol, "config": run["config"], "set": run["set"]}
  os.makedirs(args.out, exist_ok=True)
  name = f"restore_check_{jax.devices()[0].platform}{mesh.devices.size}.json"
  with open(os.path.join(args.out, name), "w") as f:
    json.dump(result, f, indent=1)
  print(f"restored {result['saved_on']} -> {result['restored_on']}: state bitwise equal "
        f"{state_equal}; next step loss {loss:.6f} vs {run['next_loss']:.6f} (rel diff {rel:.2e}, "
        f"rtol {args.rtol:g}; the losses of consecutive steps differ by >= {step_change:.1e}): "
        f"{'OK' if result['ok'] else 'MISMATCH'}")
  if not result["ok"]:
    sys.exit(1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mode", choices=("save", "restore"))
  parser.add_argument("--ckpt", required=True, help="checkpoint directory")
  parser.add_argument("--config", default="configs/default.py", help="path[:variant] (save)")
  parser.add_argument("--set", action="append", default=None,
                      help="KEY=VALUE config override (save; default: model.dtype=float32 "
                           "train.lr=3e-3 train.warmup_fraction=0.0, so that the loss moves)")
  parser.add_argument("--batch", type=int, default=2, help="global batch (save)")
  parser.add_argument("--seq", type=int, default=256, help="sequence length (save)")
  parser.add_argument("--steps", type=int, default=2, help="steps before the save (save)")
  parser.add_argument("--mesh", default=None,
                      help="AXIS=SIZE[,...] over data/fsdp/tensor (default: save fsdp=-1, "
                           "restore data=-1)")
  parser.add_argument("--rtol", type=float, default=1e-4, help="allowed relative loss difference")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  args = parser.parse_args()
  if args.set is None:
    args.set = ["model.dtype=float32", "train.lr=3e-3", "train.warmup_fraction=0.0"]
  if args.mesh is None:
    args.mesh = "fsdp=-1" if args.mode == "save" else "data=-1"
  try:
    (save if args.mode == "save" else restore)(args)
  except (ValueError, FileNotFoundError) as e:  # bad mesh / batch / checkpoint: one line
    raise SystemExit(f"restore_check: {e}") from None


if __name__ == "__main__":
  main()
