"""CPU path: exact softmax one block of query rows at a time, O(N_k * block) extra memory.

A block of ``block`` query rows sees all of its keys at once, so its softmax is exact (no online rescaling) and its
probabilities can be summed into the key mass before the block is dropped. Peak memory is a few
``[B, H_q, block, N_k]`` float32 buffers instead of eager's ``[B, H_q, N_q, N_k]``, while each step is still one
large matmul, which is what a CPU is fast at. Under the causal mask a block only reads the keys its last row can see.

Internally everything runs in float32 (float64 for float64 inputs); only ``out`` is cast back to the input dtype.
"""

from __future__ import annotations

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

DEFAULT_BLOCK = 128


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

    # One float32 copy of K and V (O(N_k * D)) instead of re-casting them for every query block.
    k_acc = k.to(acc)
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

        # GQA without repeat_kv: fold the group into the row dimension, [B, H_kv, group * rows, D]. The scale goes
        # on q (rows x D) rather than on the scores (rows x N_k): fewer multiplications.
        q_blk = (q[:, :, i0:i1].to(acc) * scale).reshape(b, h_kv, group * rows, -1)
        s = (q_blk @ k_acc[:, :, :k_stop].transpose(-1, -2)).view(b, h_q, rows, k_stop)

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

        # Two fused ops, each as accurate as a plain softmax (exp(s - lse) would lose the low bits of a large lse).
        lse[:, :, i0:i1] = torch.logsumexp(s, dim=-1)  # -inf for rows that see nothing, as documented
        p = torch.softmax(s, dim=-1)
        del s
        if attn_mask is not None:
            p = p.nan_to_num_(0.0)  # softmax of an all -inf row is NaN; such rows carry no probability

        o = p.view(b, h_kv, group * rows, k_stop) @ v_acc[:, :, :k_stop]
        out[:, :, i0:i1] = o.view(b, h_q, rows, -1).to(q.dtype)

        r0, r1 = max(i0, start) - i0, min(i1, stop) - i0  # the chosen query rows inside this block
        if r1 > r0:
            key_mass[..., :k_stop] += p[:, :, r0:r1].sum(dim=2)
            if counts is not None:
                seen = visible if not causal else visible & causal_visible(n_q, n_k, slice(i0, i1), k_stop, device=dev)
                counts[..., :k_stop] += seen.expand(b, h_q, rows, k_stop)[:, :, r0:r1].sum(dim=2)

    if normalize and counts is None:
        if causal:
            counts = causal_visible_counts(n_q, n_k, start, stop, device=dev)
        else:
            counts = torch.tensor(stop - start, device=dev)
    return ScoredAttentionOutput(out, lse, finish_key_mass(key_mass, counts, reduce_gqa=reduce_gqa, h_kv=h_kv))
