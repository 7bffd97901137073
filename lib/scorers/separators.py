"""SepLLM [@sepllm]: separator tokens act as condensed summaries of their segment, so keep them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import AttentionView, Scorer, register

SEPARATORS = (".", ",", "?", "!", ";", ":", "\n")


def separator_mask(token_ids, tokenizer, separators: Sequence[str] = SEPARATORS) -> torch.Tensor:
    """Bool mask, shaped like ``token_ids``, of the tokens whose text is made of separators only.

    Each distinct id is decoded alone (``tokenizer.decode([id])``); surrounding spaces are ignored, so ``" ."``,
    ``"\\n\\n"`` and ``".\\n"`` count, ``"),"`` and ``"a."`` do not. (SepLLM itself matches a fixed list of
    separator token ids; decoding covers the tokenizer's merged variants too.)
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    chars = {s for s in separators if len(s) == 1}

    def is_separator(text: str) -> bool:
        core = text.strip(" ")
        return core in separators or (bool(core) and all(c in chars for c in core))

    verdict = {i: is_separator(tokenizer.decode([i])) for i in ids.unique().tolist()}
    return torch.tensor([verdict[i] for i in ids.flatten().tolist()], dtype=torch.bool).view(ids.shape)


@register
@dataclass
class SeparatorScorer(Scorer):
    """SepLLM's structural score: ``s_k = 1[k is a separator] + pos_k / (2 (max_pos + 1))``.

    Separators score 1 and every other token 0; the recency term lies in [0, ½), so any separator outranks any other
    token and ties break toward recent tokens. SepLLM's other two kinds of kept tokens, the initial tokens (attention
    sinks) and the recent neighbouring window, are protection: ``selection.protected_mask(n_sink=..., recent=...)``.

    Reads ``view.roles["separator"]`` ``(K,)`` (build it with :func:`separator_mask`; the KV harnesses do when given
    ``tokenizer=``) and ``key_positions``; returns ``(B, H, K)`` (the same ranking for every head). Attention-free.
    A view whose keys hold no separator at all is valid: the ranking is then recency alone.
    """

    name = "sepllm"
    head_layout = "view"
    needs = frozenset()
    requires_roles = frozenset({"separator"})

    def score(self, view: AttentionView) -> torch.Tensor:
        mask = view.roles["separator"]
        b, h = view.batch_heads()
        positions = view.key_positions.float()
        recency = positions / (2 * (positions.max() + 1))
        return (mask.to(positions.device).float() + recency).expand(b, h, -1).clone()
