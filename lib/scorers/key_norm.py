"""Key norm (the KnormPress idea [@knormpress], a kvpress [@kvpress] press): keys with a small L2 norm tend to receive
more attention, so keep them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


@register
@dataclass
class KeyNorm(Scorer):
    """``s_k = −‖k_k‖₂`` per KV head: the smaller the key's norm, the higher the score.

    Attention-free: needs only the cached keys, so it works with fused attention kernels that never emit scores.

    Reads ``keys (B, H_kv, K, D)``; returns per-KV-head ``(B, H_kv, K)``.
    """

    name = "key_norm"
    head_layout = "kv"
    needs = frozenset({"keys"})

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.keys is None:
            raise ValueError("key_norm needs keys")
        return -view.keys.float().norm(dim=-1)
