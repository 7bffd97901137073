"""One eviction step of streamed KV caches, for every row of a batch: the running per-layer state, the scorer's view
of each row's cache, top-k behind the protected tokens, the gather, and the proof that every row holds the budget.

:mod:`salience.harness.kv_streaming` drives it chunk by chunk (one row per stream; a row's cache is row ``r`` of each
layer's ``(R, H_kv, K, D)`` tensor).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..scorers.base import AttentionView, Scorer
from ..selection import protected_mask, select_topk


class LayerState:
    """Running key mass and original positions of one layer's cache entries, for ``rows`` rows of a batch.

    ``kv_heads=None`` (shared): positions ``(R, K)``, one token set per row for all heads. ``kv_heads=n`` (per KV head):
    positions ``(R, n, K)``, slot ``k`` of head ``h`` of row ``r`` holds token ``positions[r, h, k]``.
    """

    def __init__(self, kv_heads: int | None = None, rows: int = 1) -> None:
        self.kv_heads = kv_heads
        self.rows = rows
        self.mass: torch.Tensor | None = None  # (R, H_q, K) float32, per cache slot
        self.positions: torch.Tensor | None = None  # (R, K) or (R, H_kv, K) long
        # the latest chunk's attention rows, for scorers that read queries directly (TOVA, SnapKV, CAOTE)
        self.chunk_attention: torch.Tensor | None = None  # (R, H_q, Q, K)
        self.chunk_positions: torch.Tensor | None = None  # (Q,)

    def append_positions(self, new_positions: torch.Tensor) -> None:
        shape = (self.rows, -1) if self.kv_heads is None else (self.rows, self.kv_heads, -1)
        new_positions = new_positions.expand(*shape)
        self.positions = new_positions if self.positions is None else torch.cat([self.positions, new_positions], -1)

    def absorb(self, probs: torch.Tensor, new_positions: torch.Tensor, decay: float | torch.Tensor,
               keep_attention: bool = True) -> None:
        """Add a chunk's attention ``(R, H_q, Q, K_old+Q)`` to the running mass, decayed by ``decay`` (a float, or
        ``(R,)`` one per row) per query."""
        b, h, q, k = probs.shape
        if not torch.is_tensor(decay) and decay == 1.0:
            # a fresh float32 tensor with the old mass added to its first slots: no padded copy of the old mass
            mass = probs.sum(dim=2)
            mass = mass if mass.dtype == torch.float32 else mass.float()
            if self.mass is not None:
                mass[..., : self.mass.shape[-1]] += self.mass
        else:
            old = probs.new_zeros(b, h, k, dtype=torch.float32) if self.mass is None else self.mass
            if old.shape[-1] < k:
                old = torch.nn.functional.pad(old, (0, k - old.shape[-1]))
            decay = torch.as_tensor(decay, dtype=torch.float32, device=probs.device).reshape(-1)
            # query i of Q is (Q-1-i) steps older than the newest; the old mass ages Q steps
            ages = torch.arange(q - 1, -1, -1, dtype=torch.float32, device=probs.device)
            weights = decay[:, None] ** ages  # (R or 1, Q)
            mass = old * (decay**q)[:, None, None] + torch.einsum("bhqk,bq->bhk", probs.float(), weights.expand(b, -1))
        self.mass = mass
        self.append_positions(new_positions)
        self.chunk_attention = probs if keep_attention else None
        self.chunk_positions = new_positions

    def absorb_mass(self, mass: torch.Tensor, new_positions: torch.Tensor) -> None:
        """Add a chunk's summed key mass ``(R, H_q, K_old+Q)`` (from a fused kernel) to the running mass."""
        old = self.mass if self.mass is not None else mass.new_zeros(mass.shape[:-1] + (0,))
        self.mass = torch.nn.functional.pad(old, (0, mass.shape[-1] - old.shape[-1])) + mass
        self.append_positions(new_positions)
        self.chunk_positions = new_positions

    def keep(self, index: torch.Tensor) -> None:
        """Keep slots ``index``: ``(R, K')`` shared, or ``(R, H_kv, K')`` per KV head."""
        if self.mass is not None:
            b, h_q, _ = self.mass.shape
            if index.dim() == 2:
                per_query_head = index[:, None, :].expand(b, h_q, -1)
            else:  # GQA groups share a slot
                per_query_head = index.repeat_interleave(h_q // index.shape[1], dim=1)
            self.mass = self.mass.gather(-1, per_query_head)
        self.positions = self.positions.gather(-1, index)
        self.chunk_attention = None  # its key axis no longer matches the cache

    @staticmethod
    def stack_rows(states: list["LayerState"]) -> "LayerState":
        """One state holding the rows of ``states`` in order (same layer, same number of cache slots)."""
        out = LayerState(states[0].kv_heads, rows=sum(s.rows for s in states))
        for name in ("positions", "mass", "chunk_attention"):
            parts = [getattr(s, name) for s in states]
            setattr(out, name, None if parts[0] is None else torch.cat(parts))
        out.chunk_positions = states[0].chunk_positions
        return out

    def fork(self, rows: torch.Tensor, mass: torch.Tensor | None = None, attending: bool = True) -> "LayerState":
        """A state for ``rows`` (indices into this state's rows), optionally with its own ``(len(rows), H_q, K)``
        mass (rows that age their mass differently); ``attending=False`` drops the mass and attention (rows whose
        scorers read neither, so no capture keeps them up to date)."""
        out = LayerState(self.kv_heads, rows=len(rows))
        out.positions = self.positions.index_select(0, rows)
        out.chunk_positions = self.chunk_positions
        if not attending:
            return out
        if mass is not None:
            out.mass = mass
        elif self.mass is not None:
            out.mass = self.mass.index_select(0, rows)
        if self.chunk_attention is not None:
            out.chunk_attention = self.chunk_attention.index_select(0, rows)
        return out


def needs_attention(scorer: Scorer) -> bool:
    """Whether the streaming harness must capture one layer's attention (or its key mass) for ``scorer``. Narrower
    than :attr:`Scorer.attention_free`: a scorer that needs every layer (``attention_layers``) is attention-based
    but gets nothing more here, since eviction runs layer by layer."""
    return bool(scorer.needs & {"attention", "key_mass"})


def _per_row(value, rows: int, what: str) -> list:
    """A per-row list from one value (broadcast) or a sequence of ``rows`` values."""
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise ValueError(f"{what}: {len(value)} values for {rows} rows")
        return list(value)
    return [value] * rows


def record_eviction(results: list, cache: DynamicCache, layers: list[LayerState], budget: int) -> None:
    """Assert that every layer's cache tensor, and every row's (and KV head's) distinct tokens, hold exactly
    ``budget`` entries; record each row's counts."""
    lengths = [int(layer.keys.shape[-2]) for layer in cache.layers]
    value_lengths = [int(layer.values.shape[-2]) for layer in cache.layers]
    if any(n != budget for n in lengths) or value_lengths != lengths:
        raise RuntimeError(f"eviction left cache lengths {lengths} (values {value_lengths}), expected {budget} in "
                           "every layer")
    # positions stay ascending per row and head (kept in order, new ones appended), so distinct = 1 + steps up
    positions = torch.stack([s.positions for s in layers], dim=1)  # (R, layers, K) or (R, layers, H_kv, K)
    distinct = (1 + (positions.diff(dim=-1) > 0).sum(dim=-1)).cpu()
    if bool((distinct != budget).any()):
        raise RuntimeError(f"eviction left {distinct.tolist()} distinct tokens per row and layer (and KV head), "
                           f"expected {budget}")
    per_head = distinct.dim() == 3
    for r, result in enumerate(results):
        if per_head:
            result.head_lengths.append(distinct[r].tolist())
            result.cache_lengths.append(distinct[r].min(dim=-1).values.tolist())
        else:
            result.cache_lengths.append(distinct[r].tolist())
        result.evictions += 1
        result.max_cache_len = max(result.max_cache_len, max(lengths))


def _view(state: LayerState, layer, row: int, scorer: Scorer, positions: torch.Tensor, newest: int, generator,
          roles, heads=None, kv_head=None) -> AttentionView:
    """The scorer's view of one row's cache in one layer (``heads``: the query heads of ``kv_head``'s group)."""
    rows = slice(row, row + 1)
    reads_attention = needs_attention(scorer)  # a view holds the same captures alone as in any batch
    attention = None if state.chunk_attention is None or not reads_attention else state.chunk_attention[rows]
    mass = None if state.mass is None or not reads_attention else state.mass[rows]
    keys, values = layer.keys[rows], layer.values[rows]
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


def _row_ranking(state: LayerState, layer, row: int, scorer, newest, generator, roles) -> torch.Tensor:
    """One row's float32 ranking in one layer: ``(K,)`` shared (mean over all heads) or ``(H_kv, K)`` (each GQA
    group's mean)."""
    positions = state.positions[row]
    if state.kv_heads is None:
        return scorer(_view(state, layer, row, scorer, positions, newest, generator, roles)).float().mean(dim=1)[0]
    h_q = state.mass.shape[1] if state.mass is not None and needs_attention(scorer) else state.kv_heads
    group = max(h_q // state.kv_heads, 1)
    return torch.stack([
        scorer(_view(state, layer, row, scorer, positions[h], newest, generator, roles,
                     heads=slice(h * group, (h + 1) * group), kv_head=h)).float().mean(dim=1)[0]
        for h in range(state.kv_heads)
    ])


def evict_layers(cache, layers, scorer, budget, n_sink, recent_window, newest, generator, *, roles=None) -> None:
    """Score every row's cache in every layer and keep ``budget`` entries per row and layer (per KV head in per-head
    mode).

    ``scorer``, ``n_sink``, ``recent_window``, ``generator`` and ``roles`` (``{name: (T,) bool}``) are one value for
    every row or a sequence with one per row. Scoring runs row by row and layer by layer (each has its own view);
    protection and top-k run once over all rows and layers (their caches have the same length).
    """
    rows = layers[0].rows
    scorers = _per_row(scorer, rows, "scorer")
    sinks = _per_row(n_sink, rows, "n_sink")
    recents = _per_row(recent_window, rows, "recent_window")
    generators = _per_row(generator, rows, "generator")
    row_roles = _per_row(roles or {}, rows, "roles")
    ranked = torch.stack([
        torch.stack([_row_ranking(state, cache.layers[i], r, scorers[r], newest, generators[r], row_roles[r])
                     for i, state in enumerate(layers)])
        for r in range(rows)
    ])  # (R, layers, K) or (R, layers, H_kv, K)
    positions = torch.stack([state.positions for state in layers], dim=1)
    protect = torch.stack([protected_mask(positions[r], n_sink=sinks[r], recent=recents[r], newest_position=newest)
                           for r in range(rows)])
    index = select_topk(ranked, budget, protect)
    for layer_idx, state in enumerate(layers):
        layer, kept = cache.layers[layer_idx], index[:, layer_idx]
        layer.keys, layer.values = take_slots(kept, layer.keys, layer.values)
        state.keep(kept)


def take_slots(kept: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each ``cache (R, H_kv, K, D)`` (keys, values: same R, H_kv, K) restricted to the slots ``kept``: ``(R, K')``
    shared by the heads, or ``(R, H_kv, K')`` per KV head. Whole rows are copied by one ``index_select`` on a flat
    view, with one flat index for all the caches: several times faster than ``gather`` with an index expanded over
    ``D`` (``benchmarks/README.md``, eviction section)."""
    r, h, k, _ = caches[0].shape
    if kept.dim() == 2:
        kept = kept[:, None, :].expand(r, h, -1)
    flat = (kept + torch.arange(r * h, device=kept.device).view(r, h, 1) * k).flatten()
    return tuple(c.reshape(r * h * k, c.shape[-1]).index_select(0, flat).view(r, h, -1, c.shape[-1]) for c in caches)
