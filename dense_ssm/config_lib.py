"""Config-as-code base shared by every file in configs/ (big_vision / lm1b style).

Each config file calls `base_config()` and overrides what differs. ml_collections is
imported here (lazily), never from model code: the plain-dict model sections (`model_dict`,
`retnet_model`, `mamba_model`) need only the standard library, so benchmarks that build the
paper's models run where ml_collections is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dense_ssm.models.config import ModelConfig

if TYPE_CHECKING:
  import ml_collections


def model_dict(**overrides) -> dict:
  """The model section as a plain dict: every ModelConfig field with its default, then
  `overrides` (`dense` is merged key by key)."""
  d = ModelConfig().to_dict()
  dense = d.pop("dense")
  dense.update(overrides.pop("dense", {}))
  d.update(overrides)
  d["dense"] = dense
  return d


def model_defaults(**overrides) -> ml_collections.ConfigDict:
  """`model_dict(**overrides)` as a ConfigDict (the `model` section of a config file)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(model_dict(**overrides))


def base_config() -> ml_collections.ConfigDict:
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.model = model_defaults()

  # Data (dense_ssm/data.py).
  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"  # stdlib | text:GLOB | jsonl:GLOB | tfds:NAME | arrayrecord:GLOB
  c.data.jsonl_field = "text"
  c.data.tfds_field = "text"
  c.data.tfds_train_split = "train"
  c.data.tfds_valid_split = "validation"
  c.data.tokenizer = ""  # SentencePiece .model or HF tokenizer.json; "" trains one (train split)
  c.data.tokenizer_vocab_size = 0  # 0: use model.vocab_size
  c.data.tokenizer_train_chars = 2_000_000  # text sample a new tokenizer is trained on
  c.data.add_bos = True
  c.data.add_eos = False
  c.data.seq_len = 256
  c.data.shuffle_seed = 0
  c.data.valid_fraction = 0.02
  c.data.max_chars = 0  # 0: no cap on the characters read from the source
  c.data.num_workers = 0  # grain mp_prefetch worker processes; 0: tokenize in this process

  # Training (dense_ssm/train.py): the paper's recipe (docs/model.md, 'Training recipe').
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
  # Resume from a checkpoint that lacks this run's data-iterator state (saved by another
  # number of processes), restarting the data from its beginning; otherwise that is an error.
  c.train.allow_data_replay = False
  c.train.profile_steps = 0
  # Weights that start a new run (fine-tuning): an export directory or a Hugging Face Mamba /
  # original DenseRetNet checkpoint directory (dense_ssm/init_from.py); a resumed run ignores it.
  c.train.init_from = ""

  # Mesh (dense_ssm/sharding.py): -1 fills the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c


def check_model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """Validates `c.model` by building the dataclass; errors name the offending key."""
  return ModelConfig.from_dict(c.model.to_dict())


__all__ = ["base_config", "model_defaults", "model_dict", "check_model_config", "parse_variant",
           "matched_gate_width", "retnet_model", "mamba_model", "retnet_config", "mamba_config",
           "transformer_config"]


# --- Paper models (docs/model.md). Each configs/*.py file picks one row and a variant. ---

PAPER_TOKENS = 15_000_000_000
PAPER_SEQ_LEN = 2048
PAPER_BATCH_TOKENS = 524_288  # 0.5M tokens per batch

RETNET_SIZES = {
    # name: (layers, hidden, qk, heads)
    "350m": (16, 1536, 768, 2),
    "1b3": (25, 2560, 1280, 4),
}
# The "RetNet with FFN" row: the original RetNet layout (MSR + FFN, two sub-layers per layer).
RETNET_FFN_SIZES = {
    # name: (layers, hidden, heads, ffn)
    "350m": (24, 1024, 4, 2048),
    "1b3": (24, 2048, 8, 4096),
}
MAMBA_SIZES = {"360m": (50, 1024), "1b3": (50, 2048)}  # (layers, hidden)
DENSE_RATIOS = {"350m": (8, 32), "1b3": (16, 8)}  # released checkpoints' (r_k, r_v)


def paper_recipe(c: ml_collections.ConfigDict, *, lr: float, b2: float):
  """The paper's recipe: AdamW, wd 0.01, clip 1.0, 1.5% warm-up then linear decay, seq 2048,
  0.5M-token batches, 15B tokens. The paper's corpus is not bundled: data.source is left empty,
  and the trainer says so and falls back to the embedded data."""
  c.data.source = ""
  c.data.seq_len = PAPER_SEQ_LEN
  c.train.batch_size = PAPER_BATCH_TOKENS // PAPER_SEQ_LEN
  c.train.steps = PAPER_TOKENS // PAPER_BATCH_TOKENS
  c.train.lr = lr
  c.train.b1, c.train.b2 = 0.9, b2
  c.train.weight_decay = 0.01
  c.train.clip_norm = 1.0
  c.train.warmup_fraction = 0.015
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  return c


def paper_model(d: dict, *, dropout: float) -> dict:
  """The paper recipe's model fields (docs/model.md): dropout, 2048 positions, bf16 compute
  with float32 params."""
  d.update(dropout=dropout, max_len=PAPER_SEQ_LEN, dtype="bfloat16", param_dtype="float32")
  return d


def parse_variant(arg, allowed, default):
  variant = (arg or default).strip()
  if variant not in allowed:
    raise ValueError(f"config variant {variant!r} is unknown; use one of {sorted(allowed)} "
                     f"(e.g. --config=configs/x.py:{default}).")
  return variant


