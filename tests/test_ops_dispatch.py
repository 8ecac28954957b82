"""Kernel dispatch: the Pallas impls run inside a full model, and per batch shard under a mesh."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from tests.helpers import init, rel, replace, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["dense_retnet", "dense_mamba"])
def test_model_with_pallas_kernel_matches_xla(name):
  cfg = tiny(name, chunk_size=16, impl="xla", num_layers=2)
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 21), 0, cfg.vocab_size)
  seg = (jax.numpy.arange(21) >= 12).astype(jax.numpy.int32)[None]
  xla = model.apply({"params": params}, tokens, segment_ids=seg)
  pal = init(replace(cfg, impl="pallas_interpret"))[0].apply({"params": params}, tokens,
                                                             segment_ids=seg)
  assert rel(pal, xla) < 1e-5


def test_pallas_runs_per_batch_shard_under_a_mesh():
  """Sharded over (data, fsdp) when the batch divides; whole on every device when not."""
  script = textwrap.dedent("""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
      os.environ["JAX_PLATFORMS"] = "cpu"
      import jax, jax.numpy as jnp, flax.linen as nn
      from jax.sharding import NamedSharding, PartitionSpec as P
      from dense_ssm import ops, sharding
      from dense_ssm.layers.common import batch_mesh_axes
      mesh = jax.make_mesh((2, 2, 1), sharding.MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
      ks = jax.random.split(jax.random.PRNGKey(0), 3)
      q = jax.random.normal(ks[0], (4, 40, 2, 16))
      k = jax.random.normal(ks[1], (4, 40, 2, 16)) * 0.25
      v = jax.random.normal(ks[2], (4, 40, 2, 16))
      ld = ops.retnet_log_decay(2)
      ref_o, ref_s = ops.retention(q, k, v, ld, impl="reference")
      with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        axes = batch_mesh_axes()
        assert axes == ("data", "fsdp"), axes
        f = jax.jit(lambda q, k, v: ops.retention(q, k, v, ld, impl="pallas_interpret",
                                                  chunk_size=16, batch_axes=axes))
        sh = NamedSharding(mesh, P(axes))
        o, s = f(*(jax.device_put(x, sh) for x in (q, k, v)))
      assert float(jnp.abs(o - ref_o).max()) < 1e-4
      assert float(jnp.abs(s - ref_s).max()) < 1e-4
      assert o.sharding.spec == P(axes), o.sharding
      # One row (model.init's input): the 4 batch shards cannot split it; it runs whole.
      with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        o1, s1 = f(q[:1], k[:1], v[:1])
      assert float(jnp.abs(o1 - ref_o[:1]).max()) < 1e-4
      assert float(jnp.abs(s1 - ref_s[:1]).max()) < 1e-4
      print("OK")
  """)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
