"""Shared pieces of the scored-attention paths: the output type, input checks and the key-mass bookkeeping.

Conventions used by every path (naive, blockwise, triton):

* Layout is torch SDPA's: ``q`` is ``[B, H_q, N_q, D]``, ``k`` is ``[B, H_kv, N_k, D]``,
  ``v`` is ``[B, H_kv, N_k, D_v]`` with ``H_q % H_kv == 0``; query head ``h`` reads key/value head
  ``h // (H_q // H_kv)`` (grouped-query attention).
* Causal masks are aligned to the END of the keys: query ``i`` sits at key position ``N_k - N_q + i`` and sees keys
  ``j <= N_k - N_q + i``. This is what decoding with a cache needs (the new queries are the last tokens). For
  ``N_q == N_k`` it is the ordinary lower-triangular mask. ``causal=True`` with ``N_q > N_k`` is refused.
* ``attn_mask`` (optional, boolean, ``True`` = may attend) broadcasts to ``[B, H_q, N_q, N_k]`` and is combined with
  the causal mask. A query row that can see no key gets ``out = 0``, ``lse = -inf`` and contributes no mass.
* ``key_mass[b, h, j] = sum over the chosen queries i of softmax_j(scale * q_i . k_j)``: the softmax probability each
  key receives. The chosen queries are one contiguous range of query rows (see :func:`query_range`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MASS_MODES = ("all", "window", "row")
BACKENDS = ("auto", "naive", "blockwise", "sdpa_rows", "triton")


class ScoredAttentionOutput(NamedTuple):
    """What every scored-attention path returns; unpacks as ``out, lse, key_mass``.

    out:      ``[B, H_q, N_q, D_v]`` in the dtype of ``q``.
    lse:      ``[B, H_q, N_q]`` natural-log normaliser ``log sum_j exp(scale * q_i . k_j)`` over the visible keys;
              float32 (float64 when the inputs are float64); ``-inf`` for rows that see no key.
    key_mass: ``[B, H_q, N_k]``, or ``[B, H_kv, N_k]`` with ``reduce_gqa=True``; float32 (float64 for float64 inputs).
    """

    out: torch.Tensor
    lse: torch.Tensor
    key_mass: torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32, float64 for float64: softmax statistics never live in 16 bits."""
    return torch.promote_types(dtype, torch.float32)


def check_inputs(q, k, v, *, causal: bool, attn_mask=None) -> tuple[int, int, int, int, int]:
    """Validate shapes; return ``(B, H_q, H_kv, N_q, N_k)``. Raises ``ValueError`` with the allowed shapes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D]; got {getattr(t, 'shape', type(t))}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point (float16, bfloat16, float32, float64); got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h_q, n_q, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[-1] != d:
        raise ValueError(f"q and k head dims differ: q {q.shape}, k {k.shape}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k [B, H_kv, N_k, D] and v [B, H_kv, N_k, D_v] disagree: k {k.shape}, v {v.shape}")
    h_kv, n_k = k.shape[1], k.shape[2]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"H_q must be a multiple of H_kv (grouped-query attention); got H_q={h_q}, H_kv={h_kv}")
    if n_q == 0 or n_k == 0:
        raise ValueError(f"empty sequence: N_q={n_q}, N_k={n_k}")
    if causal and n_q > n_k:
        raise ValueError(
            f"causal=True aligns queries to the end of the keys and needs N_q <= N_k; got N_q={n_q}, N_k={n_k}"
        )
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask must be boolean (True = may attend); got {attn_mask.dtype}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, h_q, n_q, n_k))
        except RuntimeError:
            raise ValueError(
                f"attn_mask {tuple(attn_mask.shape)} does not broadcast to [B, H_q, N_q, N_k] = {(b, h_q, n_q, n_k)}"
            ) from None
    return b, h_q, h_kv, n_q, n_k


def query_range(mass: str, n_q: int, *, window: int | None = None, row: int | None = None) -> tuple[int, int]:
    """The query rows ``[start, stop)`` whose probabilities are summed into ``key_mass``.

    ``"all"``: every query (H2O's accumulated attention). ``"window"``: the last ``window`` queries (SnapKV's
    observation window; a window longer than ``N_q`` means all queries). ``"row"``: the single query ``row``
    (Python indexing, so ``-1`` is the last query: TOVA's last query; ``0`` a ViT's [CLS] row). ``row=None`` means -1.
    """
    if mass not in MASS_MODES:
        raise ValueError(f"mass must be one of {MASS_MODES}; got {mass!r}")
    if mass == "all":
        return 0, n_q
    if mass == "window":
        if window is None or isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"mass='window' needs an integer window >= 1; got {window!r}")
        return max(0, n_q - window), n_q
    r = -1 if row is None else row
    if isinstance(r, bool) or not isinstance(r, int) or not -n_q <= r < n_q:
        raise ValueError(f"row must be an integer in [-{n_q}, {n_q}) for N_q={n_q}; got {row!r}")
    r %= n_q
    return r, r + 1


def causal_visible(n_q: int, n_k: int, q_rows: slice | None = None, k_stop: int | None = None, device=None,
                   k_start: int = 0) -> torch.Tensor:  # fmt: skip
    """Boolean ``[rows, k_stop - k_start]``: query ``i`` sees key ``j`` iff ``j <= N_k - N_q + i`` (end-aligned)."""
    rows = range(n_q)[q_rows] if q_rows is not None else range(n_q)
    k_stop = n_k if k_stop is None else k_stop
    i = torch.arange(rows.start, rows.stop, device=device)
    j = torch.arange(k_start, k_stop, device=device)
    return j[None, :] <= (i[:, None] + (n_k - n_q))


def causal_visible_counts(n_q: int, n_k: int, start: int, stop: int, device=None) -> torch.Tensor:
    """For each key ``j``, how many queries in ``[start, stop)`` see it under the end-aligned causal mask.

    Query ``i`` sees ``j`` iff ``i >= j - (N_k - N_q)``, so the count is ``stop - max(start, j - offset)`` clipped at 0.
    Closed form, so the Triton path never materialises a mask to normalise.
    """
    j = torch.arange(n_k, device=device)
    first = torch.clamp(j - (n_k - n_q), min=start)
    return torch.clamp(stop - first, min=0)


def finish_key_mass(mass: torch.Tensor, counts: torch.Tensor | None, *, reduce_gqa: bool, h_kv: int) -> torch.Tensor:
    """Apply ZipCache-style normalisation (``counts`` given) and the GQA-group reduction.

    mass:   ``[B, H_q, N_k]`` summed probabilities.
    counts: broadcastable to ``mass``: queries (of the chosen set) that can see each key; keys seen by none get 0.
    The GQA reduction is a SUM over the ``H_q // H_kv`` query heads of a group (normalisation is applied per query
    head first). Divide by the group size for the mean.
    """
    if counts is not None:
        counts = counts.to(mass.dtype)
        mass = torch.where(counts > 0, mass / counts.clamp(min=1), torch.zeros_like(mass))
    if reduce_gqa:
        b, h_q, n_k = mass.shape
        mass = mass.view(b, h_kv, h_q // h_kv, n_k).sum(dim=2)
    return mass
