"""Small models of the paper's shapes for the dense-vs-baseline reproduction experiment
(`experiments/dense_vs_baseline.py`). Every value is spelled out here.

  python -m dense_ssm.train --config=configs/repro_small.py:dense_retnet --workdir=/tmp/r
  variants: dense_retnet | gau (its m = 0 baseline) | dense_mamba | mamba (its m = 0 baseline)

Shapes follow the paper's models scaled down (docs/model.md, "Paper configurations"):
DenseRetNet keeps qk = H/2, E = 2H, two heads, m = 2 and gate ratio 32; DenseMamba keeps
expand 2, N = 16, tied embeddings, m = 4 with input-level fusion. Within a family the two
variants share every value except `model.dense.layers`. Dropout is 0 for both families: a run
sees each token once, far from the regime where dropout helps, and it would only add noise to
a comparison of a few tens of millions of tokens.
"""

from dense_ssm import config_lib

VARIANTS = ("dense_retnet", "gau", "dense_mamba", "mamba")


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, set(VARIANTS), "dense_retnet")
  c = config_lib.base_config()
  shared = dict(vocab_size=8192, hidden_size=512, dropout=0.0, max_len=2048, dtype="bfloat16",
                param_dtype="float32", init_std=0.02, chunk_size=64, impl="auto",
                mode="chunkwise", remat=False)
  if variant in ("dense_retnet", "gau"):
    c.model = config_lib.model_defaults(
        family="dense_retnet", num_layers=12, qk_dim=256, v_factor=2, num_heads=2,
        norm_eps=1e-6, tie_embeddings=False,
        dense={"layers": 2 if variant == "dense_retnet" else 0, "every": 1,
               "projection": "identity", "select": "mlp", "fusion": "add", "r_k": 32,
               "r_v": 32},
        **shared)
  else:
    c.model = config_lib.model_defaults(
        family="mamba", num_layers=16, state_dim=16, expand=2, conv_width=4, dt_rank=0,
        norm_eps=1e-5, tie_embeddings=True,
        dense={"layers": 4 if variant == "dense_mamba" else 0, "every": 1,
               "projection": "identity", "select": "mlp", "fusion": "add", "r_k": 32,
               "r_v": 32, "mamba_level": "input"},
        **shared)

  c.data.source = "pysrc"  # every Python source file of the interpreter, de-duplicated
  c.data.tokenizer = ""  # the experiment trains one tokenizer and passes it to every run
  c.data.tokenizer_train_chars = 5_000_000
  c.data.seq_len = 2048
  c.data.shuffle_seed = 0  # the same data order for every run
  c.data.valid_fraction = 0.01
  c.data.max_chars = 0
  c.data.num_workers = 0

  c.train.seed = 0  # the experiment varies this (initialisation only)
  c.train.batch_size = 16  # 32,768 tokens per step
  # Token budgets sized so that all eight runs (two seeds of each variant) share one H200 within
  # about eight minutes (measured per-run throughput with four runs at a time: GAU RetNet ~0.8M,
  # Mamba ~0.2M tokens/s; benchmarks/RESULTS.md): 78.6M tokens per RetNet run, 32.8M per Mamba run.
  c.train.steps = 2400 if variant in ("dense_retnet", "gau") else 1000
  c.train.lr = 1e-3
  c.train.end_lr_ratio = 0.0
  c.train.warmup_fraction = 0.03
  c.train.b1 = 0.9
  c.train.b2 = 0.98 if variant in ("dense_retnet", "gau") else 0.95
  c.train.eps = 1e-8
  c.train.weight_decay = 0.01
  c.train.clip_norm = 1.0
  c.train.grad_accum = 1
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.eval_batches = 16
  c.train.checkpoint_every = 100_000  # only the final step is saved
  c.train.keep_last = 1
  return c
