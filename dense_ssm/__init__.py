"""dense_ssm: DenseSSM language models (DenseRetNet, DenseMamba) and baselines in JAX/Flax."""

__version__ = "0.1.0"
