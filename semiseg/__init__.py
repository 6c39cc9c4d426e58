"""semiseg: semi-supervised semantic segmentation on one engine."""

import os

# OpenMP threads sleep instead of spinning between parallel regions (set before torch loads OpenMP; an explicit value
# wins). Measured on 2 cores, 2 threads (README, threading): runs sharing the cores keep 1.8-1.9 it/s each with PASSIVE
# and fall to 0.3-1.1 with ACTIVE or OpenMP's default; a run that owns its cores is 15-35 % faster with ACTIVE.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
