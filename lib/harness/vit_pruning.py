"""In-encoder reduction (the EViT / ToMe setting): drop or merge tokens after block l, blocks l+1.. run on fewer.

>>> prefix = vit_prefix(model, pixel_values, layer=4, needs=scorer.needs)       # blocks 1..4, once
>>> out = reduce_and_finish(model, prefix, scorer, keep=0.25, method="drop")  # blocks 5..L on 1 + 25% of patches
>>> out.tokens, out.sizes, out.cls, out.patch_mean, out.tokens_per_layer, out.flops, out.seconds

This is a different setting from the VLM papers' (FasterVLM, VTC-CLS, VisionZip, ...), which reduce the encoder's
*output* tokens: for those see :mod:`salience.harness.vit_encoder` and :mod:`salience.vision_eval`.

Reductions really shorten the sequence (gather / scatter), they do not mask; the decision is the pure
:func:`~salience.harness.token_merging.reduction_map` (``"drop"``, ``"tome"``, ``"visionzip"``). [CLS] and registers
are always kept and do not count in the budget. Merged tokens carry sizes and later blocks add ``log(size)`` to their
logits (:mod:`salience.harness.vit_attention`, a mode of :mod:`salience.attention_hook`). Every block's input length is recorded by a forward pre-hook and
asserted against the plan; FLOPs are estimated from the config and those lengths; wall seconds are measured per phase.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..scorers.base import Scorer
from ..selection import resolve_budget
from ..validation import check_choice, check_keep, check_layer, check_pixels
from .token_merging import CONTEXTUAL, METHODS, merge_by_destination, reduction_map
from .vit_attention import (
    ATTENTION,
    AttentionState,
    counting_tokens,
    install,
    run_block,
    using_vit_attention,
)
from .vit_model import VitParts, block_flops, estimate_flops, mlp_macs_per_token, vit_parts
from .vit_views import build_view, head_mean_scores, replicate_seed


# ------------------------------------------------------------------------------------------------------ prefix
@dataclass
class VitPrefix:
    """The state after blocks 1..``layer`` ran once on the full image (reused by every reduction).

    Attributes:
        hidden: ``(B, K, d)`` output of block ``layer``; positions: ``(B, K)`` original token index (0 = [CLS],
            n_prefix + i = patch i in raster order); sizes: ``(B, K)`` patches each token stands for.
        keys, values: ``(B, H, K, D)`` of block ``layer``'s attention (``H = 1`` holds head-averaged keys, all that
            merging reads; ``values`` may be None when scores come precomputed); attention_layers: the captured
            ``(B, H, K, K)`` probabilities of blocks 1..layer (only the last when a scorer needs just ``attention``).
        n_prefix: [CLS] + register tokens before the patches (0 for a model without [CLS]); grid: patch rows, cols.
        tokens_per_layer: input length of blocks 1..layer; seconds: wall time of the prefix.
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    sizes: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor | None
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

    @property
    def metric(self) -> torch.Tensor:
        """``(B, K, D)`` ToMe / VisionZip similarity features: the layer's keys averaged over heads."""
        return self.keys.mean(dim=1)


def reads_cls_row_only(needs) -> bool:
    """Whether every scorer in ``needs`` (a scorer or several; names say nothing about rows) reads nothing but the
    [CLS] row of the scoring layer's attention: the harness then records that row from the fused kernel."""
    scorers = [needs] if isinstance(needs, Scorer) else list(needs or ())
    return bool(scorers) and all(isinstance(s, Scorer) and s.attention_rows == "cls" and s.needs <= {"attention"}
                                 for s in scorers)  # fmt: skip


def needs_of(needs) -> frozenset[str]:
    """Capture names from a scorer, several scorers, or names."""
    if needs is None:
        return frozenset()
    if isinstance(needs, Scorer):
        return needs.needs
    items = list(needs)
    if all(isinstance(s, Scorer) for s in items):
        return frozenset().union(*(s.needs for s in items))
    return frozenset(items)


