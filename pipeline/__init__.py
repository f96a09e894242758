"""multistage-wsi: the multi-stage whole-slide tumor model of Takahama et al. (ICCV 2019)."""

import os

# OpenMP threads that spin-wait steal the CPU from DataLoader workers and other processes; on a
# busy 2-core machine that slowed training up to 14x. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
