"""Every family: parallel, chunkwise and token-by-token decode agree; packing isolates documents;
causality holds."""

import jax
import jax.numpy as jnp
import pytest

from dense_ssm.models import build_model
from tests.helpers import FAMILIES, decode_all, init, rel, replace, tiny

T = 517  # >= 512 and not a multiple of the chunk size (64)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_modes_agree(name):
  cfg = tiny(name, mode="parallel")
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, cfg.vocab_size)
  fwd = jax.jit(lambda c, p, t: build_model(c).apply({"params": p}, t), static_argnums=0)
  par = fwd(cfg, params, tokens)
  # Only the retention families have a separate parallel form.
  retention = cfg.family in ("dense_retnet", "retnet_ffn")
  chunk = fwd(replace(cfg, mode="chunkwise"), params, tokens) if retention else par
  dec = jax.jit(decode_all, static_argnums=(0, 3))(replace(cfg, mode="chunkwise"), params, tokens,
                                                    200)
  errs = {"chunkwise": rel(chunk, par), "decode": rel(dec, par)}
  print(f"{name}: relative error vs parallel {errs}")
  assert max(errs.values()) <= 1e-4, errs


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_packed_row_equals_documents_run_separately(name):
  cfg = tiny(name, mode="chunkwise", chunk_size=16)
  model, params = init(cfg)
  lens = (23, 40, 14)
  docs = [jax.random.randint(jax.random.PRNGKey(i), (1, n), 0, cfg.vocab_size)
          for i, n in enumerate(lens)]
  packed = jnp.concatenate(docs, axis=1)
  seg = jnp.concatenate([jnp.full((1, n), i + 1) for i, n in enumerate(lens)], axis=1)
  fwd = jax.jit(lambda t, s: model.apply({"params": params}, t, segment_ids=s))
  out = fwd(packed, seg)
  start, total = 0, sum(lens)
  for d, n in zip(docs, lens):
    # The document alone, right-padded to the same shape (causal: padding cannot leak back).
    alone = fwd(jnp.pad(d, ((0, 0), (0, total - n))),
                jnp.concatenate([jnp.ones((1, n), jnp.int32),
                                 jnp.full((1, total - n), 2, jnp.int32)], axis=1))
    assert rel(out[:, start:start + n], alone[:, :n]) < 1e-5
    start += n


@pytest.mark.parametrize("name", ["dense_retnet", "dense_mamba", "dense_mamba_state",
                                  "transformer"])
def test_causal(name):
  cfg = tiny(name, mode="chunkwise", chunk_size=8)
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 30), 0, cfg.vocab_size)
  t = 17
  other = tokens.at[0, t].set((tokens[0, t] + 1) % cfg.vocab_size)
  fwd = jax.jit(lambda t: model.apply({"params": params}, t))
  a, b = fwd(tokens), fwd(other)
  assert jnp.array_equal(a[:, :t], b[:, :t])
  assert not jnp.allclose(a[:, t:], b[:, t:])


def test_decode_state_size_is_independent_of_context():
  for name in ("dense_retnet", "dense_mamba"):
    cfg = tiny(name)
    model, params = init(cfg)
    sizes = []
    for n in (10, 100):
      tokens = jax.ShapeDtypeStruct((1, n), jnp.int32)
      cache = model.init_cache(1, n + 1)
      _, cache = jax.eval_shape(
          lambda t, c: model.apply({"params": params}, t, c, method=model.prefill), tokens, cache)
      sizes.append(sum(x.size for x in jax.tree.leaves(cache)))
    assert sizes[0] == sizes[1]


def test_bfloat16_compute_runs_and_tracks_float32():
  cfg = tiny("dense_retnet")
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 64), 0, cfg.vocab_size)
  f32 = model.apply({"params": params}, tokens)
  bf16 = build_model(replace(cfg, dtype="bfloat16")).apply({"params": params}, tokens)
  assert bf16.dtype == jnp.float32  # logits are always float32
  assert rel(bf16, f32) < 5e-2


def test_remat_and_dropout():
  cfg = tiny("dense_retnet", dropout=0.1, num_layers=2)
  model, params = init(cfg)
  remat = build_model(replace(cfg, remat=True))
  tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 16), 0, cfg.vocab_size)
  rngs = {"dropout": jax.random.PRNGKey(1)}
  train = lambda m, p: m.apply({"params": p}, tokens, deterministic=False, rngs=rngs)
  a, b = train(model, params), train(remat, params)
  assert rel(b, a) < 1e-6  # same dropout masks with and without remat
  assert rel(a, model.apply({"params": params}, tokens)) > 1e-3  # dropout is active
  ga = jax.grad(lambda p: train(model, p).sum())(params)
  gb = jax.grad(lambda p: train(remat, p).sum())(params)
  assert max(rel(x, y) for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga))
             if float(jnp.linalg.norm(y)) > 0) < 1e-4
