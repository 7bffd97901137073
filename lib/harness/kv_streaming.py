"""Decode-time streaming eviction on a transformers ``DynamicCache`` (H2O-style), with perplexity as the task.

Text is fed in chunks. After each chunk the harness updates every layer's running key mass from that chunk's
attention, asks the scorer for importances, and evicts down to the budget, keeping protected sinks and a recent
window. Cached keys keep their original rotary positions (new tokens get their absolute ``position_ids``), and the
causal mask follows the cache length, so a compressed cache is attended exactly as it stands.

Head modes: ``"shared"`` (default) keeps one set of tokens for every KV head of a layer (scores averaged over all
heads); ``"per_kv_head"`` lets each KV head keep its own ``budget`` tokens (scores averaged over its GQA group of query
heads). Every head then holds the same number of entries, so the cache stays one ``(B, H_kv, K, D)`` tensor per layer
and the causal mask (which follows the cache length) lets new tokens see every cached entry, whichever token it is;
each head's original positions are tracked for the scorer's views and for reporting (keys stay rotated at their
original positions, so the model itself needs no positions for them).

Roles (``roles=``, ``(T,)`` bool masks over ``input_ids``, e.g. SepLLM's separators) are sliced to the cached
positions for every view; with ``tokenizer=`` the roles a scorer requires are built when not given.

Proof of work: after every eviction the harness asserts that each layer (and, per KV head, each head's distinct
tokens) holds exactly the budget and records the lengths; :class:`StreamResult` carries them.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from ..scorers.base import AttentionView, Scorer
from ..selection import protected_mask, select_topk
from .attention_capture import capture_attention, check_attention_path
from .roles import resolve_roles

HEAD_MODES = ("shared", "per_kv_head")


@dataclass
class StreamResult:
    """Outcome of one streamed text under one scorer and budget.

    Attributes:
        nll_sum: summed negative log-likelihood (nats) of every predicted token.
        n_predicted: number of predicted tokens (text length − 1).
        cache_lengths: per eviction step, the cache length of every layer after eviction.
        head_lengths: (``per_kv_head`` only) per eviction step, per layer, the number of distinct tokens each KV head
            holds after eviction.
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


