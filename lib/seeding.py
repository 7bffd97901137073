"""One call that makes a run deterministic on CPU, and the seed rule of a run's units (documents, prompts)."""

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


def unit_seed(seed, unit: int):
    """The seed of unit ``unit`` (a document, a prompt) of a run seeded with ``seed``: ``seed * 1000 + unit``, so
    every unit draws its own numbers and adding units leaves the others' draws alone. Anything but an int (a
    ``torch.Generator``, None) is returned as it is."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        return seed
    return seed * 1000 + unit
