"""Prefill compression of a transformers ``DynamicCache`` (kvpress-style), query-agnostic or query-aware.

One uncompressed forward pass prefills the prompt while every layer's attention is handed to the scorers
(:func:`~salience.harness.kv_prefill.shared_prefill`; or the fused key-mass path). The context part of each layer's
cache is then cut down to the budget with ``torch.gather`` on ``cache.layers[i].keys/values`` (public cache
attributes, no model code copied) into a new cache (:func:`compress_shared`), one kept set per KV head or one shared
set. One prefill thus serves every scorer and budget. Kept keys keep their original rotary positions; tokens fed
afterwards get absolute ``position_ids`` from :attr:`CompressedPrefill.next_position`, and transformers' causal mask
follows the cache length, so the compressed cache is attended exactly as it stands.

Protocols (kvpress, ``kvpress/pipeline.py`` and ``evaluation/evaluate.py`` with ``query_aware``):

* **query-agnostic** (default): the scorers read the context's own queries only; the question comes after
  compression and is fed on the compressed cache, so the kept set cannot depend on it.
* **query-aware**: the question follows the context in the prefill and the scorers read every row, so the question's
  rows are the last ones (SnapKV's observation window, TOVA's last query); only the *context* keys are candidates,
  and the question's own entries stay in the cache uncompressed, **outside the budget**. kvpress compresses the
  question with the context at the same ratio (window scorers such as SnapKV then protect it anyway); keeping it
  whole here gives both modes the same number of context entries per budget, so they compare like for like. The
  cache then holds ``budget + len(question)`` entries per layer, which is what the harness asserts.

Because attention is causal, both modes can be cut from one prefill of context + question (the agnostic view reads
the first ``len(context)`` rows and keys; its cache keeps the context part only).

As in kvpress, compression happens after the prefill's forward pass, so the prefill's own outputs (including the
logits of its last token, :attr:`CompressedPrefill.last_logits`) were computed with the full cache; only tokens fed
afterwards attend to the compressed one.

Proof of work: after compression every layer's real cache length is asserted (``RuntimeError`` otherwise) and
recorded in :attr:`CompressedPrefill.cache_lengths`; :func:`~salience.harness.kv_feed.feed_batched` asserts it again
on the batch it feeds. A ratio of 1.0 keeps every token and reproduces the uncompressed model (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ..scorers.base import Scorer, get_scorer
from ..selection import protected_mask, select_topk, to_kv_heads
from ..validation import check_choice, check_ids, check_protected_fits, check_scorer_window, checked_budget
from .attention_capture import check_attention_path
from .kv_prefill import ScoringView, SharedPrefill, shared_prefill

HEAD_MODES = ("per_kv_head", "shared")


@dataclass
class CompressedPrefill:
    """A prefilled, compressed cache and what it holds.

    Attributes:
        cache: the ``DynamicCache``; per layer ``budget_tokens`` context entries, then the ``question_len`` question
            entries (query-aware mode only).
        next_position: absolute position of the next token fed after the prefill (``context_len + question_len``).
        kept_positions: ``(layers, H_kv, budget_tokens)`` original positions of the kept context entries, ascending.
        cache_lengths: real cache length of every layer right after compression (asserted).
        budget_tokens: context entries kept per layer and KV head.
        context_len: tokens in the context.
        question_len: question entries kept whole after the context (0 in query-agnostic mode).
        scores: ``(layers, H_kv or 1, context_len)`` float32 scores the selection ranked (1 head in shared mode).
        last_logits: ``(1, vocab)`` logits of the prefill's last token (computed with the full cache), when known.
        head_mode, query_aware, scorer_name: the settings used.
    """

    cache: DynamicCache
    next_position: int
    kept_positions: torch.Tensor
    cache_lengths: list[int]
    budget_tokens: int
    context_len: int
    question_len: int = 0
    scores: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None
    head_mode: str = "per_kv_head"
    query_aware: bool = False
    scorer_name: str = ""

    @property
    def budget_ratio(self) -> float:
        return self.budget_tokens / self.context_len

    @property
    def compressed_length(self) -> int:
        """Cache entries per layer right after compression: ``budget_tokens + question_len``."""
        return self.budget_tokens + self.question_len

    def appended(self) -> int:
        """Tokens fed on the cache since compression (0 unless a helper ran with ``restore=False``)."""
        return self.cache.get_seq_length() - self.compressed_length

    def span_kept(self, start: int, stop: int) -> torch.Tensor:
        """``(layers, H_kv)`` share of the context positions ``[start, stop)`` kept by each layer and KV head."""
        if not 0 <= start < stop <= self.context_len:
            raise ValueError(f"span must satisfy 0 <= start < stop <= {self.context_len}, got [{start}, {stop})")
        inside = (self.kept_positions >= start) & (self.kept_positions < stop)
        return inside.sum(dim=-1).float() / (stop - start)


def as_scorer(scorer: Scorer | str) -> Scorer:
    """A scorer instance from an instance or a registered name (unknown names raise, listing the valid ones)."""
    if isinstance(scorer, Scorer):
        return scorer
    if isinstance(scorer, str):
        return get_scorer(scorer)
    raise ValueError(f"scorer must be a Scorer or a registered scorer name, got {scorer!r}")


def _ranking_heads(scores: torch.Tensor, layout: str, num_kv_heads: int, head_mode: str) -> torch.Tensor:
    """``(..., H, K)`` scores in ``layout`` → ``(..., H_kv, K)`` (per KV head) or ``(..., 1, K)`` (shared: the mean
    over all the scorer's head rows)."""
    if head_mode == "shared":
        return scores.mean(dim=-2, keepdim=True)
    return to_kv_heads(scores, layout, num_kv_heads)


def context_protection(context_len: int, *, n_sink: int = 0, recent_window: int = 0,
                       protect: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """``(context_len,)`` bool: the sinks, the recent window and ``protect`` (e.g. a needle span), always kept."""
    if protect is not None:
        protect = torch.as_tensor(protect, dtype=torch.bool, device=device).flatten()
        if protect.shape[0] != context_len:
            raise ValueError(f"protect must have one entry per context token ({context_len}), got {protect.shape[0]}")
    return protected_mask(torch.arange(context_len, device=device), n_sink=n_sink, recent=recent_window,
                          newest_position=context_len - 1, extra=protect)


def select_kept(scores: torch.Tensor, budget_tokens: int, protect: torch.Tensor, num_kv_heads: int,
                head_mode: str = "per_kv_head", *, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept context positions of every layer, as the harness keeps them.

    ``scores`` ``(layers, H, C)`` in the scorer's concrete head ``layout`` (``"query"``, ``"kv"`` or ``"shared"``:
    ``SharedPrefill.layouts``, or :meth:`Scorer.head_layout_for`) become one row per KV head
    (:func:`salience.selection.to_kv_heads`: GQA group mean for query heads) or, shared, one set; ``protect``
    ``(C,)`` is kept first, the rest by score. Returns ``(kept (layers, H_kv, budget) ascending, ranked (layers,
    H_kv or 1, C))``.
    """
    check_choice(head_mode, HEAD_MODES, "head_mode")
    check_protected_fits(protect, budget_tokens)
    ranked = _ranking_heads(scores.float(), layout, num_kv_heads, head_mode)
    kept = select_topk(ranked, budget_tokens, protect.to(ranked.device))
    return kept.expand(-1, num_kv_heads, -1), ranked


def _gather_context(states: torch.Tensor, index: torch.Tensor, context_len: int) -> torch.Tensor:
    """Keep ``index`` ``(H_kv, budget)`` of the context entries of ``states`` ``(B, H_kv, T, D)``; the entries after
    the context (the question's) stay as they are."""
    b, h, _, d = states.shape
    gather = index[None, :, :, None].expand(b, h, index.shape[-1], d).to(states.device)
    context = states[:, :, :context_len].gather(2, gather)
    return torch.cat([context, states[:, :, context_len:]], dim=2).contiguous()


@torch.inference_mode()
def compress_shared(
    prefill: SharedPrefill,
    scored: tuple[str, str],
    budget: float | int,
    *,
    prefix_len: int | None = None,
    head_mode: str = "per_kv_head",
    n_sink: int = 0,
    recent_window: int = 0,
    protect: torch.Tensor | None = None,
    scorer_name: str = "",
) -> CompressedPrefill:
    """A compressed copy of ``prefill``'s cache: the context ``[0, C)`` cut to ``budget`` by ``scores``, then the
    entries ``[C, prefix_len)`` whole (a query-aware question), nothing after.

    Args:
        scored: ``(view, label)``, the key of the scores to rank by in ``prefill.scores`` (``(layers, H, C)``
            scores of the context keys, whose head rows ``prefill.layouts`` names).
        budget: the kept share of the context, a float ratio in (0, 1], or a token count in [1, C].
        prefix_len: the prompt the cache stands for: ``C`` (query-agnostic, default) or ``C + len(question)``.
        n_sink / recent_window: first / last context positions always kept (counting against the budget);
            protect: ``(C,)`` bool mask of further context tokens always kept (e.g. a needle span for an oracle).

    The prefill's cache is not changed, so one prefill serves every scorer and budget.
    """
    context_len = prefill.context_len
    prefix_len = context_len if prefix_len is None else prefix_len
    if not context_len <= prefix_len <= prefill.total:
        raise ValueError(f"prefix_len must lie in [{context_len}, {prefill.total}], got {prefix_len}")
    if scored not in prefill.scores:
        raise ValueError(f"no scores for {scored!r} in this prefill; scored: {sorted(prefill.scores)}")
    scores, layout = prefill.scores[scored], prefill.layouts[scored]
    layers = prefill.num_layers
    if scores.dim() != 3 or scores.shape[0] != layers or scores.shape[-1] != context_len:
        raise ValueError(f"scores must be (layers={layers}, heads, C={context_len}), got {tuple(scores.shape)}")
    budget_tokens = checked_budget(budget, context_len, n_sink=n_sink, recent_window=recent_window)
    source = prefill.cache.layers
    num_kv_heads = source[0].keys.shape[1]
    device = source[0].keys.device
    keep = context_protection(context_len, n_sink=n_sink, recent_window=recent_window, protect=protect,
                              device=device)
    kept, ranked = select_kept(scores.to(device), budget_tokens, keep, num_kv_heads, head_mode, layout=layout)
    cache = DynamicCache(config=prefill.config)
    for i, layer in enumerate(source):
        cache.update(_gather_context(layer.keys[:, :, :prefix_len], kept[i], context_len),
                     _gather_context(layer.values[:, :, :prefix_len], kept[i], context_len), i)
    lengths = [int(layer.keys.shape[-2]) for layer in cache.layers]
    value_lengths = [int(layer.values.shape[-2]) for layer in cache.layers]
    expected = budget_tokens + prefix_len - context_len
    if lengths != [expected] * layers or value_lengths != lengths or cache.get_seq_length() != expected:
        raise RuntimeError(f"compression left cache lengths {lengths} (values {value_lengths}), expected {expected} "
                           f"({budget_tokens} context + {prefix_len - context_len} question) in every layer")
    return CompressedPrefill(
        cache=cache,
        next_position=prefix_len,
        kept_positions=kept,
        cache_lengths=lengths,
        budget_tokens=budget_tokens,
        context_len=context_len,
        question_len=prefix_len - context_len,
        scores=ranked,
        last_logits=prefill.logits_at(prefix_len - 1),
        head_mode=head_mode,
        query_aware=prefix_len > context_len,
        scorer_name=scorer_name,
    )


@torch.inference_mode()
def compress_prefill(
    model: nn.Module,
    context_ids: torch.Tensor,
    scorer: Scorer | str,
    budget: float | int,
    *,
    question_ids: torch.Tensor | None = None,
    query_aware: bool = False,
    head_mode: str = "per_kv_head",
    n_sink: int = 0,
    recent_window: int = 0,
    attention: str = "eager",
    generator: torch.Generator | None = None,
    roles: dict[str, torch.Tensor] | None = None,
    protect: torch.Tensor | None = None,
    tokenizer=None,
) -> CompressedPrefill:
    """Prefill ``context_ids`` ``(1, T)`` and compress its cache to ``budget`` entries per layer and KV head: one
    scorer, one budget (:func:`~salience.harness.kv_prefill.shared_prefill` + :func:`compress_shared`).

    Args:
        scorer: a :class:`Scorer` or a registered name; higher scores are kept.
        budget: the kept share of the context, a float ratio in (0, 1] (1.0 keeps everything, i.e. no compression),
            or a token count in [1, T].
        question_ids: ``(1, T_q)``, query-aware mode only: prefilled after the context, kept whole outside the budget.
        query_aware: score with the question's attention rows (see the module docstring for the protocol).
        head_mode: ``"per_kv_head"`` reduces query-head scores to each KV head (GQA group mean) and lets each KV head
            keep its own set; ``"shared"`` averages over all heads and keeps one set for every head. Same count
            either way.
        n_sink: first context positions always kept; recent_window: last context positions always kept. Both count
            against the budget.
        attention: ``"eager"`` captures each layer's probabilities; ``"fused"`` runs scored attention and gives the
            scorer only each key's mass (key-mass scorers only).
        generator: seeds stochastic scorers. roles: optional ``(T,)`` bool masks over the context (e.g. separators).
        tokenizer: when given, roles the scorer requires (``Scorer.requires_roles``) and ``roles`` lacks are built
            from ``context_ids`` (SepLLM's ``"separator"``: :func:`salience.scorers.separator_mask`).
        protect: optional ``(T,)`` bool mask of further context tokens always kept, counting against the budget
            (e.g. a needle span, for an oracle diagnostic).

    Raises ValueError naming the valid range or choices for a bad budget, window, head mode, scorer or path.
    """
    scorer = as_scorer(scorer)
    context_ids = check_ids(context_ids, "context_ids")
    check_choice(head_mode, HEAD_MODES, "head_mode")
    context_len = context_ids.shape[1]
    budget_tokens = checked_budget(budget, context_len, n_sink=n_sink, recent_window=recent_window)
    check_attention_path(attention, [scorer])
    if query_aware:
        if question_ids is None:
            raise ValueError("query_aware=True needs question_ids: the question is prefilled after the context")
        question_ids = check_ids(question_ids, "question_ids").to(context_ids.device)
        prompt_ids = torch.cat([context_ids, question_ids], dim=1)
    else:
        if question_ids is not None:
            raise ValueError("question_ids are prefilled only with query_aware=True; in query-agnostic mode feed the "
                             "question after compression (continuation_logits / greedy_answer)")
        prompt_ids = context_ids
    total = prompt_ids.shape[1]
    check_scorer_window(scorer, total)
    keep = context_protection(context_len, n_sink=n_sink, recent_window=recent_window, protect=protect,
                              device=context_ids.device)
    check_protected_fits(keep, budget_tokens)  # before the forward pass; compress_shared checks it again
    prefill = shared_prefill(model, prompt_ids, context_len, [ScoringView("prompt", total, {"scorer": scorer})],
                             attention=attention, generator=generator, roles=roles, tokenizer=tokenizer)
    return compress_shared(prefill, ("prompt", "scorer"), budget_tokens, prefix_len=total,
                           head_mode=head_mode, n_sink=n_sink, recent_window=recent_window, protect=protect,
                           scorer_name=scorer.name)


@torch.inference_mode()
def full_prefill(model: nn.Module, context_ids: torch.Tensor,
                 question_ids: torch.Tensor | None = None) -> CompressedPrefill:
    """The uncompressed baseline in the same container: a plain prefill, no capture and no surgery.

    With ``question_ids`` the question is prefilled after the context, as in query-aware mode.
    """
    context_ids = check_ids(context_ids, "context_ids")
    prompt_ids = context_ids
    if question_ids is not None:
        prompt_ids = torch.cat([context_ids, check_ids(question_ids, "question_ids").to(context_ids.device)], dim=1)
    total, context_len = prompt_ids.shape[1], context_ids.shape[1]
    cache = DynamicCache(config=model.config)
    out = model(prompt_ids, cache=cache, position_ids=torch.arange(total, device=prompt_ids.device)[None],
                use_cache=True, logits_to_keep=1)
    num_kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    kept = torch.arange(context_len, device=prompt_ids.device).expand(len(cache.layers), num_kv_heads, -1)
    return CompressedPrefill(
        cache=cache,
        next_position=total,
        kept_positions=kept,
        cache_lengths=[int(layer.keys.shape[-2]) for layer in cache.layers],
        budget_tokens=context_len,
        context_len=context_len,
        question_len=total - context_len,
        last_logits=out.logits[:, -1].float(),
        query_aware=question_ids is not None,
        scorer_name="uncompressed",
    )
