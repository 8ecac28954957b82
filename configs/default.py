"""A small DenseRetNet that trains usefully on 2 CPU cores in a few minutes, on the embedded data
(the Python standard library's source). The README's first command runs it:

  python -m dense_ssm.train --config=configs/default.py --workdir=/tmp/dense_ssm_default

Variants pick the family at the same small size: dense_retnet (default) | gau | retnet_ffn |
mamba | dense_mamba | transformer, e.g. --config=configs/default.py:dense_mamba
"""

from dense_ssm import config_lib


def get_config(arg=None):
  variant = config_lib.parse_variant(
      arg, {"dense_retnet", "gau", "retnet_ffn", "mamba", "dense_mamba", "transformer"},
      "dense_retnet")
  c = config_lib.base_config()
  small = dict(vocab_size=2048, num_layers=4, hidden_size=192, num_heads=2, chunk_size=64,
               max_len=512)
  if variant in ("dense_retnet", "gau"):
    c.model = config_lib.model_defaults(
        family="dense_retnet", qk_dim=96, dense={"layers": 2 if variant == "dense_retnet" else 0,
                                                 "r_k": 8, "r_v": 8}, **small)
  elif variant == "retnet_ffn":
    c.model = config_lib.model_defaults(family="retnet_ffn", qk_dim=192, ffn_dim=384,
                                        ffn_act="gelu", dense={"layers": 0}, **small)
  elif variant in ("mamba", "dense_mamba"):
    c.model = config_lib.model_defaults(
        family="mamba", tie_embeddings=True, norm_eps=1e-5,
        dense={"layers": 4 if variant == "dense_mamba" else 0, "r_k": 8, "r_v": 8}, **small)
  else:
    c.model = config_lib.model_defaults(family="transformer", ffn_dim=512, dense={"layers": 0},
                                        **small)
  c.data.source = "stdlib"
  c.data.seq_len = 256
  c.data.max_chars = 8_000_000
  c.train.batch_size = 16
  c.train.steps = 400
  c.train.lr = 3e-3
  c.train.warmup_fraction = 0.05
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.checkpoint_every = 200
  return c
