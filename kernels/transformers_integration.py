"""Run a stock transformers model on scored attention and collect each layer's key mass.

>>> from salience.kernels.transformers_integration import record_key_mass
>>> with record_key_mass(model, mass="window", window=32) as rec:
...     model(**inputs)
>>> rec.key_mass[layer_idx]        # [B, H, N_k] float32 (or [B, H_kv, N_k] with reduce_gqa=True)

How it plugs in (public extension points only, no copied model code):

* ``AttentionInterface.register("salience_scored", scored_attention_forward)``: the model's attention layers call
  :func:`scored_attention_forward` instead of eager/SDPA once ``config._attn_implementation`` names it.
* ``AttentionMaskInterface.register("salience_scored", sdpa_mask)``: transformers builds masks only for names in its
  mask registry; an unregistered name silently gets *no mask at all* (padding ignored). SDPA's boolean mask is what
  :func:`salience.kernels.scored_attention` takes, and like SDPA it is ``None`` for a plain causal pattern, which
  lets CUDA inputs take the Triton path (masked inputs take the blockwise path).
* :func:`record_key_mass` switches the model to that implementation for the duration of a ``with`` block (through
  ``model.set_attn_implementation``) and restores the previous one afterwards. The active recorder is found through
  a context variable, so nothing has to be threaded through ``model(...)``'s keyword arguments.

Attention weights are never materialised: ``output_attentions=True`` returns ``None`` weights on this path.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .scored_attention import BACKENDS, MASS_MODES, scored_attention
from .scored_attention.common import query_range

ATTENTION_NAME = "salience_scored"


@dataclass
class KeyMassRecorder:
    """Settings for :func:`salience.kernels.scored_attention` plus what the forward passes produced.

    key_mass: layer index -> ``[B, H_q, N_k]`` (``[B, H_kv, N_k]`` with ``reduce_gqa``) float32 from the latest call,
        or, with ``accumulate=True``, summed over calls (decode steps), zero-padded as the cache grows: H2O's
        accumulated attention.
    callback: called as ``callback(layer_idx, key_mass)`` after each layer, for consumers that act immediately
        (a KV harness evicting while prefilling).
    """

    mass: str = "all"
    window: int | None = None
    row: int | None = None
    normalize: bool = False
    reduce_gqa: bool = False
    backend: str = "auto"
    accumulate: bool = False
    callback: Callable[[int, torch.Tensor], None] | None = None
    key_mass: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, layer_idx: int, key_mass: torch.Tensor) -> None:
        key_mass = key_mass.detach()
        previous = self.key_mass.get(layer_idx)
        if self.accumulate and previous is not None and previous.shape[:-1] == key_mass.shape[:-1]:
            grown = key_mass.shape[-1] - previous.shape[-1]
            key_mass = key_mass + (F.pad(previous, (0, grown)) if grown >= 0 else previous[..., : key_mass.shape[-1]])
        self.key_mass[layer_idx] = key_mass
        if self.callback is not None:
            self.callback(layer_idx, key_mass)


_ACTIVE: contextvars.ContextVar[KeyMassRecorder | None] = contextvars.ContextVar("salience_key_mass", default=None)


def _as_bool_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers hands over ``None``, a boolean mask (True = attend) or, for a custom 4-D mask, an additive float
    mask (0 = attend, very negative = masked). Only pure masking can be expressed as a boolean mask."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    if (attention_mask[allowed] != 0).any():
        raise NotImplementedError("additive attention biases (e.g. ALiBi) are not supported by scored attention")
    return allowed


def scored_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An attention function with transformers' calling convention (like ``sdpa_attention_forward``).

    query ``[B, H_q, N_q, D]``, key/value ``[B, H_kv, N_k, D]`` (not repeated for GQA). Returns the output as
    ``[B, N_q, H_q, D]`` and ``None`` attention weights, and hands the key mass to the active recorder.
    """
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("scored attention supports neither logit soft-capping nor position biases")
    if dropout:
        raise NotImplementedError("scored attention has no attention dropout; call model.eval()")
    recorder = _ACTIVE.get()
    mask = _as_bool_mask(attention_mask)
    q_len, kv_len = query.shape[2], key.shape[2]

    # Same decision as transformers' SDPA path: a missing mask means "plain causal" for multi-token queries.
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    causal = causal and mask is None and q_len > 1
    pad_keys = 0
    if causal and kv_len > q_len:
        # Only prefill into an empty static cache gets here: SDPA reads is_causal top-left aligned and so ignores the
        # unused cache slots at the end; our causal mask is end-aligned, so drop those slots instead (mass 0).
        pad_keys = kv_len - q_len
        key, value = key[:, :, :q_len], value[:, :, :q_len]

    settings = recorder or KeyMassRecorder(mass="row")  # no recorder: the cheapest mass, discarded
    out, _, key_mass = scored_attention(
        query,
        key,
        value,
        causal=causal,
        scale=scaling,
        mass=settings.mass,
        window=settings.window,
        row=settings.row,
        normalize=settings.normalize,
        reduce_gqa=settings.reduce_gqa,
        backend=settings.backend,
        attn_mask=mask,
    )
    if recorder is not None:
        if pad_keys:
            key_mass = F.pad(key_mass, (0, pad_keys))
        layer_idx = getattr(module, "layer_idx", None)
        recorder.record(layer_idx if layer_idx is not None else len(recorder.key_mass), key_mass)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention and mask functions under ``"salience_scored"`` (idempotent); return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, scored_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


@contextlib.contextmanager
def record_key_mass(
    model,
    *,
    mass: str = "all",
    window: int | None = None,
    row: int | None = None,
    normalize: bool = False,
    reduce_gqa: bool = False,
    backend: str = "auto",
    accumulate: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[KeyMassRecorder]:
    """Run ``model`` on scored attention inside the block and record each layer's key mass.

    The arguments are those of :func:`salience.kernels.scored_attention` (checked here, before any forward pass) plus
    ``accumulate`` and ``callback`` (see :class:`KeyMassRecorder`). The model's previous attention implementation is
    restored on exit, also when the block raises.
    """
    recorder = KeyMassRecorder(mass=mass, window=window, row=row, normalize=normalize, reduce_gqa=reduce_gqa,
                               backend=backend, accumulate=accumulate, callback=callback)  # fmt: skip
    _check_settings(recorder)
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)


def _check_settings(recorder: KeyMassRecorder) -> None:
    """Fail on bad settings now rather than inside the first attention layer (``row`` is range-checked per call,
    once the query length is known)."""
    if recorder.mass not in MASS_MODES:
        raise ValueError(f"mass must be one of {MASS_MODES}; got {recorder.mass!r}")
    if recorder.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {recorder.backend!r}")
    if recorder.mass == "window":
        query_range("window", 1, window=recorder.window)
    if recorder.row is not None and (isinstance(recorder.row, bool) or not isinstance(recorder.row, int)):
        raise ValueError(f"row must be an integer or None; got {recorder.row!r}")
