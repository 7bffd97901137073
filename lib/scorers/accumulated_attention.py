"""Accumulated attention (H2O [@h2o]): the attention mass each key has received, summed over queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


@register
@dataclass
class AccumulatedAttention(Scorer):
    """H2O's heavy-hitter score: ``s_k = Σ_q a_{q,k}`` over every query that saw key ``k``.

    Under a causal mask an early key is seen by more queries than a late one, so this sum favours early tokens
    (the bias ZipCache corrects, see :class:`~salience.scorers.normalized_attention.NormalizedAttention`).

    Reads ``attention (B, H, Q, K)`` or a streamed ``key_mass (B, H, K)``; returns ``(B, H, K)``.
    """

    name = "accumulated_attention"
    needs = frozenset({"key_mass"})

    def score(self, view: AttentionView) -> torch.Tensor:
        return view.mass()
