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
from .token_merging import bipartite_destination, contextual_destination, merge_by_destination, tome_destination
from .vit_pruning import (
    Stage,
    VitPrefix,
    VitResult,
    estimate_flops,
    prune_vit,
    reduce_and_finish,
    vit_forward,
    vit_parts,
    vit_prefix,
)

__all__ = [
    "CAPTURE",
    "HEAD_MODES",
    "Stage",
    "VitPrefix",
    "VitResult",
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
    "bipartite_destination",
    "contextual_destination",
    "estimate_flops",
    "merge_by_destination",
    "prune_vit",
    "reduce_and_finish",
    "tome_destination",
    "vit_forward",
    "vit_parts",
    "vit_prefix",
]
