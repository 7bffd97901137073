"""Two readable references for Lightning Attention-2 (see :mod:`.common` for the formula).

* :func:`lightning_attention_masked`: the O(N^2) "attention with a decay mask" form,
  ``O = ((Q K^T) * scale * M) V`` with ``M[t, s] = lambda ** (t - s)`` for ``s <= t`` and 0 above the diagonal.
  It runs in the input dtype, so in a low precision it is the tests' control.
* :func:`lightning_attention_recurrent`: the O(N) recurrence ``S_t = lambda S_{t-1} + k_t^T v_t``,
  ``o_t = scale * q_t S_t``, one token at a time. Slow (a Python loop) and exactly what the blockwise path unrolls.
"""

from __future__ import annotations

import torch

from .common import check_inputs


def decay_mask(decay: torch.Tensor, n: int, *, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``[H, n, n]`` with ``lambda_h ** (t - s)`` on and below the diagonal and 0 above it."""
    t = torch.arange(n, device=device)
    diff = (t[:, None] - t[None, :]).to(torch.float64)
    rates = decay.to(device=device, dtype=torch.float64)[:, None, None]
    # where, not multiply: above the diagonal exp(+rate * |diff|) may overflow to inf, and inf * 0 is NaN.
    mask = torch.where(diff >= 0, torch.exp(-rates * diff.clamp(min=0)), torch.zeros((), dtype=torch.float64))
    return mask.to(dtype)


def lightning_attention_masked(q, k, v, decay, *, scale: float = 1.0) -> torch.Tensor:
    """O(N^2)-memory masked form. q, k ``[B, H, N, D]``, v ``[B, H, N, E]``, decay ``[H]`` -> ``[B, H, N, E]``."""
    decay = check_inputs(q, k, v, decay)
    scores = (q @ k.transpose(-1, -2)) * scale
    return (scores * decay_mask(decay, q.shape[2], dtype=q.dtype, device=q.device)) @ v


def lightning_attention_recurrent(q, k, v, decay, *, scale: float = 1.0) -> torch.Tensor:
    """Token-by-token recurrence in the input dtype. Same shapes as :func:`lightning_attention_masked`."""
    decay = check_inputs(q, k, v, decay)
    b, h, n, d = q.shape
    lam = torch.exp(-decay.to(q.dtype)).view(1, h, 1, 1)
    state = q.new_zeros(b, h, d, v.shape[-1])
    outs = []
    for t in range(n):
        state = lam * state + k[:, :, t, :, None] * v[:, :, t, None, :]  # S_t = lambda S_{t-1} + k_t^T v_t
        outs.append(scale * (q[:, :, t, None, :] @ state))
    return torch.cat(outs, dim=2)
