"""Faithfulness of token scores: perturb the tokens a scorer ranks highest and watch the model's output.

Every function takes ``predict(input_ids (N, K'), attention_mask (N, K')) → (N,)`` (the model's output for one
example's perturbed variants, e.g. :meth:`AttributionTarget.predictor`; an :class:`AttributionTarget` itself is
accepted and explains each example with its own target), the ``(B, K)`` inputs and the scores ``(B, K)``, ``(B, 1, K)``
or ``(B, H, K)`` (heads averaged) of any registered scorer, and returns a :class:`FaithfulnessResult` whose
:class:`~salience.metrics.Metric` says which direction is better.

Perturbation (:class:`Replacement`): ``"mask"`` replaces a token by a declared baseline token id (checked against the
tokenizer), ``"remove"`` deletes it (the sequence gets shorter, later tokens shift). :func:`across_replacements`
runs a metric under both and says whether they differ.

Top-k: at fraction ``p`` the ``ceil(p · n)`` highest-scoring tokens are perturbed, ``n`` = real (attention-mask 1)
tokens that are not ``protected`` (e.g. [CLS], [SEP], BOS: never perturbed nor counted). Ties go to the earlier
position.

ERASER [@eraser]: comprehensiveness ``= mean_p [f(x) − f(x \\ top_p)]`` (higher: the top tokens mattered),
sufficiency ``= mean_p [f(x) − f(top_p only)]`` (lower: the top tokens suffice), both averaged over the bins
``p ∈ {1, 5, 10, 20, 50} %`` (:data:`ERASER_FRACTIONS`) and then over examples. Deletion / insertion curves
[@rise] read ``f`` after perturbing / keeping the top ``p`` for ``p`` in :data:`CURVE_FRACTIONS`, summarised by the
x-range-normalised area (:func:`salience.metrics.area_under_curve`); the deletion curve starts at ``f(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

from .metrics import Metric, area_under_curve
from .scorers.attribution_target import AttributionTarget, check_token_id
from .validation import check_choice

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: ERASER's bins for AOPC comprehensiveness and sufficiency
ERASER_FRACTIONS = (0.01, 0.05, 0.10, 0.20, 0.50)
#: where deletion and insertion curves are read
CURVE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
REPLACEMENT_MODES = ("mask", "remove")

COMPREHENSIVENESS = Metric("comprehensiveness", False, None, "faithfulness",
                           "ERASER AOPC: mean over bins of f(x) − f(x without the top-k% tokens)")
SUFFICIENCY = Metric("sufficiency", True, None, "faithfulness",
                     "ERASER AOPC: mean over bins of f(x) − f(only the top-k% tokens)")
DELETION_AUC = Metric("deletion_auc", True, None, "faithfulness",
                      "area under f vs share of top tokens perturbed, from f(x) at 0 (x-range normalised)")
INSERTION_AUC = Metric("insertion_auc", False, None, "faithfulness",
                       "area under f vs share of top tokens kept, the rest perturbed (x-range normalised)")
SPEARMAN = Metric("spearman", False, 1.0, "agreement", "Spearman rank correlation between two scorers' token scores")
KENDALL = Metric("kendall", False, 1.0, "agreement", "Kendall's tau-b between two scorers' token scores")
AGREEMENT = {"spearman": SPEARMAN, "kendall": KENDALL}


@dataclass(frozen=True)
class Replacement:
    """How a perturbed token is treated: ``mode="mask"`` puts ``token_id`` in its place, ``"remove"`` deletes it."""

    mode: str
    token_id: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.mode, REPLACEMENT_MODES, "replacement mode")
        if (self.mode == "mask") != (self.token_id is not None):
            raise ValueError("mode 'mask' needs a baseline token_id and 'remove' takes none")

    @property
    def label(self) -> str:
        return f"mask:{self.token_id}" if self.mode == "mask" else "remove"


def replacement(mode: str, token: int | str | None = None, tokenizer=None) -> Replacement:
    """A checked :class:`Replacement`; ``"mask"`` with ``token`` (string or id, default the tokenizer's mask token,
    else its pad token), which must be in the tokenizer's vocabulary."""
    if mode == "mask":
        if token is None:
            token = getattr(tokenizer, "mask_token", None) or getattr(tokenizer, "pad_token", None)
            if token is None:
                raise ValueError("mode 'mask' needs a baseline token: pass token= (and tokenizer= to check it)")
        return Replacement("mask", check_token_id(token, tokenizer))
    return Replacement(mode)


