"""TOVA [@tova] (Token Omission Via Attention): keep the keys the newest query attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


@register
@dataclass
class LastQueryAttention(Scorer):
    """TOVA's score: ``s_k = a_{t,k}``, the attention row of the newest query ``t`` only, per head.

    TOVA re-ranks the cache at every decoding step from the current query alone, so a key is kept exactly as long as
    the newest token still looks at it. (kvpress's ``TOVAPress`` averages the row over heads; here each query head
    keeps its own row, and a harness that wants one ranking averages with ``reduce_to_kv_heads``.)

    Reads ``attention (B, H_q, Q, K)``; the newest query is the row with the largest ``query_positions`` (the last row
    when positions are absent). Returns per-query-head ``(B, H_q, K)``.
    """

    name = "tova"
    needs = frozenset({"attention"})

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.attention is None:
            raise ValueError("tova needs attention (the (B, H, Q, K) matrix); a key_mass summary is not enough")
        row = -1 if view.query_positions is None else int(view.query_positions.argmax())
        return view.attention[:, :, row, :].float()
