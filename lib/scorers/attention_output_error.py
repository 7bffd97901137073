"""CAOTE [@caote]: the eviction error, i.e. how far a query's attention output moves if one key alone is evicted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


@register
@dataclass
class AttentionOutputError(Scorer):
    """CAOTE's score: ``e_k = a_k / (1 − a_k) · ‖v_k − o‖₂`` per query head, averaged over the last ``window`` queries.

    Derivation: ``o = Σ_j a_j v_j``. Evicting ``k`` and renormalising the rest gives
    ``o' = (o − a_k v_k) / (1 − a_k)``, so ``o − o' = a_k (v_k − o) / (1 − a_k)``: the exact change of the output,
    which is zero for a key the query does not see, and small for a heavily attended key whose value equals the output.
    Rows are renormalised by their sum ``S`` (``a_k / (1 − a_k)`` becomes ``a_k / (S − a_k)``, robust to bf16 rows).
    For a key holding over half a row, ``1 − a_k`` and ``v_k − o`` both cancel, so it uses the equal form
    ``e_k = a_k ‖v_k − o'_k‖`` (``o'_k`` the output without ``k``). A key holding all of a query's attention (no other
    visible key) cannot be evicted without emptying the output: it scores ``+inf``. The paper also runs CAOTE as a
    meta-policy on top of H2O, TOVA or SnapKV scores; that combination is not implemented here.

    Parameters:
        window: number of newest queries ≥ 1 whose errors are averaged (clipped to the queries present); 1 is the
            paper's decoding-step rule.

    Reads ``attention (B, H_q, Q, K)`` and ``values (B, H_kv, K, D)``, value head ``h // (H_q / H_kv)`` for query head
    ``h`` (GQA); returns per-query-head ``(B, H_q, K)``.
    """

    name = "caote"
    needs = frozenset({"attention", "values"})
    window: int = 1

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be ≥ 1, got {self.window}")

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.attention is None:
            raise ValueError("caote needs attention (the (B, H, Q, K) matrix); a key_mass summary is not enough")
        if view.values is None:
            raise ValueError("caote needs values")
        a = view.attention[:, :, -self.window :, :].float()  # (B, H_q, w, K)
        h_q, h_kv = a.shape[1], view.values.shape[1]
        if h_q % h_kv:
            raise ValueError(f"{h_q} query heads are not a multiple of {h_kv} KV heads")
        v = view.values.float().repeat_interleave(h_q // h_kv, dim=1)  # (B, H_q, K, D)
        total = a.sum(dim=-1, keepdim=True)
        out = (a @ v) / total  # (B, H_q, w, D)
        # ‖v_k − o‖ one query at a time, so memory stays at one (B, H_q, K, D) difference
        gap = torch.stack([(v - out[:, :, i, None, :]).norm(dim=-1) for i in range(a.shape[2])], dim=2)
        error = a * gap / (total - a).clamp(min=torch.finfo(torch.float32).tiny)
        # a key holding over half a row cancels in both factors: e_k = p_k ‖v_k − o'_k‖, o'_k the output without k
        big = a > total / 2  # at most one per row
        others = a.masked_fill(big, 0.0)
        rest = others.sum(dim=-1, keepdim=True)
        without = (others @ v) / rest.clamp(min=torch.finfo(torch.float32).tiny)
        big_error = (a * big).sum(-1, keepdim=True) / total * (big.float() @ v - without).norm(dim=-1, keepdim=True)
        big_error = torch.where(rest > 0, big_error, torch.inf)
        error = torch.where(big, big_error, torch.where(a > 0, error, 0.0))
        return error.mean(dim=-2)
