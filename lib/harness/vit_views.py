"""The scorer's view of a ViT batch (the vision contract of :class:`~salience.scorers.base.AttentionView`), head-
averaged scores over it, and the seeds of stochastic scorers' replicates and batches.

Shared by the full encoder pass (:mod:`salience.harness.vit_encoder`) and the in-encoder reduction
(:mod:`salience.harness.vit_pruning`).
"""

from __future__ import annotations

import torch

from ..scorers.base import AttentionView, Scorer


def build_view(hidden: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None,
               attention_layers: list[torch.Tensor], *, n_prefix: int, has_cls: bool, grid: tuple[int, int],
               generator: torch.Generator | None = None) -> AttentionView:
    """The scorer's view of one batch whose rows share ``positions (K,)`` (see the vision contract).

    The attention holds either every query row, ``(B, H, K, K)``, or the first ``Q < K`` tokens' rows (the [CLS] row
    that the fused kernel records, ``Q = 1``); ``query_positions`` says which.
    """
    k = positions.shape[-1]
    rows = attention_layers[-1].shape[-2] if attention_layers else k
    patch = positions >= n_prefix
    cls = positions == 0 if has_cls else torch.zeros(k, dtype=torch.bool, device=positions.device)
    roles = {"patch": patch}
    if has_cls:
        roles["cls"] = cls
    if n_prefix > 1:
        roles["register"] = ~patch & ~cls
    flat = positions - n_prefix
    coords = torch.stack([flat // grid[1], flat % grid[1]], dim=-1)
    coords = torch.where(patch[:, None], coords, torch.full_like(coords, -1))
    # an encoder's attention is not causal: every token's query sees every key (ZipCache's normaliser is K)
    visible = torch.full((k,), k, dtype=torch.long, device=positions.device)
    return AttentionView(key_positions=positions, query_positions=positions[:rows], visible_queries=visible,
                         attention=attention_layers[-1] if attention_layers else None,
                         attention_layers=list(attention_layers) if attention_layers else None,
                         keys=keys, values=values, hidden=hidden, patch_coords=coords.long(), roles=roles,
                         generator=generator)


def head_mean_scores(scorer: Scorer, hidden, positions, keys, values, attention_layers, *, n_prefix: int,
                     has_cls: bool, grid: tuple[int, int], generator=None) -> torch.Tensor:
    """``(B, K)`` head-averaged scores; rows with different positions get their own view (the contract's ``(K,)``)."""
    meta = dict(n_prefix=n_prefix, has_cls=has_cls, grid=grid, generator=generator)
    if bool((positions == positions[:1]).all()):
        return scorer(build_view(hidden, positions[0], keys, values, attention_layers, **meta)).float().mean(dim=1)
    rows = []
    for i in range(positions.shape[0]):
        view = build_view(hidden[i:i + 1], positions[i], keys[i:i + 1],
                          None if values is None else values[i:i + 1], [a[i:i + 1] for a in attention_layers], **meta)
        rows.append(scorer(view).float().mean(dim=1))
    return torch.cat(rows, dim=0)


def replicate_seed(seed: int, replicate: int, batch: int = 0) -> int:
    """A distinct, stable generator seed for each (seed, replicate, batch): replicates of a stochastic scorer must
    differ, and so must the batches of one replicate."""
    return int((int(seed) * 1_000_003 + int(replicate) * 10_007 + int(batch)) % (2**63 - 1))


__all__ = ["build_view", "head_mean_scores", "replicate_seed"]
