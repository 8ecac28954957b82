"""Config-as-code base shared by every file in configs/ (big_vision / lm1b style).

Each config file calls `base_config()` and overrides what differs. ml_collections is
imported here, never from model code.
"""

from __future__ import annotations


import ml_collections

from dense_ssm.models.config import ModelConfig


def model_defaults(**overrides) -> ml_collections.ConfigDict:
  """The model section: every ModelConfig field with its default, then `overrides`."""
  d = ModelConfig().to_dict()
  dense = d.pop("dense")
  dense.update(overrides.pop("dense", {}))
  d.update(overrides)
  d["dense"] = dense
  return ml_collections.ConfigDict(d)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_defaults()

  # Data (dense_ssm/data.py).
  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"  # stdlib | text:GLOB | jsonl:GLOB | tfds:NAME | arrayrecord:GLOB
  c.data.jsonl_field = "text"
  c.data.tfds_field = "text"
  c.data.tfds_train_split = "train"
  c.data.tfds_valid_split = "validation"
  c.data.tokenizer = ""  # path of a SentencePiece .model; "" trains one on the train split
  c.data.tokenizer_vocab_size = 0  # 0: use model.vocab_size
  c.data.tokenizer_train_chars = 2_000_000  # text sample a new tokenizer is trained on
  c.data.add_bos = True
  c.data.add_eos = False
  c.data.seq_len = 256
  c.data.shuffle_seed = 0
  c.data.valid_fraction = 0.02
  c.data.max_chars = 0  # 0: no cap on the characters read from the source
  c.data.num_workers = 0  # grain mp_prefetch worker processes; 0: tokenize in this process

  # Training (dense_ssm/train.py): SPEC section 8 recipe.
  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.batch_size = 16  # global batch, in sequences
  c.train.steps = 1000
  c.train.lr = 6e-4
  c.train.end_lr_ratio = 0.0
  c.train.warmup_fraction = 0.015
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.eps = 1e-8
  c.train.weight_decay = 0.01
  c.train.clip_norm = 1.0
  c.train.grad_accum = 1
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.eval_batches = 8
  c.train.checkpoint_every = 500
  c.train.keep_last = 3
  c.train.keep_every = 0  # 0: keep no extra permanent checkpoints
  c.train.profile_steps = 0

  # Mesh (dense_ssm/sharding.py): -1 fills the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c


def check_model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """Validates `c.model` by building the dataclass; errors name the offending key."""
  return ModelConfig.from_dict(c.model.to_dict())


__all__ = ["base_config", "model_defaults", "check_model_config"]
