"""DenseMamba-360M (docs/model.md). Variants: dense (default, m = 4) | plain (Mamba) | state.

  python -m dense_ssm.train --config=configs/mamba_360m.py
  python -m dense_ssm.train --config=configs/mamba_360m.py:plain
"""

from dense_ssm import config_lib


def get_config(arg=None):
  return config_lib.mamba_config("360m", arg)
