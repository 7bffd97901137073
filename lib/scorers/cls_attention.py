"""[CLS] attention to patches: FasterVLM [@fastervlm] / VisionZip's dominant tokens [@visionzip]; VTC-CLS's layer
ensemble [@vtc_cls]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register
from .vision_common import all_layers, cls_rows, layer_attention


@register
@dataclass
class ClsAttention(Scorer):
    """FasterVLM's score: ``s_{h,k} = a^h_{[CLS],k}``, the [CLS] query's attention to each key at one encoder layer.

    VisionZip's dominant tokens are the top-k of the same row. With several [CLS] rows (never in a plain ViT) their
    mean is taken. [CLS] itself gets its self-attention; the harness protects it anyway.

    Parameters:
        layer: index into ``view.attention_layers`` (oldest first): ``-1`` the scoring layer itself, ``-2`` the one
            before (FasterVLM and VisionZip read the penultimate layer of CLIP). ``-1`` needs only ``attention``;
            any other index needs ``attention_layers``. Out-of-range indices raise naming the valid range.

    Reads ``attention (B, H, Q, K)`` (``Q == K`` or ``query_positions``) and ``roles["cls"]``; returns per-head
    ``(B, H, K)``. Needs a [CLS] token.
    """

    name = "cls_attention"
    needs = frozenset({"attention", "attention_layers"})
    requires_roles = frozenset({"cls"})
    attention_rows = "cls"
    layer: int = -1

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"layer must be an int index into attention_layers (-1 last, -2 penultimate), "
                             f"got {self.layer!r}")
        # the harness captures only what the instance reads: one matrix for the scoring layer
        self.needs = frozenset({"attention"}) if self.layer == -1 else frozenset({"attention_layers"})

    def score(self, view: AttentionView) -> torch.Tensor:
        return cls_rows(view, layer_attention(view, self.layer, self.name), self.name)


@register
@dataclass
class MultilayerClsAttention(Scorer):
    """VTC-CLS's ensemble: ``s_k = mean_{l ∈ layers} mean_h a^{l,h}_{[CLS],k}``.

    *(interp.)* The abstract says only that [CLS] scores "from different layers" are ensembled; heads of different
    layers do not correspond, so each layer is first averaged over heads, then the layers are averaged with equal
    weight (each row sums to 1, so no layer dominates by scale).

    Parameters:
        layers: indices into ``view.attention_layers`` (negative from the end), distinct; ``None`` = every layer.

    Reads ``attention_layers`` (each ``(B, H, Q, K)``) and ``roles["cls"]``; returns ``(B, 1, K)``.
    """

    name = "multilayer_cls_attention"
    head_layout = "shared"
    needs = frozenset({"attention_layers"})
    requires_roles = frozenset({"cls"})
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = list(self.layers)
            if not self.layers or any(isinstance(i, bool) or not isinstance(i, int) for i in self.layers):
                raise ValueError(f"layers must be None (all) or a non-empty list of int indices, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must be distinct, got {self.layers}")

    def score(self, view: AttentionView) -> torch.Tensor:
        if self.layers is None:
            chosen = all_layers(view, self.name)
        else:
            chosen = [layer_attention(view, i, self.name) for i in self.layers]
        rows = [cls_rows(view, a, self.name).mean(dim=1) for a in chosen]
        return torch.stack(rows).mean(dim=0).unsqueeze(1)
