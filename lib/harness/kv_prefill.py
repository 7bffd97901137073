"""Score every prompt token with one or more scorers from a single prefill pass (no eviction)."""

from __future__ import annotations

import torch
from torch import nn

from ..scorers.base import AttentionView, Scorer
from .attention_capture import capture_attention, check_attention_path


@torch.inference_mode()
def prefill_scores(
    model: nn.Module, input_ids: torch.Tensor, scorers: dict[str, Scorer], *, attention: str = "eager"
) -> dict[str, torch.Tensor]:
    """Run ``input_ids`` ``(1, T)`` once and score every token with each scorer, layer by layer.

    ``attention="eager"`` hands scorers each layer's ``(B, H, T, T)`` probabilities (reduced as they are produced, so
    peak memory stays at one layer's matrix); ``"fused"`` runs :func:`salience.kernels.scored_attention` and hands them
    only each key's attention mass, for scorers that need nothing else.

    Returns ``{name: (layers, heads, T) float32}``.
    """
    check_attention_path(attention, scorers.values())
    total = input_ids.shape[1]
    positions = torch.arange(total, device=input_ids.device)
    per_layer: dict[str, list[torch.Tensor]] = {name: [] for name in scorers}

    def score(view: AttentionView) -> None:
        for name, scorer in scorers.items():
            per_layer[name].append(scorer(view)[0].float())

    if attention == "eager":
        def on_attention(layer_idx: int, probs: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
            score(AttentionView(key_positions=positions, query_positions=positions, attention=probs, keys=key,
                                values=value))

        with capture_attention(model, on_attention):
            model(input_ids, use_cache=False)
    else:
        from ..kernels.transformers_integration import record_key_mass

        visible = total - positions  # causal: key k is seen by queries k..T-1

        def on_mass(layer_idx: int, mass: torch.Tensor) -> None:
            score(AttentionView(key_positions=positions, query_positions=positions, key_mass=mass,
                                visible_queries=visible))

        with record_key_mass(model, mass="all", callback=on_mass):
            model(input_ids, use_cache=False)
    return {name: torch.stack(scores) for name, scores in per_layer.items()}
