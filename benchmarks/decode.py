"""Decode benchmark: tokens/s and per-token latency of generation with random bf16 weights.

    python benchmarks/decode.py --out DIR            # GPU: the 1.3B models of the issue
    python benchmarks/decode.py --tiny --out DIR     # CPU smoke test (tiny models, short contexts)

Models: DenseRetNet-1.3B (configs/retnet_1b3.py, m = 2), DenseMamba-1.3B (configs/mamba_1b3.py,
m = 4) and a LLaMA-style Transformer of similar size (24 layers, H 2048, 16 heads, SwiGLU 5504,
untied head: 1.34B). Params and compute in bfloat16; the recurrent states stay float32.

What is timed is the generation loop itself (`dense_ssm.generate.decode_block`: one jitted
program of N greedy decode steps, run in groups of known trip count), from a cache that holds C
tokens of context. The SSM caches are constant-size, so their contents are filled by a real prefill of a
short prompt; the Transformer's KV cache is allocated for C + N tokens with the first C marked
valid (the decode-step cost is that of a real prefilled cache of length C; a real 32K prefill is
not needed to time decoding).

Reported per model:
  - tokens/s at batch 1 and 64 (context 1K; --tiny: 64), N new tokens per row;
  - per-token latency (ms) at batch 1 with 1K, 8K, 32K tokens of context;
  - bytes/token = bf16 params + the decode state read per step at batch 1, and the HBM floor:
    measured copy bandwidth (bytes read + written per second, as in the issue's ~1,600 tokens/s
    for 1.3B on the H200) / bytes per token, with our share of it.
Timing: median of `--reps` runs after a compile + warm-up run. A table is printed last and
everything is written to OUT/decode.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_timing  # pylint: disable=g-import-not-at-top,wrong-import-position
import profile_trace  # pylint: disable=g-import-not-at-top,wrong-import-position
from dense_ssm import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from dense_ssm import generate as gen  # pylint: disable=wrong-import-position
from dense_ssm.models import ModelConfig, build_model, count_params, init_cache  # pylint: disable=wrong-import-position


def model_configs(tiny: bool) -> dict[str, ModelConfig]:
  llama = config_lib.model_dict(family="transformer", num_layers=24, hidden_size=2048,
                                num_heads=16, ffn_dim=5504, ffn_act="swiglu",
                                tie_embeddings=False, max_len=40960, dense={"layers": 0})
  dicts = {"DenseRetNet-1.3B": config_lib.retnet_model("1b3"),
           "DenseMamba-1.3B": config_lib.mamba_model("1b3"),
           "LLaMA-1.3B": llama}
  out = {}
  for name, d in dicts.items():
    cfg = ModelConfig.from_dict(d)
    # impl=xla: the (untimed) prefill of the SSM carries needs no kernel.
    cfg = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16", dropout=0.0,
                              impl="xla")
    if tiny:
      cfg = dataclasses.replace(cfg, num_layers=2, hidden_size=64, qk_dim=32, num_heads=2,
                                ffn_dim=128, vocab_size=512, state_dim=8,
                                dense=dataclasses.replace(cfg.dense, r_k=8, r_v=8))
      name = name.replace("1.3B", "tiny")
    out[name] = gen.inference_config(cfg)
  return out


def measure_bandwidth(tiny: bool) -> float:
  """Device copy bandwidth, bytes read + written per second (median of 10)."""
  n = (1 << 20) if tiny else (1 << 30)  # 4 MiB / 4 GiB of float32
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  return 2 * 4 * n / statistics.median(times)


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def random_params(model, seed: int = 0):
  """Params of the model's shapes: N(0, 0.02^2), norm scales 1 (bench_timing.fill_tree)."""
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"],
                          jax.random.PRNGKey(seed))
  shapes = jax.tree.map(lambda a: getattr(a, "value", a), shapes,
                        is_leaf=lambda a: hasattr(a, "value"))
  return bench_timing.fill_tree(shapes, lambda path, _: "ones" if "scale" in path else "normal",
                                seed)


