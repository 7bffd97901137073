"""One prefill pass, many scorers.

* :func:`prefill_scores` scores every token of a prompt with several scorers from one forward pass (no cache kept).
* :func:`shared_prefill` is the shared path of the KV compression tasks: **one** uncompressed forward pass of
  ``ids = context + whatever follows`` (a question, an answer prefix, a continuation) captures each layer's attention
  once, and every scorer scores the context keys of every :class:`ScoringView` of it in the same pass. The returned
  :class:`SharedPrefill` keeps the uncompressed cache (read only), the scores, the logits of the last rows (the
  uncompressed reference) and, on request, the attention rows of the tokens after a position (what an oracle or an
  attention-output error reads). :func:`~salience.harness.kv_prefill_compression.compress_shared` then gathers the
  compressed cache of every scorer × budget from it, without another forward pass.

Why one pass serves every mode and reference: attention is causal, so rows ``[0, P)`` of the attention over the whole
sequence, and the keys and values of positions ``[0, P)``, are exactly those of a prefill of the first ``P`` tokens
alone. A query-agnostic view is ``P = len(context)`` (the context's own queries), a query-aware view is
``P = len(context + question)`` (the question's rows included), and the logits of the rows after the context are the
uncompressed model's predictions of what follows. (The prefill's logits and the scores are the same numbers a
separate prefill would give, up to float round-off of a longer matrix product; tests check both paths agree.)
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from ..scorers.base import AttentionView, Scorer
from .attention_capture import capture_attention, check_attention_path
from .roles import resolve_roles

#: what one KV prefill hands a scorer: the layer's attention (or its key mass), keys and values; whether a scorer is
#: handed the attention follows :attr:`Scorer.attention_free` (:data:`salience.scorers.base.ATTENTION_NEEDS`)
PREFILL_CAPTURES = frozenset({"attention", "key_mass", "keys", "values"})


@torch.inference_mode()
def prefill_scores(
    model: nn.Module, input_ids: torch.Tensor, scorers: dict[str, Scorer], *, attention: str = "eager"
) -> dict[str, torch.Tensor]:
    """Run ``input_ids`` ``(1, T)`` once and score every token with each scorer, layer by layer.

    ``attention="eager"`` hands scorers each layer's ``(B, H, T, T)`` probabilities (reduced as they are produced, so
    peak memory stays at one layer's matrix); ``"fused"`` runs :func:`salience.kernels.scored_attention` and hands them
    only each key's attention mass, for scorers that need nothing else.

    Returns ``{name: (layers, heads, T) float32}``.
    """
    check_attention_path(attention, scorers.values())
    total = input_ids.shape[1]
    positions = torch.arange(total, device=input_ids.device)
    per_layer: dict[str, list[torch.Tensor]] = {name: [] for name in scorers}

    def score(view: AttentionView) -> None:
        for name, scorer in scorers.items():
            per_layer[name].append(scorer(view)[0].float())

    if attention == "eager":
        def on_attention(layer_idx: int, probs: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
            score(AttentionView(key_positions=positions, query_positions=positions, attention=probs, keys=key,
                                values=value))

        with capture_attention(model, on_attention):
            model(input_ids, use_cache=False)
    else:
        from ..kernels.transformers_integration import record_key_mass

        visible = total - positions  # causal: key k is seen by queries k..T-1

        def on_mass(layer_idx: int, mass: torch.Tensor) -> None:
            score(AttentionView(key_positions=positions, query_positions=positions, key_mass=mass,
                                visible_queries=visible))

        with record_key_mass(model, mass="all", callback=on_mass):
            model(input_ids, use_cache=False)
    return {name: torch.stack(scores) for name, scores in per_layer.items()}


@dataclass(frozen=True)
class ScoringView:
    """What the scorers of one view read: rows ``[first_query, end)`` of the prefill's attention over keys
    ``[0, end)``, with those keys' keys and values. Only the context keys ``[0, context_len)`` are candidates.

    Examples: query-agnostic ``ScoringView("agnostic", context_len, scorers=...)``; query-aware
    ``ScoringView("aware", context_len + question_len, scorers=...)`` (the question's rows are the last ones);
    an oracle reading the future ``ScoringView("future", T, first_query=context_len, scorers={"oracle": ...})``.
    """

    name: str
    end: int
    scorers: Mapping[str, Scorer] = field(default_factory=dict)
    first_query: int = 0

    def visible(self, device) -> torch.Tensor:
        """``(end,)`` number of the view's queries that can see each key (causal)."""
        positions = torch.arange(self.end, device=device)
        return self.end - positions.clamp(min=self.first_query)


@dataclass
class SharedPrefill:
    """One uncompressed prefill, its scores and its reference outputs.

    Attributes:
        ids: ``(1, T)`` the token ids prefilled.
        context_len: ``C``, the candidate keys are positions ``[0, C)``.
        cache: the uncompressed ``DynamicCache`` of all ``T`` tokens; read it, never change it
            (:func:`~salience.harness.kv_prefill_compression.compress_shared` copies what it keeps).
        scores: ``{(view, label): (layers, H, C) float32}`` each scorer's scores of the context keys in each view,
            with the head rows the scorer returns; layouts: ``{(view, label): "query" | "kv" | "shared"}`` what those
            rows stand for (:meth:`Scorer.head_layout_for`), so a consumer reduces them to KV heads
            (:func:`salience.selection.to_kv_heads`) without guessing from the count.
        logits: ``(R, vocab)`` float32 logits of the last ``R`` rows (``logits_from = T − R`` is the first), computed
            with the full cache: the uncompressed model's predictions.
        rows_attention: per layer, ``(1, H, T − rows_from, T)`` attention of the rows from ``rows_from`` on (when
            asked for), float32.
        config: the model's config (compressed caches are built like the prefill's).
    """

    ids: torch.Tensor
    context_len: int
    cache: DynamicCache
    scores: dict[tuple[str, str], torch.Tensor]
    logits: torch.Tensor
    logits_from: int
    views: dict[str, ScoringView]
    layouts: dict[tuple[str, str], str] = field(default_factory=dict)
    config: object = None
    rows_attention: list[torch.Tensor] | None = None
    rows_from: int | None = None

    @property
    def total(self) -> int:
        return int(self.ids.shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.cache.layers)

    def logits_at(self, row: int) -> torch.Tensor | None:
        """``(1, vocab)`` logits of prompt row ``row`` (predicting token ``row + 1``) when kept, else None."""
        if self.logits_from <= row < self.total:
            return self.logits[row - self.logits_from][None]
        return None


def view_seed(seed: int, view: str, label: str) -> int:
    """A stable seed per (view, scorer): adding a scorer or a view does not change another's random draws."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{view}/{label}".encode())) % (2**63)


def _check_views(views: Sequence[ScoringView], context_len: int, total: int) -> None:
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise ValueError(f"view names must be unique, got {names}")
    for v in views:
        if not context_len <= v.end <= total or not 0 <= v.first_query < v.end:
            raise ValueError(f"view {v.name!r} must satisfy 0 <= first_query < end and {context_len} <= end <= "
                             f"{total} (it must hold the context's keys), got first_query={v.first_query}, "
                             f"end={v.end}")
        if not v.scorers:
            raise ValueError(f"view {v.name!r} has no scorers")
        needy = [s.name for s in v.scorers.values() if s.needs - PREFILL_CAPTURES]
        if needy:
            raise ValueError(f"scorers {needy} need captures a KV prefill does not give (attention of every layer, "
                             "hidden states or gradients)")


@torch.inference_mode()
def shared_prefill(
    model: nn.Module,
    ids: torch.Tensor,
    context_len: int,
    views: Sequence[ScoringView],
    *,
    logits_rows: int = 1,
    rows_from: int | None = None,
    attention: str = "eager",
    generator: torch.Generator | int | None = None,
    roles: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
) -> SharedPrefill:
    """Prefill ``ids`` ``(1, T)`` once and score the context ``[0, context_len)`` with every view's scorers.

    Args:
        views: :class:`ScoringView` s, each with its ``{label: scorer}``.
        logits_rows: keep the logits of the last ``logits_rows`` rows (the uncompressed reference).
        rows_from: keep each layer's attention rows from this position on (``SharedPrefill.rows_attention``).
        attention: ``"eager"`` captures each layer's probabilities; ``"fused"`` runs scored attention and hands the
            scorers each key's mass over all rows (one view covering the whole prompt, key-mass scorers only).
        generator: a ``torch.Generator`` used by every stochastic scorer in turn (one scorer: as a standalone
            compression), or an int seed from which each (view, scorer) gets its own generator (stable when scorers
            are added or removed), or None.
        roles: optional ``(context_len,)`` bool masks over the context; tokenizer: builds the roles a scorer
            requires and ``roles`` lacks (SepLLM's separators). Tokens after the context have no role.

    Each scorer sees ``attention`` only when it reads attention or its key mass (``needs``), and always the view's
    keys and values, as a standalone compression gives them.
    """
    views = list(views)
    total = ids.shape[1]
    _check_views(views, context_len, total)
    all_scorers = [s for v in views for s in v.scorers.values()]
    check_attention_path(attention, all_scorers)
    if attention == "fused" and (len(views) != 1 or views[0].end != total or views[0].first_query != 0):
        raise ValueError("attention='fused' gives the key mass over all rows: use one view covering the whole prompt")
    if not 1 <= logits_rows <= total:
        raise ValueError(f"logits_rows must lie in [1, {total}], got {logits_rows}")
    if rows_from is not None and not 0 <= rows_from < total:
        raise ValueError(f"rows_from must lie in [0, {total - 1}], got {rows_from}")
    device = ids.device
    context_roles = {}
    for v in views:
        for scorer in v.scorers.values():
            context_roles.update(resolve_roles(scorer, ids[0, :context_len], {**(roles or {}), **context_roles},
                                               tokenizer, what="the context"))
    generators: dict[tuple[str, str], torch.Generator | None] = {}
    for v in views:
        for label in v.scorers:
            if isinstance(generator, int) and not isinstance(generator, bool):
                generators[v.name, label] = torch.Generator().manual_seed(view_seed(generator, v.name, label))
            else:
                generators[v.name, label] = generator

    per_layer: dict[tuple[str, str], list[torch.Tensor | None]] = {
        (v.name, label): [None] * model.config.num_hidden_layers for v in views for label in v.scorers}
    kept_rows: list[torch.Tensor | None] = [None] * model.config.num_hidden_layers
    layouts: dict[tuple[str, str], str] = {}

    def score(layer: int, probs: torch.Tensor | None, mass: torch.Tensor | None, key: torch.Tensor,
              value: torch.Tensor) -> None:
        if probs is not None and rows_from is not None:
            kept_rows[layer] = probs[:, :, rows_from:].float().clone()
        for v in views:
            positions = torch.arange(v.end, device=device)
            view_roles = {n: torch.nn.functional.pad(m, (0, v.end - context_len)) for n, m in context_roles.items()}
            for label, scorer in v.scorers.items():
                reads_attention = not scorer.attention_free
                view = AttentionView(
                    key_positions=positions, query_positions=positions[v.first_query:],
                    visible_queries=v.visible(device), keys=key[:, :, : v.end], values=value[:, :, : v.end],
                    attention=probs[:, :, v.first_query : v.end, : v.end] if reads_attention and probs is not None
                    else None,
                    key_mass=mass if reads_attention else None, roles=view_roles,
                    generator=generators[v.name, label])
                per_layer[v.name, label][layer] = scorer(view)[0, :, :context_len].float()
                layouts[v.name, label] = scorer.head_layout_for(view)

    needs_attention = any(not s.attention_free for s in all_scorers) or rows_from is not None
    if not needs_attention:
        capture = nullcontext()
    elif attention == "eager":
        capture = capture_attention(model, lambda i, probs, key, value: score(i, probs, None, key, value))
    else:
        from ..kernels.transformers_integration import record_key_mass

        pending: dict[int, torch.Tensor] = {}
        capture = record_key_mass(model, mass="all", callback=lambda i, mass: pending.__setitem__(i, mass))
    cache = DynamicCache(config=model.config)
    with capture:
        out = model(ids, cache=cache, position_ids=torch.arange(total, device=device)[None],
                    use_cache=True, logits_to_keep=logits_rows)
    for i, layer in enumerate(cache.layers):
        if attention == "fused" and needs_attention:
            score(i, None, pending[i], layer.keys, layer.values)
        elif not needs_attention:
            score(i, None, None, layer.keys, layer.values)
    missing = sorted({i for scores in per_layer.values() for i, s in enumerate(scores) if s is None})
    if missing:
        raise RuntimeError(f"layers {missing} reported no attention: the model's attention must go through "
                           "transformers' attention registry")
    return SharedPrefill(
        ids=ids, context_len=context_len, cache=cache,
        scores={key: torch.stack(layers) for key, layers in per_layer.items()},
        logits=out.logits[0].float(), logits_from=total - logits_rows, views={v.name: v for v in views},
        layouts=layouts, config=model.config, rows_attention=kept_rows if rows_from is not None else None,
        rows_from=rows_from)
