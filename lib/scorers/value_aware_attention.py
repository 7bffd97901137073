"""VATP [@vatp]: value-aware token pruning, accumulated attention weighted by the ℓ1 norm of each value vector."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


@register
@dataclass
class ValueAwareAttention(Scorer):
    """VATP's score: ``s_{h,k} = (Σ_q a^h_{q,k}) · ‖v^{g(h)}_k‖₁``.

    ``g(h) = h // (H_q / H_kv)`` is the KV head that query head ``h`` reads under GQA (the ``repeat_kv`` layout), so
    each value norm is broadcast to the query heads of its group. A token that draws attention but carries a near-zero
    value (attention sinks often do) contributes little to the output and scores low.

    Reads ``attention (B, H_q, Q, K)`` or a streamed ``key_mass (B, H_q, K)``, and ``values (B, H_kv, K, D)``;
    returns per-query-head ``(B, H_q, K)``.
    """

    name = "vatp"
    needs = frozenset({"key_mass", "values"})

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.values is None:
            raise ValueError("vatp needs values")
        mass = view.mass().float()
        h_q, h_kv = mass.shape[1], view.values.shape[1]
        if h_q % h_kv:
            raise ValueError(f"{h_q} query heads are not a multiple of {h_kv} KV heads")
        value_norm = view.values.float().abs().sum(dim=-1).repeat_interleave(h_q // h_kv, dim=1)
        return mass * value_norm
