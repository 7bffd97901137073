"""One attention function for every harness, registered once with transformers' public attention registry.

A model switched to :data:`NAME` (``model.set_attn_implementation``) calls :func:`salience_attention` in every
attention layer; what it does is chosen per call by the **mode** active in a context variable (:func:`attending`):

* :class:`Capture` — eager attention (softmax in float32) that hands ``(layer_idx, probs, key, value)`` to a callback
  (:mod:`salience.harness.attention_capture`);
* a block state with ``attend`` — the vision harness's proportional attention (ToMe's ``log(size)`` key bias) and
  capture of what a caller asks for (:class:`salience.harness.vit_attention.AttentionState`);
* a key-mass recorder — scored attention, each key's softmax mass without an N×N matrix
  (:class:`salience.kernels.transformers_integration.KeyMassRecorder`);
* no mode — transformers' own SDPA attention, so a model left switched behaves as usual.

A mode is any object with ``attend(module, query, key, value, attention_mask, *, dropout, scaling, is_causal,
**kwargs) → (output (B, Q, H, D), weights or None)``. One name means one mask format: SDPA's (a boolean mask, True =
attend, or ``None`` for a plain causal or unmasked pattern); :func:`additive_mask` turns it into what eager code adds
to its logits.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NAME = "salience"

_MODE: contextvars.ContextVar[Any] = contextvars.ContextVar("salience_attention_mode", default=None)


def salience_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention calling convention: query ``(B, H, Q, D)``, key/value ``(B, H_kv, K, D)``; returns
    ``(B, Q, H, D)`` and the weights when the mode computes them. Dispatches to the active mode."""
    mode = _MODE.get()
    if mode is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return mode.attend(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)


def install() -> str:
    """Register :func:`salience_attention` and SDPA's mask format under :data:`NAME` (idempotent); returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, salience_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


@contextmanager
def active_mode(mode) -> Iterator[Any]:
    """Within the block :func:`salience_attention` runs ``mode`` (the model must already be switched)."""
    token = _MODE.set(mode)
    try:
        yield mode
    finally:
        _MODE.reset(token)


@contextmanager
def switched(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` runs :func:`salience_attention`; its previous implementation is restored after."""
    install()
    previous = model.config._attn_implementation
    if previous != NAME:
        model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        if previous != NAME:
            model.set_attn_implementation(previous)


@contextmanager
def attending(model: nn.Module, mode) -> Iterator[Any]:
    """Switch ``model`` to :func:`salience_attention` running ``mode`` for the block; both are restored after."""
    with switched(model), active_mode(mode):
        yield mode


def causal_flag(module: nn.Module, is_causal: bool | None, attention_mask, q_len: int) -> bool:
    """SDPA's reading of a missing mask: a plain causal pattern for a causal module and several queries."""
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    return causal and attention_mask is None and q_len > 1


def additive_mask(attention_mask: torch.Tensor | None, causal: bool, q_len: int, kv_len: int,
                  dtype: torch.dtype, device) -> torch.Tensor | None:
    """What eager attention adds to its ``(…, Q, K)`` logits: 0 where a query attends, the dtype's minimum where not.

    ``attention_mask``: SDPA's boolean mask (True = attend), an additive float mask (returned cut to ``kv_len``), or
    None with ``causal`` (SDPA's ``is_causal``: query ``i`` sees keys ``0..i``, top-left aligned as SDPA reads it).
    """
    if attention_mask is None:
        if not causal:
            return None
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :kv_len]
    else:
        return attention_mask[..., :kv_len]
    zeros = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zeros, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, H_kv, K, D)`` → ``(B, H_kv·groups, K, D)`` for grouped-query attention."""
    if groups == 1:
        return x
    b, h, k, d = x.shape
    return x[:, :, None].expand(b, h, groups, k, d).reshape(b, h * groups, k, d)


AttentionCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class Capture:
    """Eager attention (softmax in float32) that reports ``(layer_idx, probs (B, H, Q, K), key, value)`` to
    ``callback`` layer by layer, so a harness can reduce what it needs on the fly."""

    callback: AttentionCallback | None = None

    def attend(self, module, query, key, value, attention_mask, *, dropout=0.0, scaling=None, is_causal=None,
               **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = repeat_kv(key, groups), repeat_kv(value, groups)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        logits = torch.matmul(query, k.transpose(2, 3)) * scale
        causal = causal_flag(module, is_causal, attention_mask, query.shape[2])
        mask = additive_mask(attention_mask, causal, query.shape[2], k.shape[-2], logits.dtype, logits.device)
        if mask is not None:
            logits = logits + mask
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if self.callback is not None:
            self.callback(getattr(module, "layer_idx", -1), probs, key, value)
        probs = probs.to(query.dtype)
        if dropout and module.training:
            probs = nn.functional.dropout(probs, p=dropout)
        out = torch.matmul(probs, v).transpose(1, 2).contiguous()
        return out, probs


__all__ = ["AttentionCallback", "Capture", "NAME", "active_mode", "additive_mask", "attending", "causal_flag",
           "install", "repeat_kv", "salience_attention", "switched"]