class Runner:
  """One model: random params and a jitted decode block of `new_tokens` greedy steps."""

  def __init__(self, cfg: ModelConfig, new_tokens: int, seed: int = 0):
    self.cfg, self.new_tokens = cfg, new_tokens
    self.model = build_model(cfg)
    self.params = random_params(self.model, seed)
    self.param_bytes = tree_bytes(self.params)
    self.block = jax.jit(lambda p, c: gen.decode_block(cfg, p, c, steps=new_tokens, pad_id=0,
                                                       greedy=True),
                         donate_argnums=(1,))
    self.prefill = jax.jit(lambda p, t: self.model.apply(
        {"params": p}, t, init_cache(cfg, t.shape[0]), method=self.model.prefill))

  def carry(self, batch: int, context: int):
    """Loop carry as after a prefill of `context` tokens (see the module doc)."""
    cfg = self.cfg
    if cfg.family == "transformer":
      cache = init_cache(cfg, batch, context + self.new_tokens)
      valid = jnp.arange(context + self.new_tokens) < context
      cache["layers"] = [{**s, "valid": jnp.broadcast_to(valid, s["valid"].shape),
                          "index": jnp.asarray(context, jnp.int32)} for s in cache["layers"]]
      cache["pos"] = jnp.full((batch,), context, jnp.int32)
    else:  # constant-size state: a real prefill of a short prompt, positions moved to `context`
      tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, 16), 0, cfg.vocab_size)
      _, cache = self.prefill(self.params, tokens)
      cache["pos"] = jnp.full((batch,), context, jnp.int32)
    z = lambda dt: jnp.zeros((), dt)  # pylint: disable=unnecessary-lambda-assignment
    return {"cache": cache, "token": jnp.ones((batch,), jnp.int32),
            "done": jnp.zeros((batch,), bool), "count": jnp.ones((), jnp.int32),
            "key": jax.random.PRNGKey(0), "sampling": (z(jnp.float32), z(jnp.int32),
                                                       jnp.ones((), jnp.float32)),
            "eos": jnp.asarray(-1, jnp.int32)}

  def time_decode(self, batch: int, context: int, reps: int, profile: str = "") -> dict:
    """Median seconds for `new_tokens` steps; each run starts from a fresh carry. With
    `profile` (a .trace.json.gz path), one more run is traced there and summarised."""
    state_bytes = tree_bytes(self.carry(batch, context)["cache"])
    times, first = [], 0.0
    t0 = time.perf_counter()
    block = self.block.lower(self.params, self.carry(batch, context)).compile()
    compile_s = time.perf_counter() - t0
    for r in range(reps + 1 + bool(profile)):  # run 0: warm-up; last: traced
      carry = self.carry(batch, context)
      jax.block_until_ready(carry)
      traced = profile and r == reps + 1
      with profile_trace.record(profile) if traced else contextlib.nullcontext():
        t0 = time.perf_counter()
        carry, out, n = block(self.params, carry)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
      assert int(n) == self.new_tokens
      if r == 0:
        first = dt
      elif not traced:
        times.append(dt)
    sec = statistics.median(times)
    row = {"batch": batch, "context": context, "new_tokens": self.new_tokens,
           "seconds": sec, "ms_per_token": 1e3 * sec / self.new_tokens,
           "tokens_per_s": batch * self.new_tokens / sec, "state_bytes": state_bytes,
           "compile_s": compile_s, "first_run_s": first}
    if profile:
      row["profile"] = profile_trace.summarize(profile)
      print(profile_trace.format_summary(row["profile"]), flush=True)
    return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--tiny", action="store_true", help="tiny models and contexts (CPU smoke test)")
  p.add_argument("--models", default="", help="comma-separated subset of the model names")
  p.add_argument("--new_tokens", type=int, default=0, help="decode steps per run (default 256)")
  p.add_argument("--reps", type=int, default=0, help="timed runs per point (default 5)")
  p.add_argument("--contexts", default="", help="latency contexts (default 1024,8192,32768)")
  p.add_argument("--batches", default="", help="throughput batches (default 1,64)")
  p.add_argument("--profile", action="store_true",
                 help="trace one batch-1 run per model into OUT/decode_*.trace.json.gz and print "
                      "where the device time goes")
  a = p.parse_args(argv)
  tiny = a.tiny
  new_tokens = a.new_tokens or (16 if tiny else 256)
  reps = a.reps or (2 if tiny else 5)
  contexts = [int(c) for c in (a.contexts or ("64,256,1024" if tiny else
                                               "1024,8192,32768")).split(",")]
  batches = [int(b) for b in (a.batches or ("1,4" if tiny else "1,64")).split(",")]
  throughput_context = contexts[0]

  device = jax.devices()[0]
  bandwidth = measure_bandwidth(tiny)
  print(f"device: {device.device_kind} ({device.platform}); copy bandwidth "
        f"{bandwidth / 1e12:.2f} TB/s (read + write); jax {jax.__version__}", flush=True)
  cfgs = model_configs(tiny)
  if a.models:
    unknown = sorted(set(a.models.split(",")) - set(cfgs))
    if unknown:
      p.error(f"unknown model(s) {unknown}; choose from {sorted(cfgs)}")
    cfgs = {k: v for k, v in cfgs.items() if k in a.models.split(",")}
  results = {"device": device.device_kind, "platform": device.platform,
             "bandwidth_bytes_per_s": bandwidth, "jax": jax.__version__,
             "new_tokens": new_tokens, "reps": reps, "models": {}}
  for name, cfg in cfgs.items():
    t0 = time.perf_counter()
    runner = Runner(cfg, new_tokens)
    print(f"{name}: params initialised in {time.perf_counter() - t0:.1f} s", flush=True)
    r = {"family": cfg.family, "params": count_params(cfg), "param_bytes": runner.param_bytes,
         "throughput": [], "latency": []}
    for b in batches:
      prof = ""
      if a.profile and b == 1:
        prof = os.path.join(a.out, "decode_" + name.replace(".", "").replace("-", "_")
                            + ".trace.json.gz")
      row = runner.time_decode(b, throughput_context, reps, prof)
      r["throughput"].append(row)
      print(f"{name}: batch {b}, context {throughput_context}: {row['tokens_per_s']:,.0f} tok/s "
            f"(compile {row['compile_s']:.1f} s)", flush=True)
    for c in contexts:
      row = runner.time_decode(1, c, reps)
      r["latency"].append(row)
      print(f"{name}: batch 1, context {c}: {row['ms_per_token']:.3f} ms/token "
            f"(state {row['state_bytes'] / 2**20:.1f} MiB)", flush=True)
    one = r["throughput"][0] if batches[0] == 1 else r["latency"][0]
    r["bytes_per_token_b1"] = runner.param_bytes + one["state_bytes"]
    r["floor_tokens_per_s_b1"] = bandwidth / r["bytes_per_token_b1"]
    r["floor_share_b1"] = one["tokens_per_s"] / r["floor_tokens_per_s_b1"]
    lat = [x["ms_per_token"] for x in r["latency"]]
    r["latency_growth_last_vs_first"] = lat[-1] / lat[0] - 1
    results["models"][name] = r
    del runner

  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "decode.json"), "w") as f:
    json.dump(results, f, indent=2)
  head = (["model", "params"] + [f"tok/s b{b}" for b in batches] + ["floor tok/s b1", "floor %"]
          + [f"ms/tok {c // 1024}K" if c >= 1024 else f"ms/tok {c}" for c in contexts]
          + ["growth"])
  print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
  for name, r in results["models"].items():
    cells = [name, f"{r['params'] / 1e9:.2f}B"]
    cells += [f"{x['tokens_per_s']:,.0f}" for x in r["throughput"]]
    cells += [f"{r['floor_tokens_per_s_b1']:,.0f}", f"{100 * r['floor_share_b1']:.0f}%"]
    cells += [f"{x['ms_per_token']:.3f}" for x in r["latency"]]
    cells += [f"{100 * r['latency_growth_last_vs_first']:+.1f}%"]
    print("| " + " | ".join(cells) + " |")
  print(f"\nwritten: {os.path.join(a.out, 'decode.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
