"""G-Prune [@gprune]: tokens as nodes of a semantic-similarity graph; importance propagated over its weighted links."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_choice
from .attention_pagerank import check_walk
from .base import AttentionView, Scorer, register
from .vision_common import FEATURES, cls_mask, cls_rows, cosine_similarity, layer_attention, token_features

PRIORS = ("uniform", "cls_attention")


@register
@dataclass
class GraphPropagation(Scorer):
    """Personalised PageRank on the similarity graph: ``r ← (1 − d) p + d · r P`` until it settles.

    Edges: ``W_ij = max(cos(x_i, x_j), 0)`` for ``i ≠ j`` (no self-loops); ``P`` = ``W`` with rows normalised (a row
    with no edge jumps uniformly). ``p`` is the teleport (prior) distribution: uniform, or the [CLS] attention row
    (head mean at the scoring layer), which seeds the propagation from what [CLS] reads. A token is important when
    tokens similar to important tokens exist: it stands for a large, well-connected part of the image.

    *(interp.)* The abstract says only "information flow is propagated via weighted links, and most important tokens
    after iterations are kept"; PageRank with a cosine graph and this prior is this implementation's reading.

    Parameters:
        damping: ``d`` in (0, 1); tol > 0 and max_iter ≥ 1 as in ``attention_pagerank``.
        feature: ``hidden`` or ``keys``; prior: ``uniform`` or ``cls_attention`` (needs [CLS]; uniform without one).

    Reads ``hidden (B, K, d)`` or ``keys``, and ``attention`` for the [CLS] prior; returns ``(B, 1, K)`` summing to 1.
    """

    name = "graph_propagation"
    head_layout = "shared"
    needs = frozenset({"hidden", "keys", "attention"})
    damping: float = 0.85
    tol: float = 1e-6
    max_iter: int = 100
    feature: str = "hidden"
    prior: str = "uniform"

    def __post_init__(self) -> None:
        check_walk(self.damping, self.tol, self.max_iter)
        check_choice(self.feature, FEATURES, "feature")
        check_choice(self.prior, PRIORS, "prior")
        self.needs = frozenset({self.feature} | ({"attention"} if self.prior == "cls_attention" else set()))

    def score(self, view: AttentionView) -> torch.Tensor:
        x = token_features(view, self.feature, self.name)
        b, k, _ = x.shape
        w = cosine_similarity(x).clamp(min=0) * (1 - torch.eye(k, device=x.device))
        out = w.sum(dim=-1, keepdim=True)
        p_walk = torch.where(out > 0, w / out.clamp(min=1e-12), 1.0 / k)
        prior = x.new_full((b, 1, k), 1.0 / k)
        if self.prior == "cls_attention" and bool(cls_mask(view).any()):
            row = cls_rows(view, layer_attention(view, -1, self.name), self.name).mean(dim=1, keepdim=True)
            prior = row / row.sum(dim=-1, keepdim=True)
        r = prior
        for _ in range(self.max_iter):
            new = (1 - self.damping) * prior + self.damping * (r @ p_walk)
            done = (new - r).abs().sum(dim=-1).max() < self.tol
            r = new
            if done:
                break
        return r
