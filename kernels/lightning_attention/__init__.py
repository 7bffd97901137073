"""Lightning Attention-2 [@lightning_attention2]: causal linear attention with per-head decay, linear time and memory
in N (the intra-/inter-block split of Lightning Attention, introduced with TransNormerLLM [@transnormerllm]).

``lightning_attention(q, k, v, decay)`` computes ``o_t = scale * sum_{s<=t} exp(-decay_h (t - s)) (q_t . k_s) v_s``
(see :mod:`.common` for shapes and the relation to fla's ``chunk_simple_gla``). Paths: ``naive`` (O(N^2) masked
form), ``recurrent`` (token by token), ``blockwise`` (intra-block masked attention plus inter-block KV state; the CPU
path and the differentiable one) and ``triton`` (forward only, imported lazily).
"""

from __future__ import annotations

import torch

from . import blockwise, naive
from .common import BACKENDS, check_inputs, slopes

__all__ = ["lightning_attention", "slopes", "BACKENDS"]


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    *,
    scale: float = 1.0,
    backend: str = "auto",
    block: int | None = None,
) -> torch.Tensor:
    """Causal linear attention with per-head exponential decay.

    Args:
        q, k: ``[B, H, N, D]``.
        v: ``[B, H, N, E]``.
        decay: ``[H]`` decay rates ``>= 0``; head ``h`` forgets by ``lambda_h = exp(-decay[h])`` per step
            (:func:`slopes` gives Lightning Attention's ALiBi-style rates).
        scale: multiplies ``q . k`` (default 1, as in Lightning Attention; fla's default is ``D ** -0.5``).
        backend: ``"auto"`` (triton for CUDA tensors when no gradient is needed, else blockwise), ``"naive"``,
            ``"recurrent"``, ``"blockwise"`` or ``"triton"``.
        block: sequence block of the blockwise/triton paths (default 64).

    Returns:
        ``[B, H, N, E]`` in ``q``'s dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    check_inputs(q, k, v, decay)
    if backend == "auto":
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        backend = "triton" if q.is_cuda and q.dtype != torch.float64 and not needs_grad else "blockwise"
    if backend == "naive":
        return naive.lightning_attention_masked(q, k, v, decay, scale=scale)
    if backend == "recurrent":
        return naive.lightning_attention_recurrent(q, k, v, decay, scale=scale)
    if backend == "blockwise":
        block = blockwise.DEFAULT_BLOCK if block is None else block
        return blockwise.lightning_attention(q, k, v, decay, scale=scale, block=block)
    from . import triton as triton_path  # lazy: importing triton must wait for TRITON_INTERPRET to be set

    return triton_path.lightning_attention(q, k, v, decay, scale=scale, block=block)
