"""Hand each layer's attention probabilities to a callback, through transformers' public attention registry.

A model loaded (or switched) with ``attn_implementation=CAPTURE`` computes ordinary eager attention and, while a
:func:`capture_attention` block is active, passes ``(layer_idx, probs, key, value)`` to the callback, layer by layer.
The harness can reduce what it needs on the fly (a column sum, a window) instead of keeping 30 layers of
``(B, H, Q, K)`` matrices, as ``output_attentions=True`` would.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

CAPTURE = "salience_capture"

AttentionCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
_callback: contextvars.ContextVar[AttentionCallback | None] = contextvars.ContextVar("salience_capture", default=None)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, H_kv, K, D)`` → ``(B, H_kv·groups, K, D)`` for grouped-query attention."""
    if groups == 1:
        return x
    b, h, k, d = x.shape
    return x[:, :, None].expand(b, h, groups, k, d).reshape(b, h * groups, k, d)


def capturing_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (softmax in float32) that also reports its probabilities. Shapes follow transformers:
    query ``(B, H, Q, D)``, key/value ``(B, H_kv, K, D)``; returns ``(B, Q, H, D)`` output and ``(B, H, Q, K)`` weights.
    """
    groups = query.shape[1] // key.shape[1]
    k = _repeat_kv(key, groups)
    v = _repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query, k.transpose(2, 3)) * scale
    if attention_mask is not None:
        logits = logits + attention_mask[:, :, :, : k.shape[-2]]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    callback = _callback.get()
    if callback is not None:
        callback(getattr(module, "layer_idx", -1), probs, key, value)
    probs = probs.to(query.dtype)
    if dropout and module.training:
        probs = nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


def install() -> str:
    """Register the capturing attention (and the eager mask format it expects); idempotent. Returns its name."""
    AttentionInterface.register(CAPTURE, capturing_attention)
    AttentionMaskInterface.register(CAPTURE, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return CAPTURE


@contextmanager
def capture_attention(model: nn.Module, callback: AttentionCallback) -> Iterator[None]:
    """Within the block, every attention layer of ``model`` reports to ``callback``.

    The model is switched to the capturing implementation for the block and restored afterwards.
    Raises if the model's attention modules do not go through transformers' attention registry.
    """
    install()
    config = model.config
    previous = config._attn_implementation
    if previous != CAPTURE:
        model.set_attn_implementation(CAPTURE)
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)
        if previous != CAPTURE:
            model.set_attn_implementation(previous)


ATTENTION_PATHS = ("eager", "fused")


def check_attention_path(path: str, scorers) -> None:
    """``"eager"`` captures full probabilities; ``"fused"`` runs scored attention and hands scorers only each key's
    attention mass (no N×N matrix). Raise if a scorer needs more than the chosen path gives."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {path!r}")
    if path == "fused":
        needy = [s.name for s in scorers if s.needs - {"key_mass"}]
        if needy:
            raise ValueError(f"scorers {needy} need more than key mass; run them with attention='eager'")
