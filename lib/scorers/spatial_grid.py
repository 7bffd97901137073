"""Spatial uniform grid (downsampling; LLaVolta-style pooling baseline [@llavolta], FEATHER's uniform sampling
[@feather])."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register
from .vision_common import cls_mask, greedy_max_min, scores_from_order


def grid_levels(coords: torch.Tensor) -> torch.Tensor:
    """``(N,)`` coarseness of each ``(row, col)``: the largest power-of-two stride ``s`` whose lattice
    ``{o_s + s·i}²`` holds the patch, as ``log2 s``. Offsets ``o_{2s} ∈ {o_s, o_s + s}`` (the one nearer the middle of a
    stride-``2s`` cell) keep the lattices nested, so the stride-``2s`` points are a subset of the stride-``s`` ones and
    sit near the centre of their cells rather than on the top-left edge."""
    span = int(coords.max()) + 1 if coords.numel() else 1
    level = torch.zeros(coords.shape[0], dtype=torch.long)
    stride, offset, step = 1, 0, 0
    while stride * 2 <= span:
        centre = (2 * stride - 1) / 2
        offset = min((offset, offset + stride), key=lambda o: (abs(o - centre), -o))
        stride, step = stride * 2, step + 1
        on = ((coords - offset) % stride == 0).all(dim=-1)
        level[on] = step
    return level


@register
@dataclass
class SpatialGrid(Scorer):
    """An ordering whose top-k is a near-uniform grid over the patches, for every ``k`` (attention-free).

    Patches are ranked coarse to fine: first the points of the coarsest power-of-two lattice (see
    :func:`grid_levels`), then those of the next finer one, and so on; within a level, greedy farthest-point order
    (Euclidean, on grid coordinates) starting at the patch nearest the grid centre, so any prefix is spread out. On a
    4×4 grid the top 4 are one patch per 2×2 quadrant; on an 8×8 grid the top 16 are the stride-2 sub-grid. [CLS] and
    other tokens without coordinates (registers) score above every patch (kept by role).

    Reads ``patch_coords (K, 2)`` only; returns ``(B, 1, K)`` (the same ranking for every image). Deterministic.
    """

    name = "spatial_grid"
    head_layout = "shared"
    needs = frozenset()

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.patch_coords is None:
            raise ValueError("spatial_grid needs patch_coords (the (row, col) of every patch on the grid)")
        b, _ = view.batch_heads()
        coords = view.patch_coords.cpu().long()
        patches = (coords >= 0).all(dim=-1) & ~cls_mask(view).cpu()
        if not bool(patches.any()):
            raise ValueError("spatial_grid found no patch with coordinates ≥ 0 in the view")
        xy = coords[patches].float()
        level = grid_levels(coords[patches])
        dist = torch.cdist(xy, xy)
        # a level bonus larger than any distance makes the order level-major, farthest-point within a level
        bonus = level.float() * (float(dist.max()) + 1.0)
        centre = xy.mean(dim=0)
        top = level == level.max()
        first = torch.where(top, (xy - centre).norm(dim=-1), float("inf")).argmin()
        order = greedy_max_min(dist[None], first[None], bonus[None])
        return scores_from_order(order, patches, view.num_keys).expand(b, 1, -1).to(view.key_positions.device)
