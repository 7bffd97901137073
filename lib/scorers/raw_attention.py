"""Raw attention as an explanation (the baseline of [@attention_flow]): one layer's attention of the explained token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_choice
from .base import AttentionView, Scorer, register
from .explanation_common import HEAD_FUSIONS, QUERIES, explained_row, fuse_heads
from .vision_common import layer_attention


@register
@dataclass
class RawAttention(Scorer):
    """``s_k = fuse_h a^{l,h}_{q,k}``: the explained query's attention row at one layer, heads fused.

    Unlike ``cls_attention`` (per head, [CLS] only) this fuses the heads into one row and also explains a model
    without [CLS]: the query is [CLS] where the view has that role, else the last query (the position a causal LM
    predicts from).

    Parameters:
        layer: index into ``view.attention_layers`` (oldest first); ``-1`` the last, readable from ``attention`` alone.
        head_fusion: ``mean``, ``max`` or ``min`` over heads.
        query: ``auto``, ``cls`` or ``last`` (see :data:`~salience.scorers.explanation_common.QUERIES`).

    Reads ``attention (B, H, Q, K)`` (or ``attention_layers``); returns ``(B, 1, K)``.
    """

    name = "raw_attention"
    head_layout = "shared"
    needs = frozenset({"attention"})
    layer: int = -1
    head_fusion: str = "mean"
    query: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"layer must be an int index into attention_layers (-1 last), got {self.layer!r}")
        check_choice(self.head_fusion, HEAD_FUSIONS, "head_fusion")
        check_choice(self.query, QUERIES, "query")
        self.needs = frozenset({"attention"}) if self.layer == -1 else frozenset({"attention_layers"})

    def score(self, view: AttentionView) -> torch.Tensor:
        row = explained_row(view, layer_attention(view, self.layer, self.name), self.query, self.name)
        return fuse_heads(row, self.head_fusion).unsqueeze(1)
