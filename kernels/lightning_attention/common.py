"""Conventions shared by the Lightning Attention-2 paths.

Causal linear attention with a per-head exponential decay and no softmax::

    o_t = scale * sum_{s <= t} lambda_h ** (t - s) * (q_t . k_s) * v_s,      lambda_h = exp(-decay_h),  decay_h >= 0

Shapes follow torch SDPA: q, k ``[B, H, N, D]``, v ``[B, H, N, E]``, decay ``[H]``, output ``[B, H, N, E]`` in the
dtype of ``q``. ``decay`` holds the *rates* ``s_h`` (the "slopes" of the Lightning Attention papers, ALiBi-style);
``decay_h = 0`` is plain causal linear attention. This is fla's ``chunk_simple_gla`` with a constant per-head log-decay
``g_h = log(lambda_h) = -decay_h`` at every step (fla's ``g_gamma``) and ``scale=1`` (fla defaults to ``D ** -0.5``).

The recurrent view behind the blockwise and Triton paths: with the state ``S_t = lambda S_{t-1} + k_t^T v_t``
(``[D, E]``), ``o_t = scale * q_t S_t``.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "naive", "recurrent", "blockwise", "triton")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def check_inputs(q, k, v, decay) -> torch.Tensor:
    """Validate shapes and return ``decay`` as a tensor on ``q``'s device. Raises ``ValueError``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point 4-D tensor [B, H, N, D]; got {getattr(t, 'shape', t)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, H, N, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, N, E] with q's B, H, N; got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if q.shape[2] == 0:
        raise ValueError("empty sequence (N = 0)")
    decay = torch.as_tensor(decay, device=q.device)
    if decay.shape != (q.shape[1],):
        raise ValueError(f"decay must have shape [H] = ({q.shape[1]},); got {tuple(decay.shape)}")
    if not decay.is_floating_point():
        decay = decay.to(torch.float32)
    if not torch.isfinite(decay).all() or (decay < 0).any():
        raise ValueError("decay rates must be finite and >= 0 (lambda = exp(-decay) in (0, 1])")
    return decay


def slopes(n_heads: int) -> torch.Tensor:
    """ALiBi-style decay rates ``2 ** (-8 (h + 1) / H)`` used by Lightning Attention (for power-of-two ``H``)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])
