"""Hand each layer's attention probabilities to a callback, through the workbook's one attention hook.

Within a :func:`capture_attention` block the model runs :func:`salience.attention_hook.salience_attention` in
:class:`~salience.attention_hook.Capture` mode: ordinary eager attention that passes ``(layer_idx, probs, key,
value)`` to the callback, layer by layer. The harness can reduce what it needs on the fly (a column sum, a window)
instead of keeping 30 layers of ``(B, H, Q, K)`` matrices, as ``output_attentions=True`` would.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..attention_hook import NAME, AttentionCallback, Capture, attending, install
from ..validation import check_choice

#: the registered name a capturing model runs under (the one hook's)
CAPTURE = NAME


@contextmanager
def capture_attention(model: nn.Module, callback: AttentionCallback) -> Iterator[None]:
    """Within the block, every attention layer of ``model`` reports to ``callback``.

    The model is switched to the one hook for the block and restored afterwards. Raises if the model's attention
    modules do not go through transformers' attention registry.
    """
    with attending(model, Capture(callback)):
        yield


ATTENTION_PATHS = ("eager", "fused")


def check_attention_path(path: str, scorers) -> None:
    """``"eager"`` captures full probabilities; ``"fused"`` runs scored attention and hands scorers only each key's
    attention mass (no N×N matrix). Raise if a scorer needs more than the chosen path gives."""
    check_choice(path, ATTENTION_PATHS, "attention")
    if path == "fused":
        needy = [s.name for s in scorers if s.needs - {"key_mass"}]
        if needy:
            raise ValueError(f"scorers {needy} need more than key mass; run them with attention='eager'")


__all__ = ["ATTENTION_PATHS", "CAPTURE", "AttentionCallback", "capture_attention", "check_attention_path", "install"]
