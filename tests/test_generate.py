"""Generation: greedy decoding equals the argmax of full-sequence logits (every family), batched
prompts of different lengths equal their one-by-one runs, seeded sampling is reproducible and
block-size independent, the decode state does not grow with the prompt, bad input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dense_ssm
from dense_ssm import generate as gen
from tests.helpers import init, tiny

# Random tiny models with the default init_std repeat one token; a larger scale gives varied text.
STD = 0.3
# Mamba's reference init reads init_std only for the embedding (and dense gates); at STD the
# embedding dominates the residual stream and the model echoes its last input, so keep 0.02.
MAMBA_STD = 0.02
PROMPTS = [[1, 5, 7, 9, 11, 13, 17, 19, 23], [1, 4], [1, 8, 6, 50, 3]]


def _greedy_matches_full_logits(cfg, params, prompt, n):
  out = gen.generate_ids(cfg, params, [prompt], max_new_tokens=n, stop_at_eos=False)[0]
  assert len(out) == n
  seq = jnp.asarray([prompt + out[:-1]], jnp.int32)
  model, _ = init(cfg)
  logits = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, seq))[0]
  tail = logits[len(prompt) - 1:]  # logits predicting each generated token
  # Each generated token is the argmax of the full-sequence logits (up to float ties).
  picked = tail[np.arange(n), out]
  assert np.all(picked >= tail.max(-1) - 1e-4), (out, tail.argmax(-1).tolist())
  return out


@pytest.mark.parametrize("name", ["dense_retnet", "retnet_ffn", "dense_mamba", "transformer"])
def test_greedy_equals_argmax_of_full_sequence_logits(name):
  cfg = tiny(name, init_std=MAMBA_STD if "mamba" in name else STD, num_layers=2)
  _, params = init(cfg)
  out = _greedy_matches_full_logits(cfg, params, PROMPTS[0], 12)
  assert len(set(out)) > 2  # not a degenerate repetition
  # Stop at EOS (pretend the 4th generated token is EOS): the row ends there.
  eos = out[3]
  stopped = gen.generate_ids(cfg, params, [PROMPTS[0]], max_new_tokens=12, eos_id=eos)[0]
  assert stopped == out[:out.index(eos) + 1]


@pytest.mark.parametrize("name", ["dense_mamba", "transformer"])
def test_batched_prompts_of_different_lengths_equal_one_by_one(name):
  cfg = tiny(name, init_std=STD, num_layers=2)
  _, params = init(cfg)
  kw = dict(max_new_tokens=8, stop_at_eos=False)
  batched = gen.generate_ids(cfg, params, PROMPTS[:2], **kw)
  single = [gen.generate_ids(cfg, params, [p], **kw)[0] for p in PROMPTS[:2]]
  assert batched == single
  # Sampling: a row's draws do not depend on the other rows.
  kw.update(temperature=0.9, top_k=20, seed=3)
  a = gen.generate_ids(cfg, params, [PROMPTS[0], PROMPTS[1]], **kw)
  b = gen.generate_ids(cfg, params, [PROMPTS[0], PROMPTS[2]], **kw)
  assert a[0] == b[0] and a[1] != b[1]


def test_sampling_is_reproducible_and_block_size_independent():
  cfg = tiny("dense_retnet", init_std=STD, num_layers=2)
  _, params = init(cfg)
  kw = dict(max_new_tokens=12, stop_at_eos=False, temperature=1.0, top_p=0.9)
  a = gen.generate_ids(cfg, params, PROMPTS[:2], seed=7, **kw)
  blocks = []
  b = gen.generate_ids(cfg, params, PROMPTS[:2], seed=7, block_size=5, on_block=blocks.append,
                       **kw)
  c = gen.generate_ids(cfg, params, PROMPTS[:2], seed=8, **kw)
  assert a == b and a != c
  assert [len(x[0]) for x in blocks] == [1, 6, 11, 12]  # first token, then blocks of 5


def test_sampling_filters():
  logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0, 4.0]] * 64)
  keys = jax.random.split(jax.random.PRNGKey(0), 50)
  draw = jax.vmap(lambda k, t, tk, tp: gen.sample_logits(logits, k, t, tk, tp),
                  (0, None, None, None))
  assert set(np.unique(draw(keys, 0.0, 0, 1.0))) == {4}  # greedy
  assert set(np.unique(draw(keys, 1.0, 2, 1.0))) == {3, 4}  # top-k
  # top-p 0.5: p(4) = 0.64 alone reaches it.
  assert set(np.unique(draw(keys, 1.0, 0, 0.5))) == {4}
  assert len(np.unique(draw(keys, 5.0, 0, 1.0))) == 5  # hot: everything


def test_decode_state_does_not_grow_with_the_prompt():
  def state_bytes(name, t):
    cfg = gen.inference_config(tiny(name))
    _, params = init(cfg)
    tokens = jax.ShapeDtypeStruct((2, t), jnp.int32)
    carry = jax.eval_shape(
        lambda p, x: gen.start(cfg, p, x, jnp.ones_like(x), jax.random.PRNGKey(0), 0.0, 0, 1.0,
                               2, max_new_tokens=4), params, tokens)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry["cache"]))

  for name in ("dense_retnet", "dense_mamba", "retnet_ffn"):
    assert state_bytes(name, 16) == state_bytes(name, 4096), name
  assert state_bytes("transformer", 4096) > 100 * state_bytes("transformer", 16)


def test_bad_input_is_a_one_line_error():
  cfg = tiny("dense_retnet")
  _, params = init(cfg)
  with pytest.raises(ValueError, match="empty prompt"):
    gen.generate_ids(cfg, params, [[1, 2], []])
  with pytest.raises(ValueError, match="top_p"):
    gen.generate_ids(cfg, params, [[1, 2]], top_p=0.0)
  with pytest.raises(FileNotFoundError, match="neither an export directory"):
    dense_ssm.generate("/nonexistent/dir", "hello")


def test_decode_benchmark_smoke(tmp_path):
  """benchmarks/decode.py --tiny runs on the CPU and writes its JSON (one model, short)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "decode.py")
  spec = importlib.util.spec_from_file_location("decode_benchmark", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert mod.main(["--tiny", f"--out={tmp_path}", "--models=DenseMamba-tiny", "--batches=1",
                   "--contexts=32,64", "--new_tokens=4", "--reps=1"]) == 0
  r = json.load(open(tmp_path / "decode.json"))["models"]["DenseMamba-tiny"]
  assert [x["context"] for x in r["latency"]] == [32, 64]
  assert r["latency"][0]["state_bytes"] == r["latency"][1]["state_bytes"] > 0
  assert r["throughput"][0]["tokens_per_s"] > 0 and r["floor_tokens_per_s_b1"] > 0


def test_decode_groups_match_and_stop_early():
  """Steps run in groups of static length: any group size gives the same tokens, and a block
  stops after the first group that ends with every row done (n counts the steps run)."""
  cfg = gen.inference_config(tiny("dense_retnet", init_std=STD, num_layers=2))
  _, params = init(cfg)
  tokens, seg = gen.left_pad(PROMPTS[:2])
  carry = gen.start(cfg, params, tokens, seg, jax.random.PRNGKey(0), 0.0, 0, 1.0, -1,
                    max_new_tokens=8, greedy=True)
  run = lambda c, **kw: gen.decode_block(cfg, params, c, steps=7, pad_id=0, greedy=True, **kw)
  _, ref, n_ref = run(carry, sync_every=16)
  _, grouped, n_grouped = run(carry, sync_every=3)  # groups of 3, 3, then 1
  np.testing.assert_array_equal(ref, grouped)
  assert int(n_ref) == int(n_grouped) == 7
  eos = int(ref[0, 1])  # row 0 emits it at step 2; row 1 is made done from the start
  stopping = {**carry, "eos": jnp.asarray(eos, jnp.int32), "done": jnp.asarray([False, True])}
  _, out, n = run(stopping, sync_every=3)
  assert int(n) == 3  # the first group ends with both rows done
  assert out[0, :2].tolist() == ref[0, :2].tolist() and np.all(np.asarray(out)[0, 2:] == 0)
  assert np.all(np.asarray(out)[1] == 0)
