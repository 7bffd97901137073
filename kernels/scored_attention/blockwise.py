"""CPU path: exact softmax one block of query rows at a time, O(N_k * block) extra memory.

A block of ``block`` query rows sees all of its keys at once, so its softmax is exact (no online rescaling) and its
probabilities can be summed into the key mass before the block is dropped. Peak memory is a few
``[B, H_q, block, N_k]`` float32 buffers instead of eager's ``[B, H_q, N_q, N_k]``, while each step is still one
large matmul, which is what a CPU is fast at. Under the causal mask a block only reads the keys its last row can see.

Where the time goes (N = 8k, one thread, 4/2 heads, D = 64; ``benchmarks/README.md``): the two matmuls are about
90% of it, as in SDPA. What this path adds to SDPA's work is kept to passes over the block that are cheap:

* scores are computed in base 2 (``q`` is scaled by ``scale * log2(e)`` once per block), so the exponential is
  ``exp2``, which torch vectorises about 3x faster than ``exp`` at the same accuracy (1 ulp);
  ``lse = ln(2) * (m + log2(l))``;
* the block's probabilities are never normalised in place: ``out = (E @ V) / l`` divides ``block x D_v`` values, and
  the key mass is one matrix-vector product ``(1 / l)^T E`` (``1 x block`` times ``block x N_k``) per head;
* ``K`` is transposed into a contiguous ``[D, N_k]`` copy once (O(N_k * D)), which the matmul packs faster.

Internally everything runs in float32 (float64 for float64 inputs); only ``out`` is cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch

from .common import (
    ScoredAttentionOutput,
    accumulation_dtype,
    causal_visible,
    causal_visible_counts,
    check_inputs,
    finish_key_mass,
    query_range,
)

DEFAULT_BLOCK = 64
LOG2_E = 1.0 / math.log(2.0)
LN_2 = math.log(2.0)


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
    block: int = DEFAULT_BLOCK,
) -> ScoredAttentionOutput:
    """Same contract as :func:`salience.kernels.scored_attention.naive.scored_attention`; ``block`` query rows a step.

    Shapes: q ``[B, H_q, N_q, D]``, k ``[B, H_kv, N_k, D]``, v ``[B, H_kv, N_k, D_v]``.
    """
    b, h_q, h_kv, n_q, n_k = check_inputs(q, k, v, causal=causal, attn_mask=attn_mask)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer; got {block!r}")
    start, stop = query_range(mass, n_q, window=window, row=row)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    group = h_q // h_kv
    offset = n_k - n_q  # causal: query i sits at key position offset + i
    dev = q.device

    # One contiguous accumulation-dtype copy of K^T and of V (O(N_k * D)) instead of casting them for every block.
    k_t = k.to(acc).transpose(-1, -2).contiguous()  # [B, H_kv, D, N_k]
    v_acc = v.to(acc)
    out = torch.empty(b, h_q, n_q, v.shape[-1], dtype=q.dtype, device=dev)
    lse = torch.empty(b, h_q, n_q, dtype=acc, device=dev)
    key_mass = torch.zeros(b, h_q, n_k, dtype=acc, device=dev)
    counts = torch.zeros(b, h_q, n_k, dtype=torch.int64, device=dev) if normalize and attn_mask is not None else None
    if attn_mask is not None:
        attn_mask = torch.broadcast_to(attn_mask, (b, h_q, n_q, n_k))

    for i0 in range(0, n_q, block):
        i1 = min(i0 + block, n_q)
        rows = i1 - i0
        k_stop = min(n_k, i1 + offset) if causal else n_k  # keys past the last row's position are never visible

        # GQA without repeat_kv: fold the group into the row dimension, [B, H_kv, group * rows, D]. The scale (and
        # the change to base 2) goes on q (rows x D) rather than on the scores (rows x N_k): fewer multiplications.
        q_blk = (q[:, :, i0:i1].to(acc) * (scale * LOG2_E)).reshape(b, h_kv, group * rows, -1)
        s = (q_blk @ k_t[..., :k_stop]).view(b, h_q, rows, k_stop)  # scores in log2 units

        visible = None
        if causal:
            # Keys up to position i0 + offset are visible to every row of the block; only the band after it needs
            # masking, so the mask is rows x rows, not rows x N_k.
            band = max(0, i0 + offset + 1)
            visible = causal_visible(n_q, n_k, slice(i0, i1), k_stop, device=dev, k_start=band)
            s[..., band:].masked_fill_(~visible, float("-inf"))
        if attn_mask is not None:
            visible = attn_mask[:, :, i0:i1, :k_stop]
            s.masked_fill_(~visible, float("-inf"))

        m = s.amax(dim=-1, keepdim=True)
        if attn_mask is not None:
            m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=acc, device=dev))  # rows that see nothing
        e = s.sub_(m).exp2_()  # unnormalised probabilities, in place (e is s)
        row_sum = e.sum(dim=-1, keepdim=True)  # [B, H_q, rows, 1]; 0 for rows that see nothing
        lse[:, :, i0:i1] = ((m + row_sum.log2()) * LN_2).squeeze(-1)  # -inf where row_sum is 0, as documented
        inv = torch.where(row_sum > 0, row_sum.reciprocal(), torch.zeros((), dtype=acc, device=dev))

        o = (e.view(b, h_kv, group * rows, k_stop) @ v_acc[:, :, :k_stop]).view(b, h_q, rows, -1)
        out[:, :, i0:i1] = (o * inv).to(q.dtype)

        r0, r1 = max(i0, start) - i0, min(i1, stop) - i0  # the chosen query rows inside this block
        if r1 > r0:
            # sum_i p_ij = sum_i e_ij / l_i: one matrix-vector product per head, no normalised copy of the block.
            key_mass[..., :k_stop] += (inv[:, :, r0:r1].transpose(-1, -2) @ e[:, :, r0:r1]).squeeze(-2)
            if counts is not None:
                seen = visible if not causal else visible & causal_visible(n_q, n_k, slice(i0, i1), k_stop, device=dev)
                counts[..., :k_stop] += seen.expand(b, h_q, rows, k_stop)[:, :, r0:r1].sum(dim=2)

    if normalize and counts is None:
        if causal:
            counts = causal_visible_counts(n_q, n_k, start, stop, device=dev)
        else:
            counts = torch.tensor(stop - start, device=dev)
    return ScoredAttentionOutput(out, lse, finish_key_mass(key_mass, counts, reduce_gqa=reduce_gqa, h_kv=h_kv))
