"""Unit tests of the training pieces: schedule, weight-decay mask, mesh and partitioning rules,
gradient accumulation, checkpoint shape check, config validation."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from dense_ssm import checkpoint, models, optim, sharding, train, train_step
from helpers import tiny
from train_testlib import tiny_config


def test_schedule_warmup_then_linear_decay():
  sched = optim.make_schedule(1.0, total_steps=1000, warmup_fraction=0.015, end_ratio=0.1)
  assert optim.warmup_steps(1000, 0.015) == 15
  lr = np.array([float(sched(c)) for c in range(1000)])  # optax count c = update c + 1
  np.testing.assert_allclose(lr[0], 1 / 15, rtol=1e-6)
  np.testing.assert_allclose(lr[14], 1.0, rtol=1e-6)  # peak at the end of warm-up
  np.testing.assert_allclose(lr[999], 0.1, rtol=1e-5)  # end_lr_ratio at the last update
  assert np.all(np.diff(lr[:15]) > 0) and np.all(np.diff(lr[14:]) < 0)
  np.testing.assert_allclose(np.diff(lr[14:]), -0.9 / 985, rtol=1e-3)  # linear


@pytest.mark.parametrize("family", ["dense_retnet", "dense_mamba", "transformer"])
def test_decay_mask_skips_norms_biases_and_ssm_dynamics(family):
  params = nn.meta.unbox(models.abstract_params(tiny(family)))
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): (m, v.ndim) for (p, m), v in zip(
      jax.tree_util.tree_flatten_with_path(mask)[0], jax.tree.leaves(params))}
  for name, (decayed, ndim) in flat.items():
    if ndim < 2 or "norm" in name or "A_log" in name:
      assert not decayed, name
    else:
      assert decayed, name
  assert any(d for d, _ in flat.values()) and not all(d for d, _ in flat.values())


def test_mesh_shape_fills_and_rejects():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="needs 6 devices but 8 are present"):
    sharding.mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="does not divide 8 devices"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def test_logical_rules_map_params_to_fsdp_and_tensor():
  mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  boxed = models.abstract_params(tiny("dense_retnet", vocab_size=96))
  specs = jax.tree.map(lambda s: s.spec, sharding.logical_to_sharding(boxed, mesh))
  assert specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
  assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
  attn = specs["layers_0"]["self_attn"]
  assert attn["q_proj"]["kernel"] == P("fsdp", "tensor")
  assert attn["to_out"]["kernel"] == P("tensor", "fsdp")
  assert attn["k_fusion"]["fc1"]["kernel"] == P("fsdp", None)  # lowrank: replicated
  # A dimension that the mesh axis does not divide is replicated instead of failing.
  odd = models.abstract_params(tiny("dense_retnet", vocab_size=97))
  odd_specs = jax.tree.map(lambda s: s.spec, sharding.logical_to_sharding(odd, mesh))
  assert odd_specs["embed_tokens"]["embedding"] == P(None, "fsdp")


def test_batch_divisibility_error_names_the_fix():
  mesh = AbstractMesh((2, 4, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  with pytest.raises(ValueError, match="batch_size=12 must be divisible by mesh data\\*fsdp=8"):
    sharding.check_batch_divisible(12, mesh, 1)


def test_gradient_accumulation_matches_one_big_batch():
  config = tiny_config(train__steps=3)
  cfg = models.ModelConfig.from_dict(config.model.to_dict())
  model = models.build_model(cfg)
  tx, schedule = optim.make_optimizer(config.train)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rng = np.random.default_rng(0)
  B, T = 8, config.data.seq_len
  tokens = rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
  weights = (rng.random((B, T)) < 0.8).astype(np.float32)  # uneven token counts per row
  batch = sharding.global_batch({
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, T), np.int32),
      "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), "weights": weights}, mesh)
  results = []
  for accum in (1, 4):
    fns = train_step.build(model, tx, schedule, mesh, seq_len=T, grad_accum=accum)
    state = fns.init(jax.random.key(0))
    for _ in range(2):
      state, metrics = fns.train_step(state, batch)
    results.append((float(metrics["loss"]), jax.device_get(state["params"])))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)  # Adam amplifies ~0 grads


def test_first_mismatch_names_the_parameter():
  have = {"params": {"a": np.zeros((2, 3)), "b": np.zeros(4)}}
  assert checkpoint.first_mismatch(have, have) is None
  msg = checkpoint.first_mismatch(have, {"params": {"a": np.zeros((2, 5)), "b": np.zeros(4)}})
  assert msg == "params/a has shape (2, 3) in the checkpoint but (2, 5) in the model"
  msg = checkpoint.first_mismatch(have, {"params": {"a": np.zeros((2, 3))}})
  assert msg == "params/b (shape (4,)) is in the checkpoint but not in the model"


def test_validate_config_rejects_unknown_keys_and_bad_values():
  config = tiny_config()
  config.train.stpes = 3  # a typo in a config file (ConfigDicts accept new keys)
  with pytest.raises(ValueError, match=r"unknown config key\(s\) \['config.train.stpes'\]"):
    train.validate_config(config)
  with pytest.raises(ValueError, match="not divisible by config.train.grad_accum=3"):
    train.validate_config(tiny_config(train__grad_accum=3))
  with pytest.raises(ValueError, match="unknown key"):
    train.validate_config(tiny_config(model__hiden_size=3))


def test_checkpoint_retention_and_data_state_round_trip(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep_last=2, keep_every=4)
  state = {"step": np.int32(0), "params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  for step in range(1, 10):
    ckpt.save(step, state, b"\x00grain-bytes" if step % 2 else {"pos": step}, {"c": 1})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 9]  # the last 2, plus every multiple of 4
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
  restored, data_state, config = ckpt.restore(9, abstract)
  assert data_state == b"\x00grain-bytes" and config == {"c": 1}
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert ckpt.restore(8, abstract)[1] == {"pos": 8}
  with pytest.raises(ValueError, match=r"params/w has shape \(2, 3\) in the checkpoint but "
                                       r"\(3, 3\) in the model; use a new --workdir"):
    ckpt.check_compatible(9, {"params": {"w": jax.ShapeDtypeStruct((3, 3), np.float32)}})
  ckpt.close()


def test_checkpointer_close_awaits_orbax_startup_cleanup(tmp_path, monkeypatch):
  """A run that errors before its first save closes the checkpointer; the temporary-directory
  cleanup Orbax starts in the background must be finished by then (else it races shutdown)."""
  import asyncio  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint import checkpoint_manager  # pylint: disable=g-import-not-at-top

  done = []

  async def slow_cleanup(*args, **kwargs):
    del args, kwargs
    await asyncio.sleep(0.5)
    done.append(True)

  monkeypatch.setattr(checkpoint_manager.temporary_paths, "cleanup_temporary_paths", slow_cleanup)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.close()
  assert done == [True]
