"""KV-cache eviction scores read as attributions: the bridge between the KV family and the explanation family.

A KV scorer ranks the context's cache entries per layer and head (``(layers, H, C)``, what
:func:`~salience.harness.kv_prefill.shared_prefill` hands :func:`~salience.harness.kv_prefill_compression.compress_shared`).
Read as an explanation of what the model does next, the same scores become one score per context token
(:func:`token_attribution`), and the explained quantity is the log-probability of the continuation that eviction is
measured on (:func:`continuation_target`: the mean over the continuation's tokens, teacher-forced, given the context).
ERASER's AOPC then asks whether masking or removing a scorer's top tokens from the *input* hurts that
log-probability (comprehensiveness) and whether its top tokens alone keep it (sufficiency), while eviction asks the
same of the *cache*. :func:`faithfulness_rows` scores every method of one document with a cache of the variants it
evaluates, so methods sharing a perturbation pay for one forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata, spearmanr

from . import faithfulness
from .explanation_tasks import CachedPredictor
from .scorers.attribution_target import AttributionTarget, attribution_target
from .validation import check_choice

#: how per-layer, per-head scores become one score per token: the mean over layers and heads of each token's rank
#: share (scale-free: a layer with large raw scores does not outvote the others), or of the raw scores
AGGREGATES = ("rank_mean", "score_mean")


def token_attribution(scores: torch.Tensor, how: str = "rank_mean") -> torch.Tensor:
    """``(layers, H, C)`` (or ``(H, C)``, ``(C,)``) scores → ``(C,)`` one score per context token (higher: more
    important). ``rank_mean``: each layer-head's scores become average ranks scaled to [0, 1] (ties share a rank),
    then averaged; ``score_mean``: the raw scores averaged."""
    check_choice(how, AGGREGATES, "aggregate")
    scores = torch.as_tensor(scores).detach().float().cpu()
    if scores.dim() == 0 or scores.shape[-1] < 1:
        raise ValueError(f"scores must end in a token axis, got shape {tuple(scores.shape)}")
    flat = scores.reshape(-1, scores.shape[-1]).numpy().astype(np.float64)
    if not np.isfinite(flat).all():
        raise ValueError("scores hold NaN or infinity: a token attribution needs finite scores")
    if how == "score_mean":
        return torch.from_numpy(flat.mean(0))
    c = flat.shape[-1]
    ranks = (rankdata(flat, axis=-1) - 1.0) / max(c - 1, 1)
    return torch.from_numpy(ranks.mean(0))


def continuation_readout(continuation: torch.Tensor):
    """``readout(outputs, attention_mask) → (N,)``: the mean log-probability of the ``continuation`` tokens
    ``(M,)`` at the end of each (unpadded) variant, each predicted from the row before it."""
    continuation = torch.as_tensor(continuation).reshape(-1)
    m = continuation.numel()
    if m < 1:
        raise ValueError("the continuation is empty: there is nothing to explain")

    def readout(outputs, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = outputs.logits[:, -(m + 1):-1].float()
        targets = continuation.to(logits.device).expand(logits.shape[0], m)
        return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1).mean(-1)
    return readout


def continuation_target(model: torch.nn.Module, tokenizer, context: torch.Tensor, continuation: torch.Tensor, *,
                        baseline_token: str) -> AttributionTarget:
    """The attribution target of one document: ``[context; continuation]`` read out as the continuation's mean
    log-probability (the continuation is never perturbed: see :func:`protected_positions`)."""
    context, continuation = torch.as_tensor(context).reshape(1, -1), torch.as_tensor(continuation).reshape(1, -1)
    ids = torch.cat([context, continuation], dim=1)
    # only the rows predicting the continuation are projected onto the vocabulary (logits_to_keep)
    return attribution_target(model, ids, tokenizer=tokenizer, readout=continuation_readout(continuation[0]),
                              baseline_token=baseline_token,
                              model_kwargs={"logits_to_keep": continuation.shape[1] + 1})


def protected_positions(context_len: int, continuation_len: int, *, n_sink: int, recent_window: int) -> torch.Tensor:
    """``(1, C + M)`` bool: what no ranking may perturb: the continuation (the explained output), and the context's
    first ``n_sink`` and last ``recent_window`` tokens, which eviction keeps whatever the scorer says; so the input
    perturbations and the cache evictions choose among the same tokens."""
    if n_sink + recent_window >= context_len:
        raise ValueError(f"n_sink + recent_window ({n_sink + recent_window}) leave no context token of "
                         f"{context_len} to rank")
    mask = torch.zeros(1, context_len + continuation_len, dtype=torch.bool)
    mask[0, :n_sink] = True
    mask[0, context_len - recent_window:] = True
    return mask


def faithfulness_rows(target: AttributionTarget, attributions: Mapping[str, torch.Tensor], protected: torch.Tensor,
                      replacements: Mapping[str, faithfulness.Replacement], fractions: Sequence[float],
                      **columns) -> list[dict]:
    """AOPC comprehensiveness and sufficiency of every method's ``(C,)`` context attribution on one document, under
    every replacement: one dict per method × replacement (plus ``columns``, e.g. the document id)."""
    k = target.input_ids.shape[1]
    predict = CachedPredictor(target)
    rows = []
    for method, scores in attributions.items():
        scores = torch.as_tensor(scores).float().reshape(-1)
        full = torch.zeros(1, k)
        full[0, :scores.numel()] = scores  # the continuation's positions are protected: their score is never read
        for label, how in replacements.items():
            comp = faithfulness.comprehensiveness(predict, target.input_ids, full, how, fractions=fractions,
                                                  attention_mask=target.attention_mask, protected=protected)
            suff = faithfulness.sufficiency(predict, target.input_ids, full, how, fractions=fractions,
                                            attention_mask=target.attention_mask, protected=protected)
            rows.append(dict(**columns, method=method, replacement=label,
                             comprehensiveness=float(comp.per_example[0]), sufficiency=float(suff.per_example[0]),
                             f_full=float(comp.curve[0, 0])))
    return rows


def rank_correlation_per_unit(x: pd.DataFrame, y: pd.DataFrame) -> pd.Series:
    """Per unit (row), Spearman's ρ across the methods (columns) of ``x`` and ``y`` (units × methods, the same
    labels); NaN where either is constant over the methods."""
    if list(x.index) != list(y.index) or list(x.columns) != list(y.columns):
        raise ValueError("x and y must have the same units and methods in the same order")
    if x.shape[1] < 3:
        raise ValueError(f"a rank correlation across methods needs at least 3 methods, got {x.shape[1]}")
    out = {}
    for unit in x.index:
        a, b = x.loc[unit].to_numpy(float), y.loc[unit].to_numpy(float)
        out[unit] = float("nan") if np.ptp(a) == 0 or np.ptp(b) == 0 else float(spearmanr(a, b).statistic)
    return pd.Series(out, name="rho")


__all__ = ["AGGREGATES", "continuation_readout", "continuation_target", "faithfulness_rows", "protected_positions",
           "rank_correlation_per_unit", "token_attribution"]
