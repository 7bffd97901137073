"""Decode-time streaming eviction on a transformers ``DynamicCache`` (H2O-style), batched, with perplexity as the task.

Text is fed in chunks. After each chunk the harness updates every layer's running key mass from that chunk's
attention, asks the scorer for importances, and evicts down to the budget, keeping protected sinks and a recent
window. Cached keys keep their original rotary positions (new tokens get their absolute ``position_ids``), and the
causal mask follows the cache length, so a compressed cache is attended exactly as it stands.

**Batched streams** (:func:`stream_batch`). Many streams, each a :class:`Stream` (a document, a scorer, a budget and
its protected sinks / recent window), run through one batched forward pass per chunk. Each row keeps its own evicted
cache: rows of one budget hold caches of the same length (the budget), so they form one ``(R, H_kv, K, D)`` tensor
per layer, while the positions they keep differ per row (and per KV head). Documents must have the same length, so
a chunk's positions are shared. Work is shared too: until a budget's first eviction every row of a document holds
the same uncompressed cache, so one uncompressed **trunk** per document (batched over documents) is run once; each
budget's rows fork from it at their first eviction. The trunk, run to the end, is the uncompressed baseline
(:attr:`StreamBatch.full`). :func:`stream_perplexity` is one stream of one document.

Head modes: ``"shared"`` (default) keeps one set of tokens for every KV head of a layer (scores averaged over all
heads); ``"per_kv_head"`` lets each KV head keep its own ``budget`` tokens (scores averaged over its GQA group of query
heads). Every head then holds the same number of entries, so the cache stays one tensor per layer and the causal mask
(which follows the cache length) lets new tokens see every cached entry, whichever token it is; each head's original
positions are tracked for the scorer's views and for reporting.

Roles (``roles=``, bool masks over ``input_ids``, e.g. SepLLM's separators) are sliced to each row's cached positions
for every view; with ``tokenizer=`` the roles a scorer requires are built when not given.

Proof of work: after every eviction the harness asserts, for every row, that each layer's cache tensor and the row's
own distinct tokens (per KV head in per-head mode) number exactly the budget, and records them per row and layer;
:class:`StreamResult` carries them. The eviction step itself (scoring views, top-k, gather, proof) lives in
:mod:`salience.harness.kv_eviction`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from ..scorers.base import Scorer
from ..validation import check_choice
from .attention_capture import capture_attention, check_attention_path
from .kv_eviction import LayerState, evict_layers, needs_attention, record_eviction
from .roles import resolve_roles

HEAD_MODES = ("shared", "per_kv_head")

#: ``observe(layer, probs (B, H, Q, K), chunk_positions (Q,), docs)``: the uncompressed trunk's attention rows, chunk by
#: chunk, of the documents ``docs`` (a ``range`` of rows of ``input_ids``; the trunk runs ``max_rows`` documents a pass)
TrunkObserver = Callable[[int, torch.Tensor, torch.Tensor, range], None]


@dataclass
class StreamResult:
    """Outcome of one streamed text under one scorer and budget.

    Attributes:
        nll_sum: summed negative log-likelihood (nats) of every predicted token.
        n_predicted: number of predicted tokens (text length − 1).
        cache_lengths: per eviction step, per layer, the number of distinct tokens this row's cache holds after the
            eviction (asserted equal to the budget and to the cache tensor's length).
        head_lengths: (``per_kv_head`` only) per eviction step, per layer, the number of distinct tokens each KV head
            of this row holds after eviction.
        evictions: number of eviction steps that removed tokens.
        kept_positions: original positions left in the cache at the end (``None`` if nothing was evicted):
            ``(layers, K)`` shared, ``(layers, H_kv, K)`` per KV head.
        max_cache_len: the largest cache any layer held after an eviction step.
        peak_cache_len: the largest cache any layer held at any time (after a chunk's forward pass, before
            eviction): ``budget + chunk_size`` per step at most, more with ``evict_every`` > 1.
        head_mode: the head mode used.
    """

    nll_sum: float
    n_predicted: int
    cache_lengths: list[list[int]] = field(default_factory=list)
    evictions: int = 0
    kept_positions: torch.Tensor | None = None
    max_cache_len: int = 0
    head_lengths: list[list[list[int]]] = field(default_factory=list)
    peak_cache_len: int = 0
    head_mode: str = "shared"

    @property
    def perplexity(self) -> float:
        return float(torch.exp(torch.tensor(self.nll_sum / max(self.n_predicted, 1))))


@dataclass(frozen=True)
class Stream:
    """One row of a batched stream: row ``doc`` of ``input_ids`` streamed through a cache of ``budget`` entries per
    layer (and per KV head), evicted by ``scorer`` behind ``n_sink`` protected initial positions and a protected
    window of the ``recent_window`` newest positions. ``generator`` seeds a stochastic scorer (each row its own, so a
    row's draws do not depend on the batch it runs in)."""

    doc: int
    scorer: Scorer
    budget: int
    n_sink: int = 4
    recent_window: int = 0
    generator: torch.Generator | None = None


@dataclass
class StreamBatch:
    """Results of :func:`stream_batch`: ``results[i]`` for ``streams[i]``; ``full[d]`` for document ``d`` streamed
    with the whole cache (never evicted; ``None`` when not asked for)."""

    results: list[StreamResult]
    full: list[StreamResult] | None = None


def _check_stream_settings(total: int, docs: int, streams: Sequence[Stream], chunk_size: int, head_mode: str,
                           evict_every: int, max_rows: int, attention: str) -> None:
    """Every bad argument fails with one line before any model work."""
    if not streams:
        raise ValueError("give at least one stream")
    for i, s in enumerate(streams):
        if not isinstance(s.doc, int) or not 0 <= s.doc < docs:
            raise ValueError(f"stream {i}: doc must be a row of input_ids in [0, {docs - 1}], got {s.doc!r}")
        if isinstance(s.budget, bool) or not isinstance(s.budget, int) or s.budget < 1:
            raise ValueError(f"budget must be ≥ 1, got {s.budget!r} (stream {i})")
        if s.n_sink < 0 or s.recent_window < 0:
            raise ValueError(f"stream {i}: n_sink and recent_window must be ≥ 0, got {s.n_sink}, {s.recent_window}")
        if s.n_sink + s.recent_window > s.budget:
            raise ValueError(f"n_sink ({s.n_sink}) + recent_window ({s.recent_window}) exceed the budget "
                             f"({s.budget}) (stream {i})")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size!r}")
    check_choice(head_mode, HEAD_MODES, "head_mode")
    if isinstance(evict_every, bool) or not isinstance(evict_every, int) or evict_every < 1:
        raise ValueError(f"evict_every must be an int ≥ 1, got {evict_every!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int ≥ 1, got {max_rows!r}")
    scorers = [s.scorer for s in streams]
    check_attention_path(attention, scorers)
    if attention == "fused":
        decaying = sorted({s.name for s in scorers if s.mass_decay != 1.0})
        if decaying:
            raise ValueError(f"{', '.join(decaying)} decays its mass per query; the fused path sums chunks undecayed, "
                             "use 'eager'")
    if total < 2:
        raise ValueError(f"input_ids must hold at least 2 tokens (one to predict), got {total}")


def _document_roles(input_ids: torch.Tensor, streams: Sequence[Stream], roles, tokenizer) -> list[dict]:
    """Per document, ``{name: (T,) bool}``: the caller's masks (``(D, T)``, or ``(T,)`` for one document) plus the
    roles each of its streams' scorers requires, built with ``tokenizer``."""
    docs, total = input_ids.shape
    given: list[dict] = [{} for _ in range(docs)]
    for name, mask in (roles or {}).items():
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() == 1 and docs == 1:
            mask = mask[None]
        if mask.dim() != 2 or mask.shape[0] != docs:
            raise ValueError(f"roles[{name!r}] must be (documents, tokens) = ({docs}, {total}) or (tokens,) for one "
                             f"document, got {tuple(mask.shape)}")
        for d in range(docs):
            given[d][name] = mask[d]
    out = [dict(g) for g in given]
    for s in streams:
        out[s.doc].update(resolve_roles(s.scorer, input_ids[s.doc], out[s.doc], tokenizer))
    return out


def _nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(R,)`` summed NLL of ``targets (R, Q')`` under the first ``Q'`` positions of ``logits (R, Q, V)``."""
    q = targets.shape[1]
    if q == 0:
        return logits.new_zeros(logits.shape[0], dtype=torch.float64)
    nll = torch.nn.functional.cross_entropy(logits[:, :q].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return nll.view(-1, q).double().sum(dim=1).cpu()


def _capture(model, attention: str, on_attention, on_mass):
    """The capture context of one forward pass (``None`` callbacks: no capture)."""
    if on_attention is None:
        return nullcontext()
    if attention == "eager":
        return capture_attention(model, on_attention)
    from ..kernels.transformers_integration import record_key_mass

    return record_key_mass(model, mass="all", callback=on_mass)


@dataclass
class _Fork:
    """The trunk's state right after chunk ``chunk`` (where a budget first evicts): cache tensors, per-decay states,
    NLL so far."""

    chunk: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    states: dict[float, list[LayerState]]
    nll: torch.Tensor
    n_predicted: int


@torch.inference_mode()
def stream_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    streams: Sequence[Stream],
    *,
    chunk_size: int = 16,
    attention: str = "eager",
    roles: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
    head_mode: str = "shared",
    evict_every: int = 1,
    max_rows: int = 16,
    full: bool = True,
    observe: TrunkObserver | None = None,
    progress: Callable[[int], None] | None = None,
) -> StreamBatch:
    """Stream every :class:`Stream` over its document (a row of ``input_ids`` ``(D, T)``), many rows per forward pass.

    Args:
        streams: the rows; each names its document, scorer, budget, protection and generator.
        chunk_size: tokens per forward pass; between evictions a cache briefly holds ``budget + chunk_size``.
        attention: ``"eager"`` captures each chunk's probabilities; ``"fused"`` runs scored attention and keeps only
            each key's mass (for scorers that need nothing else and do not decay it).
        roles: optional ``{name: (D, T) bool}`` masks over ``input_ids`` (``(T,)`` for one document), sliced to the
            cached positions for every view. tokenizer: builds the roles a scorer requires and ``roles`` lacks
            (SepLLM's separators).
        head_mode: ``"shared"`` (one token set per layer, scores averaged over all heads) or ``"per_kv_head"``
            (each KV head keeps its own ``budget`` tokens, scores averaged over its GQA group).
        evict_every: evict (down to the budget) only once the cache has grown by at least ``evict_every`` entries
            past the budget; amortises eviction's fixed cost. :attr:`StreamResult.peak_cache_len` records the real
            maximum.
        max_rows: rows per forward pass (rows of one document stay together where they fit).
        full: run the uncompressed trunk to the end, giving :attr:`StreamBatch.full` (otherwise it stops at the
            last fork, unless a budget never evicts).
        observe: called with the trunk's attention of every layer and chunk (eager only; see
            :data:`TrunkObserver`): the uncompressed model's attention rows, for statistics that would otherwise need
            another prefill.
        progress: called with the number of tokens × rows just processed (e.g. ``tqdm.update``).

    A budget ≥ T never evicts and reproduces the uncompressed model (either head mode). Raises ValueError naming
    the valid range or choices for bad arguments, before any model work.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (documents, T), got {tuple(input_ids.shape)}")
    docs, total = input_ids.shape
    streams = list(streams)
    _check_stream_settings(total, docs, streams, chunk_size, head_mode, evict_every, max_rows, attention)
    if observe is not None and attention != "eager":
        raise ValueError("observe needs attention='eager' (the fused path forms no attention rows)")
    doc_roles = _document_roles(input_ids, streams, roles, tokenizer)

    config = model.config
    kv_heads = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads
                if head_mode == "per_kv_head" else None)
    chunks = [(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]
    # a budget first evicts after the first chunk that leaves budget + evict_every entries or more
    fork_chunk = {b: next((i for i, (_, stop) in enumerate(chunks) if stop >= b + evict_every), None)
                  for b in {s.budget for s in streams}}
    forks_at = {c for c in fork_chunk.values() if c is not None}
    trunk_end = len(chunks) if full or None in fork_chunk.values() else max(forks_at, default=-1) + 1

    trunk = _merge_trunks([_run_trunk(model, input_ids, range(first, min(first + max_rows, docs)), streams,
                                      chunks[:trunk_end], forks_at, kv_heads, attention, observe, progress)
                           for first in range(0, docs, max_rows)])
    full_results = [StreamResult(nll_sum=float(trunk.nll[d]), n_predicted=trunk.n_predicted, head_mode=head_mode,
                                 peak_cache_len=chunks[trunk_end - 1][1] if trunk_end else 0)
                    for d in range(docs)]
    results: list[StreamResult | None] = [None] * len(streams)
    for budget in sorted(fork_chunk):
        rows = [i for i, s in enumerate(streams) if s.budget == budget]
        if fork_chunk[budget] is None:  # never evicts: the uncompressed stream
            for i in rows:
                results[i] = copy.copy(full_results[streams[i].doc])
            continue
        fork = trunk.forks[fork_chunk[budget]]
        for group in _groups(rows, streams, max_rows):
            out = _run_group(model, input_ids, [streams[i] for i in group], fork, chunks, budget, kv_heads,
                             head_mode, attention, evict_every, [doc_roles[streams[i].doc] for i in group], progress)
            for i, r in zip(group, out):
                results[i] = r
    return StreamBatch(results=results, full=full_results if trunk_end == len(chunks) else None)


def _groups(rows: list[int], streams: Sequence[Stream], max_rows: int) -> list[list[int]]:
    """Rows packed into forward batches of at most ``max_rows``, a document's rows together where they fit."""
    by_doc: dict[int, list[int]] = {}
    for i in rows:
        by_doc.setdefault(streams[i].doc, []).append(i)
    groups, current = [], []
    for doc_rows in by_doc.values():
        for start in range(0, len(doc_rows), max_rows):
            part = doc_rows[start : start + max_rows]
            if current and len(current) + len(part) > max_rows:
                groups.append(current)
                current = []
            current = current + part
    if current:
        groups.append(current)
    return groups


@dataclass
class _Trunk:
    nll: torch.Tensor
    n_predicted: int
    forks: dict[int, _Fork]


def _run_trunk(model, input_ids, doc_range: range, streams, chunks, forks_at, kv_heads, attention, observe,
               progress) -> _Trunk:
    """The uncompressed stream of the documents ``doc_range`` (one batch), with a snapshot at every fork chunk."""
    input_ids = input_ids[doc_range.start : doc_range.stop]
    docs = input_ids.shape[0]
    num_layers = model.config.num_hidden_layers
    attending = [s.scorer for s in streams if needs_attention(s.scorer)]
    decays = sorted({float(s.mass_decay) for s in attending}) or [1.0]
    keep_attention = any("attention" in s.needs for s in attending)
    states = {d: [LayerState(kv_heads, rows=docs) for _ in range(num_layers)] for d in decays}
    cache = DynamicCache(config=model.config)
    nll = torch.zeros(docs, dtype=torch.float64)
    n_predicted = 0
    forks: dict[int, _Fork] = {}
    positions = torch.empty(0, dtype=torch.long, device=input_ids.device)

    def on_attention(layer: int, probs: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        if attending:
            for d in decays:
                states[d][layer].absorb(probs, positions, d, keep_attention)
        if observe is not None:
            observe(layer, probs, positions, doc_range)

    def on_mass(layer: int, mass: torch.Tensor) -> None:
        for d in decays:
            states[d][layer].absorb_mass(mass, positions)

    hooked = bool(attending) or observe is not None
    with _capture(model, attention, on_attention if hooked else None, on_mass):
        for c, (start, stop) in enumerate(chunks):
            positions = torch.arange(start, stop, device=input_ids.device)
            logits = model(input_ids[:, start:stop], past_key_values=cache,
                           position_ids=positions[None].expand(docs, -1), use_cache=True).logits
            if not attending:
                for d in decays:
                    for state in states[d]:
                        state.append_positions(positions)
            targets = input_ids[:, start + 1 : stop + 1]
            nll += _nll_rows(logits, targets)
            n_predicted += targets.shape[1]
            if progress is not None:
                progress(docs * (stop - start))
            if c in forks_at:
                forks[c] = _Fork(chunk=c, keys=[layer.keys for layer in cache.layers],
                                 values=[layer.values for layer in cache.layers],
                                 states={d: [copy.copy(s) for s in states[d]] for d in decays},
                                 nll=nll.clone(), n_predicted=n_predicted)
    return _Trunk(nll=nll, n_predicted=n_predicted, forks=forks)


def _merge_trunks(trunks: list[_Trunk]) -> _Trunk:
    """The trunks of consecutive document slices as one (their rows concatenated in document order)."""
    if len(trunks) == 1:
        return trunks[0]
    forks = {}
    for c, first in trunks[0].forks.items():
        parts = [t.forks[c] for t in trunks]
        forks[c] = _Fork(chunk=c, keys=[torch.cat(k) for k in zip(*(f.keys for f in parts))],
                         values=[torch.cat(v) for v in zip(*(f.values for f in parts))],
                         states={d: [LayerState.stack_rows(list(layer))
                                     for layer in zip(*(f.states[d] for f in parts))] for d in first.states},
                         nll=torch.cat([f.nll for f in parts]), n_predicted=first.n_predicted)
    return _Trunk(nll=torch.cat([t.nll for t in trunks]), n_predicted=trunks[0].n_predicted, forks=forks)


def _run_group(model, input_ids, streams, fork, chunks, budget, kv_heads, head_mode, attention, evict_every,
               roles, progress) -> list[StreamResult]:
    """Rows of one budget, forked from the trunk at their first eviction, streamed to the end of the documents."""
    rows = len(streams)
    device = input_ids.device
    doc_index = torch.tensor([s.doc for s in streams], device=device)
    scorers = [s.scorer for s in streams]
    generators = [s.generator for s in streams]
    n_sink = [s.n_sink for s in streams]
    recent = [s.recent_window for s in streams]
    decay_of = [float(s.mass_decay) if needs_attention(s) else None for s in scorers]
    attending = any(d is not None for d in decay_of)
    keep_attention = any("attention" in s.needs for s in scorers)
    decays = torch.tensor([d if d is not None else 1.0 for d in decay_of], dtype=torch.float32, device=device)
    uniform_decay = 1.0 if bool((decays == 1.0).all()) else decays

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(fork.keys, fork.values)):
        cache.update(k.index_select(0, doc_index), v.index_select(0, doc_index), i)
    layers = []
    trunk_decays = sorted(fork.states)
    for layer in range(len(fork.keys)):
        base = fork.states[trunk_decays[0]][layer]
        mass = None
        if attending and len(trunk_decays) > 1:
            mass = torch.stack([fork.states[d if d is not None else trunk_decays[0]][layer].mass[doc]
                                for d, doc in zip(decay_of, doc_index.tolist())])
        layers.append(base.fork(doc_index, mass, attending))
    results = [StreamResult(nll_sum=0.0, n_predicted=fork.n_predicted, head_mode=head_mode) for _ in streams]
    nll = fork.nll.index_select(0, doc_index.cpu()).clone()
    peak = chunks[fork.chunk][1]
    for r in results:
        r.peak_cache_len = peak
    positions = torch.empty(0, dtype=torch.long, device=device)

    def evict(newest: int) -> None:
        evict_layers(cache, layers, scorers, budget, n_sink, recent, newest, generators, roles=roles)
        record_eviction(results, cache, layers, budget)

    evict(chunks[fork.chunk][1] - 1)

    def on_attention(layer: int, probs: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        layers[layer].absorb(probs, positions, uniform_decay, keep_attention)

    def on_mass(layer: int, mass: torch.Tensor) -> None:
        layers[layer].absorb_mass(mass, positions)

    ids = input_ids.index_select(0, doc_index)
    with _capture(model, attention, on_attention if attending else None, on_mass):
        for start, stop in chunks[fork.chunk + 1 :]:
            positions = torch.arange(start, stop, device=device)
            logits = model(ids[:, start:stop], past_key_values=cache,
                           position_ids=positions[None].expand(rows, -1), use_cache=True).logits
            if not attending:
                for state in layers:
                    state.append_positions(positions)
            targets = ids[:, start + 1 : stop + 1]
            nll += _nll_rows(logits, targets)
            for r in results:
                r.n_predicted += targets.shape[1]
            length = cache.get_seq_length()
            for r in results:
                r.peak_cache_len = max(r.peak_cache_len, length)
            if progress is not None:
                progress(rows * (stop - start))
            if length >= budget + evict_every:
                evict(stop - 1)
    for i, r in enumerate(results):
        r.nll_sum = float(nll[i])
        r.kept_positions = torch.stack([state.positions[i] for state in layers])
    return results


@torch.inference_mode()
def stream_perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    scorer: Scorer,
    budget: int,
    *,
    n_sink: int = 4,
    recent_window: int = 0,
    chunk_size: int = 16,
    generator: torch.Generator | None = None,
    attention: str = "eager",
    roles: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
    head_mode: str = "shared",
    evict_every: int = 1,
) -> StreamResult:
    """Stream ``input_ids`` ``(1, T)`` through ``model`` with a cache of at most ``budget`` entries per layer: one
    :class:`Stream` of :func:`stream_batch` (see there for the arguments; ``roles`` are ``(T,)`` masks)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, T), got {tuple(input_ids.shape)}")
    stream = Stream(doc=0, scorer=scorer, budget=budget, n_sink=n_sink, recent_window=recent_window,
                    generator=generator)
    return stream_batch(model, input_ids, [stream], chunk_size=chunk_size, attention=attention, roles=roles,
                        tokenizer=tokenizer, head_mode=head_mode, evict_every=evict_every, full=False).results[0]
