"""One call that makes a run deterministic on CPU."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # deterministic kernels where torch has them; warn (not fail) where it has none
    torch.use_deterministic_algorithms(True, warn_only=True)
