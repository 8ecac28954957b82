"""Sequence-mixing ops. One entry point per op; `impl=` picks the implementation.

Each returns `(y, final_state)`. Pallas kernels are imported lazily by the entry points.
"""

from dense_ssm.ops.retention import retention, retention_parallel_normalized, retention_step
from dense_ssm.ops.retention import retnet_log_decay
from dense_ssm.ops.selective_scan import selective_scan, selective_scan_states, selective_scan_step

__all__ = [
    "retention", "retention_parallel_normalized", "retention_step", "retnet_log_decay",
    "selective_scan", "selective_scan_states", "selective_scan_step",
]
