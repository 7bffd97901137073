"""Helpers shared by the loaders: seeded subsets and the location of files shipped inside installed packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def package_dir(module: str) -> Path:
    """Folder of an installed top-level package, found without importing it.

    ``find_spec`` on a top-level name does not execute the package, which matters for ``bible`` (its ``__init__``
    imports ``pkg_resources``, gone from new setuptools) and for the model wheels whose modules may not import.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed (see docs/offline-assets.md)")
    return Path(next(iter(spec.submodule_search_locations)))


def gensim_test_file(name: str) -> Path:
    """A file from gensim's ``test/test_data`` folder (shipped in the gensim wheel)."""
    path = package_dir("gensim") / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is gensim>=4.3 installed with its test data?")
    return path


def subset_indices(total: int, n: int | None, seed: int, what: str) -> np.ndarray:
    """Indices of the rows to return: all of them when ``n`` is None, else ``n`` drawn without replacement.

    The draw is seeded (same seed, same rows) and the indices come back sorted so a subset keeps the source order;
    different seeds give different subsets whenever ``n < total``.
    """
    if n is None:
        return np.arange(total)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n must be an integer in [1, {total}] or None for all {what}, got {n!r}")
    if not 1 <= n <= total:
        raise ValueError(f"n must be in [1, {total}] ({total} {what} available), got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=int(n), replace=False))
