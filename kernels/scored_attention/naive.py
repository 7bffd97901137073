"""Readable reference: materialise the full ``[B, H_q, N_q, N_k]`` probability matrix.

It is written the way transformers' eager attention is (scores in the input dtype, softmax in float32, probabilities
cast back to the input dtype before ``P @ V``), so that the same code serves twice in the tests: with float64 inputs
it is the reference, and in the low precision it is the control whose error sets the tolerance. O(N_q * N_k) memory.
"""

from __future__ import annotations

import torch

from .common import (
    ScoredAttentionOutput,
    accumulation_dtype,
    causal_visible,
    check_inputs,
    finish_key_mass,
    query_range,
)


def visibility(q, k, *, causal: bool, attn_mask=None):
    """Boolean mask broadcastable to ``[B, H_q, N_q, N_k]`` (True = visible), or None when every key is visible."""
    n_q, n_k = q.shape[2], k.shape[2]
    visible = causal_visible(n_q, n_k, device=q.device) if causal else None
    if attn_mask is not None:
        visible = attn_mask if visible is None else attn_mask & visible
    return visible


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
    """Attention output, log-normaliser and key mass, all from one explicit probability matrix.

    Shapes: q ``[B, H_q, N_q, D]``, k ``[B, H_kv, N_k, D]``, v ``[B, H_kv, N_k, D_v]``; see
    :mod:`salience.kernels.scored_attention.common` for the conventions and :func:`salience.kernels.scored_attention`
    for the arguments.
    """
    b, h_q, h_kv, n_q, n_k = check_inputs(q, k, v, causal=causal, attn_mask=attn_mask)
    start, stop = query_range(mass, n_q, window=window, row=row)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)

    # repeat_interleave: query head h reads kv head h // group, the same grouping as transformers' repeat_kv.
    group = h_q // h_kv
    k_rep = k.repeat_interleave(group, dim=1)
    v_rep = v.repeat_interleave(group, dim=1)

    scores = (q @ k_rep.transpose(-1, -2)) * scale  # input dtype on purpose: this is where the control rounds
    scores = scores.to(acc)
    visible = visibility(q, k, causal=causal, attn_mask=attn_mask)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if visible is not None:
        # Rows that see nothing: softmax gives NaN; they carry no probability.
        probs = torch.where(visible, probs, torch.zeros((), dtype=acc, device=q.device))

    out = probs.to(q.dtype) @ v_rep
    key_mass = probs[:, :, start:stop, :].sum(dim=2)

    counts = None
    if normalize:
        if visible is None:
            counts = torch.tensor(stop - start, device=q.device)
        else:
            counts = torch.broadcast_to(visible, (b, h_q, n_q, n_k))[:, :, start:stop, :].sum(dim=2)
    return ScoredAttentionOutput(out, lse, finish_key_mass(key_mass, counts, reduce_gqa=reduce_gqa, h_kv=h_kv))
