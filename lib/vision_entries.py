"""What the vision bench (:mod:`salience.vision_eval`) evaluates and caches: entries (one reduction under test each),
an encoded image set, and the code whose source keys the cached arrays.

**Cache keys.** Every cached array (:mod:`salience.activation_cache`) is keyed by the model, the image set and a code
hash. The encoder's arrays (output tokens, labels, block outputs, keys) and the reader weights hash
:data:`ENCODER_CODE`: the harness modules of the pass, the image loaders and their seeded subsets, and
:mod:`salience.vision_tasks` whole (pixels, normalisation, each data set's pixel range). A scorer's scores also hash
every module of :mod:`salience.scorers` (a scorer calls module-level helpers of its own module or a sibling's, e.g.
``divprune.pairwise_distance`` in DivPrune and ToDRE), the scorer's repr (its parameters) and, for a stochastic scorer,
the batch size its per-batch seeds follow.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from . import activation_cache as ac
from . import scorers, vision_tasks
from .data import images as image_data
from .data import loading as data_loading
from .harness import token_merging, vit_attention, vit_encoder, vit_model, vit_pruning, vit_views
from .harness.token_merging import METHODS
from .harness.vit_views import build_view
from .scorers.base import Scorer
from .validation import check_choice
from .vision_readers import KeptTokens

#: the modules whose source keys every cached array (a change to any of them invalidates them)
ENCODER_CODE = (vit_encoder, vit_attention, vit_model, vit_pruning, vit_views, token_merging, image_data, data_loading,
                vision_tasks)


# ------------------------------------------------------------------------------------------------------ entries
@dataclass(frozen=True)
class Entry:
    """One reduction under test: ``label`` names it in tables; ``method`` is drop / tome / visionzip; ``scorer``
    ranks (drop) or picks the dominant tokens (visionzip); ToMe needs none. ``stochastic`` entries (a scorer that
    draws, :attr:`Scorer.stochastic <salience.scorers.base.Scorer.stochastic>`) run once per replicate with their
    own seeds."""

    label: str
    method: str
    scorer: Scorer | None = None

    def __post_init__(self) -> None:
        check_choice(self.method, METHODS, "method")
        if self.method != "tome" and self.scorer is None:
            raise ValueError(f"entry {self.label!r}: method {self.method!r} needs a scorer")

    @property
    def stochastic(self) -> bool:
        return self.scorer is not None and bool(self.scorer.stochastic)

    @property
    def model_free(self) -> bool:
        """Scores read nothing from the model (random, spatial grid): computed directly, not cached."""
        return self.scorer is not None and not self.scorer.needs


def drop_entries(scorers_by_label: Mapping[str, Scorer]) -> list[Entry]:
    return [Entry(label, "drop", s) for label, s in scorers_by_label.items()]


# ------------------------------------------------------------------------------------------------- encoded sets
@dataclass
class EncodedSet:
    """One image set after the cached full pass: labels, output tokens ``(N, K, d)``, head-averaged keys and block
    outputs per layer, scores per ``(entry label, layer, replicate)``."""

    spec: ac.ImageSetSpec
    labels: np.ndarray
    tokens: torch.Tensor
    n_prefix: int
    grid: tuple[int, int]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def has_cls(self) -> bool:
        return self.n_prefix >= 1

    def unpruned(self) -> KeptTokens:
        patches = self.tokens[:, self.n_prefix:]
        return KeptTokens(patches, torch.ones(patches.shape[:2]), self.tokens[:, 0] if self.has_cls else None)


def model_free_scores(scorer: Scorer, n: int, k: int, n_prefix: int, grid, seed: int) -> torch.Tensor:
    """``(n, k)`` scores of a scorer that reads no model state (its view holds only positions and roles), drawn for
    the whole set at once (so they do not depend on any batch size)."""
    view = build_view(torch.empty(n, k, 0), torch.arange(k), None, None, [], n_prefix=n_prefix,
                      has_cls=n_prefix >= 1, grid=grid, generator=torch.Generator().manual_seed(seed))
    return scorer(view).float().mean(dim=1)


# --------------------------------------------------------------------------------------------------- cache keys
def scorer_modules() -> tuple:
    """Every module of :mod:`salience.scorers` (sorted by name): the scorers, their helpers and the contract."""
    names = sorted(m.name for m in pkgutil.iter_modules(scorers.__path__))
    return (scorers, *(importlib.import_module(f"{scorers.__name__}.{name}") for name in names))


def encoder_code(*more, extra: str = "") -> str:
    """Code hash of the encoder's arrays (and of ``more``, e.g. the readers' module)."""
    return ac.code_hash(*ENCODER_CODE, *more, extra=extra)


def scores_code(scorer: Scorer, batch_size: int) -> str:
    """Code hash of a scorer's cached scores: the encoder's code, every scorer module, the scorer's parameters and,
    when it draws, the batch size (each batch of images draws with its own seed)."""
    extra = repr(scorer) + (f"; per-batch seeds, batch_size={batch_size}" if scorer.stochastic else "")
    return encoder_code(*scorer_modules(), extra=extra)


def scores_name(scorer: Scorer, layer: int, replicate: int | None = None) -> str:
    """Array name of a scorer's scores at ``layer`` (one per replicate for a stochastic scorer)."""
    name = f"scores@{layer}-{ac.short_hash(repr(scorer))}"
    return name if replicate is None else f"{name}-r{replicate}"


__all__ = ["ENCODER_CODE", "EncodedSet", "Entry", "drop_entries", "encoder_code", "model_free_scores",
           "scorer_modules", "scores_code", "scores_name"]