# The paper's DenseRetNet ablations (docs/ablations.md): variant -> overrides of the default
# dense connection (m = 2, identity projection, MLP gate shared by the sources, add, every layer).
RETNET_ABLATIONS = {
    # Projection x select (m = 2, add). "none": no selective transition at all (identity
    # projection, no gate): the m sources are added as they are, then normalised.
    "none": {"select": "none"},
    "id_mlp": {},  # the default
    "id_linear": {"select": "linear"},
    "lin_mlp": {"projection": "linear"},
    "lin_linear": {"projection": "linear", "select": "linear"},
    # Dense depth m, and a separate gate per source ("diff. gates").
    "m1": {"layers": 1},
    "m4": {"layers": 4},
    "m2_diffgates": {"gates": "per_source"},
    "m4_diffgates": {"layers": 4, "gates": "per_source"},
    # Concatenation, reduced by per-channel weights over the m + 1 inputs.
    "concat": {"fusion": "concat", "concat_merge": "channel"},
    # Dense connection only in every k-th layer, gate widths enlarged (matched_gate_width).
    "every2": {"every": 2},
    "every4": {"every": 4},
}
RETNET_VARIANTS = ("dense", "gau", "ffn", "released", *RETNET_ABLATIONS)


def matched_gate_width(size: str, every: int, ratio: int) -> int:
  """Gate MLP inner width that keeps the gates' total parameter count of the every-layer model
  when only layers l % every == 0 own a gate. One gate holds H*w + w*width parameters, linear in
  w, so w grows by the ratio of owning layers: w = (H / r) * L / ceil(L / every), rounded."""
  layers, hidden = RETNET_SIZES[size][:2]
  owning = len(range(0, layers, every))
  return round(hidden // ratio * layers / owning)


def retnet_model(size: str, variant: str = "dense") -> dict:
  """The model section of `retnet_config(size, variant)` as a plain dict."""
  if variant == "ffn":
    layers, hidden, heads, ffn = RETNET_FFN_SIZES[size]
    d = model_dict(family="retnet_ffn", num_layers=layers, hidden_size=hidden, qk_dim=hidden,
                   num_heads=heads, ffn_dim=ffn, ffn_act="gelu", dense={"layers": 0})
  else:
    layers, hidden, qk, heads = RETNET_SIZES[size]
    r_k, r_v = DENSE_RATIOS[size] if variant == "released" else (32, 32)
    dense = {"layers": 0 if variant == "gau" else 2, "r_k": r_k, "r_v": r_v}
    dense.update(RETNET_ABLATIONS.get(variant, {}))
    if dense.get("every", 1) > 1:
      dense["gate_width_k"] = matched_gate_width(size, dense["every"], r_k)
      dense["gate_width_v"] = matched_gate_width(size, dense["every"], r_v)
    d = model_dict(family="dense_retnet", num_layers=layers, hidden_size=hidden, qk_dim=qk,
                   num_heads=heads, dense=dense)
  d["chunk_size"] = 128
  return paper_model(d, dropout=0.1)


def mamba_model(size: str, variant: str = "dense") -> dict:
  """The model section of `mamba_config(size, variant)` as a plain dict."""
  layers, hidden = MAMBA_SIZES[size]
  return paper_model(model_dict(
      family="mamba", num_layers=layers, hidden_size=hidden, state_dim=16, expand=2,
      conv_width=4, tie_embeddings=True, norm_eps=1e-5,
      dense={"layers": 0 if variant == "plain" else 4,
             "mamba_level": "state" if variant == "state" else "input"}), dropout=0.0)


def retnet_config(size: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: dense (DenseRetNet, m=2, the reference code's r_k = r_v = 32), gau (the m=0 GAU
  baseline), ffn (RetNet with FFN), released (the released checkpoints' (r_k, r_v): (8, 32) at
  350M, (16, 8) at 1.3B), and the paper's ablations, RETNET_ABLATIONS (docs/ablations.md)."""
  variant = parse_variant(arg, set(RETNET_VARIANTS), "dense")
  c = base_config()
  c.model = model_defaults(**retnet_model(size, variant))
  return paper_recipe(c, lr=6e-4, b2=0.98)


def mamba_config(size: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: dense (DenseMamba, input-level fusion of x and B, m=4), plain (Mamba),
  state (DenseMamba with the literal state-level readout)."""
  variant = parse_variant(arg, {"dense", "plain", "state"}, "dense")
  c = base_config()
  c.model = model_defaults(**mamba_model(size, variant))
  return paper_recipe(c, lr=3e-4 if size == "360m" else 2e-4, b2=0.95)


def transformer_config(kind: str) -> ml_collections.ConfigDict:
  """LLaMA-350M (RMSNorm, RoPE, SwiGLU) and OPT-1.3B (LayerNorm, learned positions, ReLU, biases).

  Both tie the embeddings: LLaMA-350M then counts 334.8M (untied: 367.6M, over 5% of 350M).
  """
  c = base_config()
  if kind == "llama_350m":
    c.model = model_defaults(**paper_model(model_dict(
        family="transformer", num_layers=18, hidden_size=1024, num_heads=8, ffn_dim=4096,
        ffn_act="swiglu", tie_embeddings=True, dense={"layers": 0}), dropout=0.0))
    return paper_recipe(c, lr=6e-4, b2=0.98)
  if kind == "opt_1b3":
    c.model = model_defaults(**paper_model(model_dict(
        family="transformer", num_layers=24, hidden_size=2048, num_heads=32, ffn_dim=8192,
        ffn_act="relu", norm_type="layer", pos_emb="learned", use_bias=True,
        tie_embeddings=True, dense={"layers": 0}), dropout=0.1))
    return paper_recipe(c, lr=2e-4, b2=0.98)
  raise ValueError(f"unknown transformer baseline {kind!r}; use llama_350m or opt_1b3.")
