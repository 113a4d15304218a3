"""Test set-up shared by every module: no test may reach a hub, and the scripts import from the repository root."""

import os

for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
