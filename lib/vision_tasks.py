"""Vision tasks for the token-reduction notebooks: digits as ViT inputs, frozen features, a linear probe, accuracy vs
kept ratio, [CLS] cosine, latency, and overlays of kept / merged tokens on photos.

Protocol (issue 5): a logistic-regression probe is trained once on **unpruned** train features
(``concat([CLS], mean of patches)``, DINOv2's linear-eval recipe); pruned test features go through the same probe.
Reductions run through :mod:`salience.harness.vit_pruning`, prefix once per (batch, layer), suffix per configuration.

>>> train_x, train_y = digit_pixels("mnist", "train", n=400)
>>> table = accuracy_vs_keep(model, (train_x, train_y), digit_pixels("mnist", "test", n=200),
...                          {"random": get_scorer("random")}, keeps=[0.25, 0.1], layers=[3, 6])
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # text bars: stored notebooks stay readable without widgets

from .harness.vit_pruning import (
    METHODS,
    check_keep,
    check_layer,
    check_method,
    reduce_and_finish,
    vit_forward,
    vit_parts,
    vit_prefix,
)
from .models.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from .scorers.base import Scorer

DATASETS = ("mnist", "digits")
#: Largest pixel value of each data set's uint8 images (sklearn's digits are counts 0..16).
_MAX_VALUE = {"mnist": 255.0, "digits": 16.0}


# ------------------------------------------------------------------------------------------------------ images
def load_image(path_or_array) -> np.ndarray:
    """A photo as uint8 ``(H, W, 3)`` RGB, from a file path or an array.

    Arrays may be ``(H, W)`` gray, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA, uint8 or float in [0, 1]. Anything that
    cannot be read raises ValueError naming the path (or the array's shape/dtype) and the reason.
    """
    if isinstance(path_or_array, (str, Path)):
        from PIL import Image, UnidentifiedImageError

        path = Path(path_or_array)
        if not path.exists():
            raise ValueError(f"cannot read image {str(path)!r}: no such file")
        if path.is_dir():
            raise ValueError(f"cannot read image {str(path)!r}: it is a directory")
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {str(path)!r}: not a readable image file ({err})") from None
    array = np.asarray(path_or_array)
    if array.dtype.kind not in "uif" or array.size == 0:
        raise ValueError(f"cannot read image array of dtype {array.dtype} and shape {array.shape}: expected a "
                         "non-empty uint8 or float array")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"cannot read image array of shape {array.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("cannot read float image array: values must be finite and lie in [0, 1]")
        array = np.round(array * 255)
    elif array.min() < 0 or array.max() > 255:
        raise ValueError(f"cannot read integer image array: values must lie in [0, 255], got "
                         f"[{array.min()}, {array.max()}]")
    return np.ascontiguousarray(array.astype(np.uint8))


def check_size(size: int, patch_size: int = 14) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < patch_size or size % patch_size:
        raise ValueError(f"image size must be a positive multiple of the patch size {patch_size} (e.g. 112 = 8x8 "
                         f"patches, 224 = 16x16), got {size!r}")


def to_pixels(images: np.ndarray, size: int = 112, *, max_value: float = 255.0, mean=IMAGENET_MEAN,
              std=IMAGENET_STD, patch_size: int = 14) -> torch.Tensor:
    """Gray ``(N, h, w)`` or RGB ``(N, h, w, 3)`` images → normalised ``(N, 3, size, size)`` float32 pixels.

    Resized bilinearly (with antialiasing when shrinking), scaled by ``max_value`` to [0, 1], gray repeated to 3
    channels, then ``(x - mean) / std`` with the model's normalisation.
    """
    check_size(size, patch_size)
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / float(max_value)
    if x.dim() == 3:
        x = x[:, None].expand(-1, 3, -1, -1)
    elif x.dim() == 4 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (N, h, w) gray or (N, h, w, 3) RGB, got shape {tuple(x.shape)}")
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return ((x.clamp(0, 1) - m) / s).contiguous()


def digit_pixels(dataset: str = "mnist", split: str = "train", n: int | None = None, size: int = 112, seed: int = 0,
                 *, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[torch.Tensor, np.ndarray]:
    """MNIST (28x28) or sklearn digits (8x8) as model inputs: ``(pixels (N, 3, size, size), labels (N,))``."""
    from .data import mnist_digits, sklearn_digits

    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    check_size(size)
    loader = mnist_digits if dataset == "mnist" else sklearn_digits
    images, labels = loader(n=n, seed=seed, split=split)
    return to_pixels(images, size, max_value=_MAX_VALUE[dataset], mean=mean, std=std), labels


def photo_pixels(image, size: int = 224, *, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """One photo (path or array, see :func:`load_image`) → ``(1, 3, size, size)``, resized without cropping."""
    return to_pixels(load_image(image)[None], size, mean=mean, std=std)


# --------------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class Reduction:
    """One reduction to apply after the prefix: ``scorer`` (None for ToMe), ``keep``, ``method``, extra options."""

    scorer: Scorer | None
    keep: float | int
    method: str = "drop"
    options: Mapping = field(default_factory=dict)


@dataclass
class FeatureSet:
    """Features of a whole image set under one reduction.

    Attributes:
        features: ``(N, F)`` probe features; cls: ``(N, d)`` final [CLS] (None without [CLS]);
        tokens_per_layer: block input lengths (the same for every image); flops: estimated FLOPs per image;
        seconds: wall seconds of the whole set (a shared prefix is counted in every configuration it served);
        n_prefix: [CLS] + register tokens.
    """

    features: np.ndarray
    cls: np.ndarray | None
    tokens_per_layer: list[int]
    flops: float
    seconds: float
    n_prefix: int = 1

    @property
    def kept_patches(self) -> int:
        """Patch tokens entering the last block."""
        return self.tokens_per_layer[-1] - self.n_prefix


def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _collect(parts: list) -> FeatureSet:
    feats = np.concatenate([p.features.float().numpy() for p in parts])
    cls = None if parts[0].cls is None else np.concatenate([p.cls.float().numpy() for p in parts])
    return FeatureSet(feats, cls, parts[0].tokens_per_layer, parts[0].flops,
                      float(sum(p.total_seconds for p in parts)), parts[0].n_prefix)


def _to_cpu(res):
    res.cls = None if res.cls is None else res.cls.cpu()
    res.patch_mean = res.patch_mean.cpu()
    return res


def unpruned_features(model, pixels: torch.Tensor, *, batch_size: int = 64,
                      desc: str | None = "features") -> FeatureSet:
    """Features of the unreduced model (same code path as the reduced ones)."""
    device = next(model.parameters()).device
    batches = tqdm(_batches(len(pixels), batch_size), desc=desc, disable=desc is None)
    return _collect([_to_cpu(vit_forward(model, pixels[s].to(device))) for s in batches])


def reduced_features(model, pixels: torch.Tensor, layer: int, reductions: Mapping[str, Reduction], *,
                     batch_size: int = 64, seed: int = 0, desc: str | None = None) -> dict[str, FeatureSet]:
    """Features under every reduction after block ``layer``; the prefix runs once per batch for all of them.

    Every reduction is validated before any block runs. Stochastic scorers are seeded with ``seed + batch index``.
    """
    check_layer(layer, vit_parts(model).depth)
    for name, r in reductions.items():
        check_method(r.method)
        check_keep(r.keep)
        if r.method != "tome" and r.scorer is None:
            raise ValueError(f"reduction {name!r}: method {r.method!r} needs a scorer")
    device = next(model.parameters()).device
    scorers = [r.scorer for r in reductions.values() if r.scorer is not None]
    out: dict[str, list] = {name: [] for name in reductions}
    for i, s in enumerate(tqdm(_batches(len(pixels), batch_size), desc=desc, disable=desc is None)):
        prefix = vit_prefix(model, pixels[s].to(device), layer, needs=scorers)
        for name, r in reductions.items():
            res = reduce_and_finish(model, prefix, r.scorer, r.keep, r.method, seed=seed + i, **dict(r.options))
            out[name].append(_to_cpu(res))
    return {name: _collect(parts) for name, parts in out.items()}


# ------------------------------------------------------------------------------------------------------- probe
def train_probe(features: np.ndarray, labels: np.ndarray, *, seed: int = 0, C: float = 1.0, max_iter: int = 2000):
    """Standardise + multinomial logistic regression (seeded), fitted on unpruned train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)).fit(
        features, labels)


