"""Generic selection: scores + budget + protected sets → kept indices.

Every family uses this one function: a KV harness keeps cache entries, a vision harness keeps patches. Protected
tokens (sinks, a recent window, separators, [CLS]) are always kept and count against the budget.
"""

from __future__ import annotations

import math

import torch


def resolve_budget(budget: float | int, num_tokens: int) -> int:
    """Turn a ratio in (0, 1] or a token count in [1, num_tokens] into a token count.

    A float is a ratio of ``num_tokens`` (rounded up, at least 1); an int is a count. Anything else raises with the
    valid range.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a ratio in (0, 1] or a token count, got {budget!r}")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget ratio must lie in (0, 1], got {budget}")
        return max(1, math.ceil(budget * num_tokens))
    if not 1 <= budget <= num_tokens:
        raise ValueError(f"token budget must lie in [1, {num_tokens}] for {num_tokens} tokens, got {budget}")
    return budget


def protected_mask(
    positions: torch.Tensor,
    *,
    n_sink: int = 0,
    recent: int = 0,
    newest_position: int | None = None,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(K,)`` bool mask of tokens that selection must keep.

    Args:
        positions: ``(K,)`` original positions of the candidate tokens.
        n_sink: tokens at positions ``< n_sink`` (attention sinks, StreamingLLM).
        recent: tokens within ``recent`` positions of ``newest_position`` (default: the largest position).
        extra: any other ``(K,)`` bool mask (separators, [CLS], a needle span for a diagnostic).
    """
    keep = positions < n_sink
    if recent > 0:
        newest = int(positions.max()) if newest_position is None else newest_position
        keep |= positions > newest - recent
    if extra is not None:
        keep |= extra.to(torch.bool)
    return keep


def select_topk(scores: torch.Tensor, budget: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``budget`` highest-scoring tokens per row, protected ones first; ascending order.

    Args:
        scores: ``(..., K)``; higher means keep. NaN is an error (a broken scorer must not pass silently).
        budget: how many to keep per row, ``1 ≤ budget ≤ K``.
        protected: ``(K,)`` or ``(..., K)`` bool; must not hold more than ``budget`` tokens.

    Returns:
        ``(..., budget)`` int64 indices into the last axis, sorted ascending (keeps the original token order).
    """
    k = scores.shape[-1]
    if not 1 <= budget <= k:
        raise ValueError(f"budget must lie in [1, {k}] for {k} tokens, got {budget}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    ranked = scores.float()
    if protected is not None:
        n_protected = int(protected.sum(dim=-1).max()) if protected.any() else 0
        if n_protected > budget:
            raise ValueError(f"{n_protected} protected tokens exceed the budget of {budget}")
        ranked = ranked.masked_fill(protected.to(torch.bool), float("inf"))
    keep = None
    if k - budget < budget:  # dropping few (eviction drops one token a step): find the dropped ones instead
        keep = _keep_by_dropping(ranked, k - budget)
    if keep is None:
        keep = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, ranked.topk(budget, dim=-1).indices, True)
    # a mask's nonzero entries come in ascending order, row by row: no sort needed
    return keep.nonzero()[:, -1].view(*scores.shape[:-1], budget)


def _keep_by_dropping(ranked: torch.Tensor, n_drop: int) -> torch.Tensor | None:
    """The keep mask that drops the ``n_drop`` lowest scores of every row, or None when some row has a tie across
    the boundary (then which tied token stays is ``topk``'s choice, and :func:`select_topk` leaves it to ``topk``, so
    both ways keep the same set)."""
    keep = torch.ones_like(ranked, dtype=torch.bool)
    if n_drop == 0:
        return keep
    dropped, index = ranked.topk(n_drop, dim=-1, largest=False)
    keep.scatter_(-1, index, False)
    lowest_kept = ranked.masked_fill(~keep, float("inf")).amin(dim=-1)
    return keep if bool((dropped.amax(dim=-1) < lowest_kept).all()) else None


def to_kv_heads(scores: torch.Tensor, layout: str, num_kv_heads: int) -> torch.Tensor:
    """``(..., H, K)`` scores in a scorer's concrete head layout → ``(..., H_kv, K)``, one row per KV head.

    ``layout`` is what :meth:`salience.scorers.Scorer.head_layout_for` says of the rows: ``"query"`` (one per query
    head: each GQA group averaged), ``"kv"`` (one per KV head: as they are) or ``"shared"`` (one row: repeated). The
    head count must match the layout; a mismatch raises instead of being guessed from the count.
    """
    heads = scores.shape[-2]
    if layout == "kv":
        if heads != num_kv_heads:
            raise ValueError(f"KV-head scores need {num_kv_heads} head rows, got {heads}")
        return scores
    if layout == "shared":
        if heads != 1:
            raise ValueError(f"shared scores need one head row, got {heads}")
        return scores.expand(*scores.shape[:-2], num_kv_heads, scores.shape[-1])
    if layout == "query":
        flat = scores.reshape(-1, heads, scores.shape[-1])
        return reduce_to_kv_heads(flat, num_kv_heads, "mean").reshape(*scores.shape[:-2], num_kv_heads, -1)
    raise ValueError(f"layout must be 'query', 'kv' or 'shared' (resolve 'view' with Scorer.head_layout_for), "
                     f"got {layout!r}")


def reduce_to_kv_heads(scores: torch.Tensor, num_kv_heads: int, mode: str = "mean") -> torch.Tensor:
    """``(B, H_q, K)`` → ``(B, H_kv, K)`` by averaging (or taking the max over) each GQA group of query heads.

    ``mode="shared"`` averages over all heads and repeats, so every KV head keeps the same tokens.
    """
    b, h, k = scores.shape
    if h % num_kv_heads:
        raise ValueError(f"{h} query heads are not a multiple of {num_kv_heads} KV heads")
    grouped = scores.view(b, num_kv_heads, h // num_kv_heads, k)
    if mode == "mean":
        return grouped.mean(dim=2)
    if mode == "max":
        return grouped.amax(dim=2)
    if mode == "shared":
        return scores.mean(dim=1, keepdim=True).expand(b, num_kv_heads, k)
    raise ValueError(f"unknown head reduction {mode!r}; choose mean, max or shared")
