"""Sharded training on 8 fake CPU devices and on 2 processes x 4 devices (jax.distributed).

Each test starts fresh Python processes (XLA_FLAGS must be set before JAX starts); they run
this file as a script (`worker`). The worker trains the tiny default model for a few steps on
one fixed global batch stream under several meshes and compares the per-step losses with a
one-device run of the same steps: equal to LOSS_RTOL (float32 sums in another order), then
saves a checkpoint from one mesh and restores it onto others, which must be bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

LOSS_RTOL = 2e-5  # relative; measured differences are ~1e-6
STEPS = 4


def _spawn(args: list[str], devices: int) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


def _result(proc: subprocess.Popen, out_path: str) -> dict:
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, (out + err)[-4000:]
  with open(out_path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict:
  """One process, 8 devices: a 1-device reference, then data x fsdp and fsdp x tensor meshes."""
  tmp = tmp_path_factory.mktemp("single")
  out = str(tmp / "result.json")
  return _result(_spawn(["--out", out, "--ckpt", str(tmp / "ckpt")], 8), out)


def test_8_devices_match_1_device_and_restore_across_meshes(single_process):
  res = single_process
  ref = res["losses"]["1"]
  assert len(ref) == STEPS and ref[-1] < ref[0]
  for mesh in ("2,4,1", "1,2,4"):
    np.testing.assert_allclose(res["losses"][mesh], ref, rtol=LOSS_RTOL, err_msg=mesh)
  # Saved from the fsdp x tensor mesh; restored onto 1 device, pure fsdp, and a 3-axis mesh.
  assert res["restored_equal"] == {"1,1,1": True, "1,8,1": True, "2,2,2": True}


def test_2_processes_x_4_devices_match_1_process(single_process, tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  outs = [str(tmp_path / f"result{i}.json") for i in range(2)]
  procs = [_spawn(["--out", outs[i], "--ckpt", str(tmp_path / "ckpt"), "--meshes", "2,4,1",
                   "--restore_meshes", "1,8,1", "--no_reference",
                   "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                   "--process_id", str(i)], 4) for i in range(2)]
  results = [_result(p, o) for p, o in zip(procs, outs)]
  for res in results:
    assert res["process_count"] == 2 and res["device_count"] == 8
    # The same mesh on 2 hosts (gloo collectives) as on 1 host, and as on 1 device.
    np.testing.assert_allclose(res["losses"]["2,4,1"], single_process["losses"]["2,4,1"],
                               rtol=LOSS_RTOL)
    np.testing.assert_allclose(res["losses"]["2,4,1"], single_process["losses"]["1"],
                               rtol=LOSS_RTOL)
    # A checkpoint written by both hosts restores bitwise onto another mesh.
    assert res["restored_equal"] == {"1,8,1": True}
  assert results[0]["losses"] == results[1]["losses"]


# ----------------------------------------------------------------------------------- worker


def worker(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from dense_ssm import checkpoint, models, optim, sharding, train, \
      train_step  # pylint: disable=g-import-not-at-top,g-multiple-import
  from train_testlib import tiny_config  # pylint: disable=g-import-not-at-top

  train.maybe_initialize_distributed("auto", args.coordinator_address, args.num_processes,
                                     args.process_id)
  config = tiny_config(model__dropout=0.1, train__steps=STEPS)
  cfg = models.ModelConfig.from_dict(config.model.to_dict())
  model = models.build_model(cfg)
  tx, schedule = optim.make_optimizer(config.train)
  B, T, V = config.train.batch_size, config.data.seq_len, cfg.vocab_size
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    tokens = (rng.integers(0, 16, (B, T + 1)) * 7 % V).astype(np.int32)  # learnable stream
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2:] = 2  # two documents per row
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)]).astype(np.int32)
    batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
                    "positions": np.tile(pos, (B, 1)), "weights": np.ones((B, T), np.float32)})

  def local_rows(mesh, batch):
    """This process's rows of a global batch, as `sharding.global_batch` expects them."""
    idx = sharding.batch_sharding(mesh).addressable_devices_indices_map((B, T))
    starts = sorted({s[0].start or 0 for s in idx.values()})
    stops = sorted({s[0].stop or B for s in idx.values()})
    return {k: v[starts[0]:stops[-1]] for k, v in batch.items()}

  def run(mesh_spec: str, devices):
    d, f, t = (int(x) for x in mesh_spec.split(","))
    mesh = sharding.make_mesh({"data": d, "fsdp": f, "tensor": t}, devices)
    fns = train_step.build(model, tx, schedule, mesh, seq_len=T, seed=0)
    state = fns.init(jax.random.key(0))
    losses = []
    for b in batches:
      state, m = fns.train_step(state, sharding.global_batch(local_rows(mesh, b), mesh))
      losses.append(float(jax.device_get(m["loss"])))
    return losses, state, fns

  result = {"process_count": jax.process_count(), "device_count": jax.device_count(),
            "losses": {}, "restored_equal": {}}
  if not args.no_reference:
    result["losses"]["1"], _, _ = run("1,1,1", jax.local_devices()[:1])
  for spec in args.meshes.split(";"):
    result["losses"][spec], state, fns = run(spec, jax.devices())

  # Save from the last mesh; restore onto other meshes and device counts.
  ckpt = checkpoint.Checkpointer(args.ckpt, async_save=True)
  ckpt.save(STEPS, state, {"position": 7}, {"note": "test"}, force=True)
  ckpt.wait()
  saved = [np.asarray(x) for x in jax.tree.leaves(
      jax.tree.map(lambda a: jax.device_get(_replicate(a)), state))]
  for spec in args.restore_meshes.split(";"):
    d, f, t = (int(x) for x in spec.split(","))
    devices = jax.local_devices()[:1] if spec == "1,1,1" else jax.devices()
    mesh = sharding.make_mesh({"data": d, "fsdp": f, "tensor": t}, devices)
    target = train_step.build(model, tx, schedule, mesh, seq_len=T).abstract_state
    restored, data_state, _ = ckpt.restore(STEPS, target)
    got = [np.asarray(jax.device_get(_replicate(x))) for x in jax.tree.leaves(restored)]
    result["restored_equal"][spec] = bool(
        data_state == {"position": 7} and len(got) == len(saved)
        and all(np.array_equal(a, b) for a, b in zip(got, saved)))
  ckpt.close()
  with open(args.out, "w") as f:
    json.dump(result, f)


def _replicate(x):
  """A fully replicated copy of a (possibly multi-host sharded) array, readable on every host."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  if x.is_fully_addressable:
    return x
  return jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, PartitionSpec()))(x)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--ckpt", required=True)
  parser.add_argument("--meshes", default="2,4,1;1,2,4")
  parser.add_argument("--restore_meshes", default="1,1,1;1,8,1;2,2,2")
  parser.add_argument("--no_reference", action="store_true")
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  worker(parser.parse_args())
