"""On-disk cache of encoder activations: computed once per (model, image set, layer, code), reused by every notebook.

Layout: ``<root>/<model fingerprint>/<image-set key>/<name>-<code hash>.npy`` (float32 or int64 arrays), plus a
``spec.json`` per image set saying what it is. The root is ``$SALIENCE_ACTIVATION_CACHE`` (a folder), or
``salience.paths.cache_dir() / "activations"``; ``SALIENCE_ACTIVATION_CACHE=off`` disables the cache (every array is
computed, nothing is written).

Keys: the **model fingerprint** hashes every parameter and buffer (names, shapes, dtypes, bytes), so another checkpoint
under the same name misses; the **image-set key** hashes the set's spec (data set, split, count, size, seed,
normalisation); the **code hash** hashes the source of the code that produced the array plus the torch and
transformers versions, so a code change invalidates (the caller names the code, see :func:`code_hash`). Writes are
atomic (temp file + rename); concurrent runs serialise on a lock file per image set, so a second notebook waits for
the first and then reads its arrays instead of computing them again.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .paths import cache_dir
from .runs import atomic_write_bytes, atomic_write_text

ENV = "SALIENCE_ACTIVATION_CACHE"
OFF = "off"
_FINGERPRINT_ATTR = "_salience_weights_fingerprint"


def cache_root() -> Path | None:
    """The cache folder, or None when ``SALIENCE_ACTIVATION_CACHE=off``."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() == OFF:
        return None
    return Path(value).expanduser() if value else cache_dir() / "activations"


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def short_hash(text: str, length: int = 12) -> str:
    """The first ``length`` hex digits of ``text``'s SHA-256 (file-name-safe keys, e.g. of a scorer's repr)."""
    return _digest([text])[:length]


def model_fingerprint(model) -> str:
    """SHA-256 over every parameter and buffer (name, shape, dtype, bytes); memoised on the module object."""
    cached = getattr(model, _FINGERPRINT_ATTR, None)
    if cached is not None:
        return cached
    parts = []
    with torch.no_grad():
        for name, tensor in sorted(list(model.state_dict().items())):
            t = tensor.detach().cpu().contiguous()
            parts += [name, tuple(t.shape), str(t.dtype), t.view(torch.uint8).numpy().tobytes() if t.numel() else b""]
    fingerprint = _digest(parts)
    object.__setattr__(model, _FINGERPRINT_ATTR, fingerprint)
    return fingerprint


def source_of(obj) -> str:
    """The source text of a module, class or function (what :func:`code_hash` reads)."""
    return inspect.getsource(obj)


def code_hash(*objects, extra: str = "") -> str:
    """SHA-256 of the source of ``objects`` (modules, classes, functions) and the torch / transformers versions.
    Name whole modules where a class or function calls module-level helpers: their source is part of the result."""
    versions = []
    for package in ("torch", "transformers"):
        try:
            versions.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    return _digest([source_of(o) for o in objects] + versions + [extra])


@dataclass(frozen=True)
class ImageSetSpec:
    """Everything that decides an image set's pixels: data set, split, count, size, subset seed, normalisation."""

    dataset: str
    split: str
    n: int
    size: int
    seed: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def key(self) -> str:
        return _digest([json.dumps(asdict(self), sort_keys=True)])[:20]


class ActivationStore:
    """Arrays of one (model, image set) by name and code hash. ``root=None`` is a disabled store."""

    def __init__(self, root: Path | None, model_key: str, image_set: ImageSetSpec):
        self.image_set = image_set
        self.folder = None if root is None else Path(root) / model_key[:20] / image_set.key()

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def path(self, name: str, code: str) -> Path:
        if self.folder is None:
            raise ValueError("the activation cache is off")
        if not name or any(c in name for c in "/\\\0"):
            raise ValueError(f"array name must be a plain file stem, got {name!r}")
        return self.folder / f"{name}-{code[:16]}.npy"

    def has(self, name: str, code: str) -> bool:
        return self.folder is not None and self.path(name, code).is_file()

    def load(self, name: str, code: str) -> np.ndarray | None:
        """The cached array, or None on a miss (or when the cache is off)."""
        if self.folder is None:
            return None
        path = self.path(name, code)
        if not path.is_file():
            return None
        return np.load(path, allow_pickle=False)

    def save(self, name: str, code: str, array: np.ndarray) -> None:
        """Write atomically (temp file in the same folder + rename); a no-op when the cache is off."""
        if self.folder is None:
            return
        spec = self.folder / "spec.json"
        if not spec.exists():
            atomic_write_text(spec, json.dumps(asdict(self.image_set), indent=2))
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        atomic_write_bytes(self.path(name, code), buf.getvalue())

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the image set's lock file (blocks while another process computes its arrays)."""
        if self.folder is None:
            yield
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def size_bytes(self) -> int:
        if self.folder is None or not self.folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.folder.glob("*.npy"))


__all__ = ["ENV", "OFF", "ActivationStore", "ImageSetSpec", "cache_root", "code_hash", "model_fingerprint",
           "short_hash", "source_of"]
