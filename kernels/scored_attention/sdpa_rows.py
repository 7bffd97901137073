"""CPU path for a few chosen query rows: torch's fused SDPA for ``out`` and ``lse``, plus those rows recomputed.

When the key mass comes from one row (TOVA's last query, a ViT's [CLS] row) or a short window of rows (SnapKV),
the rows that are not chosen need only what SDPA without scores computes. This path takes ``out`` and ``lse`` from
torch's fused CPU attention (``aten._scaled_dot_product_flash_attention_for_cpu``: the kernel behind
``F.scaled_dot_product_attention`` on CPU, which also returns the log-normaliser) and recomputes only the chosen
rows' probabilities, exactly: ``w x N_k`` scores, their row maximum and sum, in float32 (float64 for float64 inputs).
The extra work is ``w / N_q`` of one ``Q K^T``.

Eligible inputs (:func:`supports`): CPU float32/float64 tensors, no ``attn_mask``, and a causal mask that SDPA's
top-left alignment draws the same way as ours (``N_q == N_k``, or ``N_q == 1``, where the one query sees every key).
Anything else goes to :mod:`.blockwise`; :func:`salience.kernels.scored_attention.scored_attention` chooses.
"""

from __future__ import annotations

import torch

from .blockwise import LOG2_E
from .common import (
    ScoredAttentionOutput,
    accumulation_dtype,
    causal_visible,
    causal_visible_counts,
    check_inputs,
    finish_key_mass,
    query_range,
)

# The most chosen rows, as a share of N_q, for which this path beats blockwise (benchmarks/README.md): above it the
# recomputed rows cost more than blockwise's extra passes.
MAX_ROW_SHARE = 0.25


def fused_attention_with_lse():
    """torch's fused CPU attention returning ``(out, logsumexp)``, or None where this torch build lacks it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_attention(q, k, v, *, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of torch's fused CPU kernel. It reads grouped K/V heads itself (query head ``h`` uses KV head
    ``h // (H_q // H_kv)``, as here; checked against repeated heads in the tests); a build that refuses them gets
    the heads repeated (an expanded view copied by reshape: O(N_k * D) per head, no N_q * N_k)."""
    kernel = fused_attention_with_lse()
    try:
        return kernel(q, k, v, 0.0, causal, scale=scale)
    except RuntimeError:
        if q.shape[1] == k.shape[1]:
            raise
    b, h_q, h_kv = q.shape[0], q.shape[1], k.shape[1]
    k, v = (t[:, :, None].expand(b, h_kv, h_q // h_kv, *t.shape[2:]).reshape(b, h_q, *t.shape[2:]) for t in (k, v))
    return kernel(q, k, v, 0.0, causal, scale=scale)


def supports(q, k, *, causal: bool, mass: str, window=None, row=None, attn_mask=None) -> str | None:
    """None when this path can compute the call; otherwise why not (one sentence)."""
    n_q, n_k = q.shape[2], k.shape[2]
    if mass == "all":
        return "mass='all' needs every row's probabilities: blockwise computes them in one pass"
    start, stop = query_range(mass, n_q, window=window, row=row)
    if stop - start > max(1, MAX_ROW_SHARE * n_q):
        return f"{stop - start} chosen rows of {n_q} are more than {MAX_ROW_SHARE:.0%}: blockwise is faster"
    if attn_mask is not None:
        return "an attn_mask is given: SDPA's fused CPU kernel would give rows that see no key NaN, not 0"
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return f"needs CPU float32/float64 tensors; got {q.device.type} {q.dtype}"
    if causal and not (n_q == n_k or n_q == 1):
        return f"causal with N_q={n_q} < N_k={n_k}: SDPA aligns the mask top-left, this contract end-aligns it"
    if fused_attention_with_lse() is None:
        return "this torch build has no aten._scaled_dot_product_flash_attention_for_cpu"
    return None


def scored_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    mass: str = "row",
    window: int | None = None,
    row: int | None = None,
    normalize: bool = False,
    reduce_gqa: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> ScoredAttentionOutput:
    """Same contract as :func:`salience.kernels.scored_attention.naive.scored_attention`, for eligible inputs.

    Shapes: q ``[B, H_q, N_q, D]``, k ``[B, H_kv, N_k, D]``, v ``[B, H_kv, N_k, D_v]``. Raises ``ValueError`` naming
    the reason when the inputs are not eligible (see :func:`supports`).
    """
    b, h_q, h_kv, n_q, n_k = check_inputs(q, k, v, causal=causal, attn_mask=attn_mask)
    why_not = supports(q, k, causal=causal, mass=mass, window=window, row=row, attn_mask=attn_mask)
    if why_not is not None:
        raise ValueError(f"backend 'sdpa_rows' cannot compute this call: {why_not}")
    start, stop = query_range(mass, n_q, window=window, row=row)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q.dtype)
    group = h_q // h_kv
    sdpa_causal = causal and n_q > 1  # one query under the end-aligned mask sees every key

    out, lse = fused_attention(q, k, v, causal=sdpa_causal, scale=scale)

    # The chosen rows, exactly: scores in base 2 (as blockwise), their maximum and sum, then normalised probabilities.
    w = stop - start
    q_rows = (q[:, :, start:stop].to(acc) * (scale * LOG2_E)).reshape(b, h_kv, group * w, -1)
    s = (q_rows @ k.to(acc).transpose(-1, -2)).view(b, h_q, w, n_k)
    if sdpa_causal:  # N_q == N_k here: every chosen row sees the keys up to `start`; only the band after is masked
        band = causal_visible(n_q, n_k, slice(start, stop), device=q.device, k_start=start + 1)
        s[..., start + 1:].masked_fill_(~band, float("-inf"))
    e = s.sub_(s.amax(dim=-1, keepdim=True)).exp2_()
    # sum_i e_ij / l_i as one matrix-vector product per head (no normalised copy of the rows)
    key_mass = (e.sum(dim=-1, keepdim=True).reciprocal().transpose(-1, -2) @ e).squeeze(-2)

    counts = None
    if normalize:
        counts = (causal_visible_counts(n_q, n_k, start, stop, device=q.device) if sdpa_causal
                  else torch.tensor(w, device=q.device))  # fmt: skip
    return ScoredAttentionOutput(out, lse.to(acc), finish_key_mass(key_mass, counts, reduce_gqa=reduce_gqa, h_kv=h_kv))
