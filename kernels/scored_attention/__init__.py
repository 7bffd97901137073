"""Scored attention: softmax attention that also returns the probability mass each key receives.

``scored_attention(q, k, v, causal=...) -> (out, lse, key_mass)`` gives the scorers of KV-cache eviction (H2O's
accumulated attention [@h2o], SnapKV's observation window [@snapkv], TOVA's last query [@tova], ZipCache's
normalised attention [@zipcache]) and of [CLS]-based token pruning [@fastervlm] their input without materialising
the ``N_q x N_k`` attention matrix.

Four paths behind one function: ``naive`` (:mod:`.naive`, float64-capable reference), ``blockwise``
(:mod:`.blockwise`, the CPU path for any input), ``sdpa_rows`` (:mod:`.sdpa_rows`, the CPU path when the mass comes
from a few rows: torch's fused attention plus those rows) and ``triton`` (:mod:`.triton`, imported only when used so
that ``TRITON_INTERPRET`` can still be set beforehand).
"""

from __future__ import annotations

import torch

from . import blockwise, naive, sdpa_rows
from .common import BACKENDS, MASS_MODES, ScoredAttentionOutput, check_inputs, query_range

__all__ = ["ScoredAttentionOutput", "scored_attention", "pick_backend", "BACKENDS", "MASS_MODES"]


def pick_backend(backend: str, q: torch.Tensor, k: torch.Tensor, *, causal: bool, mass: str, window=None, row=None,
                 attn_mask=None) -> str:  # fmt: skip
    """The path ``backend="auto"`` takes (any other name is returned as it is, once checked)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend != "auto":
        return backend
    # The Triton kernels take no explicit mask and no float64; the blockwise path runs on any device.
    if q.is_cuda and attn_mask is None and q.dtype != torch.float64:
        return "triton"
    eligible = sdpa_rows.supports(q, k, causal=causal, mass=mass, window=window, row=row, attn_mask=attn_mask) is None
    return "sdpa_rows" if eligible else "blockwise"


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
    backend: str = "auto",
    attn_mask: torch.Tensor | None = None,
) -> ScoredAttentionOutput:
    """Softmax attention plus per-key probability mass.

    Args:
        q: ``[B, H_q, N_q, D]``.
        k: ``[B, H_kv, N_k, D]`` with ``H_q % H_kv == 0`` (query head ``h`` uses kv head ``h // (H_q // H_kv)``).
        v: ``[B, H_kv, N_k, D_v]``.
        causal: end-aligned causal mask: query ``i`` sits at key position ``N_k - N_q + i`` and sees keys up to it,
            as when decoding with a cache (needs ``N_q <= N_k``). With ``N_q == N_k`` it is the usual triangle.
        scale: score scale, default ``D ** -0.5``.
        mass: which queries' probabilities are summed into ``key_mass``: ``"all"`` (H2O), ``"window"`` (the last
            ``window`` queries, SnapKV), ``"row"`` (the single query ``row``, default the last: TOVA; ``row=0`` is
            a ViT's [CLS]).
        window: window length (``>= 1``) for ``mass="window"``; longer than ``N_q`` means all queries.
        row: query index for ``mass="row"``, Python style (``-1`` is the last).
        normalize: divide each key's mass by the number of chosen queries that can see it (ZipCache's normalised
            attention, which removes the causal mask's bias towards early keys). Keys no chosen query sees get 0.
        reduce_gqa: return ``[B, H_kv, N_k]``: the SUM over the ``H_q // H_kv`` query heads sharing a kv head
            (normalisation, if any, is applied per query head first). Divide by the group size for the mean.
        backend: ``"auto"`` (triton for CUDA tensors without ``attn_mask``; on CPU ``sdpa_rows`` when the mass
            comes from at most a quarter of the rows and :func:`.sdpa_rows.supports` the call, else blockwise),
            ``"naive"``, ``"blockwise"``, ``"sdpa_rows"`` or ``"triton"``.
        attn_mask: optional boolean mask broadcastable to ``[B, H_q, N_q, N_k]``, True = may attend (padding,
            sliding windows); combined with ``causal``. Not supported by the triton path.

    Returns:
        ``ScoredAttentionOutput(out, lse, key_mass)``: ``out [B, H_q, N_q, D_v]`` in ``q``'s dtype;
        ``lse [B, H_q, N_q]`` float32; ``key_mass [B, H_q, N_k]`` (or ``[B, H_kv, N_k]``) float32 (lse and
        key_mass are float64 for float64 inputs).

    Raises:
        ValueError: on mismatched shapes or dtypes, ``H_q`` not a multiple of ``H_kv``, an unknown ``mass`` or
            ``backend``, ``window < 1``, ``row`` out of range.
    """
    # Validate everything up front so that a bad argument fails the same way on every path, before heavy work.
    check_inputs(q, k, v, causal=causal, attn_mask=attn_mask)
    query_range(mass, q.shape[2], window=window, row=row)
    chosen = pick_backend(backend, q, k, causal=causal, mass=mass, window=window, row=row, attn_mask=attn_mask)
    kwargs = dict(
        causal=causal,
        scale=scale,
        mass=mass,
        window=window,
        row=row,
        normalize=normalize,
        reduce_gqa=reduce_gqa,
        attn_mask=attn_mask,
    )
    if chosen == "naive":
        return naive.scored_attention(q, k, v, **kwargs)
    if chosen == "blockwise":
        return blockwise.scored_attention(q, k, v, **kwargs)
    if chosen == "sdpa_rows":
        return sdpa_rows.scored_attention(q, k, v, **kwargs)
    from . import triton as triton_path  # lazy: importing triton must wait for TRITON_INTERPRET to be set

    return triton_path.scored_attention(q, k, v, **kwargs)
