"""Scored attention: every path against the float64 reference, with flash-attention's 2x-the-control rule.

For each case the inputs are drawn once in the low precision; the reference is the naive path on those same values
upcast to float64, the control is the naive path in the low precision, and the path under test must stay within
``2 x error(control)`` (plus a 1e-6 floor, see ``salience.kernels.testing``) on ``out``, ``lse`` and ``key_mass``.
"""

import pytest
import torch

from salience.kernels import scored_attention
from salience.kernels.scored_attention import blockwise, naive, pick_backend, sdpa_rows
from salience.kernels.scored_attention.common import causal_visible_counts
from salience.kernels.testing import assert_close_to_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = ("out", "lse", "key_mass")

# (B, H_q, H_kv, N_q, N_k, D): lengths off the block grid, length 1, decoding (N_q = 1 < N_k), N_q < N_k, GQA 9/3.
SHAPES = [
    (1, 9, 3, 37, 37, 16),
    (2, 4, 2, 1, 1, 32),
    (1, 4, 4, 130, 130, 64),
    (2, 6, 2, 17, 300, 16),
    (1, 2, 1, 1, 77, 32),
]
MASSES = {"all": dict(mass="all"), "window8": dict(mass="window", window=8), "row0": dict(mass="row", row=0),
          "row-last": dict(mass="row")}  # fmt: skip


def shape_id(shape, causal, dtype_name):
    b, hq, hkv, nq, nk, d = shape
    return f"B{b}-Hq{hq}-Hkv{hkv}-Nq{nq}-Nk{nk}-D{d}-{'causal' if causal else 'full'}-{dtype_name}"


def make_inputs(shape, dtype, device="cpu", seed=0, dv=None):
    b, hq, hkv, nq, nk, d = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, dv or d, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype).to(device) for t in (q, k, v))


def check_against_reference(result, q, k, v, **kwargs):
    """Assert the 2x rule for all three outputs of ``result`` (computed from the low-precision q, k, v)."""
    ref = naive.scored_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), **kwargs)
    control = naive.scored_attention(q.cpu(), k.cpu(), v.cpu(), **kwargs)
    for name, r, c, x in zip(NAMES, ref, control, result):
        assert x.shape == r.shape, name
        assert_close_to_reference(name, r, x.cpu(), c)


GRID = [
    pytest.param(shape, causal, dt, id=shape_id(shape, causal, dt))
    for shape in SHAPES
    for causal in (True, False)
    for dt in DTYPES
]


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("mass_id", list(MASSES))
@pytest.mark.parametrize("shape, causal, dtype_name", GRID)
def test_blockwise_matches_reference(shape, causal, dtype_name, mass_id, normalize):
    q, k, v = make_inputs(shape, DTYPES[dtype_name])
    kwargs = dict(causal=causal, normalize=normalize, **MASSES[mass_id])
    # block=16: every length above is off the block grid and most span several blocks.
    check_against_reference(blockwise.scored_attention(q, k, v, block=16, **kwargs), q, k, v, **kwargs)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_blockwise_default_block_and_gqa_reduction(dtype_name):
    q, k, v = make_inputs((1, 9, 3, 200, 260, 32), DTYPES[dtype_name], seed=1)
    kwargs = dict(causal=True, mass="window", window=50, normalize=True, reduce_gqa=True)
    result = scored_attention(q, k, v, backend="blockwise", **kwargs)
    assert result.key_mass.shape == (1, 3, 260)
    check_against_reference(result, q, k, v, **kwargs)


TRITON_CASES = [
    pytest.param((1, 9, 3, 37, 37, 16), True, "fp16", dict(mass="all"), id="B1-Hq9-Hkv3-Nq37-Nk37-D16-causal-fp16-all"),
    pytest.param((1, 9, 3, 37, 37, 16), False, "bf16", dict(mass="window", window=8, normalize=True),
                 id="B1-Hq9-Hkv3-Nq37-Nk37-D16-full-bf16-window8-normalized"),
    pytest.param((2, 2, 1, 5, 40, 24), True, "fp32", dict(mass="all", normalize=True, reduce_gqa=True),
                 id="B2-Hq2-Hkv1-Nq5-Nk40-D24-causal-fp32-all-normalized-gqasum"),
    pytest.param((1, 2, 2, 1, 20, 16), True, "bf16", dict(mass="row"), id="B1-Hq2-Hkv2-Nq1-Nk20-D16-causal-bf16-row"),
    pytest.param((1, 4, 2, 20, 45, 32), False, "fp16", dict(mass="row", row=3, normalize=True),
                 id="B1-Hq4-Hkv2-Nq20-Nk45-D32-full-fp16-row3-normalized"),
    pytest.param((1, 4, 2, 33, 33, 64), True, "bf16", dict(mass="window", window=20),
                 id="B1-Hq4-Hkv2-Nq33-Nk33-D64-causal-bf16-window20"),
]  # fmt: skip


