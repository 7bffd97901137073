"""Kernels that make scoring affordable (installed as ``salience.kernels``).

Each kernel family has three paths behind one function: ``naive`` (readable PyTorch, float64-capable reference),
``blockwise`` (PyTorch, O(N·block) memory, the CPU path) and ``triton`` (GPU; tests run it under
``TRITON_INTERPRET=1``). Triton is imported only when a triton path is used, so importing this package is cheap and
``TRITON_INTERPRET`` can still be set afterwards.

- :func:`scored_attention`: softmax attention that also returns the probability mass each key receives.
- :func:`lightning_attention`: Lightning Attention-2 [@lightning_attention2], causal linear attention with per-head
  decay.
- :mod:`salience.kernels.transformers_integration`: runs a stock transformers model on scored attention.
- :mod:`salience.kernels.testing`: the acceptance rule shared by the kernel tests (FlashAttention's
  [@flashattention]).
"""

from .lightning_attention import lightning_attention
from .scored_attention import ScoredAttentionOutput, scored_attention

__all__ = ["ScoredAttentionOutput", "lightning_attention", "scored_attention"]
