"""Helpers shared by the explanation scorers (family C): which query row is explained, head fusion, the target.

Nothing here is registered; each rule lives in its own module and calls these.
"""

from __future__ import annotations

import torch

from .attribution_target import AttributionTarget
from .base import AttentionView
from .vision_common import cls_mask, cls_rows

#: which query row an explanation reads: ``auto`` = [CLS] where the view has that role, else the last query
#: (the position whose output a causal LM predicts from)
QUERIES = ("auto", "cls", "last")
HEAD_FUSIONS = ("mean", "max", "min")
#: how a per-dimension attribution ``(B, K, d)`` becomes a per-token score: the signed sum (what sums to the
#: completeness gap) or the ℓ2 norm (magnitude only)
REDUCTIONS = ("sum", "l2")


def fuse_heads(attention: torch.Tensor, how: str) -> torch.Tensor:
    """``(B, H, …)`` → ``(B, …)`` by mean, max or min over heads."""
    attention = attention.float()
    return attention.mean(dim=1) if how == "mean" else getattr(attention, "a" + how)(dim=1)


def explained_row(view: AttentionView, attention: torch.Tensor, query: str, who: str) -> torch.Tensor:
    """``(B, H, K)``: the explained query's row of ``attention`` ``(B, H, Q, K)`` ([CLS] rows averaged)."""
    if query != "last" and bool(cls_mask(view).any()):
        return cls_rows(view, attention, who)
    if query == "cls":
        raise ValueError(f"{who} with query='cls' needs a [CLS] role in the view; use query='last' (or 'auto')")
    return attention[:, :, -1, :].float()


def explained_index(view: AttentionView, query: str, who: str) -> int:
    """Index of the explained token among the ``K`` keys of a square (all tokens query) layer graph."""
    cls = cls_mask(view)
    if query != "last" and bool(cls.any()):
        return int(cls.nonzero()[0, 0])
    if query == "cls":
        raise ValueError(f"{who} with query='cls' needs a [CLS] role in the view; use query='last' (or 'auto')")
    return view.num_keys - 1


def require_target(view: AttentionView, who: str, *, gradients: bool = False) -> AttributionTarget:
    """The view's attribution target, checked; raises naming how to build one, or why gradients are unavailable."""
    target = view.attribution_target
    if target is None:
        raise ValueError(f"{who} runs the model and needs an attribution target in the view (captured attention is "
                         "not enough): build the view with salience.scorers.attribution_target.explanation_view")
    if target.embeddings.shape[1] != view.num_keys:
        raise ValueError(f"{who}: the attribution target has {target.embeddings.shape[1]} tokens, the view "
                         f"{view.num_keys} keys")
    if gradients:
        target.require_gradients(who)
    return target


def reduce_embedding_dim(attributions: torch.Tensor, how: str) -> torch.Tensor:
    """``(B, K, d)`` per-dimension attributions → ``(B, 1, K)`` per-token scores."""
    scores = attributions.sum(dim=-1) if how == "sum" else attributions.norm(dim=-1)
    return scores.float().unsqueeze(1)
