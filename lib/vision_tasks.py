"""Vision inputs and pictures for the token-reduction notebooks: digits and photos as ViT pixels, paired latency of
reduced vs unreduced passes, and overlays of kept / merged tokens on photos.

How reductions are judged (readers, the two settings, the activation cache) is :mod:`salience.vision_eval`.

>>> pixels, labels = digit_pixels("mnist", "test", n=8, size=112)       # 8x8 patches + [CLS]
>>> fig, table = kept_token_figure(model, photos(["astronaut"]), {"cls": Reduction(get_scorer("cls_attention"), 0.1)},
...                                layer=6)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .harness.token_merging import CONTEXTUAL, reduction_map
from .harness.vit_encoder import ScoreRequest, encode
from .harness.vit_model import vit_parts
from .harness.vit_pruning import METHODS, reduce_and_finish, replicate_seed, vit_forward, vit_prefix
from .models.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from .scorers.base import Scorer
from .selection import resolve_budget
from .validation import check_choice, check_keep, check_layer

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

    check_choice(dataset, DATASETS, "dataset")
    check_size(size)
    loader = mnist_digits if dataset == "mnist" else sklearn_digits
    images, labels = loader(n=n, seed=seed, split=split)
    return to_pixels(images, size, max_value=_MAX_VALUE[dataset], mean=mean, std=std), labels


def photo_pixels(image, size: int = 224, *, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """One photo (path or array, see :func:`load_image`) → ``(1, 3, size, size)``, resized without cropping."""
    return to_pixels(load_image(image)[None], size, mean=mean, std=std)


# ------------------------------------------------------------------------------------------------- reductions
@dataclass(frozen=True)
class Reduction:
    """One in-encoder reduction: ``scorer`` (None for ToMe), ``keep``, ``method``, extra keyword arguments of
    :func:`~salience.harness.vit_pruning.reduce_and_finish` in ``options`` (``contextual``,
    ``proportional_attention``, ``stages``; a ``seed`` there replaces the caller's), and the ``replicate`` of a
    stochastic scorer: every replicate (and every batch of it) draws with its own seed
    (:func:`~salience.harness.vit_pruning.replicate_seed`)."""

    scorer: Scorer | None
    keep: float | int
    method: str = "drop"
    options: Mapping = field(default_factory=dict)
    replicate: int = 0

    def __post_init__(self) -> None:
        check_choice(self.method, METHODS, "method")
        check_keep(self.keep)
        if self.method != "tome" and self.scorer is None:
            raise ValueError(f"method {self.method!r} needs a scorer (tome needs none)")

    def run(self, model, prefix, *, seed: int = 0, batch: int = 0):
        """:func:`reduce_and_finish` on ``prefix`` with this reduction's seed for ``batch``."""
        options = dict(self.options)
        base = options.pop("seed", seed)
        return reduce_and_finish(model, prefix, self.scorer, self.keep, self.method,
                                 seed=replicate_seed(base, self.replicate, batch), **options)


# ---------------------------------------------------------------------------------------------------- latency
@torch.inference_mode()
def paired_latency(model, pixels: torch.Tensor, reductions: Mapping[str, Reduction], layer: int, *,
                   repeats: int = 5, inner: int = 3, warmup: int = 1, threads: int | None = 1) -> pd.DataFrame:
    """Wall and CPU seconds of the whole forward pass (prefix + scoring + reduction + suffix): the unreduced pass
    (config ``unreduced``) and every reduction on the same batch within each repeat, so each repeat is a paired unit.

    Within a repeat every configuration runs ``inner`` times, interleaved in an order rotated from repeat to repeat,
    and its fastest run (least process time) counts: a load spike slows a run, it never speeds one up. On the CPU the runs use
    ``threads`` torch threads (None: as set): with one thread the process time is the work itself, not the time
    other threads spin while the machine is busy. Returns one row per (repeat, config): repeat, config, method,
    keep, seconds (wall), cpu_seconds (process time), both of the fastest run, flops (per image, estimated),
    tokens_last_layer.
    """
    if repeats < 2 or inner < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 2 (a paired interval needs two units), inner >= 1 and warmup >= 0, "
                         f"got {repeats}, {inner}, {warmup}")
    check_layer(layer, vit_parts(model).depth)
    before = torch.get_num_threads()
    if threads is not None and not pixels.is_cuda:
        torch.set_num_threads(threads)
    try:
        return _timed_runs(model, pixels, {"unreduced": None, **reductions}, layer, repeats, inner, warmup)
    finally:
        torch.set_num_threads(before)


