"""SnapKV [@snapkv]: attention from an observation window of the newest queries, pooled along the keys before it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import AttentionView, Scorer, register

#: added to a window key's score: pooled scores are means of attention probabilities (≤ 1), so window keys rank first
WINDOW_OFFSET = 2.0


@register
@dataclass
class WindowAttention(Scorer):
    """SnapKV's score: ``s_k = pool_k( mean_{q ∈ window} a_{q,k} )`` for the keys **before** the window, per query head.

    The observation window is the last ``w = min(window, Q)`` rows of the attention (rows are ordered by position);
    its own keys are the keys at or after its first query's position. As in SnapKV's reference code (kvpress's
    ``SnapKVPress``: ``attn[..., -w:, :-w]``, pooled, the window padded back on), only the keys before the window are
    pooled: pooling along keys (stride 1, zero padding of ``kernel_size // 2`` on each side, so the output keeps
    their count) spreads a peak to its neighbours, so clusters of important positions are kept together, and the
    window's own attention never leaks onto the keys just before it. ``avg`` divides by the full kernel at the edges
    too (zero padding counted), as ``avg_pool1d`` does.

    The window's own keys score ``2 + their mean window attention``, above every pooled score (≤ 1): SnapKV keeps
    its window first, as the reference code does (it pads the window with ``max + 1``). Harnesses that compare
    scorers at equal protection protect the window for everyone (``recent_window ≥ window`` in query-agnostic
    compression; in query-aware compression the window is the question, kept outside the budget). SnapKV averages
    the score over each GQA group to pick one set per KV head: that is
    ``selection.reduce_to_kv_heads(scores, H_kv, "mean")``.

    Parameters:
        window: observation-window length ≥ 1 (clipped to the number of queries present).
        kernel_size: odd pooling width ≥ 1; 1 disables pooling.
        pooling: ``"max"`` or ``"avg"``.

    Reads ``attention (B, H_q, Q, K)`` (rows at ``query_positions``, by default the last ``Q`` keys); returns
    per-query-head ``(B, H_q, K)``.
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

    def window_keys(self, view: AttentionView) -> torch.Tensor:
        """``(K,)`` bool: the window's own keys (at or after the first window query's position)."""
        q, k = view.attention.shape[-2:]
        w = min(self.window, q)
        if view.query_positions is not None:
            first = view.query_positions[-w]
        else:  # rows are the last q keys
            first = view.key_positions[max(k - w, 0)]
        return view.key_positions >= first

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.attention is None:
            raise ValueError("snapkv needs attention (the (B, H, Q, K) matrix); a key_mass summary is not enough")
        b, h, q, k = view.attention.shape
        mean = view.attention[:, :, -min(self.window, q):, :].float().mean(dim=-2)  # (B, H, K)
        inside = self.window_keys(view).to(mean.device)
        scores = torch.where(inside, mean + WINDOW_OFFSET, mean)
        before = (~inside).nonzero().flatten()
        if self.kernel_size == 1 or before.numel() == 0:
            return scores
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        kept = mean[..., before].reshape(b * h, 1, before.numel())
        pooled = pool(kept, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        scores[..., before] = pooled.reshape(b, h, before.numel())
        return scores
