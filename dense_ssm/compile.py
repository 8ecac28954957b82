"""Ahead-of-time compilation of the train step for a TPU slice, on any machine (CPU is fine).

  python -m dense_ssm.train --config=configs/retnet_1b3.py --compile_only --topology=v5p:2x2x2

builds the mesh of `config.mesh` over the devices of the named topology (libtpu's
description of it: the `tpu` extra must be installed; no TPU is needed), lowers and compiles
the sharded train step for the global batch, and prints what one chip needs: argument,
output, temporary and code bytes (from XLA's memory analysis), the FLOPs XLA counts for one
step, and whether that fits the chip's HBM.
"""

from __future__ import annotations

import re
from typing import Any

from dense_ssm import models, optim, sharding, train_log, train_step


def topology_devices(topology: str) -> list[Any]:
  """The devices of a TPU topology such as "v5e:2x2" or "v5p:2x2x2" (one slice)."""
  import os  # pylint: disable=g-import-not-at-top

  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  # No TPU is driven here, so several compile-only processes may share libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name="default", num_slices=1)
  except Exception as e:  # pylint: disable=broad-except  # libtpu missing or a bad name
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise ValueError(f"--topology={topology!r} could not be described ({msg}); use a name like "
                     "v5e:2x2 or v5p:2x2x2 and install the tpu extra (pip install -e .[tpu]).") from None
  return list(desc.devices)


def compile_for_topology(config, topology: str, *, verbose: bool = True) -> dict[str, Any]:
  """AOT-compiles the train step of `config` for `topology`; returns the per-chip report."""
  cfg = models.ModelConfig.from_dict(config.model.to_dict())
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices)
  t = config.train
  sharding.check_batch_divisible(t.batch_size, mesh, 1)
  tx, schedule = optim.make_optimizer(t)
  fns = train_step.build(models.build_model(cfg), tx, schedule, mesh,
                         seq_len=config.data.seq_len, grad_accum=t.grad_accum, seed=t.seed)
  batch = sharding.abstract_batch(t.batch_size, config.data.seq_len, mesh)
  lowered = fns.train_step.lower(fns.abstract_state, batch)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  # XLA's out-of-memory is a runtime error
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise ValueError(out_of_memory_message(str(e), config, topology, devices)) from None
  mem = train_log.memory_report(compiled)
  hbm = train_log.hbm_bytes_per_device(devices[0])
  n_params = train_step.param_count(fns.abstract_state)
  tokens = t.batch_size * config.data.seq_len
  report = {
      "topology": topology,
      "device_kind": devices[0].device_kind,
      "num_devices": len(devices),
      "mesh": dict(mesh.shape),
      "num_params": n_params,
      "memory_bytes": mem,
      "hbm_bytes": hbm,
      "fits": (mem.get("total", 0) <= hbm) if hbm and mem else None,
      "xla_flops_per_device": train_log.cost_flops(compiled),
      "model_flops_per_device": models.flops_per_token(cfg, config.data.seq_len) * tokens
                                / len(devices),
  }
  if verbose:
    print(_format(report), flush=True)
  return report


_OOM_AMOUNTS = re.compile(r"required for ([\w ]+?) \(([\d.]+\s*[KMGT]?i?B?)\) exceeds "
                          r"available HBM \(([\d.]+\s*[KMGT]?i?B?)\)")


def out_of_memory_message(error: str, config, topology: str, devices: list[Any]) -> str:
  """One line for XLA's RESOURCE_EXHAUSTED at compile time: bytes needed vs available per chip
  and the settings that lower the need."""
  t, n = config.train, len(devices)
  found = _OOM_AMOUNTS.search(error)
  if found:
    what, need, have = found.groups()
    amounts = f"one chip needs {need} for {what} but has {have} of HBM"
  else:
    last = " ".join(error.strip().splitlines()[-1].split()) if error.strip() else "out of memory"
    amounts = f"one chip runs out of memory ({last})"
  per_chip = f"{t.batch_size / n:g}"
  micro = f", grad_accum={t.grad_accum}" if t.grad_accum > 1 else ""
  levers = [] if config.model.remat else ["recompute activations (--config.model.remat=true)"]
  levers += [f"split the batch into more micro-batches (--config.train.grad_accum="
             f"{2 * t.grad_accum} or more)",
             "lower the per-chip batch (--config.train.batch_size)",
             "use more chips (a larger --topology)"]
  return (f"the train step does not fit {topology} ({n} x {devices[0].device_kind}): {amounts} "
          f"(batch {t.batch_size} x {config.data.seq_len} tokens, {per_chip} sequences per chip"
          f"{micro}, remat={bool(config.model.remat)}); to fit, "
          f"{', '.join(levers[:-1])} or {levers[-1]}.")


def _format(r: dict[str, Any]) -> str:
  fb = train_log.format_bytes
  mem = r["memory_bytes"]
  lines = [
      f"compiled train step for {r['topology']} ({r['num_devices']} x {r['device_kind']}), "
      f"mesh {r['mesh']}, {r['num_params']:,} parameters",
      "per chip: " + ", ".join(f"{k} {fb(v)}" for k, v in mem.items()),
  ]
  if r["hbm_bytes"]:
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines.append(f"per chip total {fb(mem.get('total', 0))} of {fb(r['hbm_bytes'])} HBM: {verdict}")
  xla = r["xla_flops_per_device"]
  lines.append(f"FLOPs per chip per step: XLA {xla:.3e}" if xla is not None else
               "FLOPs per chip per step: XLA n/a")
  lines[-1] += f", model estimate {r['model_flops_per_device']:.3e}"
  return "\n".join(lines)


__all__ = ["compile_for_topology", "out_of_memory_message", "topology_devices"]
