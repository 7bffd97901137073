"""Parameters the KV prefill-compression notebooks share: kept-budget ratios, passkey depths, the protected tokens
and the checks that they fit, and the rule that keeps every observation window (SnapKV's, CAOTE's) protected for
every scorer alike.

As everywhere, no field has a default value here: the defaults live in ``params/<notebook>.yaml``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

import numpy as np

from ..evidence import Part, PartRule, PartSpec, paired_interval
from ..kv_passkey import passkey_runs
from ..params import ModelName, NotebookParams
from ..scorers.spec import ScorerSpec


def _ratios(budgets: list[float]) -> list[float]:
    bad = [b for b in budgets if not 0.0 < b < 1.0]
    if bad:
        raise ValueError(f"every budget must be a ratio in (0, 1) (1 is the uncompressed row), got {bad}")
    return sorted(set(budgets))


def _depths(depths: list[float]) -> list[float]:
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"every depth must lie in [0, 1], got {bad}")
    return depths


#: kept shares of the context, each in (0, 1), sorted
BudgetRatios = Annotated[list[float], Field(min_length=1), AfterValidator(_ratios)]
#: needle depths in [0, 1]
Depths = Annotated[list[float], Field(min_length=1), AfterValidator(_depths)]


class KVParams(NotebookParams):
    """What the KV prefill-compression notebooks share: the model, the protected tokens and the head mode."""

    model: ModelName = Field(description="embedded model name, local folder or Hugging Face id")
    n_sink: int = Field(ge=0, le=1024, description="first context tokens every scorer keeps")
    recent_window: int = Field(ge=0, le=4096, description="last context tokens every scorer keeps; at least every "
                                                          "SnapKV window, so all keep that window alike")
    head_mode: Literal["per_kv_head", "shared"] = Field(description="one kept set per KV head, or one for all")
    batch_size: int = Field(ge=1, le=4096, description="compressed rows fed per forward pass (same cache length)")


class PasskeyParams(KVParams):
    """The KV notebooks with passkey retrieval (:mod:`salience.kv_passkey`): the prompts and the solvability rule."""

    depths: Depths = Field(description="passkey depths in [0, 1]")
    n_passkeys: int = Field(ge=1, le=100, description="passkeys per depth; prompts: depths x passkeys, each in its "
                                                      "own haystack")
    answer_prefix: str = Field(min_length=1, description="fed after the question; the answer is scored after it")
    chat_template: bool = Field(description="lay the prompt out with the tokenizer's chat template (else plain "
                                            "'Question: ... Answer:')")
    solvable_accuracy: float = Field(gt=0.0, le=1.0, description="a passkey cell (mode, budget) counts when the "
                                                                 "oracle answers at least this share of the prompts")

    @property
    def n_prompts(self) -> int:
        return len(self.depths) * self.n_passkeys

    @model_validator(mode="after")
    def _two_prompts(self) -> "PasskeyParams":
        if self.n_prompts < 2:
            raise ValueError("depths x n_passkeys must give at least 2 passkey prompts (the units of a paired "
                             "interval)")
        return self


def run_passkey(model, tokenizer, params: PasskeyParams, scorers, budgets, context_tokens: int):
    """:func:`salience.kv_passkey.passkey_runs` on ``params``' prompts and settings."""
    # imported here: the data package loads `datasets`, which validating parameters does not need
    from ..data.needle import passkey_prompts

    prompts = passkey_prompts(tokenizer, params.depths, params.n_passkeys, context_tokens, seed=params.seed)
    return passkey_runs(model, tokenizer, prompts, scorers, budgets, head_mode=params.head_mode,
                        n_sink=params.n_sink, recent_window=params.recent_window, seed=params.seed,
                        answer_prefix=params.answer_prefix, chat_template=params.chat_template,
                        batch_size=params.batch_size)


def check_protection_fits(budgets: list[float], context_tokens: int, n_sink: int, recent_window: int,
                          passkey: bool = False) -> None:
    """The smallest budget must hold the protected tokens. A passkey context may come out ~10% short (its haystack
    is cut at a sentence end), so its check uses 0.9 × ``context_tokens``."""
    tokens = math.floor(0.9 * context_tokens) if passkey else context_tokens
    smallest = math.ceil(min(budgets) * tokens)
    if n_sink + recent_window > smallest:
        raise ValueError(f"the smallest budget ({min(budgets)} x ~{tokens} tokens = {smallest}) must hold n_sink + "
                         f"recent_window = {n_sink + recent_window} protected tokens")


def check_windows_protected(specs: list[ScorerSpec], recent_window: int) -> None:
    """Every scorer with an observation ``window`` (SnapKV keeps its window first; CAOTE reads its window's rows)
    must have it inside ``recent_window``, so every scorer keeps those tokens too and no scorer gets a protection
    the others lack."""
    windows = {s.key: getattr(s.build(), "window", None) for s in specs}
    wide = [key for key, w in windows.items() if isinstance(w, int) and not isinstance(w, bool) and w > recent_window]
    if wide:
        raise ValueError(f"recent_window ({recent_window}) must be >= the window of {wide}, so every scorer keeps "
                         "the tokens an observation window keeps")


def mean_interval(values, seed: int) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of the finite ``values`` with its 95% bootstrap interval (NaN bounds below 2
    values; equal values give the degenerate interval)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return (float(values.mean()) if values.size else float("nan")), float("nan"), float("nan")
    low, high, _ = paired_interval(values, seed=seed)
    return float(values.mean()), low, high


def not_judged(spec: PartSpec, rule: PartRule, reason: str) -> Part:
    """A part that this run cannot judge (no solvable cell): inconclusive, no units, the reason as its detail."""
    nan = float("nan")
    return Part(id=spec.id, statement=spec.statement, metric=spec.metric, unit=spec.unit,
                higher_is_better=spec.higher_is_better, direction=rule.direction,
                smallest_effect=float(rule.smallest_effect), n=0, effect=nan, ci_low=nan, ci_high=nan,
                confidence=0.95, method="not judged", verdict="inconclusive", papers=list(spec.papers), detail=reason)


__all__ = ["BudgetRatios", "Depths", "KVParams", "PasskeyParams", "check_protection_fits", "check_windows_protected",
           "mean_interval", "not_judged", "run_passkey"]
