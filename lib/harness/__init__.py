"""Harnesses own the model surgery and prove it happened (cache lengths, kept-token counts)."""

from .attention_capture import CAPTURE, capture_attention
from .kv_feed import continuation_logits, feed_batched, greedy_answer, greedy_tokens
from .kv_prefill import ScoringView, SharedPrefill, prefill_scores, shared_prefill
from .kv_prefill_compression import HEAD_MODES, CompressedPrefill, compress_prefill, compress_shared, full_prefill
from .kv_streaming import Stream, StreamBatch, StreamResult, stream_batch, stream_perplexity
from .token_merging import (
    bipartite_destination,
    contextual_destination,
    merge_by_destination,
    reduction_map,
    tome_destination,
)
from .vit_encoder import EncoderOutput, ScoreRequest, encode, prefix_from
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
    "ScoringView",
    "SharedPrefill",
    "EncoderOutput",
    "ScoreRequest",
    "Stream",
    "StreamBatch",
    "StreamResult",
    "capture_attention",
    "compress_prefill",
    "compress_shared",
    "continuation_logits",
    "feed_batched",
    "full_prefill",
    "greedy_answer",
    "greedy_tokens",
    "prefill_scores",
    "shared_prefill",
    "stream_batch",
    "stream_perplexity",
    "bipartite_destination",
    "contextual_destination",
    "encode",
    "estimate_flops",
    "merge_by_destination",
    "prefix_from",
    "prune_vit",
    "reduce_and_finish",
    "reduction_map",
    "tome_destination",
    "vit_forward",
    "vit_parts",
    "vit_prefix",
]
