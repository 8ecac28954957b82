"""Transformer baseline LLaMA-350M of the paper's comparison tables (docs/model.md)."""

from dense_ssm import config_lib


def get_config(arg=None):
  del arg
  return config_lib.transformer_config("llama_350m")
