"""DenseRetNet-350M (SPEC sections 1-5, 8). Variants: dense (default) | gau | ffn | released.

  python -m dense_ssm.train --config=configs/retnet_350m.py            # DenseRetNet
  python -m dense_ssm.train --config=configs/retnet_350m.py:gau        # m = 0 GAU RetNet baseline
  python -m dense_ssm.train --config=configs/retnet_350m.py:ffn        # RetNet with FFN
  ... --config.model.dense.layers=0                                   # same as :gau
"""

from dense_ssm import config_lib


def get_config(arg=None):
  return config_lib.retnet_config("350m", arg)
