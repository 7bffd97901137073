"""Where things live: the repository, run outputs and the model cache.

The cache holds converted model weights (GGUF / ONNX / CTranslate2 → Hugging Face folders). It lives outside the
git tree so a clean clone stays small; set ``SALIENCE_CACHE`` to move it.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root of the conversion cache: ``$SALIENCE_CACHE`` or ``~/.cache/salience``."""
    root = Path(os.environ.get("SALIENCE_CACHE") or Path.home() / ".cache" / "salience")
    root.mkdir(parents=True, exist_ok=True)
    return root


def outputs_dir() -> Path:
    """Root of run outputs: ``$SALIENCE_OUTPUTS`` or ``<repo>/outputs``."""
    return Path(os.environ.get("SALIENCE_OUTPUTS") or REPO_ROOT / "outputs")


def notebooks_dir() -> Path:
    return REPO_ROOT / "notebooks"


def params_dir() -> Path:
    """Parameter sets: ``$SALIENCE_PARAMS`` or ``<repo>/params``."""
    return Path(os.environ.get("SALIENCE_PARAMS") or REPO_ROOT / "params")
