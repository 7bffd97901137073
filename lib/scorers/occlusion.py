"""Leave-one-out occlusion [@occlusion]: the ablation reference, through captum's ``FeatureAblation``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from captum.attr import FeatureAblation

from ..validation import check_choice
from .attribution_target import AttributionTarget
from .base import AttentionView, Scorer, register
from .explanation_common import require_target

#: ``token``: token k's embedding replaced by the target's baseline token (``[MASK]``, pad); ``zeros``: by the zero
#: vector; ``remove``: token k deleted (the sequence one shorter, later tokens shift left)
REPLACEMENTS = ("token", "zeros", "remove")


def removal_effects(target: AttributionTarget) -> torch.Tensor:
    """``(B, K)``: ``f(x) − f(x without token k)``, one shortened forward pass per token and example."""
    b, k = target.input_ids.shape
    effects = torch.zeros(b, k)
    with torch.no_grad():
        for example in range(b):
            one = target.example(example)
            full = one.forward(one.embeddings, one.attention_mask)
            keep = ~torch.eye(k, dtype=torch.bool, device=one.embeddings.device)
            shortened = torch.stack([one.embeddings[0, keep[i]] for i in range(k)])
            masks = torch.stack([one.attention_mask[0, keep[i]] for i in range(k)])
            effects[example] = (full - one.forward(shortened, masks)).float().cpu()
    return effects


@register
@dataclass
class Occlusion(Scorer):
    """``s_k = f(x) − f(x with token k replaced)``: how much the readout drops without token ``k`` (leave-one-out).

    Parameters:
        replacement: ``token`` (the target's ``baseline_token_id``), ``zeros`` or ``remove`` (see
            :data:`REPLACEMENTS`; ``remove`` runs the shortened sequences itself, captum cannot shorten inputs).

    Reads the attribution target (``K + 1`` forward passes per example); returns ``(B, 1, K)``.
    """

    name = "occlusion"
    head_layout = "shared"
    needs = frozenset({"model"})
    replacement: str = "token"

    def __post_init__(self) -> None:
        check_choice(self.replacement, REPLACEMENTS, "replacement")

    def score(self, view: AttentionView) -> torch.Tensor:
        target = require_target(view, self.name)
        if self.replacement == "remove":
            return removal_effects(target).unsqueeze(1).to(view.key_positions.device)
        embeddings = target.embeddings
        baseline = (torch.zeros_like(embeddings) if self.replacement == "zeros"
                    else target.baseline_embeddings(self.name))
        b, k, d = embeddings.shape
        groups = torch.arange(k, device=embeddings.device)[None, :, None].expand(1, k, d)
        with torch.no_grad():
            attributions = FeatureAblation(target.forward).attribute(
                embeddings.clone(), baselines=baseline, additional_forward_args=(target.attention_mask,),
                feature_mask=groups, perturbations_per_eval=k)
        return attributions[..., 0].float().unsqueeze(1)
