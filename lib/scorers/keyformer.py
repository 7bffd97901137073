"""Keyformer [@keyformer]: accumulated Gumbel-softmax score, so keys keep a chance after the distribution shifts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register


@register
@dataclass
class Keyformer(Scorer):
    """Keyformer's score: ``s_k = Σ_q softmax_k((log a_{q,k} + g_{q,k}) / τ)``, ``g ~ Gumbel(0, 1)`` i.i.d.

    ``log a`` equals the attention logits up to a per-row constant, which the softmax cancels, so this is the
    Gumbel softmax of the logits. Masked keys (``a = 0``) stay at 0. Noise comes from ``view.generator`` (drawn on the
    generator's device, so a seeded run is reproducible).

    *(interp.)* The abstract names only "a novel score function"; the Gumbel-softmax form is from the paper body and
    its code. There the temperature grows by ``tau_delta`` at each decoding step and the score is summed over the batch
    too; here ``τ`` is fixed and each batch row keeps its own score.

    Parameters:
        tau: temperature > 0; small τ makes each query vote for one sampled key (Gumbel-max), large τ spreads the vote
            evenly over the keys it sees.

    Reads ``attention (B, H_q, Q, K)``; returns per-query-head ``(B, H_q, K)``. Stochastic.
    """

    name = "keyformer"
    needs = frozenset({"attention"})
    tau: float = 1.0

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.attention is None:
            raise ValueError("keyformer needs attention (the (B, H, Q, K) matrix); a key_mass summary is not enough")
        a = view.attention.float()
        device = a.device if view.generator is None else view.generator.device
        u = torch.rand(a.shape, generator=view.generator, device=device).to(a.device)
        tiny = torch.finfo(torch.float32).tiny
        gumbel = -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-7)))
        return torch.softmax((a.log() + gumbel) / self.tau, dim=-1).sum(dim=-2)
