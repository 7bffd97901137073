"""Verdict stability: the same notebooks on their defaults with different torch thread counts must reach the same
labels (the claim's and every part's). Thread counts change the order of floating-point reductions, which is the
round-off a verdict must not depend on.

Each thread count runs in its own outputs folder and with its own fresh activation cache
(``SALIENCE_ACTIVATION_CACHE``), so no run reuses another's numbers. ``salience stability`` and ``make
verdict-stability`` call :func:`verdict_stability`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

ACTIVATION_CACHE_ENV = "SALIENCE_ACTIVATION_CACHE"


@contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def labels_of(folder: Path) -> dict[str, str]:
    """``{"claim": label, "<part id>": verdict, ...}`` from a run folder's ``claims.json``."""
    claim = json.loads((folder / "claims.json").read_text())
    return {"claim": claim["label"], **{p["id"]: p["verdict"] for p in claim["parts"]}}


def verdict_stability(notebooks: Sequence[str] | None = None, threads: Sequence[int] = (1, 2), *,
                      timeout_s: float = 1800.0, keep: str | Path | None = None) -> tuple[pd.DataFrame, bool]:
    """Run ``notebooks`` (default: all) once per thread count; return one row per notebook and label (the claim's
    and each part's) with a column per thread count, and whether every row agrees. A run that fails is a row with
    the error as its label (and counts as unstable)."""
    from .runner import execute, plan

    if len(threads) < 2:
        raise ValueError(f"compare at least two thread counts, got {list(threads)}")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="salience-stability-"))
    results: dict[int, dict[str, dict[str, str]]] = {}
    try:
        for n in threads:
            base = root / f"threads-{n}"
            with _environ(SALIENCE_OUTPUTS=str(base / "outputs"), **{ACTIVATION_CACHE_ENV: str(base / "cache")}):
                specs = plan(list(notebooks) if notebooks else None, timeout_s=timeout_s, threads=n)
                for spec in specs:
                    outcome = execute(spec, show_progress=False)
                    if outcome.status == "ok":
                        results.setdefault(n, {})[spec.notebook] = labels_of(Path(outcome.folder))
                    else:
                        err = outcome.error or {}
                        results.setdefault(n, {})[spec.notebook] = {
                            "claim": f"{outcome.status}: {err.get('ename', '')} {err.get('evalue', '')}"[:80]}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = []
    names = sorted({nb for per in results.values() for nb in per})
    for nb in names:
        keys = list(dict.fromkeys(k for n in threads for k in results.get(n, {}).get(nb, {})))
        for key in keys:
            row = {"notebook": nb, "label": key}
            row.update({f"threads={n}": results.get(n, {}).get(nb, {}).get(key, "missing") for n in threads})
            values = [row[f"threads={n}"] for n in threads]
            row["same"] = len(set(values)) == 1 and not any(v.startswith(("failed", "timeout", "missing"))
                                                           for v in values)
            rows.append(row)
    table = pd.DataFrame(rows, columns=["notebook", "label", *[f"threads={n}" for n in threads], "same"])
    return table, bool(len(table)) and bool(table.same.all())


__all__ = ["ACTIVATION_CACHE_ENV", "labels_of", "verdict_stability"]