@pytest.mark.parametrize("shape, causal, dtype_name, options", TRITON_CASES)
def test_triton_matches_reference(triton_device, shape, causal, dtype_name, options):
    q, k, v = make_inputs(shape, DTYPES[dtype_name], device=triton_device)
    result = scored_attention(q, k, v, causal=causal, backend="triton", **options)
    check_against_reference(result, q, k, v, causal=causal, **options)


def test_triton_takes_strided_inputs_and_value_dim(triton_device):
    # transformers hands over transposed views ([B, N, H, D] storage); D_v may differ from D.
    b, h, n, d = 1, 4, 21, 16
    q, k, v = (torch.randn(b, n, h, d).to(torch.float16).to(triton_device).transpose(1, 2) for _ in range(3))
    v = torch.randn(b, h, n, 24).to(torch.float16).to(triton_device)
    assert not q.is_contiguous()
    result = scored_attention(q, k, v, causal=True, backend="triton")
    check_against_reference(result, q, k, v, causal=True)


def test_paths_agree_in_float64():
    q, k, v = make_inputs((2, 6, 2, 19, 50, 16), torch.float64, seed=3)
    for kwargs in (dict(causal=True), dict(causal=False, mass="window", window=4, normalize=True, reduce_gqa=True)):
        a = scored_attention(q, k, v, backend="naive", **kwargs)
        b = scored_attention(q, k, v, backend="blockwise", **kwargs)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_key_mass_semantics():
    q, k, v = make_inputs((1, 2, 1, 6, 10, 8), torch.float64)
    full = scored_attention(q, k, v, causal=True, backend="blockwise")
    # Each query's probabilities sum to one, so mass over all queries sums to N_q per head.
    torch.testing.assert_close(full.key_mass.sum(-1), torch.full((1, 2), 6.0, dtype=torch.float64))
    # End-aligned causal mask: query i sits at key position N_k - N_q + i = 4 + i, so query 0 sees keys 0..4.
    row0 = scored_attention(q, k, v, causal=True, mass="row", row=0, backend="blockwise")
    assert (row0.key_mass[..., 5:] == 0).all() and (row0.key_mass[..., :5] > 0).all()
    # Normalised mass divides by the number of queries that see each key: keys 0..4 by 6, key 9 by 1.
    counts = causal_visible_counts(6, 10, 0, 6)
    assert counts.tolist() == [6, 6, 6, 6, 6, 5, 4, 3, 2, 1]
    normed = scored_attention(q, k, v, causal=True, normalize=True, backend="blockwise")
    torch.testing.assert_close(normed.key_mass, full.key_mass / counts)
    # GQA reduction is a sum over the query heads of a group.
    summed = scored_attention(q, k, v, causal=True, reduce_gqa=True, backend="blockwise")
    torch.testing.assert_close(summed.key_mass, full.key_mass.sum(1, keepdim=True))


def test_top_left_causal_alignment_would_fail_the_check():
    """The check distinguishes the end-aligned convention from torch SDPA's top-left ``is_causal``."""
    q, k, v = make_inputs((1, 2, 2, 5, 12, 16), torch.float16)
    top_left = torch.ones(5, 12, dtype=torch.bool).tril()
    wrong = naive.scored_attention(q, k, v, causal=False, attn_mask=top_left)
    with pytest.raises(AssertionError):
        check_against_reference(wrong, q, k, v, causal=True)


