r"""Multi-query associative recall (MQAR, the Zoology recall task) with 2-layer models.

  python -m dense_ssm.train --config=configs/mqar.py:dense_mamba --workdir=DIR \
      --config.model.hidden_size=128

Variants pick the family: dense_retnet (m=2) | gau (RetNet GAU, m=0) | dense_mamba (m=4, which
a 2-layer model caps at 1) | mamba | transformer. `model.hidden_size` (default 128) is the
width; the widths that depend on it follow any override of it: qk_dim = H/2 and the value
width 2H (retention), d_inner = 2H (Mamba), ffn_dim = 2H (Transformer). The task (see
dense_ssm/mqar.py): 8192-token vocabulary, 32 key-value pairs and 32 queries per 256-token
row, loss only on the answers; experiments/mqar.py sweeps families and widths.
"""

import ml_collections

from dense_ssm import config_lib

VARIANTS = ("dense_retnet", "gau", "dense_mamba", "mamba", "transformer")
SEQ_LEN = 256
VOCAB = 8192
PAIRS = 32


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, set(VARIANTS), "dense_retnet")
  c = config_lib.base_config()
  common = dict(vocab_size=VOCAB, num_layers=2, num_heads=2, chunk_size=64, max_len=SEQ_LEN)
  if variant in ("dense_retnet", "gau"):
    c.model = config_lib.model_defaults(
        family="dense_retnet", dense={"layers": 2 if variant == "dense_retnet" else 0,
                                      "r_k": 8, "r_v": 8}, **common)
  elif variant in ("mamba", "dense_mamba"):
    c.model = config_lib.model_defaults(
        family="mamba", state_dim=16, expand=2, conv_width=4, tie_embeddings=True, norm_eps=1e-5,
        dense={"layers": 4 if variant == "dense_mamba" else 0, "r_k": 8, "r_v": 8}, **common)
  else:
    c.model = config_lib.model_defaults(family="transformer", ffn_act="swiglu",
                                        dense={"layers": 0}, **common)
  width = ml_collections.FieldReference(128)
  c.model.hidden_size = width
  c.model.qk_dim = width // 2
  c.model.ffn_dim = width * 2

  c.data.source = f"mqar:vocab={VOCAB},pairs={PAIRS},queries={PAIRS},power_a=0.01,seed=0,valid=1024"
  c.data.seq_len = SEQ_LEN

  c.train.batch_size = 64
  c.train.steps = 3000
  c.train.lr = 2e-3
  c.train.warmup_fraction = 0.05
  c.train.b2 = 0.98
  c.train.weight_decay = 0.1
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.eval_batches = 16  # 16 x 64 = the 1024 validation examples
  c.train.checkpoint_every = 3000
  c.train.keep_last = 1
  return c
