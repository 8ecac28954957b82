"""Test setup: run JAX on the CPU (the CI machine has no accelerator; libtpu may be installed for
AOT compilation, which must not be picked as the default backend)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