def test_attention_mask_matches_reference_and_empty_rows():
    q, k, v = make_inputs((2, 4, 2, 9, 9, 16), torch.bfloat16)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    mask[0, :, :, :3] = False  # batch 0: three left-padding keys; its first three queries see nothing
    kwargs = dict(causal=True, attn_mask=mask, normalize=True)
    result = blockwise.scored_attention(q, k, v, block=4, **kwargs)
    check_against_reference(result, q, k, v, **kwargs)
    assert torch.isneginf(result.lse[0, :, :3]).all() and (result.out[0, :, :3] == 0).all()
    assert (result.key_mass[0, :, :3] == 0).all()


def test_auto_backend_on_cpu_is_blockwise_for_the_mass_of_every_row():
    q, k, v = make_inputs((1, 2, 1, 7, 7, 16), torch.float32)
    a = scored_attention(q, k, v, causal=True)
    b = blockwise.scored_attention(q, k, v, causal=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_blockwise_spans_several_blocks_and_empty_rows_in_float64():
    # Rows that see nothing (attn_mask) inside a block of rows that do: their out is 0, lse -inf, no NaN anywhere.
    q, k, v = make_inputs((1, 4, 2, 23, 31, 8), torch.float64, seed=5)
    mask = torch.rand(1, 1, 23, 31, generator=torch.Generator().manual_seed(0)) > 0.5
    mask[..., 3, :] = False
    mask[..., 10, :] = False
    for kwargs in (dict(causal=False, normalize=True), dict(causal=True, mass="window", window=9)):
        ref = naive.scored_attention(q, k, v, attn_mask=mask, **kwargs)
        got = blockwise.scored_attention(q, k, v, attn_mask=mask, block=5, **kwargs)
        for x, y in zip(ref, got):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
        assert not got.out.isnan().any() and torch.isneginf(got.lse[..., [3, 10]]).all()


# sdpa_rows: the shapes it takes (N_q == N_k, N_q == 1, or not causal), GQA 9/3 and 4/2, lengths off any grid.
SDPA_ROWS_CASES = [
    pytest.param((1, 9, 3, 37, 37, 16), True, dict(mass="row"), id="causal-row-last"),
    pytest.param((2, 4, 2, 130, 130, 64), True, dict(mass="window", window=8, normalize=True),
                 id="causal-window8-norm"),
    pytest.param((1, 4, 2, 130, 130, 64), True, dict(mass="row", row=0, reduce_gqa=True), id="causal-row0-gqasum"),
    pytest.param((2, 6, 2, 17, 300, 16), False, dict(mass="row", row=0, normalize=True), id="full-cls-row"),
    pytest.param((1, 2, 1, 1, 77, 32), True, dict(mass="row"), id="decode-one-query"),
    pytest.param((1, 4, 4, 40, 40, 32), False, dict(mass="window", window=10), id="full-window-quarter"),
]  # fmt: skip


def auto_choice(q, k, causal, options):
    choice = {name: value for name, value in options.items() if name in ("mass", "window", "row", "attn_mask")}
    return pick_backend("auto", q, k, causal=causal, **choice)


@pytest.mark.parametrize("shape, causal, options", SDPA_ROWS_CASES)
def test_sdpa_rows_matches_reference(shape, causal, options):
    q, k, v = make_inputs(shape, torch.float32)
    assert auto_choice(q, k, causal, options) == "sdpa_rows"
    result = scored_attention(q, k, v, causal=causal, **options)
    check_against_reference(result, q, k, v, causal=causal, **options)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    exact = naive.scored_attention(q64, k64, v64, causal=causal, **options)
    for x, y in zip(exact, sdpa_rows.scored_attention(q64, k64, v64, causal=causal, **options)):
        assert y.dtype == torch.float64
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shape, dtype, options, reason",
    [
        ((1, 2, 1, 40, 40, 16), torch.float32, dict(causal=True, mass="all"), "mass='all'"),
        ((1, 2, 1, 40, 40, 16), torch.float32, dict(causal=True, mass="window", window=11), "more than 25%"),
        ((1, 2, 1, 5, 12, 16), torch.float32, dict(causal=True, mass="row"), "end-aligns"),
        ((1, 2, 1, 40, 40, 16), torch.bfloat16, dict(causal=True, mass="row"), "float32/float64"),
        ((1, 2, 1, 40, 40, 16), torch.float32,
         dict(causal=True, mass="row", attn_mask=torch.ones(40, 40, dtype=torch.bool)), "attn_mask"),
    ],
)  # fmt: skip
def test_sdpa_rows_refuses_what_it_cannot_do_and_auto_falls_back(shape, dtype, options, reason):
    q, k, v = make_inputs(shape, dtype)
    with pytest.raises(ValueError, match=reason):
        scored_attention(q, k, v, backend="sdpa_rows", **options)
    assert auto_choice(q, k, options.pop("causal"), options) == "blockwise"
    options["causal"] = True
    check_against_reference(scored_attention(q, k, v, **options), q, k, v, **options)


