"""A2SF [@a2sf]: accumulated attention with a forgetting factor, so old attention counts less."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


@register
@dataclass
class ForgettingAttention(Scorer):
    """A2SF's score: before each new query's attention is added, every past score is multiplied by ``factor``.

    Equivalently ``s_k = Σ_q factor^(t − q) a_{q,k}`` with ``t`` the newest query position: early keys no longer win
    just by having been observed longer.

    Parameters:
        factor: forgetting factor in (0, 1]; 1 recovers H2O's accumulated attention.

    Reads a streamed ``key_mass`` that the harness decayed by ``mass_decay`` per query (preferred when present), or
    ``attention (B, H, Q, K)`` with ``query_positions``; returns ``(B, H, K)``.
    """

    name = "forgetting_attention"
    needs = frozenset({"key_mass"})
    factor: float = 0.99

    def __post_init__(self) -> None:
        if not 0.0 < self.factor <= 1.0:
            raise ValueError(f"forgetting factor must lie in (0, 1], got {self.factor}")

    @property
    def mass_decay(self) -> float:  # type: ignore[override]
        return self.factor

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.key_mass is not None:
            return view.key_mass  # a streaming harness decayed it by ``mass_decay`` per query
        if view.attention is None:
            raise ValueError("forgetting_attention needs attention or a decayed key_mass")
        if view.query_positions is None:
            raise ValueError("forgetting_attention needs query_positions to weight each query's attention")
        age = (view.query_positions.max() - view.query_positions).to(torch.float32)
        weights = torch.pow(torch.tensor(self.factor, dtype=torch.float32), age)  # (Q,)
        return torch.einsum("bhqk,q->bhk", view.attention.float(), weights)
