"""Score every prompt token with one or more scorers from a single prefill pass (no eviction)."""

from __future__ import annotations

import torch
from torch import nn

from ..scorers.base import AttentionView, Scorer
from .attention_capture import capture_attention


@torch.inference_mode()
def prefill_scores(model: nn.Module, input_ids: torch.Tensor, scorers: dict[str, Scorer]) -> dict[str, torch.Tensor]:
    """Run ``input_ids`` ``(1, T)`` once and score every token with each scorer, layer by layer.

    Returns ``{name: (layers, heads, T) float32}``. Attention is reduced per layer as it is produced, so peak memory
    stays at one layer's ``(H, T, T)`` matrix.
    """
    total = input_ids.shape[1]
    positions = torch.arange(total, device=input_ids.device)
    per_layer: dict[str, list[torch.Tensor]] = {name: [] for name in scorers}

    def on_attention(layer_idx: int, probs: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        view = AttentionView(key_positions=positions, query_positions=positions, attention=probs, keys=key, values=value)
        for name, scorer in scorers.items():
            per_layer[name].append(scorer(view)[0].float())

    with capture_attention(model, on_attention):
        model(input_ids, use_cache=False)
    return {name: torch.stack(scores) for name, scores in per_layer.items()}