def test_dtypes_of_outputs():
    q, k, v = make_inputs((1, 2, 1, 7, 7, 16), torch.bfloat16)
    out, lse, key_mass = scored_attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and key_mass.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="cuda"), "backend must be one of"),
        (dict(mass="sum"), "mass must be one of"),
        (dict(mass="window"), "window >= 1"),
        (dict(mass="window", window=0), "window >= 1"),
        (dict(mass="row", row=7), r"row must be an integer in \[-7, 7\)"),
        (dict(mass="row", row=-8), "row must be"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    q, k, v = make_inputs((1, 2, 1, 7, 9, 16), torch.float32)
    with pytest.raises(ValueError, match=match):
        scored_attention(q, k, v, causal=True, **kwargs)


def test_bad_shapes_raise():
    q = torch.randn(1, 4, 5, 16)
    with pytest.raises(ValueError, match="multiple of H_kv"):
        scored_attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16), causal=False)
    with pytest.raises(ValueError, match="head dims differ"):
        scored_attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), causal=False)
    with pytest.raises(ValueError, match="disagree"):
        scored_attention(q, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 6, 16), causal=False)
    with pytest.raises(ValueError, match="N_q <= N_k"):
        scored_attention(q, torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), causal=True)
    with pytest.raises(ValueError, match="4-D"):
        scored_attention(q[0], q[0], q[0], causal=False)
    with pytest.raises(ValueError, match="one dtype"):
        scored_attention(q, q.double(), q, causal=False)
    with pytest.raises(ValueError, match="attn_mask"):
        scored_attention(q, q, q, causal=False, attn_mask=torch.ones(3, 3, dtype=torch.bool))


def test_triton_refuses_what_it_cannot_do(triton_device):
    q = torch.randn(1, 2, 5, 16, device=triton_device)
    with pytest.raises(ValueError, match="attn_mask"):
        scored_attention(q, q, q, causal=False, backend="triton", attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="float64"):
        scored_attention(q.double(), q.double(), q.double(), causal=False, backend="triton")


def test_the_fused_kernel_reads_grouped_heads_as_repeated_ones():
    # sdpa_rows hands grouped K/V to torch's fused kernel; its answer must be that of K/V repeated per query head
    q, k, v = make_inputs((2, 9, 3, 37, 37, 16), torch.float64, seed=7)
    grouped = sdpa_rows.fused_attention(q, k, v, causal=True, scale=0.25)
    repeated = sdpa_rows.fused_attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), causal=True,
                                         scale=0.25)
    for x, y in zip(grouped, repeated):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_fused_kernel_that_refuses_grouped_heads_gets_them_repeated(monkeypatch):
    real = sdpa_rows.fused_attention_with_lse()

    def same_heads_only(q, k, v, *args, **kwargs):
        if q.shape[1] != k.shape[1]:
            raise RuntimeError("number of heads in key/value must equal the number of heads in query")
        return real(q, k, v, *args, **kwargs)

    q, k, v = make_inputs((1, 4, 2, 21, 21, 16), torch.float64, seed=8)
    expected = sdpa_rows.fused_attention(q, k, v, causal=True, scale=0.25)
    monkeypatch.setattr(sdpa_rows, "fused_attention_with_lse", lambda: same_heads_only)
    for x, y in zip(expected, sdpa_rows.fused_attention(q, k, v, causal=True, scale=0.25)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(sdpa_rows, "fused_attention_with_lse", lambda: broken)
    with pytest.raises(RuntimeError, match="kernel failed"):  # with equal head counts a failure is not retried
        sdpa_rows.fused_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), causal=True,
                                  scale=0.25)
