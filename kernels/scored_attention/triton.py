"""GPU path: a flash-style forward, then one pass over key blocks that re-derives the probabilities.

Pass 1 (grid: query blocks x batch·heads) is the usual online-softmax forward. Besides ``out`` it stores, per query
row, the running maximum ``M`` (base-2 units) and the normaliser ``L``, so that ``p_ij = exp2(s_ij - M_i) / L_i``
can be recomputed exactly the way the forward saw it. Storing ``M`` and ``L`` rather than only the LSE keeps the
recomputed probabilities as accurate as a plain softmax (``s - lse`` would lose the low bits of a large LSE).

Pass 2 (grid: key blocks x batch·heads) owns a block of keys, walks the chosen query rows and sums ``p`` down the
columns in float32: no atomics, deterministic. Under the causal mask it starts at the first query that can see the
block. For ``mass='window'`` or ``'row'`` it visits only those rows, so it costs almost nothing.

Works under ``TRITON_INTERPRET=1`` on CPU tensors (set it before triton is imported); written against the subset of
``triton.language`` that triton 3.0 through 3.9 share (pointer arithmetic, no block pointers or descriptors).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .common import (
    ScoredAttentionOutput,
    causal_visible_counts,
    check_inputs,
    finish_key_mass,
    query_range,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _forward_kernel(
    Q, K, V, Out, M, L,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H_Q, GROUP, N_Q, N_K, D, DV, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, INTERP_BF16: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_Q).to(tl.int64)  # int64 base offsets: B·H·N·D can pass 2**31 at long contexts
    h = (pid_bh % H_Q).to(tl.int64)
    h_kv = h // GROUP
    offset = N_K - N_Q  # end-aligned causal mask: query i sits at key position offset + i

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=(rows[:, None] < N_Q) & (offs_d[None, :] < D),
        other=0.0,
    )
    if INTERP_BF16:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M + offset)  # keys after the block's last row are never visible
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k_t = tl.load(  # [BLOCK_D, BLOCK_N]: K transposed by the pointer layout, no copy
            k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=(cols[None, :] < N_K) & (offs_d[:, None] < D),
            other=0.0,
        )
        if INTERP_BF16:
            k_t = k_t.to(tl.float32)
        # "ieee": float32 inputs would otherwise go through TF32 on tensor cores (~1e-3 relative error).
        s = tl.dot(q, k_t, input_precision="ieee") * qk_scale
        visible = cols[None, :] < N_K
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + offset)
        s = tl.where(visible, s, float("-inf"))

        # Every row sees key 0 in the first block (N_q <= N_k when causal), so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=(cols[:, None] < N_K) & (offs_dv[None, :] < DV),
            other=0.0,
        )
        if INTERP_BF16:
            p_v = p
            v = v.to(tl.float32)
        else:
            p_v = p.to(v.dtype)  # round P to the input precision for the tensor-core dot, as flash attention does
        acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision="ieee")
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_dv[None, :] * stride_od,
        acc.to(Out.dtype.element_ty),
        mask=(rows[:, None] < N_Q) & (offs_dv[None, :] < DV),
    )
    stat = pid_bh.to(tl.int64) * N_Q + rows  # M and L are contiguous [B * H_q, N_q]
    tl.store(M + stat, m_i, mask=rows < N_Q)
    tl.store(L + stat, l_i, mask=rows < N_Q)


@triton.jit
def _key_mass_kernel(
    Q, K, M, L, MASS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H_Q, GROUP, N_Q, N_K, D, qk_scale, Q_START, Q_STOP,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_Q).to(tl.int64)
    h = (pid_bh % H_Q).to(tl.int64)
    h_kv = h // GROUP
    offset = N_K - N_Q

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_t = tl.load(
        K + b * stride_kb + h_kv * stride_kh + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=(cols[None, :] < N_K) & (offs_d[:, None] < D),
        other=0.0,
    )
    if INTERP_BF16:
        k_t = k_t.to(tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    stat_base = pid_bh.to(tl.int64) * N_Q

    mass = tl.zeros([BLOCK_N], tl.float32)
    lo = Q_START
    if CAUSAL:
        lo = tl.maximum(Q_START, pid_n * BLOCK_N - offset)  # earlier queries cannot see any key of this block
    for start_m in range(lo, Q_STOP, BLOCK_M):
        rows = start_m + offs_m
        in_rows = rows < Q_STOP
        q = tl.load(
            q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=in_rows[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        if INTERP_BF16:
            q = q.to(tl.float32)
        m_i = tl.load(M + stat_base + rows, mask=in_rows, other=0.0)
        l_i = tl.load(L + stat_base + rows, mask=in_rows, other=1.0)
        s = tl.dot(q, k_t, input_precision="ieee") * qk_scale
        p = tl.exp2(s - m_i[:, None]) / l_i[:, None]
        visible = in_rows[:, None] & (cols[None, :] < N_K)
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + offset)
        mass += tl.sum(tl.where(visible, p, 0.0), 0)  # where, not multiply: masked p may be inf

    tl.store(MASS + pid_bh.to(tl.int64) * N_K + cols, mass, mask=cols < N_K)  # MASS is contiguous [B * H_q, N_k]


def _pow2_at_least_16(n: int) -> int:
    # tl.dot needs every dimension >= 16 and tl.arange needs powers of two; padded lanes load zeros.
    return max(16, triton.next_power_of_2(n))


def _block_sizes(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Small blocks under the interpreter keep tests fast and multi-block."""
    if interpreting():
        return 16, 16, 1, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 64, 64, 4, 2
    return 32, 32, 4, 1