@torch.inference_mode()
def vit_prefix(model: nn.Module, pixel_values: torch.Tensor, layer: int, needs=None) -> VitPrefix:
    """Run the embeddings and blocks 1..``layer`` once, capturing what the scorers need.

    Args:
        pixel_values: ``(B, 3, H, W)`` normalised pixels, H and W multiples of the patch size.
        layer: reduce after this block, in ``[1, depth - 1]``.
        needs: a scorer, scorers, or capture names (``"attention"``, ``"attention_layers"``, ``"key_mass"``, ...).
            Keys, values and hidden states of ``layer`` are always kept (merging reads the keys). When every scorer
            reads only the [CLS] row (:func:`reads_cls_row_only`), block ``layer`` records that row, ``(B, H, 1,
            K)``, from the fused scored-attention kernel instead of the full matrix.
    """
    parts = vit_parts(model)
    check_layer(layer, parts.depth)
    check_pixels(pixel_values, parts.patch_size)
    cls_row = reads_cls_row_only(needs)
    needs = needs_of(needs)
    all_layers = "attention_layers" in needs
    last_layer = all_layers or bool(needs & {"attention", "key_mass"})
    start = time.perf_counter()
    counts: list[int] = []
    with using_vit_attention(model), counting_tokens(parts.blocks[:layer], counts):
        hidden = parts.embed(pixel_values)
        b, k, _ = hidden.shape
        grid = (pixel_values.shape[-2] // parts.patch_size, pixel_values.shape[-1] // parts.patch_size)
        n_patches = grid[0] * grid[1]
        n_prefix = k - n_patches
        if n_prefix < 0:
            raise ValueError(f"embeddings gave {k} tokens for {n_patches} patches")
        probs = []
        cls_row = cls_row and n_prefix >= 1  # [CLS] is token 0
        for i, block in enumerate(parts.blocks[:layer]):
            is_last = i == layer - 1
            state = AttentionState(record_probs=all_layers or (is_last and last_layer and not cls_row),
                                   record_cls_row=is_last and cls_row, record_kv=is_last)
            hidden = run_block(block, hidden, state)
            if state.probs is not None:
                probs.append(state.probs)
    if counts != [k] * layer:
        raise AssertionError(f"prefix blocks saw {counts} tokens, expected {[k] * layer}")
    positions = torch.arange(k, device=hidden.device).expand(b, k).clone()
    return VitPrefix(hidden=hidden, positions=positions, sizes=torch.ones(b, k, device=hidden.device),
                     keys=state.keys, values=state.values, attention_layers=probs, layer=layer, depth=parts.depth,
                     n_prefix=n_prefix, has_cls=n_prefix >= 1, grid=grid, tokens_per_layer=counts,
                     n_patches=n_patches, seconds=time.perf_counter() - start)


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
        tokens: ``(B, n, d)`` final-normed output tokens ([CLS] and registers first, then the kept or merged patch
            tokens in original order); sizes: ``(B, n)`` patches each token stands for; n_prefix: [CLS] + registers.
        tokens_per_layer: input length of every block (asserted against the plan); kept_positions: ``(B, n)`` original
            index of each output token (its own position for a merged group's survivor); assignment: ``(B, N)`` output
            token each original patch ended in (-1 dropped).
        flops: estimated FLOPs per image (:func:`estimate_flops`); seconds: wall seconds per phase (prefix,
            score_reduce, suffix) for the whole batch; has_cls: whether token 0 is [CLS].
    """

    tokens: torch.Tensor
    sizes: torch.Tensor
    tokens_per_layer: list[int]
    kept_positions: torch.Tensor
    assignment: torch.Tensor
    flops: float
    seconds: dict[str, float] = field(default_factory=dict)
    n_prefix: int = 1
    has_cls: bool = True

    @property
    def cls(self) -> torch.Tensor | None:
        """``(B, d)`` final-normed [CLS] (None without [CLS])."""
        return self.tokens[:, 0] if self.has_cls else None

    @property
    def patches(self) -> torch.Tensor:
        """``(B, n - n_prefix, d)`` output patch tokens (kept or merged)."""
        return self.tokens[:, self.n_prefix:]

    @property
    def patch_sizes(self) -> torch.Tensor:
        return self.sizes[:, self.n_prefix:]

    @property
    def patch_mean(self) -> torch.Tensor:
        """``(B, d)`` size-weighted mean of the output patch tokens."""
        w = self.patch_sizes.to(self.tokens.dtype)
        return (self.patches * w[..., None]).sum(1) / w.sum(1, keepdim=True)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))


def expected_tokens_per_layer(depth: int, n_prefix: int, n_patches: int, stages: Sequence[Stage]) -> list[int]:
    """Input length of every block under a plan (what the pre-hooks must observe)."""
    counts, patches, by_layer = [], n_patches, {s.layer: s.keep for s in stages}
    for i in range(depth):
        counts.append(n_prefix + patches)
        if i + 1 in by_layer:
            patches = resolve_budget(by_layer[i + 1], patches)
    return counts


def _check_plan(parts: VitParts, prefix: VitPrefix, keep, stages) -> list[Stage]:
    plan = [Stage(prefix.layer, keep)] + [s if isinstance(s, Stage) else Stage(*s) for s in stages]
    for s in plan[1:]:
        check_layer(s.layer, parts.depth)
        check_keep(s.keep)
    if [s.layer for s in plan] != sorted({s.layer for s in plan}):
        raise ValueError(f"stage layers must increase strictly after the prefix layer {prefix.layer}, "
                         f"got {[s.layer for s in plan]}")
    return plan


@torch.inference_mode()
def reduce_and_finish(model: nn.Module, prefix: VitPrefix, scorer: Scorer | None, keep: float | int,
                      method: str = "drop", *, stages: Sequence[Stage | tuple[int, float]] = (),
                      proportional_attention: bool = True, contextual: float = CONTEXTUAL, seed: int = 0,
                      scores: torch.Tensor | None = None) -> VitResult:
    """Reduce the prefix's tokens to ``keep`` of its patches, run the remaining blocks, return output tokens and proof.

    Args:
        scorer: ranks tokens for ``"drop"`` and picks VisionZip's dominant tokens (ignored by ``"tome"``).
        keep: ratio in (0, 1] of the patches (or a patch count); [CLS] and registers are kept on top.
        method: ``"drop"``, ``"tome"`` or ``"visionzip"``.
        stages: later reductions ``(layer, keep)`` after ``prefix.layer``, ``keep`` relative to the patches left
            then; the scorer is applied to a view captured at that layer (its ``needs`` are captured there).
        proportional_attention: add ``log(size)`` to the keys' logits in later blocks (merging methods).
        contextual: VisionZip's share of the budget given to contextual (merged) tokens.
        seed: seeds the generator stochastic scorers read (use :func:`replicate_seed` for replicates and batches).
        scores: ``(B, K)`` precomputed scores of the prefix's tokens for the first stage (e.g. from the activation
            cache); the scorer is then used only for later stages.
    """
    parts = vit_parts(model)
    check_choice(method, METHODS, "method")
    check_keep(keep, prefix.n_patches)
    if not 0.0 <= contextual < 1.0:
        raise ValueError(f"contextual must lie in [0, 1), got {contextual}")
    if method != "tome" and scorer is None and scores is None:
        raise ValueError(f"method {method!r} needs a scorer (tome needs none)")
    plan = _check_plan(parts, prefix, keep, stages)
    meta = dict(n_prefix=prefix.n_prefix, has_cls=prefix.has_cls, grid=prefix.grid)
    generator = torch.Generator().manual_seed(seed)
    needs = scorer.needs if scorer is not None else frozenset()
    all_layers = "attention_layers" in needs
    probs_needed = all_layers or bool(needs & {"attention", "key_mass"})
    cls_row = reads_cls_row_only(scorer) and prefix.has_cls
    recorded = prefix.attention_layers[-1] if prefix.attention_layers else None
    if recorded is not None and recorded.shape[-2] < recorded.shape[-1] and probs_needed and not cls_row \
            and method != "tome" and scores is None:  # fmt: skip
        raise ValueError(f"this prefix recorded only the [CLS] row of block {prefix.layer}'s attention (it was built "
                         f"for scorers that read nothing else), and {scorer.name!r} reads more: build the prefix with "
                         "vit_prefix(..., needs=<this scorer, or every scorer that will use the prefix>)")
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
    with using_vit_attention(model):
        while True:
            if layer in stage_at:
                start = time.perf_counter()
                protected = positions < prefix.n_prefix
                budget = resolve_budget(stage_at[layer], int((~protected[0]).sum()))
                stage_scores = None
                if method != "tome":
                    stage_scores = scores if (scores is not None and layer == prefix.layer) else head_mean_scores(
                        scorer, hidden, positions, keys, values, attention_layers, generator=generator, **meta)
                dest, survivor = reduction_map(method, budget, protected, scores=stage_scores,
                                               metric=keys.mean(dim=1), sizes=sizes, contextual=contextual)
                n_out = int(survivor[0].sum())
                if merging:
                    hidden, sizes = merge_by_destination(hidden, sizes, dest, n_out)
                    attention_layers = []  # merged tokens have no attention rows of their own
                else:
                    hidden, sizes = hidden[survivor].view(b, n_out, -1), sizes[survivor].view(b, n_out)
                    idx = torch.nonzero(survivor)[:, 1].view(b, 1, n_out, 1)
                    attention_layers = [keep_tokens(a, idx) for a in attention_layers]
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
            record = later_stage and probs_needed and (all_layers or next_is_stage)
            state = AttentionState(log_sizes=size_bias, record_probs=record and not cls_row,
                                   record_cls_row=record and cls_row, record_kv=next_is_stage)
            with counting_tokens(parts.blocks[layer:layer + 1], counts):
                hidden = run_block(parts.blocks[layer], hidden, state)
            if state.probs is not None:
                attention_layers = (attention_layers if all_layers else []) + [state.probs]
            if next_is_stage:
                keys, values = state.keys, state.values
            seconds["suffix"] += time.perf_counter() - start
            layer += 1
        start = time.perf_counter()
        tokens = parts.normed(hidden)
        seconds["suffix"] += time.perf_counter() - start
    expected = expected_tokens_per_layer(parts.depth, prefix.n_prefix, n_patches, plan)
    if counts != expected:
        raise AssertionError(f"blocks saw {counts} tokens, the plan says {expected}")
    return VitResult(tokens=tokens, sizes=sizes, tokens_per_layer=counts, kept_positions=positions,
                     assignment=assignment, seconds=seconds, n_prefix=prefix.n_prefix, has_cls=prefix.has_cls,
                     flops=estimate_flops(parts.config, counts, n_patches=n_patches))


def keep_tokens(attention: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``attention (B, H, Q, K)`` restricted to the kept tokens ``idx (B, 1, n, 1)``: keys always, query rows when
    the matrix is square (a recorded [CLS] row, ``Q = 1``, stays: [CLS] is always kept)."""
    b, h, q, k = attention.shape
    if q == k:
        attention = attention.gather(2, idx.expand(-1, h, -1, k))
    return attention.gather(3, idx.transpose(2, 3).expand(-1, h, attention.shape[2], -1))


def vit_forward(model: nn.Module, pixel_values: torch.Tensor) -> VitResult:
    """The unreduced model through the same code path (keep = 1.0 after block 1): the reference output."""
    return reduce_and_finish(model, vit_prefix(model, pixel_values, 1), None, 1.0, "tome")


def prune_vit(model: nn.Module, pixel_values: torch.Tensor, scorer: Scorer | None, keep: float | int, layer: int,
              method: str = "drop", **kwargs) -> VitResult:
    """One call: validate everything first, then :func:`vit_prefix` + :func:`reduce_and_finish`."""
    check_choice(method, METHODS, "method")
    check_keep(keep)
    check_layer(layer, vit_parts(model).depth)
    return reduce_and_finish(model, vit_prefix(model, pixel_values, layer, needs=scorer), scorer, keep, method,
                             **kwargs)


__all__ = [
    "ATTENTION",
    "METHODS",
    "Stage",
    "VitParts",
    "VitPrefix",
    "VitResult",
    "block_flops",
    "build_view",
    "estimate_flops",
    "expected_tokens_per_layer",
    "head_mean_scores",
    "install",
    "mlp_macs_per_token",
    "needs_of",
    "keep_tokens",
    "prune_vit",
    "reads_cls_row_only",
    "reduce_and_finish",
    "replicate_seed",
    "vit_parts",
    "vit_forward",
    "vit_prefix",
]
