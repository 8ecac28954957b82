"""DenseMamba-1.3B (docs/model.md). Variants: dense (default, m = 4) | plain (Mamba) | state.

  python -m dense_ssm.train --config=configs/mamba_1b3.py
  python -m dense_ssm.train --config=configs/mamba_1b3.py:plain
"""

from dense_ssm import config_lib


def get_config(arg=None):
  return config_lib.mamba_config("1b3", arg)
