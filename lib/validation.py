"""The checks every harness and task runs at its boundary, in one place: token ids, budgets, protection, windows.

A budget is resolved and checked once, where it enters (:func:`checked_budget`): a ratio in (0, 1] or a token count,
NumPy scalars accepted, and the protected tokens (sinks + recent window) must fit it. Every check raises
``ValueError`` naming the valid range, before any forward pass.
"""

from __future__ import annotations

import numbers

import torch

from .scorers.base import Scorer
from .selection import resolve_budget


def plain_number(budget):
    """NumPy scalars (a budget from ``np.linspace`` or ``np.arange``) as Python floats / ints."""
    if isinstance(budget, bool) or isinstance(budget, (int, float)):
        return budget
    if isinstance(budget, numbers.Integral):
        return int(budget)
    if isinstance(budget, numbers.Real):
        return float(budget)
    return budget


def check_ids(ids: torch.Tensor, what: str) -> torch.Tensor:
    """``ids`` itself when it is a ``(1, T)`` tensor with ``T >= 1``; ValueError naming ``what`` otherwise."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be a (1, T) tensor of token ids with T >= 1, got {shape}")
    return ids


def check_protection(n_sink: int, recent_window: int, budget_tokens: int, context_len: int) -> None:
    """``n_sink`` and ``recent_window`` are non-negative, the window fits the context and both fit the budget."""
    if n_sink < 0 or recent_window < 0:
        raise ValueError(f"n_sink and recent_window must be >= 0, got {n_sink} and {recent_window}")
    if recent_window > context_len:
        raise ValueError(f"recent_window ({recent_window}) is longer than the context ({context_len} tokens): "
                         f"use recent_window in [0, {context_len}]")
    if n_sink + recent_window > budget_tokens:
        raise ValueError(f"n_sink ({n_sink}) + recent_window ({recent_window}) exceed the budget of {budget_tokens} "
                         f"tokens: protect at most {budget_tokens} tokens")


def check_protected_fits(protect: torch.Tensor, budget_tokens: int) -> None:
    """The tokens always kept (``protect`` ``(C,)`` bool: sinks, recent window, e.g. a needle span) fit the budget."""
    if int(protect.sum()) > budget_tokens:
        raise ValueError(f"{int(protect.sum())} protected tokens (n_sink, recent_window, protect) exceed the budget "
                         f"of {budget_tokens} tokens: protect at most {budget_tokens}")


def check_scorer_window(scorer: Scorer, prompt_len: int) -> None:
    """A scorer with an int ``window`` (SnapKV, CAOTE) reads at most ``prompt_len`` queries' rows."""
    window = getattr(scorer, "window", None)
    if isinstance(window, int) and not isinstance(window, bool) and window > prompt_len:
        raise ValueError(f"{scorer.name} window ({window}) is longer than the prompt ({prompt_len} tokens): "
                         f"use window in [1, {prompt_len}]")


def checked_budget(budget, context_len: int, *, n_sink: int = 0, recent_window: int = 0) -> int:
    """``budget`` (a ratio in (0, 1] or a token count in [1, ``context_len``], NumPy scalars accepted) as a token
    count, after checking that ``n_sink`` + ``recent_window`` protected tokens fit it and the context."""
    tokens = resolve_budget(plain_number(budget), context_len)
    check_protection(n_sink, recent_window, tokens, context_len)
    return tokens


__all__ = ["check_ids", "check_protected_fits", "check_protection", "check_scorer_window", "checked_budget",
           "plain_number"]
