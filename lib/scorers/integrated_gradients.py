"""Integrated gradients [@integrated_gradients] on the input embeddings, through captum's ``IntegratedGradients``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from captum.attr import IntegratedGradients as CaptumIntegratedGradients

from ..validation import check_choice
from .base import AttentionView, Scorer, register
from .explanation_common import REDUCTIONS, reduce_embedding_dim, require_target

BASELINES = ("zeros", "token")
#: captum's quadrature rules for the path integral
METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


@register
@dataclass
class IntegratedGradients(Scorer):
    """``s_k = reduce_d((e_k − e'_k) ⊙ ∫₀¹ ∂f/∂e_k(e' + α(e − e')) dα)`` along the straight path from a baseline
    ``e'`` to the input embeddings ``e``.

    Completeness: with ``reduce="sum"`` the scores sum to ``f(e) − f(e')`` up to the quadrature error, which falls
    as ``n_steps`` grows (tests/test_attribution.py checks it). On pre-RMSNorm models (Llama, SmolLM2) the zero
    baseline makes the integrand spike next to the baseline (``RMSNorm(αe)`` jumps from 0 to its full value within
    ``α ≈ √eps / rms(e)``), which no practical ``n_steps`` resolves: use ``baseline="token"`` there.

    Parameters:
        n_steps: quadrature points along the path.
        method: captum's rule, one of :data:`METHODS`.
        baseline: ``zeros`` (the zero embedding at every position; positions and segments are still added inside
            the model) or ``token`` (every position holds the target's ``baseline_token_id``, e.g. ``[MASK]``).
        internal_batch_size: rows per forward pass (``None``: all ``n_steps · B`` at once).
        reduce: ``sum`` (signed, completeness holds) or ``l2``.
        completeness_tolerance: warn when ``|Σ s − (f(e) − f(e'))|`` exceeds this share of ``|f(e) − f(e')|``
            (captum's convergence delta; deep LMs can need hundreds of steps); ``None`` skips the check.

    Reads the attribution target; returns ``(B, 1, K)``.
    """

    name = "integrated_gradients"
    head_layout = "shared"
    needs = frozenset({"model", "gradients"})
    n_steps: int = 50
    method: str = "gausslegendre"
    baseline: str = "zeros"
    internal_batch_size: int | None = None
    reduce: str = "sum"
    completeness_tolerance: float | None = 0.05

    def __post_init__(self) -> None:
        if self.completeness_tolerance is not None and self.completeness_tolerance <= 0:
            raise ValueError(f"completeness_tolerance must be > 0 or None, got {self.completeness_tolerance}")
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be ≥ 1, got {self.n_steps}")
        check_choice(self.method, METHODS, "method")
        check_choice(self.baseline, BASELINES, "baseline")
        check_choice(self.reduce, REDUCTIONS, "reduce")

    def score(self, view: AttentionView) -> torch.Tensor:
        target = require_target(view, self.name, gradients=True)
        baseline = (torch.zeros_like(target.embeddings) if self.baseline == "zeros"
                    else target.baseline_embeddings(self.name))
        attributions, delta = CaptumIntegratedGradients(target.forward).attribute(
            target.embeddings.clone(), baselines=baseline, additional_forward_args=(target.attention_mask,),
            n_steps=self.n_steps, method=self.method, internal_batch_size=self.internal_batch_size,
            return_convergence_delta=True)
        if self.completeness_tolerance is not None:
            self._check_completeness(target, baseline, delta.detach())
        return reduce_embedding_dim(attributions.detach(), self.reduce)

    def _check_completeness(self, target, baseline: torch.Tensor, delta: torch.Tensor) -> None:
        with torch.no_grad():
            gap = (target.forward(target.embeddings, target.attention_mask)
                   - target.forward(baseline, target.attention_mask)).abs()
        worst = float((delta.abs() / gap.clamp_min(1e-12)).max())
        if worst > self.completeness_tolerance:
            warnings.warn(f"integrated_gradients: attributions miss completeness by {worst:.0%} of f(x) − "
                          f"f(baseline) (tolerance {self.completeness_tolerance:.0%}); raise n_steps (now "
                          f"{self.n_steps}) or choose a baseline closer to the input", stacklevel=4)
