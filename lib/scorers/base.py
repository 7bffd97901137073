"""The scorer contract shared by every family (KV cache, vision tokens, explanation).

A scorer is a small dataclass holding one rule. It reads an :class:`AttentionView` of one forward pass (or of a stream
of passes, summarised) and returns importances, **higher means keep**, shaped ``(batch, heads, keys)``. Scorers declare
what they read (``needs``) so a harness captures only that, and whether they are attention-free.

Shapes used throughout:
    B batch, H query heads, Q queries in the view, K keys in the view, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..validation import check_choice

if TYPE_CHECKING:
    from .attribution_target import AttributionTarget

#: Every capture a scorer may ask for. ``model``: the view carries an :class:`AttributionTarget` (the model, its inputs
#: and a scalar readout) that the scorer runs again (occlusion, norm-based decompositions); ``gradients``: that readout
#: must also be differentiable with respect to the input embeddings (gradient × input, integrated gradients).
CAPTURES = frozenset({"attention", "attention_layers", "key_mass", "keys", "values", "hidden", "gradients", "model"})
#: The captures that read attention (a matrix or its key mass): a scorer needing any of them is attention-based
#: (:attr:`Scorer.attention_free` is False). The one place this rule lives.
ATTENTION_NEEDS = frozenset({"attention", "attention_layers", "key_mass"})


@dataclass
class AttentionView:
    """What a scorer may read about one forward pass over ``K`` keys.

    Attributes:
        key_positions: ``(K,)`` original token positions of the keys (after eviction they are not ``arange(K)``).
        query_positions: ``(Q,)`` original positions of the queries whose attention the view holds.
        attention: ``(B, H, Q, K)`` softmax probabilities, rows are queries; ``None`` when only a summary exists.
        attention_layers: the ``(B, H, Q, K)`` attention of every layer up to and including the scoring one, oldest
            first, over the same keys (multi-layer scorers: rollout, VTC-CLS, FlowCut); ``attention`` is the last.
        key_mass: ``(B, H, K)`` attention received by each key, summed over the queries the view stands for.
            Harnesses that stream (or fused kernels) fill this instead of ``attention``.
        visible_queries: ``(K,)`` number of queries that could see each key (the causal mask's column count).
        keys, values: ``(B, H_kv, K, D)``; hidden: ``(B, K, d_model)``.
        roles: optional named boolean masks over keys, e.g. ``{"sink": ..., "separator": ..., "cls": ...}``.
            Vision harnesses set ``"cls"`` (the class token) and ``"patch"`` (image patches).
        patch_coords: ``(K, 2)`` int64 (row, column) of each key on the patch grid, ``-1`` for non-patch tokens
            ([CLS], registers, text); vision harnesses fill it, spatial scorers read it.
        generator: seeded generator for stochastic scorers, so runs are reproducible.
        attribution_target: the model, its ``(B, K)`` inputs and a scalar readout per example, for the explanation
            scorers that run the model themselves (``needs`` ``model`` / ``gradients``); see
            :mod:`salience.scorers.attribution_target`. ``None`` in views built from captures alone.
    """

    key_positions: torch.Tensor
    query_positions: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    key_mass: torch.Tensor | None = None
    visible_queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    attention_layers: list[torch.Tensor] | None = None
    patch_coords: torch.Tensor | None = None
    roles: dict[str, torch.Tensor] = field(default_factory=dict)
    generator: torch.Generator | None = None
    attribution_target: AttributionTarget | None = None

    @property
    def num_keys(self) -> int:
        return int(self.key_positions.shape[-1])

    def batch_heads(self) -> tuple[int, int]:
        """``(B, H)`` from whichever capture is present."""
        for t in (self.attention, self.key_mass):
            if t is not None:
                return int(t.shape[0]), int(t.shape[1])
        for t in (self.keys, self.values):
            if t is not None:
                return int(t.shape[0]), int(t.shape[1])
        if self.hidden is not None:
            return int(self.hidden.shape[0]), 1
        if self.attribution_target is not None:
            return int(self.attribution_target.embeddings.shape[0]), 1
        raise ValueError("the view holds neither attention, key mass, keys, values, hidden states nor an attribution "
                         "target")

    def mass(self) -> torch.Tensor:
        """``(B, H, K)`` attention received by each key, summed over queries."""
        if self.key_mass is not None:
            return self.key_mass
        if self.attention is None:
            raise ValueError("this scorer needs attention or key_mass, and the view has neither")
        return self.attention.float().sum(dim=-2)

    def visible(self) -> torch.Tensor:
        """``(K,)`` number of queries that could attend to each key (≥ 1 for every key that was seen)."""
        if self.visible_queries is not None:
            return self.visible_queries
        if self.query_positions is None:
            raise ValueError("visible-query counts need query_positions or visible_queries in the view")
        seen = self.query_positions[:, None] >= self.key_positions[None, :]
        return seen.sum(dim=0)


HEAD_LAYOUTS = ("query", "kv", "shared", "view")
ATTENTION_ROWS = ("all", "cls")


def resolved_head_layout(layout: str, view: AttentionView) -> str:
    """``layout`` made concrete for ``view``: ``"view"`` becomes ``"query"`` when the view carries attention or key
    mass (its rows follow their heads), ``"kv"`` when it carries keys or values, ``"shared"`` otherwise (hidden states,
    an attribution target: one row); the other layouts stay as they are."""
    check_choice(layout, HEAD_LAYOUTS, "head_layout")
    if layout != "view":
        return layout
    if view.attention is not None or view.key_mass is not None:
        return "query"
    if view.keys is not None or view.values is not None:
        return "kv"
    return "shared"


def expected_heads(layout: str, view: AttentionView) -> int | None:
    """How many head rows a scorer of ``layout`` returns for ``view``; None when the view does not tell (a query-head
    rule on a view without attention or key mass, a KV-head rule without keys or values)."""
    layout = resolved_head_layout(layout, view)
    if layout == "shared":
        return 1
    if layout == "query":
        layers = view.attention_layers[-1] if view.attention_layers else None
        source = next((t for t in (view.attention, view.key_mass, layers) if t is not None), None)
    else:
        source = view.keys if view.keys is not None else view.values
    return None if source is None else int(source.shape[1])


_REGISTRY: dict[str, type["Scorer"]] = {}


@dataclass
class Scorer:
    """Base class: subclass, set ``name``/``needs``, implement :meth:`score`, decorate with :func:`register`."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Streaming harnesses keep ``key_mass`` as a running sum; a scorer may ask for it decayed per query step.
    mass_decay: ClassVar[float] = 1.0
    #: Roles (keys of ``AttentionView.roles``) the rule cannot work without, e.g. ``{"cls"}`` for [CLS] attention.
    requires_roles: ClassVar[frozenset[str]] = frozenset()
    #: The rule draws from ``AttentionView.generator`` (random scores, random pivots): harnesses give each replicate
    #: (and each batch) its own seed and repeat the entry over replicates.
    stochastic: ClassVar[bool] = False
    #: What the head axis of the returned scores stands for, checked by :meth:`__call__` against the view:
    #: ``"query"``: one row per query head (the attention's or key mass's head count; attention rules);
    #: ``"kv"``: one per KV head (the keys' or values' head count); ``"shared"``: one row for all heads (H = 1);
    #: ``"view"``: as many rows as :meth:`AttentionView.batch_heads` finds (rules that read no head-specific
    #: capture: positions, roles, random draws). :meth:`head_layout_for` makes ``"view"`` concrete for a view, and a
    #: consumer reduces the rows to one per KV head with :func:`salience.selection.to_kv_heads` (by the layout, never
    #: by the count) or to one ranking with a mean over the head axis.
    head_layout: ClassVar[str] = "query"
    #: Which query rows of ``attention`` the rule reads: ``"all"``, or ``"cls"`` (the [CLS] row only). A harness may
    #: then hand it ``attention`` of shape ``(B, H, 1, K)`` with ``query_positions`` naming that row, computed by the
    #: fused scored-attention kernel instead of the full matrix (the ViT pruning harness does).
    attention_rows: ClassVar[str] = "all"

    def head_layout_for(self, view: AttentionView) -> str:
        """The concrete layout (``"query"``, ``"kv"`` or ``"shared"``) of this scorer's rows for ``view``: what a
        consumer hands :func:`salience.selection.to_kv_heads` to get one row per KV head."""
        return resolved_head_layout(self.head_layout, view)

    @property
    def attention_free(self) -> bool:
        return not (self.needs & ATTENTION_NEEDS)

    def score(self, view: AttentionView) -> torch.Tensor:  # pragma: no cover - abstract
        """Return ``(B, H, K)`` importances for the keys in ``view``; higher means keep."""
        raise NotImplementedError

    def __call__(self, view: AttentionView) -> torch.Tensor:
        # a role is present when the harness set it, even all-False (a text span without separators); a model
        # without [CLS] gets no "cls" entry at all
        missing = sorted(r for r in self.requires_roles if r not in view.roles)
        if missing:
            hint = " (the model has no [CLS] token; use a scorer without [CLS])" if "cls" in missing else ""
            raise ValueError(f"scorer {self.name!r} needs token role(s) {missing}, which this view lacks{hint}; "
                             f"roles present: {sorted(view.roles) or 'none'}")
        scores = self.score(view)
        if scores.dim() != 3 or scores.shape[-1] != view.num_keys:
            raise RuntimeError(
                f"scorer {self.name!r} returned shape {tuple(scores.shape)}; the contract is (B, H, {view.num_keys})"
            )
        heads = expected_heads(self.head_layout, view)
        if heads is not None and scores.shape[1] != heads:
            raise RuntimeError(f"scorer {self.name!r} declares head_layout {self.head_layout!r}, which means {heads} "
                               f"row(s) for this view, and returned {scores.shape[1]}")
        return scores


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    if cls.head_layout not in HEAD_LAYOUTS:
        raise TypeError(f"{cls.__name__}.head_layout must be one of {HEAD_LAYOUTS}, got {cls.head_layout!r}")
    if cls.attention_rows not in ATTENTION_ROWS:
        raise TypeError(f"{cls.__name__}.attention_rows must be one of {ATTENTION_ROWS}, got {cls.attention_rows!r}")
    unknown = cls.needs - CAPTURES
    if unknown:
        raise TypeError(f"{cls.__name__}.needs has unknown captures {sorted(unknown)}; known: {sorted(CAPTURES)}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"scorer name {cls.name!r} is taken by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_scorers() -> list[str]:
    return sorted(_REGISTRY)


def scorer_class(name: str) -> type[Scorer]:
    """The registered class of ``name``; unknown names list the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(available_scorers())}") from None


def get_scorer(name: str, **params) -> Scorer:
    """Instantiate a registered scorer by name; unknown names list the valid ones."""
    return scorer_class(name)(**params)
