"""The checks every harness and task runs at its boundary, in one place: choices, token ids, budgets, protection,
windows, and the vision harness's kept shares, pruning layers and pixel tensors.

A budget is resolved and checked once, where it enters (:func:`checked_budget`): a ratio in (0, 1] or a token count,
NumPy scalars accepted, and the protected tokens (sinks + recent window) must fit it. Every check raises
``ValueError`` naming the valid range, before any forward pass.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import torch

from .selection import resolve_budget

if TYPE_CHECKING:  # the scorers import this module for check_choice
    from .scorers.base import Scorer


def check_choice(value, allowed, what: str) -> None:
    """``value`` is one of ``allowed``; ValueError naming ``what`` and the choices otherwise."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {tuple(allowed)}, got {value!r}")


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


def check_keep(keep: float | int, n_patches: int | None = None) -> None:
    """A kept share must be a ratio in (0, 1] (or, with ``n_patches``, a patch count in [1, n_patches])."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep must be a ratio in (0, 1] or a patch count, got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep ratio must lie in (0, 1], got {keep}")
    elif keep < 1 or (n_patches is not None and keep > n_patches):
        raise ValueError(f"keep as a patch count must lie in [1, {n_patches or 'number of patches'}] (a ratio in "
                         f"(0, 1] otherwise), got {keep}")


def check_layer(layer: int, depth: int) -> None:
    """Reduction happens after block ``layer``; at least one block must run on the reduced tokens."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth - 1:
        raise ValueError(f"pruning layer must be an integer in [1, {depth - 1}] for this {depth}-layer model "
                         f"(reduce after block l, blocks l+1..{depth} run on the kept tokens), got {layer!r}")


def check_pixels(pixel_values, patch: int) -> None:
    """``pixel_values`` is a ``(B, C, H, W)`` tensor whose height and width are multiples of the patch size."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a (B, C, H, W) tensor, got {got}")
    h, w = pixel_values.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {patch}")


__all__ = ["check_choice", "check_ids", "check_keep", "check_layer", "check_pixels", "check_protected_fits",
           "check_protection", "check_scorer_window", "checked_budget", "plain_number"]
