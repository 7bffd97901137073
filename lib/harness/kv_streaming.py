"""Decode-time streaming eviction on a transformers ``DynamicCache`` (H2O-style), with perplexity as the task.

Text is fed in chunks. After each chunk the harness updates every layer's running key mass from that chunk's
attention, asks the scorer for importances, and evicts down to the budget, keeping protected sinks and a recent
window. Cached keys keep their original rotary positions (new tokens get their absolute ``position_ids``), and the
causal mask follows the cache length, so a compressed cache is attended exactly as it stands.

Proof of work: after every eviction the harness asserts that each layer holds exactly the budget and records the
lengths; :class:`StreamResult` carries them.
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


@dataclass
class StreamResult:
    """Outcome of one streamed text under one scorer and budget.

    Attributes:
        nll_sum: summed negative log-likelihood (nats) of every predicted token.
        n_predicted: number of predicted tokens (text length − 1).
        cache_lengths: per eviction step, the cache length of every layer after eviction.
        evictions: number of eviction steps that removed tokens.
        kept_positions: ``(layers, budget)`` original positions left in each layer's cache at the end.
        max_cache_len: the largest cache any layer held after an eviction step.
    """

    nll_sum: float
    n_predicted: int
    cache_lengths: list[list[int]] = field(default_factory=list)
    evictions: int = 0
    kept_positions: torch.Tensor | None = None
    max_cache_len: int = 0

    @property
    def perplexity(self) -> float:
        return float(torch.exp(torch.tensor(self.nll_sum / max(self.n_predicted, 1))))


class _LayerState:
    """Running key mass and original positions of one layer's cache entries."""

    def __init__(self) -> None:
        self.mass: torch.Tensor | None = None  # (B, H_q, K) float32
        self.positions: torch.Tensor | None = None  # (K,) long
        # the latest chunk's attention rows, for scorers that read queries directly (TOVA, SnapKV, CAOTE)
        self.chunk_attention: torch.Tensor | None = None  # (B, H_q, Q, K)
        self.chunk_positions: torch.Tensor | None = None  # (Q,)

    def append_positions(self, new_positions: torch.Tensor) -> None:
        self.positions = new_positions if self.positions is None else torch.cat([self.positions, new_positions])

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
        if self.mass is not None:
            self.mass = self.mass[..., index]
        self.positions = self.positions[index]
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
) -> StreamResult:
    """Stream ``input_ids`` ``(1, T)`` through ``model`` with a cache of at most ``budget`` entries per layer.

    Args:
        scorer: ranks cache entries; its ``mass_decay`` sets how the running key mass ages.
        budget: cache entries kept per layer after each chunk (all KV heads keep the same tokens).
        n_sink: initial positions always kept (attention sinks).
        recent_window: newest positions always kept.
        chunk_size: tokens per forward pass; between evictions the cache briefly holds ``budget + chunk_size``.
        generator: seeds stochastic scorers.
        attention: ``"eager"`` captures each chunk's probabilities; ``"fused"`` runs scored attention and keeps only
            each key's mass (for scorers that need nothing else and do not decay it).

    A budget ≥ T never evicts and reproduces the uncompressed model.
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
    check_attention_path(attention, [scorer])
    if attention == "fused" and scorer.mass_decay != 1.0:
        raise ValueError(f"{scorer.name} decays its mass per query; the fused path sums chunks undecayed, use 'eager'")

    config = model.config
    num_layers = config.num_hidden_layers
    layers = [_LayerState() for _ in range(num_layers)]
    cache = DynamicCache(config=config)
    result = StreamResult(nll_sum=0.0, n_predicted=0)
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
            if cache.get_seq_length() > budget:
                _evict(cache, layers, scorer, budget, n_sink, recent_window, stop - 1, generator)
                lengths = [cache.layers[i].keys.shape[-2] for i in range(num_layers)]
                if any(n != budget for n in lengths):
                    raise RuntimeError(f"eviction left cache lengths {lengths}, expected {budget} in every layer")
                result.cache_lengths.append(lengths)
                result.evictions += 1
                result.max_cache_len = max(result.max_cache_len, max(lengths))
    result.kept_positions = torch.stack([s.positions for s in layers]) if result.evictions else None
    return result


def _add_nll(result: StreamResult, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Add the NLL of the next tokens this chunk predicts (the last chunk has one target fewer than positions)."""
    logprobs = torch.log_softmax(logits[0, : targets.shape[0]].float(), dim=-1)
    result.nll_sum -= float(logprobs.gather(-1, targets[:, None]).sum())
    result.n_predicted += int(targets.shape[0])


def _evict(cache, layers, scorer, budget, n_sink, recent_window, newest, generator) -> None:
    for layer_idx, state in enumerate(layers):
        positions = state.positions
        view = AttentionView(
            key_positions=positions,
            query_positions=state.chunk_positions,
            attention=state.chunk_attention,
            key_mass=state.mass,
            visible_queries=newest - positions + 1,
            keys=cache.layers[layer_idx].keys,
            values=cache.layers[layer_idx].values,
            generator=generator,
        )
        scores = scorer(view)
        shared = scores.float().mean(dim=1)  # one ranking per layer: every KV head keeps the same tokens
        protect = protected_mask(positions, n_sink=n_sink, recent=recent_window, newest_position=newest)
        index = select_topk(shared[0], budget, protect)
        layer = cache.layers[layer_idx]
        layer.keys = layer.keys[:, :, index]
        layer.values = layer.values[:, :, index]
        state.keep(index)