def _timed_runs(model, pixels, configs, layer, repeats, inner, warmup) -> pd.DataFrame:
    names = list(configs)
    rows = []
    for i in range(warmup + repeats):
        shift = i % len(names)
        best: dict[str, tuple[float, float, object]] = {}
        for _ in range(inner):
            for name in names[shift:] + names[:shift]:
                r = configs[name]
                wall, cpu = time.perf_counter(), time.process_time()
                if r is None:
                    res = vit_forward(model, pixels)
                else:
                    prefix = vit_prefix(model, pixels, layer, needs=[r.scorer] if r.scorer else None)
                    res = r.run(model, prefix, batch=i)
                if pixels.is_cuda:
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if name not in best or cpu < best[name][1]:
                    best[name] = (wall, cpu, res)
        if i < warmup:
            continue
        for name in names:
            wall, cpu, res = best[name]
            r = configs[name]
            rows.append(dict(repeat=i - warmup, config=name, method="none" if r is None else r.method,
                             keep=1.0 if r is None else float(r.keep), seconds=wall, cpu_seconds=cpu,
                             flops=res.flops, tokens_last_layer=res.tokens_per_layer[-1]))
    return pd.DataFrame(rows)


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


@torch.inference_mode()
def _after_encoder_groups(model, pixels, reductions: Mapping[str, Reduction], seed: int) -> tuple[dict, int]:
    """``{name: (assignment (B, N), kept_positions (B, n), tokens)}`` when the encoder's output tokens are reduced,
    and the number of [CLS] + register tokens."""
    depth = vit_parts(model).depth
    requests = {name: ScoreRequest(r.scorer, depth, seed=replicate_seed(seed, r.replicate))
                for name, r in reductions.items() if r.scorer is not None}
    out = encode(model, pixels, scores=requests, key_layers=[depth])
    b, k = out.tokens.shape[:2]
    positions = torch.arange(k, device=out.tokens.device).expand(b, k)
    protected = positions < out.n_prefix
    groups = {}
    for name, r in reductions.items():
        budget = resolve_budget(r.keep, k - out.n_prefix)
        contextual = dict(r.options).get("contextual", CONTEXTUAL)
        dest, survives = reduction_map(r.method, budget, protected, scores=out.scores.get(name),
                                       metric=out.keys[depth], contextual=contextual)
        groups[name] = (dest[:, out.n_prefix:], positions[survives].view(b, -1), out.n_prefix + budget)
    return groups, out.n_prefix


def kept_token_figure(model, images: Mapping[str, np.ndarray], reductions: Mapping[str, Reduction],
                      layer: int | None = None, *, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      seed: int = 0):
    """Rows: photos; columns: reductions. Dropped patches dimmed (drop) or groups coloured (merge methods).

    ``layer`` None reduces the encoder's output tokens (after-encoder: scorers read the last block); an int reduces
    after that block (in-encoder). Returns ``(figure, table)``; the table lists per photo and reduction the tokens
    left, the kept original patch indices and the number of merged groups, so the figure can be checked as numbers.
    """
    import matplotlib.pyplot as plt

    if not images or not reductions:
        raise ValueError("need at least one image and one reduction")
    pixels = torch.cat([photo_pixels(img, size, mean=mean, std=std) for img in images.values()])
    device = next(model.parameters()).device
    grid = (size // vit_parts(model).patch_size,) * 2
    if layer is None:
        groups, n_prefix = _after_encoder_groups(model, pixels.to(device), reductions, seed)
    else:
        prefix = vit_prefix(model, pixels.to(device), layer, needs=[r.scorer for r in reductions.values() if r.scorer])
        groups, n_prefix = {}, prefix.n_prefix
        for name, r in reductions.items():
            res = r.run(model, prefix, seed=seed)
            groups[name] = (res.assignment, res.kept_positions, int(res.tokens_per_layer[-1]))
    fig, axes = plt.subplots(len(images), len(reductions), figsize=(2.1 * len(reductions), 2.2 * len(images)),
                             squeeze=False)
    rows = []
    for i, (photo, img) in enumerate(images.items()):
        for j, (name, r) in enumerate(reductions.items()):
            assignment, kept_positions, tokens = groups[name]
            assignment = assignment[i].cpu().numpy()
            overlay_tokens(axes[i, j], img, assignment, grid, merged=r.method != "drop",
                           title=name if i == 0 else None)
            if j == 0:
                axes[i, j].set_ylabel(photo, fontsize=9)
            kept = kept_positions[i].cpu().numpy() - n_prefix
            sizes = np.unique(assignment[assignment >= 0], return_counts=True)[1]
            rows.append(dict(photo=photo, reduction=name, method=r.method, tokens=tokens,
                             merged_groups=int((sizes > 1).sum()),
                             kept_patches=" ".join(str(int(x)) for x in kept[kept >= 0])))
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


__all__ = [
    "DATASETS",
    "METHODS",
    "Reduction",
    "check_size",
    "digit_pixels",
    "kept_token_figure",
    "load_image",
    "overlay_tokens",
    "paired_latency",
    "photo_pixels",
    "to_pixels",
]
