"""DART [@dart]: keep tokens that duplicate the pivot tokens least."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_choice
from .base import AttentionView, Scorer, register
from .vision_common import FEATURES, cls_mask, cosine_similarity, token_features

PIVOT_RULES = ("norm", "random")


@register
@dataclass
class Dart(Scorer):
    """``s_k = −max_{p ∈ P} cos(x_k, x_p)`` for non-pivots; the pivots ``P`` score 2 (above any non-pivot).

    Pivots are the ``n_pivots`` tokens with the largest feature L2 norm (DART's default picks them by key norm) or a
    seeded random draw; every other token is ranked by its duplication with its most similar pivot, least duplicated
    first. *(interp.)* The abstract says "pick pivot tokens, keep tokens with low duplication to pivots"; the max over
    pivots (rather than DART's per-pivot groups) and the norm rule are this implementation's reading.

    Parameters:
        n_pivots: pivots ≥ 1 (clipped to the non-[CLS] tokens present).
        feature: ``keys`` (heads concatenated) or ``hidden``.
        pivot_rule: ``norm`` (largest L2 norm) or ``random`` (from ``view.generator``).

    Reads ``keys (B, H, K, D)`` or ``hidden (B, K, d)``; returns ``(B, 1, K)``. [CLS] is never a pivot or candidate
    and scores 3 (kept by role).
    """

    name = "dart"
    head_layout = "shared"
    needs = frozenset({"hidden", "keys"})
    n_pivots: int = 4
    feature: str = "keys"
    pivot_rule: str = "norm"

    def __post_init__(self) -> None:
        if isinstance(self.n_pivots, bool) or not isinstance(self.n_pivots, int) or self.n_pivots < 1:
            raise ValueError(f"n_pivots must be an int ≥ 1, got {self.n_pivots!r}")
        check_choice(self.feature, FEATURES, "feature")
        check_choice(self.pivot_rule, PIVOT_RULES, "pivot_rule")
        self.needs = frozenset({self.feature})
        self.stochastic = self.pivot_rule == "random"

    def score(self, view: AttentionView) -> torch.Tensor:
        x = token_features(view, self.feature, self.name)
        b, k, _ = x.shape
        candidates = ~cls_mask(view).to(x.device)
        n = int(candidates.sum())
        if n == 0:
            raise ValueError("dart found no non-[CLS] token to rank")
        xc = x[:, candidates]
        if self.pivot_rule == "norm":
            rank = xc.norm(dim=-1)
        else:
            rank = torch.rand((b, n), generator=view.generator).to(x.device)
        pivots = rank.topk(min(self.n_pivots, n), dim=-1).indices  # (B, P)
        sim = cosine_similarity(xc)  # (B, n, n)
        duplication = sim.gather(2, pivots[:, None, :].expand(b, n, -1)).amax(dim=-1)
        inner = (-duplication).scatter(1, pivots, 2.0)
        scores = torch.full((b, k), 3.0, device=x.device)
        scores[:, candidates] = inner
        return scores.unsqueeze(1)
