"""Attention flow [@attention_flow]: the max-flow from each input token to the explained output token through the
layer graph whose edge capacities are the (residual-augmented) attention weights."""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

from ..validation import check_choice
from .base import AttentionView, Scorer, register
from .explanation_common import HEAD_FUSIONS, QUERIES, explained_index, fuse_heads
from .vision_common import all_layers

#: default longest input: one max-flow per input token over a graph of L·K² edges is slow in pure Python
#: (about K·L·K² work; 64 tokens × 6 layers takes seconds, 256 tokens minutes)
MAX_TOKENS = 64


def mixing_matrices(layers: list[torch.Tensor], residual: float, head_fusion: str) -> list[torch.Tensor]:
    """``(B, K, K)`` per layer: ``norm_rows(ρ I + (1 − ρ) fuse_h A_l)`` (rows are queries), oldest first."""
    out = []
    for a in layers:
        fused = fuse_heads(a, head_fusion)
        mixed = residual * torch.eye(fused.shape[-1]) + (1 - residual) * fused
        out.append(mixed / mixed.sum(dim=-1, keepdim=True))
    return out


def max_flows(mixing: list[torch.Tensor], sink: int) -> torch.Tensor:
    """``(K,)`` max-flow value from each input node ``(0, j)`` to the output node ``(L, sink)`` for one example.

    Nodes ``(l, i)``: token ``i`` after layer ``l`` (``l = 0`` the input). Edge ``(l − 1, j) → (l, i)`` has capacity
    ``mixing[l − 1][i, j]``. ``mixing``: ``L`` matrices ``(K, K)``.
    """
    graph = nx.DiGraph()
    for level, m in enumerate(mixing, start=1):
        rows, cols = m.nonzero(as_tuple=True)
        for i, j in zip(rows.tolist(), cols.tolist()):
            graph.add_edge((level - 1, j), (level, i), capacity=float(m[i, j]))
    top = (len(mixing), sink)
    k = mixing[0].shape[-1]
    flows = torch.zeros(k)
    for j in range(k):
        if (0, j) in graph and top in graph:
            flows[j] = nx.maximum_flow_value(graph, (0, j), top)
    return flows


@register
@dataclass
class AttentionFlow(Scorer):
    """Abnar & Zuidema's attention flow: ``s_j = maxflow((0, j) → (L, q))`` over the layer graph with capacities
    ``Ã_l = norm_rows(ρ I + (1 − ρ) fuse_h A_l)`` (ρ = 0.5 in the paper: the residual connection).

    Rollout multiplies the weights along every path and sums over paths; flow treats them as capacities, so a path
    is limited by its narrowest edge and the scores are not a distribution (each lies in [0, 1]; they need not sum
    to 1). The explained output ``q`` is [CLS] where the view has that role, else the last token.

    Parameters:
        residual: ρ in [0, 1); 0 = raw attention as capacities.
        head_fusion: ``mean``, ``max`` or ``min`` over heads per layer.
        query: ``auto``, ``cls`` or ``last``.
        max_tokens: longest input accepted (the rule runs ``K`` max-flows over ``L·K²`` edges in networkx);
            longer views raise rather than run for minutes. Raise it knowingly.

    Reads ``attention_layers`` (square ``(B, H, K, K)``); returns ``(B, 1, K)``.
    """

    name = "attention_flow"
    head_layout = "shared"
    needs = frozenset({"attention_layers"})
    residual: float = 0.5
    head_fusion: str = "mean"
    query: str = "auto"
    max_tokens: int = MAX_TOKENS

    def __post_init__(self) -> None:
        if not 0.0 <= self.residual < 1.0:
            raise ValueError(f"residual must lie in [0, 1), got {self.residual}")
        check_choice(self.head_fusion, HEAD_FUSIONS, "head_fusion")
        check_choice(self.query, QUERIES, "query")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1, got {self.max_tokens}")

    def score(self, view: AttentionView) -> torch.Tensor:
        if view.num_keys > self.max_tokens:
            raise ValueError(f"attention_flow runs one max-flow per token and is limited to {self.max_tokens} tokens; "
                             f"this view has {view.num_keys}: shorten the input, raise max_tokens, or use "
                             "attention_rollout")
        layers = [a.detach().float().cpu() for a in all_layers(view, self.name)]
        for a in layers:
            if a.shape[-2] != a.shape[-1]:
                raise ValueError(f"attention_flow needs square attention (all tokens query), got {tuple(a.shape)}")
        sink = explained_index(view, self.query, self.name)
        mixing = mixing_matrices(layers, self.residual, self.head_fusion)
        flows = [max_flows([m[b] for m in mixing], sink) for b in range(mixing[0].shape[0])]
        return torch.stack(flows).unsqueeze(1).to(view.key_positions.device)