def cls_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two ``(N, d)`` arrays (e.g. pruned vs unpruned [CLS])."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    num = (a * b).sum(axis=1)
    return num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def accuracy_vs_keep(model, train: tuple[torch.Tensor, np.ndarray], test: tuple[torch.Tensor, np.ndarray],
                     scorers: Mapping[str, Scorer | None], keeps: Sequence[float], layers: Sequence[int], *,
                     methods: Sequence[str] = ("drop",), batch_size: int = 64, seed: int = 0, probe_C: float = 1.0,
                     options: Mapping[str, Mapping] | None = None) -> tuple[pd.DataFrame, object]:
    """Probe accuracy and [CLS] cosine of reduced test features, per layer × scorer × method × keep.

    The probe is trained once on unpruned train features. ``scorers`` maps a label to a scorer (None only for
    ``"tome"``, which needs none; a ToMe entry ignores its scorer). ``options`` maps a method to extra keyword
    arguments of :func:`reduce_and_finish` (e.g. ``{"visionzip": {"contextual": 0.2}}``).

    Returns ``(table, probe)``; table columns: layer, scorer, method, keep, kept_patches, accuracy, accuracy_se
    (binomial standard error, sqrt(p(1-p)/n)), accuracy_cls (a second probe trained on unpruned [CLS] alone, which
    does not see the shift of the patch mean; NaN without [CLS]), cls_cosine (mean over test images), flops (per
    image), flops_ratio (vs unpruned), seconds (whole test set: prefix + reduction + suffix; a shared prefix is
    counted in every row), n_test.
    The first row is the unpruned reference (layer 0, scorer "unpruned", method "none", keep 1).
    """
    for k in keeps:
        check_keep(float(k))
    for m in methods:
        check_method(m)
    depth = vit_parts(model).depth
    for layer in layers:
        check_layer(layer, depth)
    for name, s in scorers.items():
        if s is None and any(m != "tome" for m in methods):
            raise ValueError(f"scorer {name!r} is None: only method 'tome' runs without a scorer")
    train_x, train_y = train
    test_x, test_y = test
    ref_train = unpruned_features(model, train_x, batch_size=batch_size, desc="unpruned train features")
    probe = train_probe(ref_train.features, train_y, seed=seed, C=probe_C)
    # a second probe on [CLS] alone: the patch mean shifts when patches go, [CLS] is what the model itself pools
    cls_probe = None if ref_train.cls is None else train_probe(ref_train.cls, train_y, seed=seed, C=probe_C)
    ref = unpruned_features(model, test_x, batch_size=batch_size, desc="unpruned test features")

    def row(fs: FeatureSet, **keys) -> dict:
        return dict(keys, kept_patches=fs.kept_patches, accuracy=float(probe.score(fs.features, test_y)),
                    accuracy_cls=float(cls_probe.score(fs.cls, test_y)) if cls_probe is not None else np.nan,
                    cls_cosine=float(cls_cosine(fs.cls, ref.cls).mean()) if fs.cls is not None else np.nan,
                    flops=fs.flops, flops_ratio=fs.flops / ref.flops, seconds=fs.seconds)

    rows = [row(ref, layer=0, scorer="unpruned", method="none", keep=1.0)]
    options = options or {}
    for layer in layers:
        reductions = {}
        for m in methods:
            names = ["tome"] if m == "tome" else list(scorers)
            for name in names:
                for k in keeps:
                    reductions[(layer, name, m, float(k))] = Reduction(None if m == "tome" else scorers[name],
                                                                       float(k), m, options.get(m, {}))
        feats = reduced_features(model, test_x, layer, reductions, batch_size=batch_size, seed=seed,
                                 desc=f"layer {layer}: {len(reductions)} reductions")
        for (lay, name, m, k), fs in feats.items():
            rows.append(row(fs, layer=lay, scorer=name, method=m, keep=k))
    table = pd.DataFrame(rows)
    table["n_test"] = len(test_y)
    table.insert(6, "accuracy_se", np.sqrt(table.accuracy * (1 - table.accuracy) / len(test_y)))
    return table, probe


