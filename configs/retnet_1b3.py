"""DenseRetNet-1.3B (docs/model.md). Variants: dense (default) | gau | ffn | released, and the
ablation variants of docs/ablations.md (none, id_linear, m4, concat, every2, ...).

  python -m dense_ssm.train --config=configs/retnet_1b3.py            # DenseRetNet
  python -m dense_ssm.train --config=configs/retnet_1b3.py:gau        # m = 0 GAU RetNet baseline
  python -m dense_ssm.train --config=configs/retnet_1b3.py:ffn        # RetNet with FFN
  ... --config.model.dense.layers=0                                   # same as :gau
"""

from dense_ssm import config_lib


def get_config(arg=None):
  return config_lib.retnet_config("1b3", arg)
