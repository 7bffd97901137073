"""The vision harness's attention function and block runner: proportional attention, capture, token counting.

Merged tokens carry sizes; with proportional attention every later block adds ``log(size)`` to the attention logits of
each key (ToMe's proportional attention). :class:`AttentionState` is a mode of the workbook's one attention hook
(:mod:`salience.attention_hook`): set for a block by :func:`run_block`, it adds the sizes and captures the
probabilities, keys and values a caller asks for, so one forward pass records only what is needed.

Every block's input length is recorded by a forward pre-hook (:func:`counting_tokens`): proof, not bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from ..attention_hook import NAME, active_mode, attending, install
from ..kernels.scored_attention import scored_attention

#: the registered name a ViT runs under in the harness (the one hook's)
ATTENTION = NAME


@dataclass
class AttentionState:
    """What the registered attention function reads (sizes, what to record) and writes (the captures) for one block.

    ``log_sizes (B, K)`` is added to the logits of every query's row (proportional attention); ``probs``
    ``(B, H, K, K)``, ``keys`` and ``values`` ``(B, H, K, D)`` are filled when ``record_probs`` / ``record_kv``.
    ``record_cls_row`` (without ``record_probs``) records only the [CLS] query's row, ``probs (B, H, 1, K)``, read
    from the fused scored-attention kernel (:func:`salience.kernels.scored_attention`, ``mass="row"``, ``row=0``):
    no ``K x K`` matrix, about the cost of SDPA.
    """

    log_sizes: torch.Tensor | None = None
    record_probs: bool = False
    record_kv: bool = False
    record_cls_row: bool = False
    probs: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bidirectional attention with optional ``log(size)`` key bias and capture.

        query/key/value ``(B, H, K, D)``; returns ``(B, K, H, D)`` and the probabilities when they were computed.
        Without capture it calls PyTorch's fused ``scaled_dot_product_attention`` (the bias as a float mask), so
        timing a reduced model measures real work, not a slow eager path.
        """
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        bias = attention_mask
        if self.log_sizes is not None:
            size_bias = self.log_sizes[:, None, None, :].to(query.dtype)
            bias = size_bias if bias is None else bias + size_bias
        if self.record_kv:
            self.keys, self.values = key, value
        fused_row = self.record_cls_row and not self.record_probs and bias is None and not module.training
        if fused_row:  # the kernel takes boolean masks only: with a float bias (merged sizes) the row comes from eager
            res = scored_attention(query, key, value, causal=False, scale=scale, mass="row", row=0)
            self.probs = res.key_mass[:, :, None, :]
            return res.out.transpose(1, 2).contiguous(), None
        if not (self.record_probs or self.record_cls_row):
            out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale,
                                                             dropout_p=dropout if module.training else 0.0)
            return out.transpose(1, 2).contiguous(), None
        logits = torch.matmul(query, key.transpose(2, 3)) * scale
        if bias is not None:
            logits = logits + bias
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        self.probs = probs if self.record_probs else probs[:, :, :1]
        out = torch.matmul(probs.to(query.dtype), value)
        return out.transpose(1, 2).contiguous(), probs


@contextmanager
def using_vit_attention(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` runs the one hook, in a plain :class:`AttentionState` unless :func:`run_block`
    sets a block's own; its previous implementation is restored afterwards."""
    with attending(model, AttentionState()):
        yield


@contextmanager
def counting_tokens(blocks: Sequence[nn.Module], counts: list[int]) -> Iterator[None]:
    """Record the sequence length every block really receives (a pre-hook: proof, not bookkeeping)."""
    handles = [b.register_forward_pre_hook(lambda _m, args: counts.append(int(args[0].shape[1]))) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def attention_state(state: AttentionState) -> Iterator[AttentionState]:
    """Within the block the one hook reads (and records into) ``state``."""
    with active_mode(state):
        yield state


def run_block(block: nn.Module, hidden: torch.Tensor, state: AttentionState) -> torch.Tensor:
    """One block on ``hidden (B, K, d)`` with ``state`` visible to the attention function."""
    with attention_state(state):
        out = block(hidden, None)
    return out[0] if isinstance(out, tuple) else out


__all__ = ["ATTENTION", "AttentionState", "attention_state", "counting_tokens", "install", "run_block",
           "using_vit_attention"]
