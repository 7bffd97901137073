"""Helpers shared by the vision-token scorers (family B): layer lookup, [CLS] rows, token features, greedy max–min.

Nothing here is registered; each rule lives in its own module and calls these.
"""

from __future__ import annotations

import math

import torch

from .base import AttentionView

FEATURES = ("hidden", "keys")


def layer_attention(view: AttentionView, layer: int, who: str) -> torch.Tensor:
    """``attention_layers[layer]`` ``(B, H, Q, K)``; ``view.attention`` stands in for layer -1 when only it exists."""
    layers = view.attention_layers
    if layers is None:
        if layer == -1 and view.attention is not None:
            return view.attention
        raise ValueError(f"{who} needs attention_layers (every layer's attention) for layer {layer}")
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"{who}: layer {layer} is outside [-{len(layers)}, {len(layers) - 1}] "
                         f"for a view holding {len(layers)} layers")
    return layers[layer]


def all_layers(view: AttentionView, who: str) -> list[torch.Tensor]:
    if view.attention_layers:
        return list(view.attention_layers)
    if view.attention is not None:
        return [view.attention]
    raise ValueError(f"{who} needs attention_layers (or at least attention)")


def cls_mask(view: AttentionView) -> torch.Tensor:
    """``(K,)`` bool mask of the [CLS] keys; all False when the view has no ``"cls"`` role."""
    mask = view.roles.get("cls")
    if mask is None:
        return torch.zeros(view.num_keys, dtype=torch.bool, device=view.key_positions.device)
    return mask.to(device=view.key_positions.device, dtype=torch.bool)


def cls_rows(view: AttentionView, attention: torch.Tensor, who: str) -> torch.Tensor:
    """``(B, H, K)`` attention of the [CLS] query row(s) (mean over them) in a ``(B, H, Q, K)`` matrix.

    Rows are matched to keys by position: with ``Q == K`` and no ``query_positions`` row ``i`` is key ``i``.
    """
    cls = cls_mask(view)
    q, k = attention.shape[-2], attention.shape[-1]
    if view.query_positions is not None and q == view.query_positions.numel():
        rows = torch.isin(view.query_positions.to(view.key_positions.device), view.key_positions[cls])
    elif q == k:
        rows = cls
    else:
        raise ValueError(f"{who}: cannot tell which of the {q} query rows is [CLS] without query_positions")
    if not bool(rows.any()):
        raise ValueError(f"{who}: no [CLS] query row in the attention (the queries do not include [CLS])")
    return attention[:, :, rows.to(attention.device), :].float().mean(dim=-2)


def token_features(view: AttentionView, feature: str, who: str) -> torch.Tensor:
    """``(B, K, F)`` per-token features: ``hidden`` as is, or ``keys`` with heads concatenated."""
    if feature == "hidden":
        if view.hidden is None:
            raise ValueError(f"{who} with feature='hidden' needs hidden states in the view")
        return view.hidden.float()
    if view.keys is None:
        raise ValueError(f"{who} with feature='keys' needs keys in the view")
    b, h, k, d = view.keys.shape
    return view.keys.float().transpose(1, 2).reshape(b, k, h * d)


def cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` cosine similarity between the rows of ``x (B, N, F)`` (zero vectors give 0)."""
    unit = torch.nn.functional.normalize(x, dim=-1)
    return unit @ unit.transpose(-1, -2)


def greedy_max_min(dist: torch.Tensor, first: torch.Tensor, bonus: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, N)`` greedy farthest-point order: start at ``first (B,)``, then repeatedly the point maximising
    ``min distance to the points picked so far + bonus``. ``dist (B, N, N)``, ``bonus (B, N)`` or None."""
    b, n, _ = dist.shape
    rows = torch.arange(b, device=dist.device)
    order = torch.empty(b, n, dtype=torch.long, device=dist.device)
    picked = torch.zeros(b, n, dtype=torch.bool, device=dist.device)
    nearest = torch.full((b, n), float("inf"), device=dist.device)
    current = first
    for step in range(n):
        order[:, step] = current
        picked[rows, current] = True
        nearest = torch.minimum(nearest, dist[rows, current])
        crit = nearest if bonus is None else nearest + bonus
        current = crit.masked_fill(picked, float("-inf")).argmax(dim=-1)
    return order


def most_isolated(dist: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the point whose nearest other point is farthest (``dist (B, N, N)``; 0 when ``N == 1``)."""
    n = dist.shape[-1]
    if n == 1:
        return torch.zeros(dist.shape[0], dtype=torch.long, device=dist.device)
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    return dist.masked_fill(eye, float("inf")).amin(dim=-1).argmax(dim=-1)


def scores_from_order(order: torch.Tensor, candidates: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``(B, 1, K)`` scores from a ranking of the ``candidates`` keys: the r-th pick scores ``N − r`` (first highest);
    keys outside ``candidates`` ([CLS], protected anyway) score ``N + 1``. ``order (B, N)`` indexes the candidates."""
    b, n = order.shape
    idx = candidates.nonzero().squeeze(-1).to(order.device)
    ranked = torch.arange(n, 0, -1, device=order.device, dtype=torch.float32).expand(b, n)
    scores = torch.full((b, num_keys), float(n + 1), device=order.device)
    scores[:, idx] = torch.zeros(b, n, device=order.device).scatter(1, order, ranked)
    return scores.unsqueeze(1)


def interleave(first: list[int], second: list[int], share: float) -> list[int]:
    """Merge two rankings (duplicates skipped) so each prefix of ``k`` holds ``⌈share · k⌉`` picks from ``first``."""
    order, placed, pos, from_first = [], set(), [0, 0], 0
    lists = (first, second)
    total = len(set(first) | set(second))
    while len(order) < total:
        side = 0 if from_first < math.ceil(share * (len(order) + 1)) else 1
        for s in (side, 1 - side):
            while pos[s] < len(lists[s]) and lists[s][pos[s]] in placed:
                pos[s] += 1
            if pos[s] < len(lists[s]):
                pick = lists[s][pos[s]]
                order.append(pick)
                placed.add(pick)
                from_first += s == 0
                break
    return order
