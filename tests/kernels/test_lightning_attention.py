"""Lightning Attention-2: masked form, recurrence, blockwise and Triton paths agree under the 2x-the-control rule.

Reference: the O(N^2) masked form in float64 on the low-precision inputs upcast. Control: the same masked form run in
the low precision. The recurrence is checked against the masked form in float64 (two independent formulations).
"""

import pytest
import torch

from salience.kernels import lightning_attention
from salience.kernels.lightning_attention import naive, slopes
from salience.kernels.testing import assert_close_to_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (B, H, N, D, E): lengths off the block grid, N = 1, E != D, several blocks.
SHAPES = [(1, 3, 37, 16, 16), (2, 2, 1, 8, 24), (1, 2, 70, 32, 40), (1, 4, 130, 64, 64)]


def shape_id(shape, dtype_name):
    b, h, n, d, e = shape
    return f"B{b}-H{h}-N{n}-D{d}-E{e}-{dtype_name}"


def make_inputs(shape, dtype, device="cpu", seed=0):
    b, h, n, d, e = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) / d**0.5  # keep |o| moderate for fp16
    k = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, n, e, generator=gen, dtype=torch.float64)
    # Rates from "no decay" (plain causal linear attention) to "forgets within a few tokens".
    decay = torch.linspace(0.0, 2.0, h, dtype=torch.float64)
    return tuple(t.to(dtype).to(device) for t in (q, k, v)) + (decay,)


def check_against_reference(result, q, k, v, decay):
    ref = naive.lightning_attention_masked(q.double().cpu(), k.double().cpu(), v.double().cpu(), decay)
    control = naive.lightning_attention_masked(q.cpu(), k.cpu(), v.cpu(), decay)
    assert result.dtype == q.dtype and result.shape == ref.shape
    assert_close_to_reference("out", ref, result.cpu(), control)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: shape_id(s, "fp64"))
def test_recurrent_and_blockwise_equal_masked_form_in_float64(shape):
    q, k, v, decay = make_inputs(shape, torch.float64)
    masked = lightning_attention(q, k, v, decay, backend="naive")
    torch.testing.assert_close(lightning_attention(q, k, v, decay, backend="recurrent"), masked, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lightning_attention(q, k, v, decay, backend="blockwise", block=16), masked,
                               rtol=1e-10, atol=1e-10)  # fmt: skip


@pytest.mark.parametrize(
    "shape, dtype_name",
    [pytest.param(s, dt, id=shape_id(s, dt)) for s in SHAPES for dt in DTYPES],
)
@pytest.mark.parametrize("block", [16, 64])
def test_blockwise_matches_reference(shape, dtype_name, block):
    q, k, v, decay = make_inputs(shape, DTYPES[dtype_name])
    check_against_reference(lightning_attention(q, k, v, decay, backend="blockwise", block=block), q, k, v, decay)


@pytest.mark.parametrize(
    "shape, dtype_name",
    [pytest.param(s, dt, id=shape_id(s, dt)) for s in SHAPES[:3] for dt in DTYPES]
    + [pytest.param(SHAPES[3], "bf16", id=shape_id(SHAPES[3], "bf16"))],
)
def test_triton_matches_reference(triton_device, shape, dtype_name):
    q, k, v, decay = make_inputs(shape, DTYPES[dtype_name], device=triton_device)
    check_against_reference(lightning_attention(q, k, v, decay, backend="triton"), q, k, v, decay)


def test_triton_block_size_and_strided_inputs(triton_device):
    b, h, n, d = 1, 2, 45, 16
    q, k, v = (torch.randn(b, n, h, d).to(triton_device).transpose(1, 2) for _ in range(3))
    decay = slopes(h)
    result = lightning_attention(q, k, v, decay, backend="triton", block=32)
    check_against_reference(result, q, k, v, decay)


def test_blockwise_gradients_match_masked_form():
    q, k, v, decay = make_inputs((1, 2, 21, 8, 8), torch.float64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    grads_block = torch.autograd.grad(lightning_attention(*inputs, decay, backend="blockwise", block=8).sum(), inputs)
    grads_naive = torch.autograd.grad(lightning_attention(*inputs, decay, backend="naive").sum(), inputs)
    for a, b in zip(grads_block, grads_naive):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_no_decay_is_causal_linear_attention():
    q, k, v, _ = make_inputs((1, 1, 9, 4, 3), torch.float64)
    expected = ((q @ k.transpose(-1, -2)).tril()) @ v
    torch.testing.assert_close(lightning_attention(q, k, v, torch.zeros(1), backend="blockwise", block=4), expected)


def test_slopes_are_alibi_rates():
    assert slopes(8).tolist() == [2.0 ** (-(h + 1)) for h in range(8)]


def test_wrong_kernel_would_fail_the_check():
    """A decay applied one step late (lambda^(t-s+1)) is caught by the rule."""
    q, k, v, decay = make_inputs((1, 3, 37, 16, 16), torch.bfloat16)
    late = naive.lightning_attention_masked(q.double(), k.double(), v.double(), decay)
    late = late * torch.exp(-decay).view(1, 3, 1, 1)
    with pytest.raises(AssertionError):
        check_against_reference(late.to(torch.bfloat16), q, k, v, decay)


def test_bad_arguments_raise():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        lightning_attention(q, q, q, torch.zeros(2), backend="fast")
    with pytest.raises(ValueError, match=r"decay must have shape \[H\]"):
        lightning_attention(q, q, q, torch.zeros(3))
    with pytest.raises(ValueError, match=">= 0"):
        lightning_attention(q, q, q, torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="same shape"):
        lightning_attention(q, torch.randn(1, 2, 6, 8), q, torch.zeros(2))
    with pytest.raises(ValueError, match="block"):
        lightning_attention(q, q, q, torch.zeros(2), backend="blockwise", block=0)


def test_triton_is_forward_only(triton_device):
    q = torch.randn(1, 2, 5, 16, device=triton_device, requires_grad=True)
    with pytest.raises(ValueError, match="forward-only"):
        lightning_attention(q, q, q, torch.zeros(2), backend="triton")
    # "auto" picks the differentiable blockwise path instead.
    lightning_attention(q, q, q, torch.zeros(2)).sum().backward()
    assert q.grad is not None
