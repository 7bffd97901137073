"""The acceptance helper itself: it passes honest results and rejects wrong ones."""

import pytest
import torch

from salience.kernels.scored_attention import naive
from salience.kernels.testing import assert_close_to_reference, max_abs_error, tolerance


def _attention_outputs(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 16, dtype=torch.float64).to(dtype) for _ in range(3))
    ref = naive.scored_attention(q.double(), k.double(), v.double(), causal=True)
    control = naive.scored_attention(q, k, v, causal=True)
    return ref, control


def test_control_passes_against_itself():
    ref, control = _attention_outputs(torch.bfloat16)
    for r, c in zip(ref, control):
        error, allowed = assert_close_to_reference("x", r, c, c)
        assert error <= allowed


def test_perturbed_output_is_rejected():
    ref, control = _attention_outputs(torch.bfloat16)
    # Three times the control's own error: what a subtly wrong kernel (a missing rescale, a lost block) looks like.
    bad = ref.out + 3 * max_abs_error(ref.out, control.out) * torch.sign(torch.randn_like(ref.out))
    with pytest.raises(AssertionError, match="out"):
        assert_close_to_reference("out", ref.out, bad, control.out)


def test_shifted_key_mass_is_rejected():
    ref, control = _attention_outputs(torch.float16)
    shifted = torch.roll(ref.key_mass, shifts=1, dims=-1)  # an off-by-one in the key index
    with pytest.raises(AssertionError, match="key_mass"):
        assert_close_to_reference("key_mass", ref.key_mass, shifted, control.key_mass)


def test_float32_scale_error_is_rejected():
    ref, control = _attention_outputs(torch.float32)
    with pytest.raises(AssertionError):
        assert_close_to_reference("key_mass", ref.key_mass, ref.key_mass * (1 + 1e-4), control.key_mass)


def test_non_finite_mismatch_is_rejected():
    ref = torch.tensor([0.0, float("-inf"), 1.0], dtype=torch.float64)
    assert max_abs_error(ref, torch.tensor([0.0, float("-inf"), 1.0])) == 0.0
    assert max_abs_error(ref, torch.tensor([0.0, -1e30, 1.0])) == float("inf")
    with pytest.raises(AssertionError):
        assert_close_to_reference("lse", ref, torch.tensor([0.0, 0.0, 1.0]), ref.float())


def test_floor_allows_roundoff_when_the_control_is_exact():
    ref = torch.zeros(4, dtype=torch.float64)
    assert tolerance(ref, ref.float()) == pytest.approx(1e-6)
    assert_close_to_reference("zeros", ref, torch.full((4,), 5e-7), ref.float())
    with pytest.raises(AssertionError):
        assert_close_to_reference("zeros", ref, torch.full((4,), 5e-6), ref.float())


def test_shape_mismatch_is_rejected():
    ref = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(AssertionError):
        assert_close_to_reference("x", ref, torch.zeros(3, 2), ref.float())
