"""Scorers: one rule per module, all behind :class:`~salience.scorers.base.Scorer` (``score(view) → (B, H, K)``).

Add a scorer: see README, "Adding a scorer".
"""

from . import accumulated_attention, forgetting_attention, normalized_attention, random_baseline, recency  # noqa: F401
from .accumulated_attention import AccumulatedAttention
from .base import AttentionView, Scorer, available_scorers, get_scorer, register
from .forgetting_attention import ForgettingAttention
from .normalized_attention import NormalizedAttention
from .random_baseline import RandomScorer
from .recency import RecencyScorer

__all__ = [
    "AccumulatedAttention",
    "AttentionView",
    "ForgettingAttention",
    "NormalizedAttention",
    "RandomScorer",
    "RecencyScorer",
    "Scorer",
    "available_scorers",
    "get_scorer",
    "register",
]
