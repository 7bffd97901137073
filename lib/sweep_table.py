"""A sweep's results in one tidy table and one figure, gathered from its run folders (:mod:`salience.sweep`).

``table.csv``: one row per combination and claim part: the swept parameters first (one column each, lists as JSON),
then ``combination``, ``status`` (ok / failed / timeout / missing), the claim's overall ``label``, the part (``part``,
``metric``, ``direction``, ``n``, ``effect`` a − b with ``ci_low`` / ``ci_high`` at ``confidence``, the arm means
``a_mean`` / ``b_mean``, the part's ``verdict``), then ``error``, ``worker`` and ``wall_time_s``. A failed run is one
row with its error and no part. ``effects.png``: each part's effect with its interval against the first swept
parameter, one line per value of the others.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd

from .runs import atomic_write_bytes, atomic_write_text

RUN_COLUMNS = ["combination", "status", "label"]
PART_COLUMNS = ["part", "metric", "direction", "n", "effect", "ci_low", "ci_high", "confidence", "a_mean", "b_mean",
                "verdict"]
TAIL_COLUMNS = ["error", "worker", "wall_time_s"]
MAX_PANELS = 12


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def latest_run(runs: Path, name: str) -> Path | None:
    """The folder of a combination's latest run: ``<name>.failed/`` while it exists (a good run removes it), else
    ``<name>/``; None when it never finished."""
    for folder in (runs / f"{name}.failed", runs / name):
        if (folder / "run.json").is_file():
            return folder
    return None


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _param_column(key: str) -> str:
    taken = RUN_COLUMNS + PART_COLUMNS + TAIL_COLUMNS
    return f"param.{key}" if key in taken else key


def gather(folder: Path) -> pd.DataFrame:
    """The tidy table of the sweep in ``folder`` (its ``sweep.json`` lists the combinations)."""
    sweep = _read_json(folder / "sweep.json")
    if sweep is None:
        raise ValueError(f"{folder}: no readable sweep.json")
    keys = list(sweep.get("grid") or {})
    rows = []
    for combo in sweep.get("combinations", []):
        head = {_param_column(k): _cell(combo["values"].get(k)) for k in keys}
        head.update(combination=combo["name"], status="missing", label=None)
        tail: dict[str, Any] = {"error": None, "worker": None, "wall_time_s": None}
        run_folder = latest_run(folder / "runs", combo["name"])
        record = _read_json(run_folder / "run.json") if run_folder else None
        parts: list[dict] = []
        if record is not None:
            error = record.get("error") or None
            head["status"] = "failed" if run_folder.name.endswith(".failed") else str(record.get("status", "ok"))
            if error and error.get("ename") == "Timeout":
                head["status"] = "timeout"
            worker = record.get("worker") or {}
            where = worker.get("address") or (f"{worker.get('host')}:{worker.get('pid')}" if worker else None)
            tail.update(error=f"{error.get('ename')}: {error.get('evalue')}" if error else None, worker=where,
                        wall_time_s=record.get("wall_time_s"))
            claim = _read_json(run_folder / "claims.json") if head["status"] == "ok" else None
            if claim is not None:
                head["label"] = claim.get("label")
                parts = [p for p in claim.get("parts", []) if isinstance(p, dict)]
            elif head["status"] == "ok":
                head["label"] = (record.get("verdict") or {}).get("label")
        blank = dict.fromkeys(PART_COLUMNS)
        for part in parts or [None]:
            values = blank if part is None else {c: part.get(c if c != "part" else "id") for c in PART_COLUMNS}
            rows.append({**head, **values, **tail})
    columns = [_param_column(k) for k in keys] + RUN_COLUMNS + PART_COLUMNS + TAIL_COLUMNS
    table = pd.DataFrame(rows, columns=columns)
    table["n"] = table["n"].astype("Int64")  # whole numbers, blank for a failed run
    return table


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def plot_effects(table: pd.DataFrame, keys: list[str]):
    """Each part's effect a − b with its interval against the first swept parameter (a matplotlib Figure), one
    line per combination of the other swept parameters; None when no run produced a part."""
    from matplotlib.figure import Figure

    data = table[table["part"].notna() & table["effect"].notna()]
    if data.empty or not keys:
        return None
    x_key, others = _param_column(keys[0]), [_param_column(k) for k in keys[1:]]
    parts = list(dict.fromkeys(data["part"]))[:MAX_PANELS]
    levels = list(dict.fromkeys(table[x_key]))
    numeric = _numeric(levels)
    position = {v: (v if numeric else i) for i, v in enumerate(levels)}
    ncols = min(3, len(parts))
    nrows = math.ceil(len(parts) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    groups = data.groupby(others, sort=False, dropna=False) if others else [((), data)]
    series = [(g if isinstance(g, tuple) else (g,), frame) for g, frame in groups]
    spread = (max(levels) - min(levels) if numeric and len(levels) > 1 else 1.0) * 0.015
    for ax, part in zip(axes, parts):
        for i, (group, frame) in enumerate(series):
            rows = frame[frame["part"] == part]
            if rows.empty:
                continue
            x = [position[v] + (i - (len(series) - 1) / 2) * spread for v in rows[x_key]]
            y = rows["effect"].astype(float)
            err = [(y - rows["ci_low"].astype(float)).clip(lower=0), (rows["ci_high"].astype(float) - y).clip(lower=0)]
            label = ", ".join(f"{k}={v}" for k, v in zip(others, group)) or None
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, linewidth=1.2, label=label)
        ax.axhline(0.0, color="0.4", linewidth=0.8)
        metric = next(iter(data.loc[data["part"] == part, "metric"].dropna()), "")
        ax.set_title("\n".join([str(part), *textwrap.wrap(str(metric), 48)[:2]]), fontsize=9)
        ax.set(xlabel=keys[0], ylabel="effect a − b")
        if not numeric:
            ax.set_xticks(range(len(levels)), [str(v) for v in levels], rotation=30 if len(levels) > 4 else 0)
        if others:
            ax.legend(fontsize=7, frameon=False)
    for ax in axes[len(parts):]:
        ax.set_visible(False)
    return fig


def write_table(folder: Path) -> Path:
    """Gather ``folder``'s runs into ``table.csv`` and ``effects.png`` (removed when there is nothing to plot);
    returns the table's path."""
    table = gather(folder)
    path = folder / "table.csv"
    atomic_write_text(path, table.to_csv(index=False))
    keys = list((_read_json(folder / "sweep.json") or {}).get("grid") or {})
    fig = plot_effects(table, keys)
    if fig is None:
        (folder / "effects.png").unlink(missing_ok=True)
        return path
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": None})
    atomic_write_bytes(folder / "effects.png", buf.getvalue())
    return path