class _LayerState:
    """Running key mass and original positions of one layer's cache entries.

    ``kv_heads=None`` (shared): positions ``(K,)``, one token set for all heads. ``kv_heads=n`` (per KV head):
    positions ``(n, K)``, slot ``k`` of head ``h`` holds token ``positions[h, k]``.
    """

    def __init__(self, kv_heads: int | None = None) -> None:
        self.kv_heads = kv_heads
        self.mass: torch.Tensor | None = None  # (B, H_q, K) float32, per cache slot
        self.positions: torch.Tensor | None = None  # (K,) or (H_kv, K) long
        # the latest chunk's attention rows, for scorers that read queries directly (TOVA, SnapKV, CAOTE)
        self.chunk_attention: torch.Tensor | None = None  # (B, H_q, Q, K)
        self.chunk_positions: torch.Tensor | None = None  # (Q,)

    def append_positions(self, new_positions: torch.Tensor) -> None:
        if self.kv_heads is not None:
            new_positions = new_positions.expand(self.kv_heads, -1)
        self.positions = new_positions if self.positions is None else torch.cat([self.positions, new_positions], -1)

    def absorb(self, probs: torch.Tensor, new_positions: torch.Tensor, decay: float) -> None:
        """Add a chunk's attention ``(B, H_q, Q, K_old+Q)`` to the running mass, decayed by ``decay`` per query."""
        b, h, q, k = probs.shape
        old = probs.new_zeros(b, h, k, dtype=torch.float32) if self.mass is None else self.mass
        if old.shape[-1] < k:
            old = torch.nn.functional.pad(old, (0, k - old.shape[-1]))
        if decay == 1.0:
            self.mass = old + probs.sum(dim=2)
        else:
            # query i of Q is (Q-1-i) steps older than the newest; the old mass ages Q steps
            weights = decay ** torch.arange(q - 1, -1, -1, dtype=torch.float32, device=probs.device)
            self.mass = old * decay**q + torch.einsum("bhqk,q->bhk", probs, weights)
        self.append_positions(new_positions)
        self.chunk_attention, self.chunk_positions = probs, new_positions

    def absorb_mass(self, mass: torch.Tensor, new_positions: torch.Tensor) -> None:
        """Add a chunk's summed key mass ``(B, H_q, K_old+Q)`` (from a fused kernel) to the running mass."""
        old = self.mass if self.mass is not None else mass.new_zeros(mass.shape[:-1] + (0,))
        self.mass = torch.nn.functional.pad(old, (0, mass.shape[-1] - old.shape[-1])) + mass
        self.append_positions(new_positions)

    def keep(self, index: torch.Tensor) -> None:
        """Keep slots ``index``: ``(K',)`` shared, or ``(H_kv, K')`` per KV head."""
        if index.dim() == 1:
            if self.mass is not None:
                self.mass = self.mass[..., index]
            self.positions = self.positions[index]
        else:
            if self.mass is not None:
                b, h_q, _ = self.mass.shape
                per_query_head = index.repeat_interleave(h_q // index.shape[0], dim=0)  # GQA groups share a slot
                self.mass = self.mass.gather(-1, per_query_head[None].expand(b, -1, -1))
            self.positions = self.positions.gather(-1, index)
        self.chunk_attention = None  # its key axis no longer matches the cache


def _needs_attention(scorer: Scorer) -> bool:
    return bool(scorer.needs & {"attention", "key_mass"})


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
    """Stream ``input_ids`` ``(1, T)`` through ``model`` with a cache of at most ``budget`` entries per layer.

    Args:
        scorer: ranks cache entries; its ``mass_decay`` sets how the running key mass ages.
        budget: cache entries kept per layer (and per KV head) after each eviction.
        n_sink: initial positions always kept (attention sinks).
        recent_window: newest positions always kept.
        chunk_size: tokens per forward pass; between evictions the cache briefly holds ``budget + chunk_size``.
        generator: seeds stochastic scorers.
        attention: ``"eager"`` captures each chunk's probabilities; ``"fused"`` runs scored attention and keeps only
            each key's mass (for scorers that need nothing else and do not decay it).
        roles: optional ``{name: (T,) bool}`` masks over ``input_ids`` (e.g. ``"separator"``), sliced to the cached
            positions for every view.
        tokenizer: when given, roles the scorer requires (``Scorer.requires_roles``) and ``roles`` lacks are built
            from ``input_ids`` (SepLLM's separators).
        head_mode: ``"shared"`` (one token set per layer, scores averaged over all heads) or ``"per_kv_head"``
            (each KV head keeps its own ``budget`` tokens, scores averaged over its GQA group).
        evict_every: evict (down to ``budget``) only once the cache has grown by at least ``evict_every`` entries
            past the budget, i.e. every ``evict_every`` tokens at ``chunk_size=1``; amortises eviction's fixed cost.
            The cache then holds up to ``budget + evict_every - 1`` entries between evictions (plus the chunk being
            fed); :attr:`StreamResult.peak_cache_len` records the real maximum. 1 (default) evicts after every
            chunk that overflows the budget.

    A budget ≥ T never evicts and reproduces the uncompressed model (either head mode).
    Raises ValueError naming the valid range or choices for bad arguments, before any model work.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, T), got {tuple(input_ids.shape)}")
    total = input_ids.shape[1]
    if budget < 1:
        raise ValueError(f"budget must be ≥ 1, got {budget}")
    if n_sink + recent_window > budget:
        raise ValueError(f"n_sink ({n_sink}) + recent_window ({recent_window}) exceed the budget ({budget})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if head_mode not in HEAD_MODES:
        raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    if isinstance(evict_every, bool) or not isinstance(evict_every, int) or evict_every < 1:
        raise ValueError(f"evict_every must be an int ≥ 1, got {evict_every!r}")
    check_attention_path(attention, [scorer])
    if attention == "fused" and scorer.mass_decay != 1.0:
        raise ValueError(f"{scorer.name} decays its mass per query; the fused path sums chunks undecayed, use 'eager'")
    token_roles = resolve_roles(scorer, input_ids[0], roles, tokenizer)

    config = model.config
    num_layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    layers = [_LayerState(kv_heads if head_mode == "per_kv_head" else None) for _ in range(num_layers)]
    cache = DynamicCache(config=config)
    result = StreamResult(nll_sum=0.0, n_predicted=0, head_mode=head_mode)
    decay = float(scorer.mass_decay)
    device = input_ids.device
    chunk_positions = torch.empty(0, dtype=torch.long, device=device)

    def on_attention(layer_idx: int, probs: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        layers[layer_idx].absorb(probs, chunk_positions, decay)

    def on_mass(layer_idx: int, mass: torch.Tensor) -> None:
        layers[layer_idx].absorb_mass(mass, chunk_positions)

    needs_attention = _needs_attention(scorer)
    if not needs_attention:
        capture = nullcontext()
    elif attention == "eager":
        capture = capture_attention(model, on_attention)
    else:
        from ..kernels.transformers_integration import record_key_mass

        capture = record_key_mass(model, mass="all", callback=on_mass)
    with capture:
        for start in range(0, total, chunk_size):
            stop = min(start + chunk_size, total)
            chunk_positions = torch.arange(start, stop, device=device)
            logits = model(input_ids[:, start:stop], past_key_values=cache, position_ids=chunk_positions[None],
                           use_cache=True).logits
            if not needs_attention:
                for state in layers:
                    state.append_positions(chunk_positions)
            _add_nll(result, logits, input_ids[0, start + 1 : stop + 1])
            length = cache.get_seq_length()
            result.peak_cache_len = max(result.peak_cache_len, length)
            if length >= budget + evict_every:
                _evict(cache, layers, scorer, budget, n_sink, recent_window, stop - 1, generator, roles=token_roles)
                _record_eviction(result, cache, layers, budget)
    if result.evictions:
        result.kept_positions = torch.stack([s.positions for s in layers])
    return result


def _record_eviction(result: StreamResult, cache: DynamicCache, layers: list[_LayerState], budget: int) -> None:
    """Assert that every layer (and every KV head's distinct tokens) holds exactly ``budget`` entries; record it."""
    lengths = [int(layer.keys.shape[-2]) for layer in cache.layers]
    value_lengths = [int(layer.values.shape[-2]) for layer in cache.layers]
    if any(n != budget for n in lengths) or value_lengths != lengths:
        raise RuntimeError(f"eviction left cache lengths {lengths} (values {value_lengths}), expected {budget} in "
                           "every layer")
    if layers[0].kv_heads is not None:
        # positions stay ascending per head (kept in order, new ones appended), so distinct = 1 + number of steps up
        heads = [(1 + (s.positions.diff(dim=-1) > 0).sum(dim=-1)).tolist() for s in layers]
        if any(n != budget for per_layer in heads for n in per_layer):
            raise RuntimeError(f"per-KV-head eviction left distinct tokens per head {heads}, expected {budget}")
        result.head_lengths.append(heads)
    result.cache_lengths.append(lengths)
    result.evictions += 1
    result.max_cache_len = max(result.max_cache_len, max(lengths))


def _add_nll(result: StreamResult, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Add the NLL of the next tokens this chunk predicts (the last chunk has one target fewer than positions)."""
    logprobs = torch.log_softmax(logits[0, : targets.shape[0]].float(), dim=-1)
    result.nll_sum -= float(logprobs.gather(-1, targets[:, None]).sum())
    result.n_predicted += int(targets.shape[0])


def _view(state: _LayerState, layer, positions: torch.Tensor, newest: int, generator, roles, heads=None,
          kv_head=None) -> AttentionView:
    """The scorer's view of one layer's cache (``heads``: the query heads of ``kv_head``'s group, per-head mode)."""
    attention, mass, keys, values = state.chunk_attention, state.mass, layer.keys, layer.values
    if heads is not None:
        attention = None if attention is None else attention[:, heads]
        mass = None if mass is None else mass[:, heads]
        keys, values = keys[:, kv_head : kv_head + 1], values[:, kv_head : kv_head + 1]
    return AttentionView(
        key_positions=positions,
        query_positions=state.chunk_positions,
        attention=attention,
        key_mass=mass,
        visible_queries=newest - positions + 1,
        keys=keys,
        values=values,
        roles={name: mask[positions] for name, mask in roles.items()},
        generator=generator,
    )


def _layer_ranking(state: _LayerState, layer, scorer, newest, generator, roles) -> torch.Tensor:
    """One layer's float32 ranking: ``(K,)`` shared (mean over all heads) or ``(H_kv, K)`` (each GQA group's mean)."""
    positions = state.positions
    if state.kv_heads is None:
        return scorer(_view(state, layer, positions, newest, generator, roles)).float().mean(dim=1)[0]
    h_q = state.mass.shape[1] if state.mass is not None else state.kv_heads
    group = max(h_q // state.kv_heads, 1)
    return torch.stack([
        scorer(_view(state, layer, positions[h], newest, generator, roles, heads=slice(h * group, (h + 1) * group),
                     kv_head=h)).float().mean(dim=1)[0]
        for h in range(state.kv_heads)
    ])


def _evict(cache, layers, scorer, budget, n_sink, recent_window, newest, generator, *, roles=None) -> None:
    """Score every layer's cache and keep ``budget`` entries per layer (per KV head in per-head mode).

    Scoring runs layer by layer (each layer has its own view); protection and top-k run once over all layers
    (their caches have the same length), which saves ~30 small calls per eviction.
    """
    roles = roles or {}
    ranked = torch.stack([_layer_ranking(state, cache.layers[i], scorer, newest, generator, roles)
                          for i, state in enumerate(layers)])  # (layers, K) or (layers, H_kv, K)
    positions = torch.stack([state.positions for state in layers])
    protect = protected_mask(positions, n_sink=n_sink, recent=recent_window, newest_position=newest)
    index = select_topk(ranked, budget, protect)
    for layer_idx, state in enumerate(layers):
        layer, kept = cache.layers[layer_idx], index[layer_idx]
        if kept.dim() == 1:
            layer.keys = layer.keys.index_select(2, kept)
            layer.values = layer.values.index_select(2, kept)
        else:
            b, _, _, d = layer.keys.shape
            gather = kept[None, :, :, None].expand(b, -1, -1, d)
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)
        state.keep(kept)
