"""Drop or merge visual tokens between the blocks of a ViT: prefix once, suffix many.

>>> prefix = vit_prefix(model, pixel_values, layer=4, needs=scorer.needs)       # blocks 1..4, once
>>> out = reduce_and_finish(model, prefix, scorer, keep=0.25, method="drop")  # blocks 5..L on 1 + 25% of patches
>>> out.cls, out.patch_mean, out.tokens_per_layer, out.flops, out.seconds

Works on any Hugging Face ViT-like encoder whose blocks can be called as ``block(hidden, None)``: ``Dinov2Model``
(the embedded ``dinov2-s``), ``ViTModel``, ``CLIPVisionModel``, ``SiglipVisionModel`` (no [CLS]). The parts
(embeddings, blocks, final norm) are found by attribute name (:func:`vit_parts`), never by copying model code.

Reductions really shorten the sequence (gather / scatter), they do not mask. Three methods:

- ``"drop"``: a scorer ranks the tokens (``(B, H, K)`` averaged over heads), [CLS] and registers are always kept and do
  not count in the budget, the top ``resolve_budget(keep, n_patches)`` patches survive (FasterVLM, VTC-CLS, ...).
- ``"tome"``: ToMe bipartite soft matching on the layer's keys (mean over heads), size-weighted averages.
- ``"visionzip"``: dominant tokens chosen by the scorer (VisionZip uses [CLS] attention), the rest merged by key
  similarity into ``contextual`` centres (a share of the same budget).

Merged tokens carry sizes; with ``proportional_attention`` every later layer adds ``log(size)`` to the attention logits
of each key (ToMe's proportional attention), through an attention function registered with transformers'
``AttentionInterface`` that reads the sizes from a context variable. The same function captures the probabilities,
keys and values the scorers ask for, so the prefix runs once with only what is needed.

Every block's input length is recorded by a forward pre-hook and asserted against the plan; FLOPs are estimated from
the config and those lengths (:func:`estimate_flops`); wall seconds are measured per phase.
"""

from __future__ import annotations

import contextvars
import inspect
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ..scorers.base import AttentionView, Scorer
from ..selection import resolve_budget, select_topk
from .token_merging import contextual_destination, merge_by_destination, tome_destination

ATTENTION = "salience_vit"
METHODS = ("drop", "tome", "visionzip")


# --------------------------------------------------------------------------------------------- attention function
@dataclass
class _AttentionState:
    """What the registered attention function reads while the harness runs a block."""

    log_sizes: torch.Tensor | None = None  # (B, K) added to the logits of every query's row (proportional attention)
    record_probs: bool = False
    record_kv: bool = False
    probs: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


_state: contextvars.ContextVar[_AttentionState | None] = contextvars.ContextVar("salience_vit", default=None)


