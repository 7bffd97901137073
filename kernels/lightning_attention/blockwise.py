"""CPU path of Lightning Attention-2: intra-block masked attention plus an inter-block KV state.

For a block of rows ``[a, a + n)`` (local index ``r = t - a``), with ``S`` the state after token ``a - 1``::

    intra = ((Q_b K_b^T) * scale * M_local) V_b           M_local[r, c] = lambda ** (r - c) for c <= r
    inter = scale * (Q_b * lambda ** (r + 1)) S           everything before the block, decayed to row r
    S    <- lambda ** n * S + (K_b * lambda ** (n - 1 - r))^T V_b

Memory is O(N * (D + E) + block^2); time is linear in N. Internally float32 (float64 for float64 inputs). Written
without in-place writes into a shared buffer, so torch autograd runs through it (the backward reference).
"""

from __future__ import annotations

import torch

from .common import accumulation_dtype, check_inputs

DEFAULT_BLOCK = 64


def lightning_attention(q, k, v, decay, *, scale: float = 1.0, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """q, k ``[B, H, N, D]``, v ``[B, H, N, E]``, decay ``[H]`` (rates, ``lambda = exp(-decay)``).

    Returns ``[B, H, N, E]`` in ``q``'s dtype. ``block``: rows per step (any positive integer).
    """
    decay = check_inputs(q, k, v, decay)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer; got {block!r}")
    b, h, n, d = q.shape
    acc = accumulation_dtype(q.dtype)
    rate = decay.to(acc).view(1, h, 1, 1)
    state = torch.zeros(b, h, d, v.shape[-1], dtype=acc, device=q.device)
    local = torch.arange(block, device=q.device, dtype=acc)
    outs = []
    for a in range(0, n, block):
        e = min(a + block, n)
        m = e - a
        r = local[:m]
        q_b, k_b, v_b = (t[:, :, a:e].to(acc) for t in (q, k, v))

        diff = r[:, None] - r[None, :]
        mask = torch.where(diff >= 0, torch.exp(-rate * diff.clamp(min=0)), torch.zeros((), dtype=acc))
        intra = ((q_b @ k_b.transpose(-1, -2)) * (scale * mask)) @ v_b
        inter = (q_b * (scale * torch.exp(-rate * (r[:, None] + 1)))) @ state
        outs.append((intra + inter).to(q.dtype))

        k_decayed = k_b * torch.exp(-rate * (m - 1 - r[:, None]))
        state = torch.exp(-rate * m) * state + k_decayed.transpose(-1, -2) @ v_b
    return torch.cat(outs, dim=2)
