"""Scorers: one rule per module, all behind :class:`~salience.scorers.base.Scorer` (``score(view) → (B, H, K)``).

Add a scorer: see README, "Adding a scorer".
"""

from . import accumulated_attention, forgetting_attention, normalized_attention, random_baseline, recency  # noqa: F401
from . import (  # noqa: F401
    attention_output_error,
    attention_pagerank,
    key_norm,
    keyformer,
    last_query_attention,
    probe_attention,
    separators,
    value_aware_attention,
    window_attention,
)
from . import attention_rollout, cls_attention, dart, divprune, flowcut, graph_propagation, hiprune  # noqa: F401
from . import spatial_grid, todre  # noqa: F401
from . import attention_flow, attention_x_gradient, globenc, gradient_x_input  # noqa: F401
from . import integrated_gradients, occlusion, raw_attention  # noqa: F401
from .accumulated_attention import AccumulatedAttention
from .attention_output_error import AttentionOutputError
from .attention_pagerank import AttentionPageRank
from .base import AttentionView, Scorer, available_scorers, get_scorer, register
from .forgetting_attention import ForgettingAttention
from .key_norm import KeyNorm
from .keyformer import Keyformer
from .last_query_attention import LastQueryAttention
from .normalized_attention import NormalizedAttention
from .probe_attention import ProbeNormalizedAttention, probe_rows
from .random_baseline import RandomScorer
from .recency import RecencyScorer
from .separators import SeparatorScorer, separator_mask
from .spec import ScorerList, ScorerSpec, build_scorers
from .value_aware_attention import ValueAwareAttention
from .window_attention import WindowAttention

__all__ = [
    "AccumulatedAttention",
    "AttentionOutputError",
    "AttentionPageRank",
    "AttentionView",
    "ForgettingAttention",
    "KeyNorm",
    "Keyformer",
    "LastQueryAttention",
    "NormalizedAttention",
    "ProbeNormalizedAttention",
    "RandomScorer",
    "RecencyScorer",
    "Scorer",
    "ScorerList",
    "ScorerSpec",
    "SeparatorScorer",
    "ValueAwareAttention",
    "WindowAttention",
    "available_scorers",
    "build_scorers",
    "get_scorer",
    "probe_rows",
    "register",
    "separator_mask",
]
