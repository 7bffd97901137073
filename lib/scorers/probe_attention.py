"""ZipCache's probe approximation [@zipcache]: normalized attention measured from a few probe queries only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


def probe_rows(num_queries: int, probe_fraction: float, generator: torch.Generator | None = None,
               recent_share: float = 0.5) -> torch.Tensor:
    """Ascending ``(P,)`` indices of the probe queries among ``num_queries`` rows ordered by position.

    ``P = ceil(probe_fraction · num_queries)`` (at least 1): the newest ``ceil(recent_share · P)`` rows plus
    ``P − that`` rows drawn without replacement from the older ones with ``generator``.
    """
    if not 0.0 < probe_fraction <= 1.0:
        raise ValueError(f"probe_fraction must lie in (0, 1], got {probe_fraction}")
    if not 0.0 <= recent_share <= 1.0:
        raise ValueError(f"recent_share must lie in [0, 1], got {recent_share}")
    n_probe = max(1, math.ceil(probe_fraction * num_queries))
    n_recent = math.ceil(recent_share * n_probe)
    older = num_queries - n_recent
    device = torch.device("cpu") if generator is None else generator.device
    drawn = torch.randperm(older, generator=generator, device=device).cpu()[: n_probe - n_recent]
    return torch.cat([drawn, torch.arange(older, num_queries)]).sort().values


@register
@dataclass
class ProbeNormalizedAttention(Scorer):
    """``s_k = Σ_{q ∈ P} a_{q,k} / |{q ∈ P : q sees k}|``: :class:`NormalizedAttention` restricted to probe rows ``P``.

    ZipCache computes the saliency from a small set of probe queries so the rest of the prefill can run in
    FlashAttention, which never materialises attention: a harness then needs to compute only the ``P`` probe rows
    (``softmax(q_P Kᵀ)``, cost ∝ ``P · K``). Here the rows are read from ``view.attention`` so the approximation can be
    compared with the exact score. *(interp.)* Probes = the most recent ``recent_share`` of them plus a seeded random
    share of the older queries (ZipCache's hybrid recent + random choice; the 10% split half and half is a default to
    check against the paper's ablation, not a number the abstract gives); see :func:`probe_rows`. Keys no probe sees
    score 0.

    Parameters:
        probe_fraction: share of the queries used as probes, in (0, 1]; 1 gives the exact normalized attention.
        recent_share: share of the probes taken from the newest queries, in [0, 1].

    Reads ``attention (B, H_q, Q, K)`` with ``query_positions`` (rows ordered by position) and ``view.generator``;
    returns per-query-head ``(B, H_q, K)``.
    """

    name = "normalized_attention_probe"
    needs = frozenset({"attention"})
    probe_fraction: float = 0.1
    recent_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.probe_fraction <= 1.0:
            raise ValueError(f"probe_fraction must lie in (0, 1], got {self.probe_fraction}")
        if not 0.0 <= self.recent_share <= 1.0:
            raise ValueError(f"recent_share must lie in [0, 1], got {self.recent_share}")

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.attention is None or view.query_positions is None:
            raise ValueError("normalized_attention_probe needs attention and query_positions")
        rows = probe_rows(view.attention.shape[-2], self.probe_fraction, view.generator, self.recent_share)
        rows = rows.to(view.attention.device)
        mass = view.attention.index_select(-2, rows).float().sum(dim=-2)
        seen = view.query_positions[rows][:, None] >= view.key_positions[None, :]
        return mass / seen.sum(dim=0).clamp(min=1).to(mass.dtype)
