"""Fail the install if something replaced the CPU torch build we pinned."""
import sys

import torch

EXPECTED = "2.13.0"
if not torch.__version__.startswith(EXPECTED):
    sys.exit(f"torch {torch.__version__} is installed, expected {EXPECTED} (CPU build); "
             "an unpinned dependency replaced it — reinstall with `make clean setup`.")
print(f"torch {torch.__version__} ok")