@dataclass(frozen=True)
class FaithfulnessResult:
    """One metric over ``E`` examples: ``value`` (mean), ``per_example (E,)``, and for curves / AOPC the values
    ``curve (E, F)`` of ``f`` at ``fractions`` (the deletion curve's first column is fraction 0, ``f(x)``)."""

    metric: Metric
    value: float
    per_example: np.ndarray
    fractions: tuple[float, ...] = ()
    replacement: str = ""
    curve: np.ndarray | None = field(default=None, repr=False)

    def row(self) -> dict:
        """A table row: the value under the metric's name, plus what it was computed with."""
        return {self.metric.name: self.value, "metric_family": self.metric.family,
                "lower_is_better": self.metric.lower_is_better, "replacement": self.replacement,
                "fractions": ",".join(f"{p:g}" for p in self.fractions), "n_examples": len(self.per_example)}


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """The fractions as a tuple; raises unless each lies in (0, 1]."""
    fractions = tuple(float(p) for p in fractions)
    if not fractions:
        raise ValueError("give at least one fraction in (0, 1]")
    bad = [p for p in fractions if not 0.0 < p <= 1.0 or math.isnan(p)]
    if bad:
        raise ValueError(f"fractions of tokens to perturb must lie in (0, 1], got {bad}")
    return fractions