def scored_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    mass: str = "all",
    window: int | None = None,
    row: int | None = None,
    normalize: bool = False,
    reduce_gqa: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> ScoredAttentionOutput:
    """Two-kernel Triton scored attention. Same contract as the naive path, without ``attn_mask``.

    Shapes: q ``[B, H_q, N_q, D]``, k ``[B, H_kv, N_k, D]``, v ``[B, H_kv, N_k, D_v]``; any strides (transformers
    hands over transposed views). Inputs must be CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    b, h_q, h_kv, n_q, n_k = check_inputs(q, k, v, causal=causal, attn_mask=attn_mask)
    if attn_mask is not None:
        raise ValueError("the triton path takes no attn_mask (causal only); use backend='blockwise' or 'naive'")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the triton path supports {SUPPORTED_DTYPES}; got {q.dtype} (use 'naive' for float64)")
    if not q.is_cuda and not interpreting():
        raise ValueError("the triton path needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    start, stop = query_range(mass, n_q, window=window, row=row)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qk_scale = scale * math.log2(math.e)  # exp2 is the native instruction; fold log2(e) into the scale once

    d, dv = q.shape[-1], v.shape[-1]
    block_m, block_n, num_warps, num_stages = _block_sizes(max(d, dv))
    block_d, block_dv = _pow2_at_least_16(d), _pow2_at_least_16(dv)
    # Two bugs of Triton's interpreter (3.9) with bfloat16: tl.dot multiplies the raw uint16 storage, and float32 ->
    # bfloat16 casts truncate instead of rounding to nearest. Under the interpreter bf16 operands are therefore
    # upcast (exact) before each dot, P stays float32, and `out` is written in float32 and rounded by PyTorch.
    # On a GPU none of this applies: bf16 x bf16 -> f32 dots and round-to-nearest casts, as in flash attention.
    interp_bf16 = interpreting() and q.dtype == torch.bfloat16
    out = torch.empty(b, h_q, n_q, dv, dtype=torch.float32 if interp_bf16 else q.dtype, device=q.device)
    row_max = torch.empty(b, h_q, n_q, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    key_mass = torch.empty(b, h_q, n_k, dtype=torch.float32, device=q.device)
    group = h_q // h_kv
    launch = dict(num_warps=num_warps, num_stages=num_stages, INTERP_BF16=interp_bf16)

    _forward_kernel[(triton.cdiv(n_q, block_m), b * h_q)](
        q, k, v, out, row_max, row_sum,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h_q, group, n_q, n_k, d, dv, qk_scale,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, **launch,
    )  # fmt: skip
    _key_mass_kernel[(triton.cdiv(n_k, block_n), b * h_q)](
        q, k, row_max, row_sum, key_mass,
        *q.stride(), *k.stride(),
        h_q, group, n_q, n_k, d, qk_scale, start, stop,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **launch,
    )  # fmt: skip

    out = out.to(q.dtype)
    lse = (row_max + torch.log2(row_sum)) * math.log(2.0)  # back from base-2 units to natural log
    counts = None
    if normalize:
        if causal:
            counts = causal_visible_counts(n_q, n_k, start, stop, device=q.device)
        else:
            counts = torch.tensor(stop - start, device=q.device)
    return ScoredAttentionOutput(out, lse, finish_key_mass(key_mass, counts, reduce_gqa=reduce_gqa, h_kv=h_kv))
