"""Gradient × input [@gradient_x_input] on the input embeddings, through captum's ``InputXGradient``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from captum.attr import InputXGradient

from ..validation import check_choice
from .base import AttentionView, Scorer, register
from .explanation_common import REDUCTIONS, reduce_embedding_dim, require_target


@register
@dataclass
class GradientXInput(Scorer):
    """``s_k = reduce_d(e_k ⊙ ∂f/∂e_k)``: the embedding of token ``k`` times the gradient of the readout ``f``.

    Parameters:
        reduce: ``sum`` (signed, the first-order Taylor share of ``f`` each token holds) or ``l2`` (magnitude).

    Reads the attribution target (gradients with respect to the ``(B, K, d)`` input embeddings); returns
    ``(B, 1, K)``.
    """

    name = "gradient_x_input"
    head_layout = "shared"
    needs = frozenset({"model", "gradients"})
    reduce: str = "sum"

    def __post_init__(self) -> None:
        check_choice(self.reduce, REDUCTIONS, "reduce")

    def score(self, view: AttentionView) -> torch.Tensor:
        target = require_target(view, self.name, gradients=True)
        inputs = target.embeddings.clone().requires_grad_(True)
        attributions = InputXGradient(target.forward).attribute(
            inputs, additional_forward_args=(target.attention_mask,))
        return reduce_embedding_dim(attributions.detach(), self.reduce)
