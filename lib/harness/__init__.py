"""Harnesses own the model surgery and prove it happened (cache lengths, kept-token counts)."""

from .attention_capture import CAPTURE, capture_attention
from .kv_prefill import prefill_scores
from .kv_prefill_compression import (
    HEAD_MODES,
    CompressedPrefill,
    compress_prefill,
    continuation_logits,
    full_prefill,
    greedy_answer,
    greedy_tokens,
)
from .kv_streaming import StreamResult, stream_perplexity

__all__ = [
    "CAPTURE",
    "HEAD_MODES",
    "CompressedPrefill",
    "StreamResult",
    "capture_attention",
    "compress_prefill",
    "continuation_logits",
    "full_prefill",
    "greedy_answer",
    "greedy_tokens",
    "prefill_scores",
    "stream_perplexity",
]
