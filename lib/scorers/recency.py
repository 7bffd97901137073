"""Recency: newer tokens matter more. With protected sinks this is StreamingLLM [@streamingllm]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


@register
@dataclass
class RecencyScorer(Scorer):
    """Score = original token position, so top-k keeps the most recent window.

    StreamingLLM [@streamingllm] = this scorer + ``n_sink`` protected initial tokens in the selection.
    Returns ``(B, H, K)`` (the same ranking for every head). Attention-free.
    """

    name = "recency"
    head_layout = "view"
    needs = frozenset()

    def score(self, view: AttentionView) -> torch.Tensor:
        b, h = view.batch_heads()
        return view.key_positions.float().expand(b, h, -1).clone()
