"""Prefill compression of a transformers ``DynamicCache`` (kvpress-style), query-agnostic or query-aware.

One forward pass prefills the prompt into a ``DynamicCache`` while :func:`capture_attention` (or the fused key-mass
path) hands every layer's attention to the scorer. The context part of each layer's cache is then cut down to the
budget with ``torch.gather`` on ``cache.layers[i].keys/values`` (public cache attributes, no model code copied), one
kept set per KV head or one shared set. Kept keys keep their original rotary positions; tokens fed afterwards get
absolute ``position_ids`` from :attr:`CompressedPrefill.next_position`, and transformers' causal mask follows the
cache length, so the compressed cache is attended exactly as it stands.

Protocols (kvpress, ``kvpress/pipeline.py`` and ``evaluation/evaluate.py`` with ``query_aware``):

* **query-agnostic** (default): only the context is prefilled and scored (the view holds the context's own queries);
  the question comes after compression and is fed on the compressed cache, so the kept set cannot depend on it.
* **query-aware**: the question is appended to the context and both are prefilled in one pass, as kvpress does
  (``context + question``, then an empty question). The scorer sees the attention of every row, so the question's
  rows are the last ones (SnapKV's observation window, TOVA's last query); only the *context* keys are candidates,
  and the question's own entries stay in the cache uncompressed, **outside the budget**. kvpress compresses the
  question with the context at the same ratio (window scorers such as SnapKV then protect it anyway); keeping it
  whole here gives both modes the same number of context entries per budget, so they compare like for like. The
  cache then holds ``budget + len(question)`` entries per layer, which is what the harness asserts.

As in kvpress, compression happens after the prefill's forward pass, so the prefill's own outputs (including the
logits of its last token, :attr:`CompressedPrefill.last_logits`) were computed with the full cache; only tokens fed
afterwards attend to the compressed one.

Proof of work: after compression every layer's real cache length is asserted (``RuntimeError`` otherwise) and
recorded in :attr:`CompressedPrefill.cache_lengths`. A ratio of 1.0 keeps every token and reproduces the uncompressed
model (tested).
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ..scorers.base import AttentionView, Scorer, get_scorer
from ..selection import protected_mask, reduce_to_kv_heads, resolve_budget, select_topk
from .attention_capture import capture_attention, check_attention_path
from .roles import resolve_roles

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
        last_logits: ``(1, vocab)`` logits of the prefill's last token (computed with the full cache).
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


def _plain_number(budget):
    """NumPy scalars (a budget from ``np.linspace`` or ``np.arange``) as Python floats / ints."""
    if isinstance(budget, bool) or isinstance(budget, (int, float)):
        return budget
    if isinstance(budget, numbers.Integral):
        return int(budget)
    if isinstance(budget, numbers.Real):
        return float(budget)
    return budget


def _check_ids(ids: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be a (1, T) tensor of token ids with T >= 1, got {shape}")
    return ids


def _check_protection(n_sink: int, recent_window: int, budget_tokens: int, context_len: int) -> None:
    if n_sink < 0 or recent_window < 0:
        raise ValueError(f"n_sink and recent_window must be >= 0, got {n_sink} and {recent_window}")
    if recent_window > context_len:
        raise ValueError(f"recent_window ({recent_window}) is longer than the context ({context_len} tokens): "
                         f"use recent_window in [0, {context_len}]")
    if n_sink + recent_window > budget_tokens:
        raise ValueError(f"n_sink ({n_sink}) + recent_window ({recent_window}) exceed the budget of {budget_tokens} "
                         f"tokens: protect at most {budget_tokens} tokens")


def _check_scorer_window(scorer: Scorer, prompt_len: int) -> None:
    window = getattr(scorer, "window", None)
    if isinstance(window, int) and not isinstance(window, bool) and window > prompt_len:
        raise ValueError(f"{scorer.name} window ({window}) is longer than the prompt ({prompt_len} tokens): "
                         f"use window in [1, {prompt_len}]")


def _kv_head_scores(scores: torch.Tensor, num_kv_heads: int, head_mode: str) -> torch.Tensor:
    """``(1, H, K)`` scores → ``(1, H_kv, K)`` (per KV head) or ``(1, 1, K)`` (shared)."""
    if head_mode == "shared":
        return scores.mean(dim=1, keepdim=True)
    heads = scores.shape[1]
    if heads == num_kv_heads:
        return scores
    if heads == 1:
        return scores.expand(-1, num_kv_heads, -1)
    return reduce_to_kv_heads(scores, num_kv_heads, "mean")


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
    """Prefill ``context_ids`` ``(1, T)`` and compress its cache to ``budget`` entries per layer and KV head.

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
    context_ids = _check_ids(context_ids, "context_ids")
    if head_mode not in HEAD_MODES:
        raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    context_len = context_ids.shape[1]
    budget_tokens = resolve_budget(_plain_number(budget), context_len)
    _check_protection(n_sink, recent_window, budget_tokens, context_len)
    check_attention_path(attention, [scorer])
    if query_aware:
        if question_ids is None:
            raise ValueError("query_aware=True needs question_ids: the question is prefilled after the context")
        question_ids = _check_ids(question_ids, "question_ids").to(context_ids.device)
        prompt_ids = torch.cat([context_ids, question_ids], dim=1)
    else:
        if question_ids is not None:
            raise ValueError("question_ids are prefilled only with query_aware=True; in query-agnostic mode feed the "
                             "question after compression (continuation_logits / greedy_answer)")
        prompt_ids = context_ids
    total = prompt_ids.shape[1]
    question_len = total - context_len
    _check_scorer_window(scorer, total)

    config = model.config
    num_layers = config.num_hidden_layers
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    device = prompt_ids.device
    positions = torch.arange(total, device=device)
    context_roles = resolve_roles(scorer, context_ids[0], roles, tokenizer, what="the context")
    # question tokens have no role
    view_roles = {name: torch.nn.functional.pad(mask, (0, question_len)) for name, mask in context_roles.items()}

    layer_scores: list[torch.Tensor | None] = [None] * num_layers

    def score(layer_idx: int, **captured) -> None:
        view = AttentionView(key_positions=positions, query_positions=positions, visible_queries=total - positions,
                             roles=view_roles, generator=generator, **captured)
        # the whole prompt is scored as one sequence; only the context keys are candidates
        layer_scores[layer_idx] = scorer(view)[..., :context_len].float()

    needs_attention = bool(scorer.needs & {"attention", "key_mass"})
    if not needs_attention:
        capture = nullcontext()
    elif attention == "eager":
        capture = capture_attention(
            model, lambda i, probs, key, value: score(i, attention=probs, keys=key, values=value))
    else:
        from ..kernels.transformers_integration import record_key_mass

        capture = record_key_mass(model, mass="all", callback=lambda i, mass: score(i, key_mass=mass))
    cache = DynamicCache(config=config)
    with capture:
        out = model(prompt_ids, past_key_values=cache, position_ids=positions[None], use_cache=True, logits_to_keep=1)
    if not needs_attention:
        for i in range(num_layers):
            score(i, keys=cache.layers[i].keys, values=cache.layers[i].values)
    missing = [i for i, s in enumerate(layer_scores) if s is None]
    if missing:
        raise RuntimeError(f"layers {missing} reported no attention: the model's attention must go through "
                           "transformers' attention registry")

    if protect is not None:
        protect = torch.as_tensor(protect, dtype=torch.bool, device=device).flatten()
        if protect.shape[0] != context_len:
            raise ValueError(f"protect must have one entry per context token ({context_len}), got {protect.shape[0]}")
    protect = protected_mask(torch.arange(context_len, device=device), n_sink=n_sink, recent=recent_window,
                             newest_position=context_len - 1, extra=protect)
    if int(protect.sum()) > budget_tokens:
        raise ValueError(f"{int(protect.sum())} protected tokens (n_sink, recent_window, protect) exceed the budget "
                         f"of {budget_tokens} tokens: protect at most {budget_tokens}")
    kept, ranked = [], []
    for i in range(num_layers):
        head_scores = _kv_head_scores(layer_scores[i], num_kv_heads, head_mode)  # (1, H_kv or 1, T)
        index = select_topk(head_scores[0], budget_tokens, protect).expand(num_kv_heads, -1)  # (H_kv, budget)
        layer = cache.layers[i]
        layer.keys = _gather_context(layer.keys, index, context_len)
        layer.values = _gather_context(layer.values, index, context_len)
        kept.append(index)
        ranked.append(head_scores[0])

    lengths = [int(cache.layers[i].keys.shape[-2]) for i in range(num_layers)]
    expected = budget_tokens + question_len
    value_lengths = [int(cache.layers[i].values.shape[-2]) for i in range(num_layers)]
    if lengths != [expected] * num_layers or value_lengths != lengths or cache.get_seq_length() != expected:
        raise RuntimeError(f"compression left cache lengths {lengths} (values {value_lengths}), expected {expected} "
                           f"({budget_tokens} context + {question_len} question) in every layer")
    return CompressedPrefill(
        cache=cache,
        next_position=total,
        kept_positions=torch.stack(kept),
        cache_lengths=lengths,
        budget_tokens=budget_tokens,
        context_len=context_len,
        question_len=question_len,
        scores=torch.stack(ranked),
        last_logits=out.logits[:, -1].float(),
        head_mode=head_mode,
        query_aware=query_aware,
        scorer_name=scorer.name,
    )


