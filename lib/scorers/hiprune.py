"""HiPrune [@hiprune]: anchors from a middle (object-centric) layer, their spatial buffers, registers from deep layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register
from .vision_common import all_layers, cls_mask, interleave, layer_attention

STEPS = {4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
         8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))}


@register
@dataclass
class HiPrune(Scorer):
    """An ordering whose top-k holds ``⌈α k⌉`` anchor + buffer tokens and registers for the rest, for every ``k``.

    Attention a token receives at layer ``l``: ``r_l(k) = mean_{h, q} a^{l,h}_{q,k}`` (no [CLS] needed). Anchors are
    taken in descending ``r`` at ``object_layer``, each followed by its buffer (its 4- or 8-neighbours on the patch
    grid, not yet listed); registers in descending ``r`` at ``register_layer``. The two lists are interleaved so that
    after ``k`` picks ``⌈α k⌉`` came from the anchor list (duplicates skipped).

    *(interp.)* HiPrune fixes the budget ``N'`` and takes ``α N'`` anchors + buffers, then ``(1 − α) N'`` registers;
    a scorer does not know ``N'``, so the interleaving reproduces that split at every budget. "Attention" is read as
    attention received averaged over queries and heads, which needs no [CLS] (the paper's selling point).

    Parameters:
        alpha: share of anchor + buffer tokens, in (0, 1] (HiPrune's default 0.1).
        object_layer: index into ``attention_layers`` of the object-centric layer; ``None`` = the middle one
            (``L // 2`` of the ``L`` layers held; HiPrune uses layer 9 of CLIP-L's 24).
        register_layer: index of the deep layer (default ``-1``, the scoring layer).
        neighbourhood: 4 or 8 buffer neighbours.

    Reads ``attention_layers`` and ``patch_coords (K, 2)``; returns ``(B, 1, K)``; [CLS] ranks first.
    """

    name = "hiprune"
    head_layout = "shared"
    needs = frozenset({"attention_layers"})
    alpha: float = 0.1
    object_layer: int | None = None
    register_layer: int = -1
    neighbourhood: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {self.alpha}")
        if self.neighbourhood not in STEPS:
            raise ValueError(f"neighbourhood must be 4 or 8, got {self.neighbourhood}")
        for layer in (self.object_layer, self.register_layer):
            if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
                raise ValueError(f"layer indices must be ints into attention_layers, got {layer!r}")

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.patch_coords is None:
            raise ValueError("hiprune needs patch_coords (buffers are spatial neighbours on the patch grid)")
        obj = len(all_layers(view, self.name)) // 2 if self.object_layer is None else self.object_layer
        received = [layer_attention(view, i, self.name).float().mean(dim=(1, 2)).cpu()
                    for i in (obj, self.register_layer)]
        cls = cls_mask(view).cpu()
        coords = [tuple(c) for c in view.patch_coords.cpu().tolist()]
        where = {c: i for i, c in enumerate(coords) if c[0] >= 0}
        k = view.num_keys
        scores = torch.empty(received[0].shape[0], k)
        for b in range(scores.shape[0]):
            anchors = [i for i in received[0][b].argsort(descending=True).tolist() if not cls[i]]
            listed, anchor_list = set(), []
            for i in anchors:
                row, col = coords[i]
                buffer = [] if row < 0 else [where.get((row + dr, col + dc)) for dr, dc in STEPS[self.neighbourhood]]
                for j in [i, *buffer]:
                    if j is not None and j not in listed:
                        listed.add(j)
                        anchor_list.append(j)
            registers = [i for i in received[1][b].argsort(descending=True).tolist() if not cls[i]]
            order = interleave(anchor_list, registers, self.alpha)
            scores[b] = float(len(order) + 1)  # [CLS]
            scores[b, order] = torch.arange(len(order), 0, -1, dtype=torch.float32)
        return scores.unsqueeze(1).to(view.key_positions.device)
