"""One full encoder pass that records everything the after-encoder setting and the in-encoder prefixes read.

The VLM papers (FasterVLM, VTC-CLS, VisionZip, FlowCut, HiPrune, DivPrune, DART, ToDRE, G-Prune) reduce the
encoder's *output*: the encoder runs on every token once, scorers read that pass (attention of its layers, [CLS]
rows, keys / values / hidden states of a scoring layer), and the language model reads the kept tokens. So one pass
per image serves every scorer and every budget:

>>> out = encode(model, pixels, scores={"cls": ScoreRequest(get_scorer("cls_attention"), layer=12)},
...              hidden_layers=[6], key_layers=[6, 12])
>>> out.tokens.shape, out.scores["cls"].shape, out.hidden[6].shape, out.keys[12].shape
((B, 65, 384), (B, 65), (B, 65, 384), (B, 65, 64))

``hidden[l]`` and ``keys[l]`` (head-averaged) are block ``l``'s output and keys: the prefix of an in-encoder
reduction after block ``l`` (:func:`prefix_from`), so that setting reuses the same pass too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..scorers.base import Scorer
from ..validation import check_pixels
from .vit_attention import AttentionState, counting_tokens, run_block, using_vit_attention
from .vit_model import vit_parts
from .vit_pruning import VitPrefix
from .vit_views import head_mean_scores


@dataclass(frozen=True)
class ScoreRequest:
    """Score every token with ``scorer`` on the view of block ``layer`` (1-based; the attention of blocks
    1..layer, keys, values and hidden state of block ``layer``); ``seed`` seeds stochastic scorers (one generator per
    :func:`encode` call: a caller that encodes in batches gives each batch its own seed)."""

    scorer: Scorer
    layer: int
    seed: int = 0


@dataclass
class EncoderOutput:
    """What one full pass recorded for a batch.

    Attributes:
        tokens: ``(B, K, d)`` final-normed output tokens ([CLS] and registers first, then patches in raster order).
        hidden: ``{layer: (B, K, d)}`` block outputs; keys: ``{layer: (B, K, D)}`` keys averaged over heads.
        scores: ``{name: (B, K)}`` head-averaged scores of each :class:`ScoreRequest`.
        n_prefix: [CLS] + registers; has_cls; grid: patch rows, cols; tokens_per_layer: block input lengths.
    """

    tokens: torch.Tensor
    n_prefix: int
    has_cls: bool
    grid: tuple[int, int]
    tokens_per_layer: list[int]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_layers(layers: Iterable[int], depth: int, what: str) -> list[int]:
    layers = sorted(set(layers))
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= depth]
    if bad:
        raise ValueError(f"{what} must be block indices in [1, {depth}] for this {depth}-layer model, got {bad}")
    return layers


@torch.inference_mode()
def encode(model: nn.Module, pixel_values: torch.Tensor, *, scores: Mapping[str, ScoreRequest] | None = None,
           hidden_layers: Iterable[int] = (), key_layers: Iterable[int] = ()) -> EncoderOutput:
    """Run the whole encoder once on ``pixel_values (B, 3, H, W)``, recording what is asked and nothing more.

    Attention probabilities are computed (eager) only for the blocks some scorer reads; every other block runs the
    fused kernel. Scores are computed right after the block they read, so at most the captured layers are held.
    """
    parts = vit_parts(model)
    check_pixels(pixel_values, parts.patch_size)
    scores = dict(scores or {})
    depth = parts.depth
    hidden_layers = _check_layers(hidden_layers, depth, "hidden_layers")
    key_layers = _check_layers(key_layers, depth, "key_layers")
    _check_layers([r.layer for r in scores.values()], depth, "score layers")
    every_layer = max((r.layer for r in scores.values() if "attention_layers" in r.scorer.needs), default=0)
    at_layer = {r.layer for r in scores.values() if r.scorer.needs & {"attention", "key_mass", "attention_layers"}}
    kv_layers = set(key_layers) | {r.layer for r in scores.values()}
    counts: list[int] = []
    out_hidden, out_keys, out_scores, probs = {}, {}, {}, []
    with using_vit_attention(model), counting_tokens(parts.blocks, counts):
        hidden = parts.embed(pixel_values)
        b, k, _ = hidden.shape
        grid = (pixel_values.shape[-2] // parts.patch_size, pixel_values.shape[-1] // parts.patch_size)
        n_prefix = k - grid[0] * grid[1]
        if n_prefix < 0:
            raise ValueError(f"embeddings gave {k} tokens for {grid[0] * grid[1]} patches")
        positions = torch.arange(k, device=hidden.device).expand(b, k)
        for layer, block in enumerate(parts.blocks, start=1):
            state = AttentionState(record_probs=layer <= every_layer or layer in at_layer,
                                   record_kv=layer in kv_layers)
            hidden = run_block(block, hidden, state)
            probs.append(state.probs)
            if layer in hidden_layers:
                out_hidden[layer] = hidden
            if layer in key_layers:
                out_keys[layer] = state.keys.mean(dim=1)
            for name, req in scores.items():
                if req.layer != layer:
                    continue
                captured = [p for p in (probs if "attention_layers" in req.scorer.needs else probs[-1:])
                            if p is not None]
                out_scores[name] = head_mean_scores(
                    req.scorer, hidden, positions, state.keys, state.values, captured, n_prefix=n_prefix,
                    has_cls=n_prefix >= 1, grid=grid, generator=torch.Generator().manual_seed(req.seed))
            if layer >= every_layer:
                probs = [None] * len(probs)  # no later scorer reads these layers: free them
        tokens = parts.normed(hidden)
    if counts != [k] * depth:
        raise AssertionError(f"blocks saw {counts} tokens, expected {[k] * depth}")
    return EncoderOutput(tokens=tokens, n_prefix=n_prefix, has_cls=n_prefix >= 1, grid=grid, tokens_per_layer=counts,
                         hidden=out_hidden, keys=out_keys, scores=out_scores)


def prefix_from(hidden: torch.Tensor, keys: torch.Tensor, layer: int, *, depth: int, n_prefix: int,
                grid: tuple[int, int]) -> VitPrefix:
    """An in-encoder prefix from recorded block-``layer`` outputs ``hidden (B, K, d)`` and head-averaged ``keys
    (B, K, D)``: :func:`~salience.harness.vit_pruning.reduce_and_finish` continues from it with precomputed scores."""
    b, k, _ = hidden.shape
    return VitPrefix(hidden=hidden, positions=torch.arange(k, device=hidden.device).expand(b, k).clone(),
                     sizes=torch.ones(b, k, device=hidden.device), keys=keys[:, None], values=None,
                     attention_layers=[], layer=layer, depth=depth, n_prefix=n_prefix, has_cls=n_prefix >= 1,
                     grid=grid, tokens_per_layer=[k] * layer, n_patches=grid[0] * grid[1])


__all__ = ["EncoderOutput", "ScoreRequest", "encode", "prefix_from"]
