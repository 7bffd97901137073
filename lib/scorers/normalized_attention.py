"""Normalized attention (ZipCache [@zipcache]): accumulated attention divided by the number of queries that saw the
key."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


@register
@dataclass
class NormalizedAttention(Scorer):
    """ZipCache's saliency: ``s_k = (Σ_q a_{q,k}) / n_k`` with ``n_k`` = number of queries that can see key ``k``.

    Dividing by the causal mask's column count turns a sum that grows with a key's age into a mean attention
    per observing query, removing accumulated attention's bias toward early tokens.

    Reads ``attention (B, H, Q, K)`` or ``key_mass (B, H, K)`` plus ``visible_queries (K,)`` (or query and key
    positions to count them); returns ``(B, H, K)``. Keys seen by no query score 0.
    """

    name = "normalized_attention"
    needs = frozenset({"key_mass"})

    def score(self, view: AttentionView) -> torch.Tensor:
        counts = view.visible().to(torch.float32)
        return view.mass() / counts.clamp(min=1.0)
