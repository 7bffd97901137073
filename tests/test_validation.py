"""The boundary checks of salience.validation: every one refuses bad input with a message naming the valid range."""

import numpy as np
import pytest
import torch

from salience.validation import (
    check_choice,
    check_ids,
    check_keep,
    check_layer,
    check_pixels,
    check_protection,
    checked_budget,
)


def test_check_choice_names_the_choices():
    check_choice("mean", ("mean", "max"), "reduction")
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'max'\), got 'sum'"):
        check_choice("sum", ("mean", "max"), "reduction")
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\)"):
        check_choice("c", {"a": 1, "b": 2}, "mode")  # a mapping's keys are the choices


def test_checked_budget_resolves_once_and_accepts_numpy_scalars():
    assert checked_budget(0.25, 40) == 10
    assert checked_budget(np.float64(0.25), 40) == 10 and checked_budget(np.int64(7), 40) == 7
    assert checked_budget(7, 40) == checked_budget(checked_budget(7, 40), 40)  # a count passes through unchanged
    with pytest.raises(ValueError, match=r"ratio must lie in \(0, 1\]"):
        checked_budget(1.5, 40)
    with pytest.raises(ValueError, match=r"token budget must lie in \[1, 40\]"):
        checked_budget(41, 40)
    with pytest.raises(ValueError, match="exceed the budget of 4 tokens"):
        checked_budget(4, 40, n_sink=2, recent_window=3)
    with pytest.raises(ValueError, match="recent_window .* is longer than the context"):
        check_protection(0, 50, 60, 40)


def test_check_ids_wants_one_row_of_ids():
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert check_ids(ids, "context_ids") is ids
    for bad in (torch.zeros(2, 3), torch.zeros(3), torch.zeros(1, 0), [[1, 2]]):
        with pytest.raises(ValueError, match="context_ids must be a \\(1, T\\) tensor"):
            check_ids(bad, "context_ids")


def test_vision_checks():
    check_keep(0.1), check_keep(5, 16), check_layer(3, 12)
    with pytest.raises(ValueError, match=r"keep ratio must lie in \(0, 1\]"):
        check_keep(0.0)
    with pytest.raises(ValueError, match=r"patch count must lie in \[1, 16\]"):
        check_keep(17, 16)
    with pytest.raises(ValueError, match="keep must be a ratio"):
        check_keep(True)
    with pytest.raises(ValueError, match=r"pruning layer must be an integer in \[1, 11\]"):
        check_layer(12, 12)
    check_pixels(torch.zeros(1, 3, 28, 28), 14)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        check_pixels(torch.zeros(1, 3, 30, 28), 14)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) tensor"):
        check_pixels(torch.zeros(3, 28, 28), 14)
