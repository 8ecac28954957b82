"""DenseRetNet-350M (docs/model.md) and the paper's ablations of it (docs/ablations.md).

  python -m dense_ssm.train --config=configs/retnet_350m.py            # DenseRetNet
  python -m dense_ssm.train --config=configs/retnet_350m.py:gau        # m = 0 GAU RetNet baseline
  python -m dense_ssm.train --config=configs/retnet_350m.py:ffn        # RetNet with FFN
  python -m dense_ssm.train --config=configs/retnet_350m.py:released   # released (r_k, r_v)
  ... --config.model.dense.layers=0                                   # same as :gau

Ablation variants (one per row of the paper's ablation tables; docs/ablations.md lists each
one's parameter count):
  projection x select (m = 2, add): none | id_mlp (= dense) | id_linear | lin_mlp | lin_linear
  dense depth and separate gates:   m1 | m4 | m2_diffgates | m4_diffgates
  fusion:                           concat
  dense every k-th layer:           every2 | every4

  python -m dense_ssm.summary --config=configs/retnet_350m.py:every2   # parameter count
"""

from dense_ssm import config_lib


def get_config(arg=None):
  return config_lib.retnet_config("350m", arg)
