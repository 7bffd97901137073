"""The acceptance rule shared by every kernel test (FlashAttention's [@flashattention]).

A result computed in a low precision passes when its error against a float64 reference is at most ``ratio`` (2) times
the error of a *control*: the same readable PyTorch reference code run in that same low precision. The control's
error is what the precision itself costs, so the rule says "the kernel loses at most twice what plain PyTorch loses",
and it scales from float16 to float32 without hand-tuned tolerances.

One addition: when the control happens to be exact (exact zeros, e.g. keys no query sees; or a float32 result that
rounds identically), ``2 x 0`` would demand bit-exactness. A floor of ``floor * max(1, max|ref|)`` is added, with
``floor = 1e-6`` by default: about 8 float32 ulps at the reference's scale, far below any float16/bfloat16 control
error and far below the error of any real bug the tests look for.
"""

from __future__ import annotations

import torch

DEFAULT_RATIO = 2.0
DEFAULT_FLOOR = 1e-6


def max_abs_error(reference: torch.Tensor, result: torch.Tensor) -> float:
    """Largest ``|result - reference|`` in float64; ``inf`` when the non-finite entries (e.g. ``-inf`` LSE of rows
    that see no key) differ in position or value, or when the shapes differ."""
    if reference.shape != result.shape:
        return float("inf")
    ref = reference.detach().to(torch.float64)
    res = result.detach().to(device=ref.device, dtype=torch.float64)
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(res)) or not torch.equal(ref[~finite], res[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    return (res[finite] - ref[finite]).abs().max().item()


def tolerance(reference: torch.Tensor, control: torch.Tensor, *, ratio: float = DEFAULT_RATIO,
              floor: float = DEFAULT_FLOOR) -> float:  # fmt: skip
    """The largest error the rule allows: ``ratio * err(control) + floor * max(1, max|ref|)``."""
    ref = reference.detach().to(torch.float64)
    finite = ref[torch.isfinite(ref)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return ratio * max_abs_error(reference, control) + floor * scale


def assert_close_to_reference(
    name: str,
    ref64: torch.Tensor,
    low: torch.Tensor,
    control: torch.Tensor,
    *,
    ratio: float = DEFAULT_RATIO,
    floor: float = DEFAULT_FLOOR,
) -> tuple[float, float]:
    """Assert ``max|low - ref64| <= ratio * max|control - ref64| + floor * max(1, max|ref64|)``.

    Args:
        name: what is compared, for the failure message (e.g. ``"key_mass"``).
        ref64: float64 reference result.
        low: the result under test (kernel or blockwise path run in the low precision).
        control: the readable reference run in the same low precision as ``low``.
    Returns:
        ``(error, allowed)`` so callers can log margins.
    """
    if torch.isfinite(control).logical_not().any() and max_abs_error(ref64, control) == float("inf"):
        raise AssertionError(f"{name}: the control itself disagrees with the reference on non-finite entries")
    error = max_abs_error(ref64, low)
    allowed = tolerance(ref64, control, ratio=ratio, floor=floor)
    if not error <= allowed:
        raise AssertionError(
            f"{name}: max abs error {error:.3e} vs the float64 reference exceeds {ratio:g} x the control's "
            f"{max_abs_error(ref64, control):.3e} + floor {allowed - ratio * max_abs_error(ref64, control):.1e}"
        )
    return error, allowed
