"""SnapKV (s93): attention from an observation window of the newest queries, pooled along keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import AttentionView, Scorer, register


@register
@dataclass
class WindowAttention(Scorer):
    """SnapKV's score: ``s_k = pool_k( mean_{q ∈ last w queries} a_{q,k} )``, per query head.

    The observation window is the last ``w = min(window, Q)`` rows of the attention (rows are ordered by position).
    Pooling along keys (stride 1, zero padding of ``kernel_size // 2`` on each side, so the output keeps length ``K``)
    spreads a peak to its neighbours, so clusters of important positions are kept together. ``avg`` divides by the
    full kernel at the edges too (zero padding counted), as SnapKV's ``avg_pool1d`` does.

    SnapKV always keeps the window's own keys: that is protection (``selection.protected_mask(recent=window)``), not
    part of this score. SnapKV averages the score over each GQA group to pick one set per KV head: that is
    ``selection.reduce_to_kv_heads(scores, H_kv, "mean")``.

    Parameters:
        window: observation-window length ≥ 1 (clipped to the number of queries present).
        kernel_size: odd pooling width ≥ 1; 1 disables pooling.
        pooling: ``"max"`` or ``"avg"``.

    Reads ``attention (B, H_q, Q, K)``; returns per-query-head ``(B, H_q, K)``.
    """

    name = "snapkv"
    needs = frozenset({"attention"})
    window: int = 64
    kernel_size: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be ≥ 1, got {self.window}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer ≥ 1, got {self.kernel_size}")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.attention is None:
            raise ValueError("snapkv needs attention (the (B, H, Q, K) matrix); a key_mass summary is not enough")
        b, h, q, k = view.attention.shape
        mean = view.attention[:, :, -min(self.window, q):, :].float().mean(dim=-2)  # (B, H, K)
        if self.kernel_size == 1:
            return mean
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(mean.reshape(b * h, 1, k), self.kernel_size, stride=1, padding=self.kernel_size // 2)
        return pooled.reshape(b, h, k)
