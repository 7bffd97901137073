"""Run a stock transformers model on scored attention and collect each layer's key mass.

>>> from salience.kernels.transformers_integration import record_key_mass
>>> with record_key_mass(model, mass="window", window=32) as rec:
...     model(**inputs)
>>> rec.key_mass[layer_idx]        # [B, H, N_k] float32 (or [B, H_kv, N_k] with reduce_gqa=True)

How it plugs in (public extension points only, no copied model code): through the workbook's one attention hook
(:mod:`salience.attention_hook`), registered with transformers' ``AttentionInterface`` and, for its masks, with
``AttentionMaskInterface`` (an unregistered name silently gets *no mask at all*). The hook's mask format is SDPA's: a
boolean mask, which is what :func:`salience.kernels.scored_attention` takes, or ``None`` for a plain causal pattern,
which lets CUDA inputs take the Triton path (masked inputs take the blockwise path). :func:`record_key_mass` switches
the model to the hook with a :class:`KeyMassRecorder` as its mode for the duration of a ``with`` block and restores
the previous implementation afterwards; the mode is found through a context variable, so nothing has to be threaded
through ``model(...)``'s keyword arguments.

Attention weights are never materialised: ``output_attentions=True`` returns ``None`` weights on this path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attention_hook import NAME, attending, install
from .scored_attention import BACKENDS, MASS_MODES, scored_attention
from .scored_attention.common import query_range

#: the registered name a model runs under while recording (the one hook's)
ATTENTION_NAME = NAME


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

    def attend(self, module, query, key, value, attention_mask, *, dropout=0.0, scaling=None, is_causal=None,
               **kwargs):
        """The one hook's mode: :func:`scored_attention_forward` recording into this recorder."""
        return scored_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        is_causal=is_causal, recorder=self, **kwargs)


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
    recorder: KeyMassRecorder | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An attention function with transformers' calling convention (like ``sdpa_attention_forward``).

    query ``[B, H_q, N_q, D]``, key/value ``[B, H_kv, N_k, D]`` (not repeated for GQA). Returns the output as
    ``[B, N_q, H_q, D]`` and ``None`` attention weights, and hands the key mass to ``recorder`` (without one, the
    cheapest mass is computed and discarded).
    """
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError("scored attention supports neither logit soft-capping nor position biases")
    if dropout:
        raise NotImplementedError("scored attention has no attention dropout; call model.eval()")
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
    """Register the one attention hook and its mask format (idempotent); return its name."""
    return install()


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
    with attending(model, recorder):
        yield recorder


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
