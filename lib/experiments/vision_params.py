"""Parameter types the vision notebooks share: an input size on the patch grid, kept shares, pruning layers.

Each is an annotated type, so a notebook's ``Params`` declares ``image_size: ImageSize = Field(112, ...)`` and gets the
check and its one-line error; notebook-specific limits (e.g. layers ≥ 2 for a penultimate-layer scorer) stay there.
The model's depth is checked again once the model is loaded (``check_layer`` in the harness).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

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


def _block_layers(layers: list[int]) -> list[int]:
    bad = [layer for layer in layers if layer < 1]
    if bad:
        raise ValueError(f"every pruning layer must be >= 1 (reduce after that block, below the model's depth), "
                         f"got {bad}")
    return sorted(set(layers))


ImageSize = Annotated[int, Field(ge=PATCH, le=1036), AfterValidator(_patch_multiple)]
KeepRatios = Annotated[list[float], Field(min_length=1), AfterValidator(_keep_ratios)]
PruneLayers = Annotated[list[int], Field(min_length=1), AfterValidator(_block_layers)]


def _known_photos(names: list[str]) -> list[str]:
    from ..data import PHOTO_NAMES

    unknown = [n for n in names if n not in PHOTO_NAMES]
    if unknown:
        raise ValueError(f"unknown photo(s) {unknown}; choices: {', '.join(PHOTO_NAMES)}")
    return names


PhotoNames = Annotated[list[str], Field(min_length=1), AfterValidator(_known_photos)]