def vit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bidirectional attention with optional ``log(size)`` key bias and capture.

    query/key/value ``(B, H, K, D)``; returns ``(B, K, H, D)`` and the probabilities when they were computed.
    Without capture it calls PyTorch's fused ``scaled_dot_product_attention`` (the bias as a float mask), so timing
    a reduced model measures real work, not a slow eager path.
    """
    state = _state.get() or _AttentionState()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bias = attention_mask
    if state.log_sizes is not None:
        size_bias = state.log_sizes[:, None, None, :].to(query.dtype)
        bias = size_bias if bias is None else bias + size_bias
    if state.record_kv:
        state.keys, state.values = key, value
    if not state.record_probs:
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale,
                                                         dropout_p=dropout if module.training else 0.0)
        return out.transpose(1, 2).contiguous(), None
    logits = torch.matmul(query, key.transpose(2, 3)) * scale
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    state.probs = probs
    out = torch.matmul(probs.to(query.dtype), value)
    return out.transpose(1, 2).contiguous(), probs


def install() -> str:
    """Register :func:`vit_attention` (idempotent); returns its name."""
    AttentionInterface.register(ATTENTION, vit_attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return ATTENTION


@contextmanager
def _using_vit_attention(model: nn.Module) -> Iterator[None]:
    install()
    previous = model.config._attn_implementation
    if previous != ATTENTION:
        model.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        if previous != ATTENTION:
            model.set_attn_implementation(previous)


@contextmanager
def _attention_state(state: _AttentionState) -> Iterator[_AttentionState]:
    token = _state.set(state)
    try:
        yield state
    finally:
        _state.reset(token)


# ------------------------------------------------------------------------------------------------- model parts
@dataclass
class VitParts:
    """The pieces of a ViT-like encoder the harness drives.

    Attributes:
        embeddings: pixel values → ``(B, n_prefix + N, d)`` tokens; pre_norm: applied after it (CLIP) or None.
        blocks: the transformer blocks in order; final_norm: the norm applied to every output token.
        config: the vision config (hidden size, heads, MLP size, patch size).
    """

    embeddings: nn.Module
    blocks: Sequence[nn.Module]
    final_norm: nn.Module | None
    pre_norm: nn.Module | None
    config: object

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def patch_size(self) -> int:
        p = self.config.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if "interpolate_pos_encoding" in inspect.signature(self.embeddings.forward).parameters:
            kwargs["interpolate_pos_encoding"] = True
        hidden = self.embeddings(pixel_values, **kwargs)
        return self.pre_norm(hidden) if self.pre_norm is not None else hidden


def _first_attr(obj, names):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def vit_parts(model: nn.Module) -> VitParts:
    """Find embeddings, blocks and final norm of a Hugging Face ViT-like encoder (ViT, DINOv2, CLIP/SigLIP vision)."""
    root = _first_attr(model, ("vision_model", "vit", "dinov2")) or model
    embeddings = getattr(root, "embeddings", None)
    encoder = getattr(root, "encoder", None)
    blocks = _first_attr(encoder, ("layer", "layers")) if encoder is not None else None
    if embeddings is None or blocks is None:
        raise ValueError(f"{type(model).__name__} does not look like a ViT encoder: expected .embeddings and "
                         ".encoder.layer(s) (ViTModel, Dinov2Model, CLIPVisionModel, SiglipVisionModel)")
    final_norm = _first_attr(root, ("layernorm", "post_layernorm", "norm", "final_layernorm"))
    pre_norm = _first_attr(root, ("pre_layrnorm", "pre_layernorm"))
    config = getattr(model.config, "vision_config", None) or model.config
    return VitParts(embeddings, list(blocks), final_norm, pre_norm, config)


# ---------------------------------------------------------------------------------------------------- validation
def check_keep(keep: float | int, n_patches: int | None = None) -> None:
    """A kept share must be a ratio in (0, 1] (or, with ``n_patches``, a patch count in [1, n_patches])."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep must be a ratio in (0, 1] or a patch count, got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep ratio must lie in (0, 1], got {keep}")
    elif keep < 1 or (n_patches is not None and keep > n_patches):
        raise ValueError(f"keep as a patch count must lie in [1, {n_patches or 'number of patches'}] (a ratio in "
                         f"(0, 1] otherwise), got {keep}")


def check_layer(layer: int, depth: int) -> None:
    """Reduction happens after block ``layer``; at least one block must run on the reduced tokens."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth - 1:
        raise ValueError(f"pruning layer must be an integer in [1, {depth - 1}] for this {depth}-layer model "
                         f"(reduce after block l, blocks l+1..{depth} run on the kept tokens), got {layer!r}")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ------------------------------------------------------------------------------------------------------ prefix
@dataclass
class VitPrefix:
    """The state after blocks 1..``layer`` ran once on the full image (reused by every reduction).

    Attributes:
        hidden: ``(B, K, d)`` output of block ``layer``; positions: ``(B, K)`` original token index (0 = [CLS],
            n_prefix + i = patch i in raster order); sizes: ``(B, K)`` patches each token stands for.
        keys, values: ``(B, H, K, D)`` of block ``layer``'s attention; attention_layers: the captured ``(B, H, K, K)``
            probabilities of blocks 1..layer (only the last when a scorer needs just ``attention``; empty if none).
        n_prefix: [CLS] + register tokens before the patches (0 for a model without [CLS]); grid: patch rows, cols.
        tokens_per_layer: input length of blocks 1..layer; seconds: wall time of the prefix.
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    sizes: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    attention_layers: list[torch.Tensor]
    layer: int
    depth: int
    n_prefix: int
    has_cls: bool
    grid: tuple[int, int]
    tokens_per_layer: list[int]
    n_patches: int
    seconds: float = 0.0

    @property
    def batch(self) -> int:
        return int(self.hidden.shape[0])


def _needs_of(needs) -> frozenset[str]:
    if needs is None:
        return frozenset()
    if isinstance(needs, Scorer):
        return needs.needs
    items = list(needs)
    if all(isinstance(s, Scorer) for s in items):
        return frozenset().union(*(s.needs for s in items))
    return frozenset(items)


