"""Random scores: the baseline every eviction or pruning rule must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


@register
@dataclass
class RandomScorer(Scorer):
    """Uniform random importances, drawn from the view's seeded generator.

    Returns ``(B, H, K)``. Needs nothing, so it is attention-free. Reproducible when the harness passes a generator.
    """

    name = "random"
    head_layout = "view"
    needs = frozenset()
    stochastic = True

    def score(self, view: AttentionView) -> torch.Tensor:
        b, h = view.batch_heads()
        # drawn on the CPU so a CPU generator seeds runs on any device alike
        return torch.rand((b, h, view.num_keys), generator=view.generator).to(view.key_positions.device)
