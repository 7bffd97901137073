"""Parameters the vision notebooks share: the digits, the encoder, the readers, and checks on kept shares, layers,
photos and the scorer labels a notebook names in a role (a baseline, a control).

:class:`VisionParams` holds what every vit-* notebook has; a notebook's ``Params`` adds its own fields. As everywhere,
no field has a default value here: the defaults live in ``params/<notebook>.yaml``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .. import evidence
from ..data import PHOTO_NAMES
from ..params import ModelName, NotebookParams
from ..scorers.spec import ScorerList
from ..vision_readers import READERS
from .param_checks import check_labels

#: patch size of the embedded DINOv2-S; other models are checked by the harness against their own patch size
PATCH = 14


def _patch_multiple(size: int) -> int:
    if size % PATCH:
        raise ValueError(f"must be a multiple of the patch size {PATCH} (112 px = 8x8 patches, 224 = 16x16), "
                         f"got {size}")
    return size


def _keep_ratios(keeps: list[float]) -> list[float]:
    bad = [k for k in keeps if not 0.0 < k <= 1.0]
    if bad:
        raise ValueError(f"every kept share must be a ratio in (0, 1], got {bad}")
    return sorted(set(keeps), reverse=True)


def _known_photos(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in PHOTO_NAMES]
    if unknown:
        raise ValueError(f"unknown photo(s) {unknown}; choices: {', '.join(PHOTO_NAMES)}")
    return names


ImageSize = Annotated[int, Field(ge=PATCH, le=1036), AfterValidator(_patch_multiple)]
KeepRatios = Annotated[list[float], Field(min_length=1), AfterValidator(_keep_ratios)]
PhotoNames = Annotated[list[str], Field(min_length=1), AfterValidator(_known_photos)]
PhotoName = Annotated[str, AfterValidator(lambda name: _known_photos([name])[0])]
ReaderName = Literal[READERS]


class ReaderParams(BaseModel):
    """Training settings of the readers (:mod:`salience.vision_readers`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    heads: int = Field(ge=1, le=64, description="learned queries of the attention-pooling reader")
    key_dim: int = Field(ge=1, le=4096, description="key projection size of the attention-pooling reader")
    epochs: int = Field(ge=1, le=1000, description="Adam epochs over the unpruned train tokens (fixed, seeded)")
    lr: float = Field(gt=0, le=1, description="Adam learning rate")
    weight_decay: float = Field(ge=0, le=1, description="Adam weight decay")
    batch_size: int = Field(ge=1, le=100_000, description="images per Adam step")
    probe_c: float = Field(gt=0, le=1e6, description="inverse L2 strength of the logistic-regression probes")


class VisionParams(NotebookParams):
    """What every vit-* notebook has: the encoder, the digits, the readers and the random replicates."""

    model: ModelName = Field(description="embedded ViT name, local folder or Hugging Face id")
    dataset: Literal["mnist", "digits"] = Field(description="MNIST (28x28; 4000 train / 1000 test) or sklearn digits "
                                                            "(8x8; 1437 / 360)")
    image_size: ImageSize = Field(description="input side in pixels, a multiple of the patch size 14")
    n_train: int = Field(ge=50, le=4000, description="train images of the readers (unpruned for the attention "
                                                      "reader and the [CLS] probe, reduced for the retrained probe)")
    n_test: int = Field(ge=20, le=1000, description="test images: the units every claim part is paired over")
    batch_size: int = Field(ge=1, le=4096, description="images per forward pass")
    reader: ReaderParams = Field(description="training settings of the readers")
    decide_reader: ReaderName = Field(description="the reader whose per-image true-class probability decides the "
                                                  "claim parts (all three are reported)")
    scorers: ScorerList = Field(min_length=1, description="the compared scorers, one YAML line each "
                                                          "({name: ..., label: ..., <scorer fields>})")
    random_replicates: int = Field(ge=1, le=20, description="seeds of every random entry (averaged per image)")
    keeps: KeepRatios = Field(description="kept shares of the patches, in (0, 1] (after the encoder)")
    parts: dict[str, evidence.PartRule] = Field(description="direction and smallest effect δ of each judged part")


def check_keep_in(keep: float, keeps: Iterable[float], what: str) -> None:
    if not any(abs(keep - k) < 1e-12 for k in keeps):
        raise ValueError(f"{what} {keep} must be one of the kept shares {list(keeps)}")


__all__ = ["PATCH", "ImageSize", "KeepRatios", "PhotoName", "PhotoNames", "ReaderName", "ReaderParams",
           "VisionParams", "check_keep_in", "check_labels"]
