"""ToDRE [@todre]: diverse tokens by greedy k-center, steered by task relevance where the model offers it ([CLS])."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_choice
from .base import AttentionView, Scorer, register
from .divprune import METRICS, pairwise_distance
from .vision_common import (
    FEATURES,
    cls_mask,
    cls_rows,
    greedy_max_min,
    layer_attention,
    most_isolated,
    scores_from_order,
    token_features,
)

RELEVANCES = ("cls_attention", "cls_similarity", "none")


@register
@dataclass
class ToDRE(Scorer):
    """Greedy k-center seeded at the most relevant token: pick ``argmax_i min_{j∈S} d(x_i, x_j) + λ · rel_i``.

    ``rel`` is the task relevance scaled to [0, 1] (divided by its max over the candidates): the [CLS] attention row
    (head mean, at the scoring layer) or the cosine similarity of each token's hidden state to the [CLS] hidden state
    (clipped at 0). The first centre is the most relevant token; with ``λ = 0`` the rest is pure k-center.

    *(interp.)* ToDRE keeps diverse tokens after the encoder by "greedy k-center", then drops task-irrelevant ones
    inside the LLM using text attention. A ViT classifier has no text; [CLS] (the summary the probe reads) is the
    task proxy here, and the two stages are folded into one greedy criterion. Without a [CLS] role, relevance is
    "where available": it falls back to ``none`` (the start is then the most isolated token, as in DivPrune).

    Parameters:
        relevance_weight: λ ≥ 0 (distances ``1 − cos`` lie in [0, 2], so λ ≈ 1 balances the two terms).
        relevance: ``cls_attention``, ``cls_similarity`` or ``none``.
        feature: ``hidden`` or ``keys`` for the distances; metric: ``cosine`` or ``euclidean``.

    Reads ``hidden``/``keys`` and, for ``cls_attention``, ``attention``; returns ``(B, 1, K)``; [CLS] ranks first.
    """

    name = "todre"
    head_layout = "shared"
    needs = frozenset({"hidden", "keys", "attention"})
    relevance_weight: float = 0.5
    relevance: str = "cls_attention"
    feature: str = "hidden"
    metric: str = "cosine"

    def __post_init__(self) -> None:
        if not self.relevance_weight >= 0:
            raise ValueError(f"relevance_weight must be ≥ 0, got {self.relevance_weight}")
        check_choice(self.relevance, RELEVANCES, "relevance")
        check_choice(self.feature, FEATURES, "feature")
        check_choice(self.metric, METRICS, "metric")
        reads = {"cls_attention": {"attention"}, "cls_similarity": {"hidden"}, "none": set()}[self.relevance]
        self.needs = frozenset({self.feature} | reads)

    def relevance_of(self, view: AttentionView, candidates: torch.Tensor) -> torch.Tensor | None:
        cls = cls_mask(view)
        if self.relevance == "none" or not bool(cls.any()):
            return None
        if self.relevance == "cls_attention":
            rel = cls_rows(view, layer_attention(view, -1, self.name), self.name).mean(dim=1)
        else:
            h = token_features(view, "hidden", self.name)
            rel = torch.nn.functional.cosine_similarity(h, h[:, cls].mean(dim=1, keepdim=True), dim=-1).clamp(min=0)
        rel = rel[:, candidates.to(rel.device)]
        return rel / rel.amax(dim=-1, keepdim=True).clamp(min=1e-12)

    def score(self, view: AttentionView) -> torch.Tensor:
        x = token_features(view, self.feature, self.name)
        candidates = ~cls_mask(view).to(x.device)
        if not bool(candidates.any()):
            raise ValueError("todre found no non-[CLS] token to rank")
        dist = pairwise_distance(x[:, candidates], self.metric)
        rel = self.relevance_of(view, candidates)
        if rel is None:
            order = greedy_max_min(dist, most_isolated(dist))
        else:
            order = greedy_max_min(dist, rel.argmax(dim=-1), self.relevance_weight * rel.to(dist.device))
        return scores_from_order(order, candidates, view.num_keys)
