"""DivPrune [@divprune]: token selection as a Max–Min Diversity Problem, solved greedily (farthest-point order)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_choice
from .base import AttentionView, Scorer, register
from .vision_common import (
    FEATURES,
    cls_mask,
    cosine_similarity,
    greedy_max_min,
    most_isolated,
    scores_from_order,
    token_features,
)

METRICS = ("cosine", "euclidean")


def pairwise_distance(x: torch.Tensor, metric: str) -> torch.Tensor:
    """``(B, N, N)`` distances between the rows of ``x (B, N, F)``: ``1 − cos`` or Euclidean."""
    return 1.0 - cosine_similarity(x) if metric == "cosine" else torch.cdist(x, x)


@register
@dataclass
class DivPrune(Scorer):
    """Greedy max–min order: pick the token farthest from the picked set, again and again; earlier picks score higher.

    The first pick is the token whose nearest other token is farthest (the most isolated one), then each step adds
    ``argmax_i min_{j ∈ S} d(x_i, x_j)``, the classic 2-approximation of the max–min diversity problem, so the top-k
    for any ``k`` is the greedy solution for budget ``k``. *(interp.)* DivPrune's abstract states only the
    problem; the most-isolated start and the default ``1 − cos`` on hidden states are this implementation's choices.

    Parameters:
        feature: ``hidden`` (block output) or ``keys`` (heads concatenated).
        metric: ``cosine`` (``1 − cos``) or ``euclidean``.

    Reads ``hidden (B, K, d)`` or ``keys (B, H, K, D)``; returns ``(B, 1, K)``. [CLS] is not a candidate (it scores
    above all others; the harness keeps it).
    """

    name = "divprune"
    head_layout = "shared"
    needs = frozenset({"hidden", "keys"})
    feature: str = "hidden"
    metric: str = "cosine"

    def __post_init__(self) -> None:
        check_choice(self.feature, FEATURES, "feature")
        check_choice(self.metric, METRICS, "metric")
        self.needs = frozenset({self.feature})

    def score(self, view: AttentionView) -> torch.Tensor:
        x = token_features(view, self.feature, self.name)
        candidates = ~cls_mask(view).to(x.device)
        if not bool(candidates.any()):
            raise ValueError("divprune found no non-[CLS] token to rank")
        dist = pairwise_distance(x[:, candidates], self.metric)
        order = greedy_max_min(dist, most_isolated(dist))
        return scores_from_order(order, candidates, view.num_keys)
