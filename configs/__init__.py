"""Training configs (config-as-code, see dense_ssm/config_lib.py), installed as `dense_ssm.configs`.

`python -m dense_ssm.train --config=configs/NAME.py[:VARIANT]` from the repository, or
`--config=NAME[:VARIANT]` anywhere dense_ssm is installed (dense_ssm/config_file.py).
"""
