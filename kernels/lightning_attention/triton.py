"""Triton forward of Lightning Attention-2 (forward only; see :mod:`.blockwise` for the algebra).

Grid: ``(B * H, cdiv(E, BLOCK_E))``. One program owns one head and a slice of the value dimension, walks the sequence
block by block and keeps the ``[D, BLOCK_E]`` KV state in float32 registers, so time is linear in N and memory is the
output only. Splitting E across programs bounds the state's registers and multiplies the parallelism for small
``B * H``. Dot operands are rounded to the input dtype (as flash attention rounds P) and accumulate in float32.

Works under ``TRITON_INTERPRET=1`` on CPU tensors; uses only pointer arithmetic, so triton 3.0 through 3.9 compile it.
There is no backward: inputs that require grad are refused (use ``backend='blockwise'`` for autograd).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import check_inputs

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _lightning_forward_kernel(
    Q, K, V, Out, DECAY,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_ve,
    stride_ob, stride_oh, stride_on, stride_oe,
    H, N, D, E, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, INTERP_BF16: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_e = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rate = tl.load(DECAY + h).to(tl.float32)

    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    d_ok = offs_d < D
    e_ok = offs_e < E

    # Decay factors depend only on positions inside a block: compute them once.
    diff = (offs[:, None] - offs[None, :]).to(tl.float32)
    intra_decay = tl.where(diff >= 0, tl.exp(-rate * tl.maximum(diff, 0.0)), 0.0) * scale  # [BLOCK, BLOCK]
    q_decay = tl.exp(-rate * (offs + 1).to(tl.float32)) * scale  # row r sees the state decayed r + 1 steps
    k_decay = tl.exp(-rate * (BLOCK - 1 - offs).to(tl.float32))  # key r has BLOCK - 1 - r steps left to the end
    block_decay = tl.exp(-rate * BLOCK)

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = Out + b * stride_ob + h * stride_oh
    state = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    for start in range(0, N, BLOCK):
        rows = start + offs
        row_ok = rows < N
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        k_t = tl.load(k_base + rows[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                      mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # fmt: skip
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_e[None, :] * stride_ve,
                    mask=row_ok[:, None] & e_ok[None, :], other=0.0)  # fmt: skip
        if INTERP_BF16:
            q = q.to(tl.float32)
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)

        # Padded rows of the last block load zeros, so they add nothing to the outputs or the state.
        s = tl.dot(q, k_t, input_precision="ieee") * intra_decay
        o = tl.dot(s.to(v.dtype), v, input_precision="ieee")
        q_s = (q.to(tl.float32) * q_decay[:, None]).to(v.dtype)
        o += tl.dot(q_s, state.to(v.dtype), input_precision="ieee")
        tl.store(o_base + rows[:, None] * stride_on + offs_e[None, :] * stride_oe, o.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & e_ok[None, :])  # fmt: skip

        # The state after a partial (last) block is never read, so the full-block decays are always right.
        k_s = (k_t.to(tl.float32) * k_decay[None, :]).to(v.dtype)
        state = state * block_decay + tl.dot(k_s, v, input_precision="ieee")


def lightning_attention(q, k, v, decay, *, scale: float = 1.0, block: int | None = None) -> torch.Tensor:
    """q, k ``[B, H, N, D]``, v ``[B, H, N, E]``, decay ``[H]`` -> ``[B, H, N, E]``. CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1``. ``block``: sequence block (power of two >= 16; default 64, 16 in the interpreter)."""
    decay = check_inputs(q, k, v, decay)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the triton path supports {SUPPORTED_DTYPES}; got {q.dtype}")
    if not q.is_cuda and not interpreting():
        raise ValueError("the triton path needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("the triton path is forward-only; use backend='blockwise' to differentiate")
    block = (16 if interpreting() else 64) if block is None else block
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 (tl.dot's minimum); got {block}")
    b, h, n, d = q.shape
    e = v.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    block_e = min(max(16, triton.next_power_of_2(e)), 16 if interpreting() else 64)
    # Interpreter-only bfloat16 workaround, as in scored_attention/triton.py: upcast dot operands, write float32 out.
    interp_bf16 = interpreting() and q.dtype == torch.bfloat16
    out = torch.empty(b, h, n, e, dtype=torch.float32 if interp_bf16 else q.dtype, device=q.device)
    decay = decay.to(torch.float32).contiguous()
    _lightning_forward_kernel[(b * h, triton.cdiv(e, block_e))](
        q, k, v, out, decay,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, n, d, e, float(scale),
        BLOCK=block, BLOCK_D=block_d, BLOCK_E=block_e, INTERP_BF16=interp_bf16,
        num_warps=4, num_stages=1,
    )  # fmt: skip
    return out.to(q.dtype)