def _scores_2d(scores: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().float().cpu()
    if scores.dim() == 3:
        scores = scores.mean(dim=1)
    if scores.dim() == 1:
        scores = scores[None]
    if tuple(scores.shape) != shape:
        raise ValueError(f"scores must be (B, K), (B, 1, K) or (B, H, K) for inputs {shape}, got "
                         f"{tuple(scores.shape)}")
    return scores


def _candidates(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                protected: torch.Tensor | None) -> torch.Tensor:
    """``(B, K)`` bool: tokens that may be perturbed; raises when an example has none."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if protected is not None:
        valid = valid & ~torch.as_tensor(protected, dtype=torch.bool).expand_as(valid)
    if input_ids.shape[1] == 0 or bool((valid.sum(dim=1) == 0).any()):
        raise ValueError("an example has no token to perturb (empty text, or every token padding or protected)")
    return valid


def top_tokens(scores: torch.Tensor, candidates: torch.Tensor, fraction: float) -> torch.Tensor:
    """``(K,)`` bool: the ``ceil(fraction · n)`` highest-scoring candidates of one example (ties: earlier first)."""
    n = int(candidates.sum())
    k = math.ceil(fraction * n - 1e-9)
    ranked = torch.where(candidates, scores, torch.tensor(float("-inf")))
    order = torch.argsort(-ranked, stable=True)[:k]
    chosen = torch.zeros_like(candidates)
    chosen[order] = True
    return chosen


def perturb(input_ids: torch.Tensor, attention_mask: torch.Tensor, drop: torch.Tensor,
            how: Replacement) -> tuple[torch.Tensor, torch.Tensor]:
    """One example ``(K,)`` with the ``drop`` tokens masked or removed → ``(ids, mask)`` of length ``K`` or less."""
    if how.mode == "mask":
        return torch.where(drop, torch.tensor(how.token_id), input_ids), attention_mask
    if bool(drop.all()):
        raise ValueError("removing every token leaves an empty input: protect a token (e.g. [CLS] or BOS), use "
                         "fractions below 1, or replacement mode 'mask'")
    return input_ids[~drop], attention_mask[~drop]


def _predictors(predict: Predict | AttributionTarget, batch: int) -> list[Predict]:
    if isinstance(predict, AttributionTarget):
        return [predict.predictor(e) for e in range(batch)]
    return [predict] * batch


def _evaluate(predict: Predict, variants: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """``f`` of each ``(ids (K',), mask (K',))`` variant, batching those of equal length."""
    out = np.zeros(len(variants))
    by_length: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(variants):
        by_length.setdefault(int(ids.shape[0]), []).append(i)
    for rows in by_length.values():
        ids = torch.stack([variants[i][0] for i in rows])
        mask = torch.stack([variants[i][1] for i in rows])
        with torch.no_grad():
            out[rows] = torch.as_tensor(predict(ids, mask)).detach().float().cpu().numpy().reshape(-1)
    return out


def _curves(predict, input_ids, scores, how: Replacement, fractions, attention_mask, protected,
            keep_top: bool, with_original: bool) -> np.ndarray:
    """``(B, F)`` (``F + 1`` with the original first) values of ``f`` with the top tokens perturbed, or kept."""
    input_ids = torch.as_tensor(input_ids).cpu()
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask).cpu()
    if mask.dim() == 1:
        mask = mask[None]
    candidates = _candidates(input_ids, mask, None if protected is None else torch.as_tensor(protected).cpu())
    if isinstance(predict, AttributionTarget) and how.mode == "mask":
        check_token_id(how.token_id, vocab_size=predict.model.get_input_embeddings().weight.shape[0])
    scores = _scores_2d(scores, tuple(input_ids.shape))
    rows = []
    for example, predict_one in enumerate(_predictors(predict, input_ids.shape[0])):
        ids, m, cand = input_ids[example], mask[example], candidates[example]
        padding = ~m.bool()
        variants = [(ids[~padding], m[~padding])] if with_original else []
        for p in fractions:
            top = top_tokens(scores[example], cand, p)
            drop = (cand & ~top) if keep_top else top
            variants.append(perturb(ids[~padding], m[~padding], drop[~padding], how))
        rows.append(_evaluate(predict_one, variants))
    return np.stack(rows)


def comprehensiveness(predict: Predict | AttributionTarget, input_ids, scores, how: Replacement, *,
                      fractions: Sequence[float] = ERASER_FRACTIONS, attention_mask=None,
                      protected=None) -> FaithfulnessResult:
    """ERASER AOPC comprehensiveness: ``mean_p f(x) − f(x with the top p perturbed)`` (higher is better)."""
    fractions = check_fractions(fractions)
    values = _curves(predict, input_ids, scores, how, fractions, attention_mask, protected, False, True)
    per_example = (values[:, :1] - values[:, 1:]).mean(axis=1)
    return FaithfulnessResult(COMPREHENSIVENESS, float(per_example.mean()), per_example, fractions, how.label, values)


def sufficiency(predict: Predict | AttributionTarget, input_ids, scores, how: Replacement, *,
                fractions: Sequence[float] = ERASER_FRACTIONS, attention_mask=None,
                protected=None) -> FaithfulnessResult:
    """ERASER AOPC sufficiency: ``mean_p f(x) − f(only the top p, the rest perturbed)`` (lower is better)."""
    fractions = check_fractions(fractions)
    values = _curves(predict, input_ids, scores, how, fractions, attention_mask, protected, True, True)
    per_example = (values[:, :1] - values[:, 1:]).mean(axis=1)
    return FaithfulnessResult(SUFFICIENCY, float(per_example.mean()), per_example, fractions, how.label, values)


def deletion_curve(predict: Predict | AttributionTarget, input_ids, scores, how: Replacement, *,
                   fractions: Sequence[float] = CURVE_FRACTIONS, attention_mask=None,
                   protected=None) -> FaithfulnessResult:
    """``f`` as the top tokens are perturbed, from ``f(x)`` at 0; its normalised area (lower: faster drop, better).
    ``curve`` is ``(B, F + 1)`` over ``(0, *fractions)``."""
    fractions = check_fractions(fractions)
    values = _curves(predict, input_ids, scores, how, fractions, attention_mask, protected, False, True)
    xs = (0.0, *fractions)
    per_example = np.array([area_under_curve(xs, row) for row in values])
    return FaithfulnessResult(DELETION_AUC, float(per_example.mean()), per_example, xs, how.label, values)


def insertion_curve(predict: Predict | AttributionTarget, input_ids, scores, how: Replacement, *,
                    fractions: Sequence[float] = CURVE_FRACTIONS, attention_mask=None,
                    protected=None) -> FaithfulnessResult:
    """``f`` with only the top tokens kept (the rest perturbed); its normalised area (higher: faster recovery).
    Needs at least two fractions; ``curve`` is ``(B, F)``."""
    fractions = check_fractions(fractions)
    if len(set(fractions)) < 2:
        raise ValueError("an insertion curve needs at least two distinct fractions")
    values = _curves(predict, input_ids, scores, how, fractions, attention_mask, protected, True, False)
    per_example = np.array([area_under_curve(fractions, row) for row in values])
    return FaithfulnessResult(INSERTION_AUC, float(per_example.mean()), per_example, fractions, how.label, values)


def across_replacements(metric_fn: Callable[..., FaithfulnessResult], predict, input_ids, scores,
                        replacements: Sequence[Replacement], *, tolerance: float = 1e-6,
                        **kwargs) -> tuple[list[FaithfulnessResult], bool]:
    """Run ``metric_fn`` under each replacement; ``(results, differ)`` with ``differ`` True when any two values are
    more than ``tolerance`` apart (then report every result, not one)."""
    if not replacements:
        raise ValueError("give at least one replacement")
    results = [metric_fn(predict, input_ids, scores, how, **kwargs) for how in replacements]
    values = [r.value for r in results]
    return results, bool(max(values) - min(values) > tolerance)


def rank_agreement(scores_a, scores_b, method: str = "spearman", *, attention_mask=None,
                   protected=None) -> FaithfulnessResult:
    """Rank correlation between two scorers' token scores, per example over its real, unprotected tokens, then
    averaged. ``method``: ``spearman`` or ``kendall`` (tau-b). An example where either ranking is constant gives NaN
    and is left out of the mean (``per_example`` keeps the NaN)."""
    if method not in AGREEMENT:
        raise ValueError(f"method must be one of {tuple(AGREEMENT)}, got {method!r}")
    a = torch.as_tensor(scores_a).detach().float().cpu()
    a = a.mean(dim=1) if a.dim() == 3 else (a[None] if a.dim() == 1 else a)
    b = _scores_2d(scores_b, tuple(a.shape))
    valid = torch.ones(a.shape, dtype=torch.bool)
    if attention_mask is not None:
        valid &= torch.as_tensor(attention_mask).cpu().bool().reshape(a.shape)
    if protected is not None:
        valid &= ~torch.as_tensor(protected, dtype=torch.bool).cpu().expand_as(valid)
    correlate = stats.spearmanr if method == "spearman" else stats.kendalltau
    per_example = []
    for row_a, row_b, keep in zip(a, b, valid):
        if int(keep.sum()) < 2:
            per_example.append(float("nan"))
            continue
        x, y = row_a[keep].numpy(), row_b[keep].numpy()
        constant = np.ptp(x) == 0 or np.ptp(y) == 0
        per_example.append(float("nan") if constant else float(correlate(x, y)[0]))
    per_example = np.array(per_example)
    value = float(np.nanmean(per_example)) if np.isfinite(per_example).any() else float("nan")
    return FaithfulnessResult(AGREEMENT[method], value, per_example)


__all__ = ["COMPREHENSIVENESS", "CURVE_FRACTIONS", "DELETION_AUC", "ERASER_FRACTIONS", "FaithfulnessResult",
           "INSERTION_AUC", "KENDALL", "REPLACEMENT_MODES", "Replacement", "SPEARMAN", "SUFFICIENCY",
           "across_replacements", "check_fractions", "comprehensiveness", "deletion_curve", "insertion_curve",
           "perturb", "rank_agreement", "replacement", "sufficiency", "top_tokens"]
