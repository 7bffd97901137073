"""FlowCut [@flowcut]: importance from the information that flows to [CLS] across layers, not one layer's attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register
from .vision_common import all_layers, cls_mask, cls_rows


@register
@dataclass
class FlowCut(Scorer):
    """``s_k = (Σ_l c_l · p_l(k)) / Σ_l c_l · ‖v_k‖``, ``p_l`` the [CLS] row at layer ``l``, ``c_l`` its concentration.

    ``p_l(k) = mean_h a^{l,h}_{[CLS],k}`` over the non-[CLS] keys, renormalised to sum 1; ``c_l = 1 − H(p_l) / log n``
    (``n`` non-[CLS] keys) is 0 for a uniform row and 1 for a one-hot row.

    *(interp.)* The paper states three ideas: information flow across layers instead of single-layer attention,
    [CLS] as the relay (every patch's contribution reaches the output through it), and redundancy that emerges as
    attention concentrates layer by layer. Here: flow = [CLS] attention accumulated over layers, each layer weighted by
    how concentrated its [CLS] row is (diffuse early layers say little about what to drop), times the value norm
    ``mean_h ‖v_k‖₂`` at the scoring layer, since what a key sends along an edge is ``a · v``, not ``a`` alone. The
    paper's exact weights and its per-layer adaptive ratio are not reproduced; check against its code before relying
    on the numbers.

    Parameters:
        value_weighted: multiply by the value norm (needs ``values``); False gives the attention-only flow.
        concentration_weighted: weight layers by ``c_l``; False gives the plain mean over layers (VTC-CLS-like).

    Reads ``attention_layers`` (``attention`` alone counts as one layer), ``roles["cls"]`` and optionally
    ``values (B, H, K, D)``; returns ``(B, 1, K)``. [CLS] scores the maximum (it is the relay; the harness keeps it).
    """

    name = "flowcut"
    head_layout = "shared"
    needs = frozenset({"attention_layers", "values"})
    requires_roles = frozenset({"cls"})
    value_weighted: bool = True
    concentration_weighted: bool = True

    def __post_init__(self) -> None:
        for field_name in ("value_weighted", "concentration_weighted"):
            if not isinstance(getattr(self, field_name), bool):
                raise ValueError(f"{field_name} must be True or False, got {getattr(self, field_name)!r}")
        self.needs = frozenset({"attention_layers", "values"} if self.value_weighted else {"attention_layers"})

    def score(self, view: AttentionView) -> torch.Tensor:
        cls = cls_mask(view)
        patches = ~cls
        n = int(patches.sum())
        if n == 0:
            raise ValueError("flowcut needs at least one non-[CLS] key")
        total, weight, plain, layers = 0.0, 0.0, 0.0, 0
        for a in all_layers(view, self.name):
            row = cls_rows(view, a, self.name).mean(dim=1)[:, patches.to(a.device)]  # (B, n)
            p = row / row.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
            if self.concentration_weighted and n > 1:
                entropy = -(p * p.clamp(min=1e-30).log()).sum(dim=-1, keepdim=True)
                c = 1.0 - entropy / math.log(n)
            else:
                c = torch.ones_like(p[:, :1])
            total, weight, plain, layers = total + c * p, weight + c, plain + p, layers + 1
        # every row uniform: no layer is informative, fall back to the plain mean
        flow = torch.where(weight > 1e-12, total / weight.clamp(min=1e-12), plain / layers)
        if self.value_weighted:
            if view.values is None:
                raise ValueError("flowcut with value_weighted=True needs values in the view")
            flow = flow * view.values.float().norm(dim=-1).mean(dim=1)[:, patches.to(flow.device)]
        scores = torch.empty(flow.shape[0], view.num_keys, device=flow.device)
        scores[:, patches.to(flow.device)] = flow
        scores[:, cls.to(flow.device)] = flow.max(dim=-1, keepdim=True).values + 1.0
        return scores.unsqueeze(1)
