"""LexRank's idea [@lexrank] as a KV scorer: PageRank centrality on the graph that attention draws between tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


def check_walk(damping: float, tol: float, max_iter: int) -> None:
    """Settings of a damped random walk solved by power iteration (shared with G-Prune's propagation)."""
    if not 0.0 < damping < 1.0:
        raise ValueError(f"damping must lie in (0, 1), got {damping}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be ≥ 1, got {max_iter}")


@register
@dataclass
class AttentionPageRank(Scorer):
    """``r = (1 − d)/K + d · r P``, the stationary distribution of a walk that follows attention, per head.

    Token ``q`` links to key ``k`` with weight ``a_{q,k}``: a random reader at token ``q`` moves to the token it
    attends to, and with probability ``1 − d`` jumps to a uniformly random token. ``P`` is the square part of the
    attention (the last ``K`` query rows over the ``K`` keys, row ``i`` taken as token ``i``, which holds in a
    prefill where query and key positions coincide), each row renormalised to sum 1; an all-zero row (dangling
    node) jumps uniformly. A key is central when central tokens attend to it, not merely when many do (LexRank's
    eigenvector centrality, vs H2O's degree). Under a causal mask the walk only moves back in time, so early tokens
    collect the mass unless the damping is low.

    Parameters:
        damping: probability ``d`` in (0, 1) of following an edge.
        tol: stop when the L1 change of ``r`` is below ``tol`` (> 0) for every head; ``max_iter`` ≥ 1 caps the loop.

    Reads ``attention (B, H_q, Q, K)`` with ``Q ≥ K``; returns per-query-head ``(B, H_q, K)`` summing to 1 per head.
    """

    name = "attention_pagerank"
    needs = frozenset({"attention"})
    damping: float = 0.85
    tol: float = 1e-6
    max_iter: int = 100

    def __post_init__(self) -> None:
        check_walk(self.damping, self.tol, self.max_iter)

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.attention is None:
            raise ValueError("attention_pagerank needs attention (the (B, H, Q, K) matrix)")
        b, h, q, k = view.attention.shape
        if q < k:
            raise ValueError(f"attention_pagerank needs a square attention graph, Q ≥ K queries; got Q={q}, K={k}")
        p = view.attention[:, :, q - k :, :].float()
        out_weight = p.sum(dim=-1, keepdim=True)
        p = torch.where(out_weight > 0, p / out_weight.clamp(min=torch.finfo(torch.float32).tiny), 1.0 / k)
        r = p.new_full((b, h, 1, k), 1.0 / k)
        for _ in range(self.max_iter):
            new = (1 - self.damping) / k + self.damping * (r @ p)
            done = (new - r).abs().sum(dim=-1).max() < self.tol
            r = new
            if done:
                break
        return r[:, :, 0, :]
