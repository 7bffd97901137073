"""Attention × gradient: one layer's attention weighted by the readout's gradient with respect to it, heads fused
by the positive part of their mean, as in Chefer et al.'s gradient-weighted attention [@generic_attention]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_choice
from .attribution_target import require_attention_weights
from .base import AttentionView, Scorer, register
from .explanation_common import QUERIES, explained_row, require_target


@register
@dataclass
class AttentionXGradient(Scorer):
    """``s_k = [mean_h (A^{l,h} ⊙ ∂f/∂A^{l,h})_{q,k}]⁺``: attention of the explained query ``q`` at layer ``l``,
    each head weighted by how the readout ``f`` responds to that weight.

    Chefer et al. aggregate this ``Ā_l = E_h[(∇A_l ⊙ A_l)⁺]`` over all layers; this scorer reads one layer (the
    last by default), the single-layer form the workbook compares with raw attention.

    Parameters:
        layer: which block's attention (index over blocks, ``-1`` the last).
        query: ``auto`` ([CLS] where the view has that role, else the last token), ``cls`` or ``last``.
        positive: keep only the positive part of the head mean (Chefer et al.); ``False`` keeps the sign.

    Reads the attribution target (one forward and backward pass with eager attention); returns ``(B, 1, K)``.
    """

    name = "attention_x_gradient"
    head_layout = "shared"
    #: runs the model itself; ``attention_layers`` marks it attention-based (it reads the model's eager attention)
    needs = frozenset({"model", "gradients", "attention_layers"})
    layer: int = -1
    query: str = "auto"
    positive: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"layer must be an int block index (-1 last), got {self.layer!r}")
        check_choice(self.query, QUERIES, "query")

    def score(self, view: AttentionView) -> torch.Tensor:
        target = require_target(view, self.name, gradients=True)
        require_attention_weights(target.model, self.name)
        value, outputs = target.run(target.embeddings.clone().requires_grad_(True), target.attention_mask,
                                    output_attentions=True)
        layers = outputs.attentions
        if not -len(layers) <= self.layer < len(layers):
            raise ValueError(f"{self.name}: layer {self.layer} is outside [-{len(layers)}, {len(layers) - 1}]")
        attention = layers[self.layer]
        # autograd.grad, not backward(): nothing accumulates in the model's parameter .grad
        (gradient,) = torch.autograd.grad(value.sum(), attention, allow_unused=True)
        if gradient is None:
            raise ValueError(f"{self.name}: the model's returned attention is not the tensor its forward uses, so it "
                             "gets no gradient; use attn_implementation='eager', which returns the weights it uses")
        weighted = (attention.detach() * gradient).float()
        row = explained_row(view, weighted, self.query, self.name).mean(dim=1)
        return (row.clamp_min(0) if self.positive else row).unsqueeze(1)
