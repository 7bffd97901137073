"""The report's Sweeps page (``sweeps.html``): per sweep under ``outputs/<nb>/sweeps/<name>/``, what was swept, how
many combinations ran, the tidy ``table.csv`` (sortable, linked) and the ``effects.png`` figure.

:func:`salience.report.build_report` calls :func:`write_sweeps_page`; the files are copied under
``assets/sweeps/<nb>/<name>/`` so the page opens from the file system like the rest of the report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import quote


def _hidden(path: Path) -> bool:
    return path.name.startswith((".", "_"))


def discover_sweeps(outputs: Path) -> list[dict]:
    """Every sweep with a ``sweep.json``: ``[{notebook, name, meta, folder, problem}]`` in name order."""
    sweeps = []
    if not outputs.is_dir():
        return sweeps
    for path in sorted(outputs.glob("*/sweeps/*/sweep.json")):
        folder = path.parent
        if _hidden(folder) or _hidden(folder.parent.parent):
            continue
        entry = {"notebook": folder.parent.parent.name, "name": folder.name, "folder": folder, "meta": {},
                 "problem": None}
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"holds a {type(meta).__name__}, not an object")
            entry["meta"] = meta
        except (OSError, ValueError) as err:
            entry["problem"] = f"sweep.json is unusable: {err}"
        sweeps.append(entry)
    return sweeps


def _status_counts(table: dict) -> dict[str, int]:
    """Runs per status, counting each combination once (the table has one row per part)."""
    columns = table["columns"]
    if "combination" not in columns or "status" not in columns:
        return {}
    ci, si = columns.index("combination"), columns.index("status")
    seen: dict[str, str] = {}
    for row in table["rows"]:
        seen.setdefault(row[ci][0], row[si][0])
    counts: dict[str, int] = {}
    for status in seen.values():
        counts[status] = counts.get(status, 0) + 1
    return counts


def sweep_entries(outputs: Path, build: Path) -> list[dict]:
    """Sweeps ready for the template, their table and figure copied into the build."""
    from .report import read_table

    entries = []
    for sweep in discover_sweeps(outputs):
        assets = Path("assets") / "sweeps" / sweep["notebook"] / sweep["name"]
        entry = {**sweep, "anchor": f"sweep--{sweep['notebook']}--{sweep['name']}", "table": None, "figure": None,
                 "table_href": None, "counts": {}}
        table = sweep["folder"] / "table.csv"
        if table.is_file():
            (build / assets).mkdir(parents=True, exist_ok=True)
            shutil.copy2(table, build / assets / "table.csv")
            entry["table_href"] = quote((assets / "table.csv").as_posix())
            try:
                entry["table"] = read_table(table)
                entry["counts"] = _status_counts(entry["table"])
            except Exception as err:  # noqa: BLE001 - a bad CSV is reported on the page, not fatal
                entry["problem"] = f"table.csv could not be read: {type(err).__name__}: {err}"
        elif not entry["problem"]:
            entry["problem"] = "no table.csv yet (the sweep is running, or was stopped before its runs ended)"
        figure = sweep["folder"] / "effects.png"
        if figure.is_file():
            (build / assets).mkdir(parents=True, exist_ok=True)
            shutil.copy2(figure, build / assets / "effects.png")
            entry["figure"] = quote((assets / "effects.png").as_posix())
        entries.append(entry)
    return entries


def write_sweeps_page(build: Path, outputs: Path, env, **context) -> None:
    """Render ``sweeps.html`` into the report being built (``env``: the report's Jinja environment)."""
    page = env.get_template("sweeps.html.j2").render(sweeps=sweep_entries(outputs, build), outputs=str(outputs),
                                                      **context)
    (build / "sweeps.html").write_text(page, encoding="utf-8")