def plot_accuracy_vs_keep(table: pd.DataFrame, hue: str = "scorer", title: str | None = None):
    """Probe accuracy (top) and [CLS] cosine to the unpruned model (bottom) vs kept share, one column per layer.

    ``table`` as returned by :func:`accuracy_vs_keep`; the unpruned accuracy is the dashed line.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    ref = table[table.scorer == "unpruned"]
    data = table[table.scorer != "unpruned"].copy()
    data["label"] = data[hue] if hue != "scorer+method" else data.scorer + " / " + data.method
    layers = sorted(data.layer.unique())
    fig, axes = plt.subplots(2, len(layers), figsize=(3.4 * len(layers), 5.6), squeeze=False, sharex=True)
    for j, layer in enumerate(layers):
        d = data[data.layer == layer]
        for i, (metric, label) in enumerate((("accuracy", "probe accuracy"), ("cls_cosine", "[CLS] cosine"))):
            ax = axes[i, j]
            sns.lineplot(d, x="keep", y=metric, hue="label", marker="o", ax=ax,
                         legend=(i == 0 and j == len(layers) - 1))
            if metric == "accuracy" and len(ref):
                ax.axhline(float(ref.accuracy.iloc[0]), color="grey", ls="--", lw=1)
            ax.set_xscale("log")
            ax.set(xlabel="kept share of patches", ylabel=label if j == 0 else "",
                   title=f"reduce after layer {layer}" if i == 0 else "")
    if axes[0, -1].get_legend() is not None:
        sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1, 1), frameon=False, title=None)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------------ latency
@torch.inference_mode()
def measure_latency(model, pixels: torch.Tensor, reduction: Reduction | None, layer: int = 1, *, repeats: int = 5,
                    warmup: int = 1) -> dict[str, float]:
    """Median wall seconds of the whole forward pass (prefix + scoring + reduction + suffix) over ``repeats`` runs.

    ``reduction`` None times the unreduced model through the same code path. Returns ``{"seconds", "min_seconds",
    "flops", "tokens_last_layer"}``. Timings on a shared CPU are noisy: compare medians of the same session.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    times, res = [], None
    for i in range(warmup + repeats):
        start = time.perf_counter()
        if reduction is None:
            res = vit_forward(model, pixels)
        else:
            prefix = vit_prefix(model, pixels, layer, needs=[reduction.scorer] if reduction.scorer else None)
            res = reduce_and_finish(model, prefix, reduction.scorer, reduction.keep, reduction.method,
                                    **dict(reduction.options))
        if pixels.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return dict(seconds=float(np.median(times)), min_seconds=float(np.min(times)), flops=res.flops,
                tokens_last_layer=res.tokens_per_layer[-1])