@contextmanager
def _counting_tokens(blocks: Sequence[nn.Module], counts: list[int]) -> Iterator[None]:
    """Record the sequence length every block really receives (a pre-hook: proof, not bookkeeping)."""
    handles = [b.register_forward_pre_hook(lambda _m, args: counts.append(int(args[0].shape[1]))) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run_block(block: nn.Module, hidden: torch.Tensor, state: _AttentionState) -> torch.Tensor:
    with _attention_state(state):
        out = block(hidden, None)
    return out[0] if isinstance(out, tuple) else out


def _check_pixels(pixel_values, patch: int) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a (B, C, H, W) tensor, got {got}")
    h, w = pixel_values.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {patch}")


@torch.inference_mode()
def vit_prefix(model: nn.Module, pixel_values: torch.Tensor, layer: int, needs=None) -> VitPrefix:
    """Run the embeddings and blocks 1..``layer`` once, capturing what the scorers need.

    Args:
        pixel_values: ``(B, 3, H, W)`` normalised pixels, H and W multiples of the patch size.
        layer: reduce after this block, in ``[1, depth - 1]``.
        needs: a scorer, scorers, or capture names (``"attention"``, ``"attention_layers"``, ``"key_mass"``, ...).
            Keys, values and hidden states of ``layer`` are always kept (merging reads the keys).
    """
    parts = vit_parts(model)
    check_layer(layer, parts.depth)
    _check_pixels(pixel_values, parts.patch_size)
    needs = _needs_of(needs)
    all_layers = "attention_layers" in needs
    last_layer = all_layers or bool(needs & {"attention", "key_mass"})
    start = time.perf_counter()
    counts: list[int] = []
    with _using_vit_attention(model), _counting_tokens(parts.blocks[:layer], counts):
        hidden = parts.embed(pixel_values)
        b, k, _ = hidden.shape
        grid = (pixel_values.shape[-2] // parts.patch_size, pixel_values.shape[-1] // parts.patch_size)
        n_patches = grid[0] * grid[1]
        n_prefix = k - n_patches
        if n_prefix < 0:
            raise ValueError(f"embeddings gave {k} tokens for {n_patches} patches")
        probs = []
        for i, block in enumerate(parts.blocks[:layer]):
            is_last = i == layer - 1
            state = _AttentionState(record_probs=all_layers or (is_last and last_layer), record_kv=is_last)
            hidden = _run_block(block, hidden, state)
            if state.probs is not None:
                probs.append(state.probs)
    if counts != [k] * layer:
        raise AssertionError(f"prefix blocks saw {counts} tokens, expected {[k] * layer}")
    positions = torch.arange(k, device=hidden.device).expand(b, k).clone()
    return VitPrefix(hidden=hidden, positions=positions, sizes=torch.ones(b, k, device=hidden.device),
                     keys=state.keys, values=state.values, attention_layers=probs, layer=layer, depth=parts.depth,
                     n_prefix=n_prefix, has_cls=n_prefix >= 1, grid=grid, tokens_per_layer=counts,
                     n_patches=n_patches, seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------- views
def build_view(hidden: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               attention_layers: list[torch.Tensor], *, n_prefix: int, has_cls: bool, grid: tuple[int, int],
               generator: torch.Generator | None = None) -> AttentionView:
    """The scorer's view of one batch whose rows share ``positions (K,)`` (see the vision contract)."""
    k = positions.shape[-1]
    patch = positions >= n_prefix
    cls = positions == 0 if has_cls else torch.zeros(k, dtype=torch.bool, device=positions.device)
    roles = {"patch": patch}
    if has_cls:
        roles["cls"] = cls
    if n_prefix > 1:
        roles["register"] = ~patch & ~cls
    flat = positions - n_prefix
    coords = torch.stack([flat // grid[1], flat % grid[1]], dim=-1)
    coords = torch.where(patch[:, None], coords, torch.full_like(coords, -1))
    # an encoder's attention is not causal: every token's query sees every key (ZipCache's normaliser is K)
    visible = torch.full((k,), k, dtype=torch.long, device=positions.device)
    return AttentionView(key_positions=positions, query_positions=positions, visible_queries=visible,
                         attention=attention_layers[-1] if attention_layers else None,
                         attention_layers=list(attention_layers) if attention_layers else None,
                         keys=keys, values=values, hidden=hidden, patch_coords=coords.long(), roles=roles,
                         generator=generator)


def _scores(scorer: Scorer, hidden, positions, keys, values, attention_layers, meta, generator) -> torch.Tensor:
    """``(B, K)`` head-averaged scores; rows with different positions get their own view (the contract's ``(K,)``)."""
    if bool((positions == positions[:1]).all()):
        view = build_view(hidden, positions[0], keys, values, attention_layers, generator=generator, **meta)
        return scorer(view).float().mean(dim=1)
    rows = []
    for i in range(positions.shape[0]):
        view = build_view(hidden[i:i + 1], positions[i], keys[i:i + 1], values[i:i + 1],
                          [a[i:i + 1] for a in attention_layers], generator=generator, **meta)
        rows.append(scorer(view).float().mean(dim=1))
    return torch.cat(rows, dim=0)


# ------------------------------------------------------------------------------------------------------ suffix
@dataclass
class Stage:
    """Reduce after block ``layer`` to ``keep`` of the patch tokens present at that point (ratio or count)."""

    layer: int
    keep: float | int


@dataclass
class VitResult:
    """Output of a (reduced) forward pass.

    Attributes:
        cls: ``(B, d)`` final-normed [CLS] (the first token; None without [CLS]); patch_mean: ``(B, d)`` size-weighted
            mean of the final-normed patch tokens; features: ``concat(cls, patch_mean)`` (DINOv2 linear-eval recipe,
            ``patch_mean`` alone without [CLS]).
        tokens_per_layer: input length of every block (asserted against the plan); kept_positions: ``(B, n)`` original
            index of each output token (its own position for a merged group's survivor); assignment: ``(B, N)`` output
            token each original patch ended in (-1 dropped); sizes: ``(B, n)``.
        flops: estimated FLOPs per image (:func:`estimate_flops`); seconds: wall seconds per phase (prefix, score,
            reduce, suffix) for the whole batch; n_prefix: [CLS] + registers (0 without [CLS]).
    """

    cls: torch.Tensor | None
    patch_mean: torch.Tensor
    tokens_per_layer: list[int]
    kept_positions: torch.Tensor
    assignment: torch.Tensor
    sizes: torch.Tensor
    flops: float
    seconds: dict[str, float] = field(default_factory=dict)
    n_prefix: int = 1

    @property
    def features(self) -> torch.Tensor:
        return self.patch_mean if self.cls is None else torch.cat([self.cls, self.patch_mean], dim=-1)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))


def _reduce(method: str, scorer: Scorer | None, keep, hidden, positions, sizes, keys, values, attention_layers,
            meta, *, contextual: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dest, survives)`` of one reduction step (see :mod:`token_merging`)."""
    b, k, _ = hidden.shape
    n_prefix_here = int((positions[0] < meta["n_prefix"]).sum())
    n_patch = k - n_prefix_here
    budget = resolve_budget(keep, n_patch)
    protected = positions < meta["n_prefix"]  # (B, K)
    metric = keys.mean(dim=1)  # ToMe / VisionZip similarity: keys averaged over heads, (B, K, D)
    if method == "tome":
        return tome_destination(metric, sizes, n_patch - budget, protected)
    scores = _scores(scorer, hidden, positions, keys, values, attention_layers, meta, generator)
    if method == "drop":
        kept = select_topk(scores, n_prefix_here + budget, protected)
        survives = torch.zeros(b, k, dtype=torch.bool, device=hidden.device).scatter_(1, kept, True)
        return torch.where(survives, survives.long().cumsum(1) - 1, torch.full_like(positions, -1)), survives
    # visionzip: dominant tokens by the scorer, the rest merged into contextual centres (same total budget)
    n_ctx = min(budget - 1, max(1, round(contextual * budget))) if budget > 1 and contextual > 0 else 0
    kept = select_topk(scores, n_prefix_here + budget - n_ctx, protected)
    dominant = torch.zeros(b, k, dtype=torch.bool, device=hidden.device).scatter_(1, kept, True)
    return contextual_destination(metric, dominant, n_ctx)


def expected_tokens_per_layer(depth: int, n_prefix: int, n_patches: int, stages: Sequence[Stage]) -> list[int]:
    """Input length of every block under a plan (what the pre-hooks must observe)."""
    counts, patches, by_layer = [], n_patches, {s.layer: s.keep for s in stages}
    for i in range(depth):
        counts.append(n_prefix + patches)
        if i + 1 in by_layer:
            patches = resolve_budget(by_layer[i + 1], patches)
    return counts


@torch.inference_mode()
def reduce_and_finish(model: nn.Module, prefix: VitPrefix, scorer: Scorer | None, keep: float | int,
                      method: str = "drop", *, stages: Sequence[Stage | tuple[int, float]] = (),
                      proportional_attention: bool = True, contextual: float = 0.15, seed: int = 0) -> VitResult:
    """Reduce the prefix's tokens to ``keep`` of its patches, run the remaining blocks, return features and proof.

    Args:
        scorer: ranks tokens for ``"drop"`` and picks VisionZip's dominant tokens (ignored by ``"tome"``).
        keep: ratio in (0, 1] of the patches (or a patch count); [CLS] and registers are kept on top.
        method: ``"drop"``, ``"tome"`` or ``"visionzip"``.
        stages: later reductions ``(layer, keep)`` after ``prefix.layer``, ``keep`` relative to the patches left
            then; the scorer is applied to a view captured at that layer (its ``needs`` are captured there).
        proportional_attention: add ``log(size)`` to the keys' logits in later blocks (merging methods).
        contextual: VisionZip's share of the budget given to contextual (merged) tokens.
        seed: seeds the generator stochastic scorers read.
    """
    parts = vit_parts(model)
    check_method(method)
    check_keep(keep, prefix.n_patches)
    if not 0.0 <= contextual < 1.0:
        raise ValueError(f"contextual must lie in [0, 1), got {contextual}")
    if method != "tome" and scorer is None:
        raise ValueError(f"method {method!r} needs a scorer (tome needs none)")
    plan = [Stage(prefix.layer, keep)] + [s if isinstance(s, Stage) else Stage(*s) for s in stages]
    for s in plan[1:]:
        check_layer(s.layer, parts.depth)
        check_keep(s.keep)
    if [s.layer for s in plan] != sorted({s.layer for s in plan}):
        raise ValueError(f"stage layers must increase strictly after the prefix layer {prefix.layer}, "
                         f"got {[s.layer for s in plan]}")
    meta = dict(n_prefix=prefix.n_prefix, has_cls=prefix.has_cls, grid=prefix.grid)
    generator = torch.Generator().manual_seed(seed)
    needs = scorer.needs if scorer is not None else frozenset()
    all_layers = "attention_layers" in needs
    probs_needed = all_layers or bool(needs & {"attention", "key_mass"})
    merging = method != "drop"

    hidden, positions, sizes = prefix.hidden, prefix.positions, prefix.sizes
    keys, values, attention_layers = prefix.keys, prefix.values, list(prefix.attention_layers)
    b, n_patches = prefix.batch, prefix.n_patches
    assignment = torch.arange(n_patches, device=hidden.device).expand(b, n_patches) + prefix.n_prefix
    seconds = {"prefix": prefix.seconds, "score_reduce": 0.0, "suffix": 0.0}
    counts = list(prefix.tokens_per_layer)
    stage_at = {s.layer: s.keep for s in plan}
    layer = prefix.layer
    size_bias = None  # log(size) per key while any token stands for several patches (ToMe's proportional attention)
    with _using_vit_attention(model):
        while True:
            if layer in stage_at:
                start = time.perf_counter()
                dest, survivor = _reduce(method, scorer, stage_at[layer], hidden, positions, sizes, keys, values,
                                         attention_layers, meta, contextual=contextual, generator=generator)
                n_out = int(survivor[0].sum())
                if merging:
                    hidden, sizes = merge_by_destination(hidden, sizes, dest, n_out)
                    attention_layers = []  # merged tokens have no attention rows of their own
                else:
                    hidden, sizes = hidden[survivor].view(b, n_out, -1), sizes[survivor].view(b, n_out)
                    idx = torch.nonzero(survivor)[:, 1].view(b, 1, n_out, 1)
                    attention_layers = [a.gather(2, idx.expand(-1, a.shape[1], -1, a.shape[3]))
                                        .gather(3, idx.transpose(2, 3).expand(-1, a.shape[1], n_out, -1))
                                        for a in attention_layers]
                positions = positions[survivor].view(b, n_out)
                if merging and proportional_attention and bool((sizes != 1).any()):
                    size_bias = sizes.log()
                assignment = torch.where(assignment >= 0, dest.gather(1, assignment.clamp(min=0)), assignment)
                seconds["score_reduce"] += time.perf_counter() - start
            if layer == parts.depth:
                break
            start = time.perf_counter()
            later_stage = any(s.layer > layer for s in plan)
            next_is_stage = layer + 1 in stage_at
            state = _AttentionState(
                log_sizes=size_bias,
                record_probs=later_stage and probs_needed and (all_layers or next_is_stage),
                record_kv=next_is_stage)
            with _counting_tokens(parts.blocks[layer:layer + 1], counts):
                hidden = _run_block(parts.blocks[layer], hidden, state)
            if state.probs is not None:
                attention_layers = (attention_layers if all_layers else []) + [state.probs]
            if next_is_stage:
                keys, values = state.keys, state.values
            seconds["suffix"] += time.perf_counter() - start
            layer += 1
        start = time.perf_counter()
        normed = parts.final_norm(hidden) if parts.final_norm is not None else hidden
        patch = positions >= prefix.n_prefix
        w = sizes * patch
        patch_mean = (normed * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        cls = normed[:, 0] if prefix.has_cls else None
        seconds["suffix"] += time.perf_counter() - start
    expected = expected_tokens_per_layer(parts.depth, prefix.n_prefix, n_patches, plan)
    if counts != expected:
        raise AssertionError(f"blocks saw {counts} tokens, the plan says {expected}")
    return VitResult(cls=cls, patch_mean=patch_mean, tokens_per_layer=counts, kept_positions=positions,
                     assignment=assignment, sizes=sizes, seconds=seconds, n_prefix=prefix.n_prefix,
                     flops=estimate_flops(parts.config, counts, n_patches=n_patches))


def vit_forward(model: nn.Module, pixel_values: torch.Tensor) -> VitResult:
    """The unreduced model through the same code path (keep = 1.0 after block 1): the reference features."""
    return reduce_and_finish(model, vit_prefix(model, pixel_values, 1), None, 1.0, "tome")


def prune_vit(model: nn.Module, pixel_values: torch.Tensor, scorer: Scorer | None, keep: float | int, layer: int,
              method: str = "drop", **kwargs) -> VitResult:
    """One call: validate everything first, then :func:`vit_prefix` + :func:`reduce_and_finish`."""
    check_method(method)
    check_keep(keep)
    check_layer(layer, vit_parts(model).depth)
    return reduce_and_finish(model, vit_prefix(model, pixel_values, layer, needs=scorer), scorer, keep, method,
                             **kwargs)


# ------------------------------------------------------------------------------------------------------- FLOPs
def mlp_macs_per_token(config) -> int:
    """Multiply-accumulates of one token through one block's MLP, from the config (SwiGLU for DINOv2-g style)."""
    d = config.hidden_size
    if getattr(config, "use_swiglu_ffn", False):
        hidden = int(d * config.mlp_ratio)
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return 3 * d * hidden
    inner = getattr(config, "intermediate_size", None) or int(d * getattr(config, "mlp_ratio", 4))
    return 2 * d * inner


def block_flops(config, n: int) -> float:
    """FLOPs (2 x MACs) of one block on ``n`` tokens: Q, K, V, O projections ``4 n d²``, scores and weighted sum
    ``2 n² d``, MLP; norms, softmax and biases are left out (a few percent)."""
    d = config.hidden_size
    return 2.0 * (4 * n * d * d + 2 * n * n * d + n * mlp_macs_per_token(config))


def estimate_flops(config, tokens_per_layer: Sequence[int], n_patches: int) -> float:
    """Estimated FLOPs per image: patch embedding (``2 N 3 p² d``) plus every block at its recorded length."""
    p = config.patch_size[0] if isinstance(config.patch_size, (tuple, list)) else config.patch_size
    channels = getattr(config, "num_channels", 3)
    embed = 2.0 * n_patches * channels * p * p * config.hidden_size
    return embed + sum(block_flops(config, n) for n in tokens_per_layer)


__all__ = [
    "ATTENTION",
    "METHODS",
    "Stage",
    "VitParts",
    "VitPrefix",
    "VitResult",
    "block_flops",
    "build_view",
    "check_keep",
    "check_layer",
    "check_method",
    "estimate_flops",
    "expected_tokens_per_layer",
    "install",
    "mlp_macs_per_token",
    "prune_vit",
    "reduce_and_finish",
    "vit_attention",
    "vit_forward",
    "vit_parts",
    "vit_prefix",
]