def _gather_context(states: torch.Tensor, index: torch.Tensor, context_len: int) -> torch.Tensor:
    """Keep ``index`` ``(H_kv, budget)`` of the context entries of ``states`` ``(B, H_kv, T, D)``; the entries after
    the context (the question's) stay as they are."""
    b, h, _, d = states.shape
    gather = index[None, :, :, None].expand(b, h, index.shape[-1], d).to(states.device)
    context = states[:, :, :context_len].gather(2, gather)
    return torch.cat([context, states[:, :, context_len:]], dim=2).contiguous()


@torch.inference_mode()
def full_prefill(model: nn.Module, context_ids: torch.Tensor,
                 question_ids: torch.Tensor | None = None) -> CompressedPrefill:
    """The uncompressed baseline in the same container: a plain prefill, no capture and no surgery.

    With ``question_ids`` the question is prefilled after the context, as in query-aware mode.
    """
    context_ids = _check_ids(context_ids, "context_ids")
    prompt_ids = context_ids
    if question_ids is not None:
        prompt_ids = torch.cat([context_ids, _check_ids(question_ids, "question_ids").to(context_ids.device)], dim=1)
    total, context_len = prompt_ids.shape[1], context_ids.shape[1]
    cache = DynamicCache(config=model.config)
    out = model(prompt_ids, past_key_values=cache, position_ids=torch.arange(total, device=prompt_ids.device)[None],
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


@contextmanager
def _rollback(compressed: CompressedPrefill, restore: bool) -> Iterator[None]:
    """Within the block tokens may be appended to the cache; afterwards (with ``restore``) they are cropped off, so
    one compressed prefill can serve several continuations or questions (as kvpress's pipeline does)."""
    length = compressed.cache.get_seq_length()
    try:
        yield
    finally:
        if restore:
            for layer in compressed.cache.layers:
                extra = layer.keys.shape[-2] - length
                if extra > 0:
                    layer.crop(-extra)


@torch.inference_mode()
def continuation_logits(model: nn.Module, compressed: CompressedPrefill, continuation_ids: torch.Tensor, *,
                        restore: bool = True) -> torch.Tensor:
    """Feed ``continuation_ids`` ``(1, n)`` on the compressed cache at their absolute positions; ``(1, n, vocab)``
    float32 logits (row ``i`` predicts the token after ``continuation_ids[i]``).

    Positions start at ``next_position`` plus whatever was already appended since compression, so feeding a text in
    pieces with ``restore=False`` equals feeding it at once. With ``restore`` (default) the cache is cropped back to
    its compressed state afterwards.
    """
    ids = _check_ids(continuation_ids, "continuation_ids")
    start = compressed.next_position + compressed.appended()
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    with _rollback(compressed, restore):
        logits = model(ids, past_key_values=compressed.cache, position_ids=positions, use_cache=True).logits
    return logits.float()


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


@torch.inference_mode()
def greedy_tokens(model: nn.Module, compressed: CompressedPrefill, prompt_ids: torch.Tensor | None,
                  max_new_tokens: int, eos_ids: Collection[int] = (), *, restore: bool = True) -> list[int]:
    """Greedy decoding on the compressed cache after feeding ``prompt_ids`` (or, when it is None or empty, from the
    prefill's last logits); stops at an id in ``eos_ids`` (not returned) or after ``max_new_tokens``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    with _rollback(compressed, restore):
        if prompt_ids is not None and prompt_ids.numel() > 0:
            logits = continuation_logits(model, compressed, prompt_ids, restore=False)[:, -1]
        else:
            if compressed.appended():
                raise ValueError("no prompt_ids and tokens were appended since compression: the prefill's last "
                                 "logits no longer predict the next token")
            logits = compressed.last_logits
        generated: list[int] = []
        device = compressed.kept_positions.device
        for step in range(max_new_tokens):
            token = int(logits[0].argmax())
            if token in eos_ids:
                break
            generated.append(token)
            if step + 1 < max_new_tokens:
                logits = continuation_logits(model, compressed, torch.tensor([[token]], device=device),
                                             restore=False)[:, -1]
    return generated


def greedy_answer(model: nn.Module, compressed: CompressedPrefill, prompt_ids: torch.Tensor | None,
                  max_new_tokens: int, tokenizer, *, restore: bool = True) -> str:
    """:func:`greedy_tokens` decoded with ``tokenizer`` (special tokens skipped); stops at the tokenizer's or the
    model's end-of-sequence token."""
    tokens = greedy_tokens(model, compressed, prompt_ids, max_new_tokens, _eos_ids(model, tokenizer),
                           restore=restore)
    return tokenizer.decode(tokens, skip_special_tokens=True)