# ----------------------------------------------------------------------------------------------------- overlays
def overlay_tokens(ax, image: np.ndarray, assignment: np.ndarray, grid: tuple[int, int], *, merged: bool = False,
                   title: str | None = None, dim: float = 0.25) -> None:
    """Draw ``image`` (uint8 HxWx3, resized to the grid) with dropped patches dimmed; merged groups get one colour
    each (patches kept alone are shown unchanged).

    ``assignment`` is one image's ``(N,)`` output token per patch (-1 dropped), as in :class:`VitResult`.
    """
    import matplotlib.pyplot as plt
    from PIL import Image

    rows, cols = grid
    a = np.asarray(assignment).reshape(rows, cols)
    size = (cols * 16, rows * 16)
    img = np.asarray(Image.fromarray(load_image(image)).resize(size, Image.BILINEAR), dtype=np.float32) / 255
    cell = np.kron(a, np.ones((16, 16), dtype=np.int64))
    shown = np.where((cell >= 0)[..., None], img, img * dim)
    if merged:  # patches merged with others share a colour; patches kept alone stay as they are
        groups, counts = np.unique(a[a >= 0], return_counts=True)
        shared = np.isin(cell, groups[counts > 1])
        palette = plt.get_cmap("tab20")(np.arange(20))[:, :3]
        tinted = 0.5 * img + 0.5 * palette[np.searchsorted(groups, np.maximum(cell, groups[0])) % 20]
        shown = np.where(shared[..., None], tinted, shown)
    ax.imshow(shown)
    for r in range(rows + 1):
        ax.axhline(r * 16 - 0.5, color="white", lw=0.3, alpha=0.5)
    for c in range(cols + 1):
        ax.axvline(c * 16 - 0.5, color="white", lw=0.3, alpha=0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def kept_token_figure(model, images: Mapping[str, np.ndarray], reductions: Mapping[str, Reduction], layer: int, *,
                      size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0):
    """Rows: photos; columns: reductions. Dropped patches dimmed (drop) or groups coloured (merge methods).

    Returns ``(figure, table)``; the table lists per photo and reduction the kept original patch indices (drop) or
    the number of groups (merge), so the figure's content can be checked as numbers.
    """
    import matplotlib.pyplot as plt

    if not images or not reductions:
        raise ValueError("need at least one image and one reduction")
    pixels = torch.cat([photo_pixels(img, size, mean=mean, std=std) for img in images.values()])
    device = next(model.parameters()).device
    feats = {}
    prefix = vit_prefix(model, pixels.to(device), layer, needs=[r.scorer for r in reductions.values() if r.scorer])
    for name, r in reductions.items():
        feats[name] = reduce_and_finish(model, prefix, r.scorer, r.keep, r.method, seed=seed, **dict(r.options))
    fig, axes = plt.subplots(len(images), len(reductions), figsize=(2.1 * len(reductions), 2.2 * len(images)),
                             squeeze=False)
    rows = []
    for i, (photo, img) in enumerate(images.items()):
        for j, (name, r) in enumerate(reductions.items()):
            res = feats[name]
            overlay_tokens(axes[i, j], img, res.assignment[i].cpu().numpy(), prefix.grid, merged=r.method != "drop",
                           title=name if i == 0 else None)
            if j == 0:
                axes[i, j].set_ylabel(photo, fontsize=9)
            kept = (res.kept_positions[i] - prefix.n_prefix).cpu().numpy()
            groups = np.unique(res.assignment[i].cpu().numpy(), return_counts=True)[1]
            rows.append(dict(photo=photo, reduction=name, method=r.method, tokens=int(res.tokens_per_layer[-1]),
                             merged_groups=int((groups > 1).sum()) if r.method != "drop" else 0,
                             kept_patches=" ".join(str(int(k)) for k in kept[kept >= 0])))
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


__all__ = [
    "DATASETS",
    "METHODS",
    "FeatureSet",
    "Reduction",
    "accuracy_vs_keep",
    "check_size",
    "cls_cosine",
    "digit_pixels",
    "kept_token_figure",
    "load_image",
    "measure_latency",
    "overlay_tokens",
    "plot_accuracy_vs_keep",
    "photo_pixels",
    "reduced_features",
    "to_pixels",
    "train_probe",
    "unpruned_features",
]
