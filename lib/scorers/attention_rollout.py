"""Attention rollout [@attention_flow] (the flow-style aggregation of family B/C): attention chained over layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_choice
from .base import AttentionView, Scorer, register
from .explanation_common import explained_index
from .vision_common import all_layers, cls_mask

HEAD_FUSIONS = ("mean", "max", "min")
#: whose row of the rollout is the score: ``cls_or_mean`` = the [CLS] row(s), else the mean of all rows (how much
#: of each token reaches the average token: a pruning score); ``auto`` = [CLS], else the last token (the output a
#: causal LM predicts from: an explanation); ``cls``; ``last``
ROLLOUT_QUERIES = ("cls_or_mean", "auto", "cls", "last")


@register
@dataclass
class AttentionRollout(Scorer):
    """Rollout: ``R = Ã_L ⋯ Ã_1`` with ``Ã_l = norm_rows(ρ I + (1 − ρ) fuse_h A_l)``; ``s_k = R_{[CLS],k}``.

    The residual term ``ρ I`` stands for the skip connection (Abnar & Zuidema use ρ = 0.5), rows are renormalised so
    each ``Ã_l`` stays a mixing matrix, and the product says how much of each input token ends up in each output
    token. The score is the [CLS] row of ``R``; a view without a [CLS] role falls back to the mean over all query rows
    (how much of each token reaches the average token), so the rule also runs on models without [CLS]. To explain one
    output, name its row with ``query`` (``last`` for a causal LM's next-token prediction).

    Parameters:
        residual: ρ in [0, 1); 0 = raw attention product.
        head_fusion: how heads are merged per layer, one of ``mean``, ``max``, ``min``.
        start_layer: first index ≥ 0 into ``attention_layers`` included (early layers are often near-uniform).
        query: which row is the score, one of ``ROLLOUT_QUERIES`` (default ``cls_or_mean``).

    Reads ``attention_layers`` (square ``(B, H, K, K)``; ``attention`` alone counts as one layer); returns
    ``(B, 1, K)``, the rollout row (sums to 1).
    """

    name = "attention_rollout"
    head_layout = "shared"
    needs = frozenset({"attention_layers"})
    residual: float = 0.5
    head_fusion: str = "mean"
    start_layer: int = 0
    query: str = "cls_or_mean"

    def __post_init__(self) -> None:
        check_choice(self.query, ROLLOUT_QUERIES, "query")
        if not 0.0 <= self.residual < 1.0:
            raise ValueError(f"residual must lie in [0, 1), got {self.residual}")
        check_choice(self.head_fusion, HEAD_FUSIONS, "head_fusion")
        if self.start_layer < 0:
            raise ValueError(f"start_layer must be ≥ 0, got {self.start_layer}")

    def score(self, view: AttentionView) -> torch.Tensor:
        layers = all_layers(view, self.name)
        if self.start_layer >= len(layers):
            raise ValueError(f"start_layer {self.start_layer} is outside [0, {len(layers) - 1}] "
                             f"for a view holding {len(layers)} layers")
        rollout = None
        for a in layers[self.start_layer:]:
            if a.shape[-2] != a.shape[-1]:
                raise ValueError(f"attention_rollout needs square attention (all tokens query), got {tuple(a.shape)}")
            a = a.float()
            fused = a.mean(dim=1) if self.head_fusion == "mean" else getattr(a, "a" + self.head_fusion)(dim=1)
            eye = torch.eye(fused.shape[-1], device=fused.device)
            mixed = self.residual * eye + (1 - self.residual) * fused
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            rollout = mixed if rollout is None else mixed @ rollout
        if self.query != "cls_or_mean":
            return rollout[:, explained_index(view, self.query, self.name), :].unsqueeze(1)
        cls = cls_mask(view).to(rollout.device)
        rows = rollout[:, cls, :] if bool(cls.any()) else rollout
        return rows.mean(dim=1).unsqueeze(1)
