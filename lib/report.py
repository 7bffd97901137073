"""The HTML report over run folders: ``outputs/report/index.html``, a Claims page (``claims.html``: every judged
part of every notebook's claim in one sortable table with a forest plot), a References page (``references.html``:
every paper key, linked from Findings and claims) and one page per executed notebook.

Reads the runner's contract (``outputs/<notebook>/<param_set>[.failed]/`` with ``run.json``, ``findings.md``,
``figures/*.png``, ``tables/*.csv`` and ``executed.ipynb``) and writes a self-contained folder that opens from the
file system: relative links only, inline CSS and JS, figures copied under ``assets/``, no network requests (the
notebook pages use nbconvert's "lab" template with the require.js, MathJax, Mermaid and widget loaders removed, so
TeX shows as source). The build happens in a temporary folder next to ``dest`` and is swapped in at the end.

``python -m salience.report [OUTPUTS] [--dest DIR]`` builds it from the command line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import numbers
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import jinja2
import mistune

from salience.paths import REPO_ROOT, outputs_dir as default_outputs_dir
from salience.references import cite_html
from salience.report_claims import FOREST_RANGE, claim_rows, reference_rows
from salience.report_sweep import write_sweeps_page

TEMPLATES = Path(__file__).resolve().parent / "templates"
WORKBOOK = "Token salience workbook"
MAX_TABLE_ROWS = 200
# run.json keys a report entry cannot do without, and the type each must have.
REQUIRED = {"notebook": str, "param_set": str, "title": str, "claim": str, "status": str, "params": dict}
_markdown = mistune.create_markdown(escape=True, plugins=["table", "strikethrough", "math"])


@dataclass
class Run:
    """One run folder, read and checked; ``problem`` says why its run.json is unusable."""

    notebook: str
    folder: Path
    meta: dict = field(default_factory=dict)
    problem: str | None = None
    warnings: list[str] = field(default_factory=list)
    findings: str = ""
    figures: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    other_tables: list[dict] = field(default_factory=list)
    notebook_href: str | None = None
    claim: dict | None = None

    @property
    def status(self) -> str:
        return "broken" if self.problem else self.meta["status"]

    @property
    def key(self) -> str:  # folder name relative to outputs/, used for anchors and asset paths
        return f"{self.notebook}/{self.folder.name}"


# -- formatting ---------------------------------------------------------------------------------------------------


def fmt_num(x) -> str:
    """A number for humans: 3–4 significant digits, integers kept whole, NaN as a dash."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if 1e4 <= abs(x) < 1e9:
        return str(round(x))
    return f"{x:.4g}"


def fmt_seconds(s) -> str:
    if not isinstance(s, (int, float)) or isinstance(s, bool):
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def fmt_time(iso) -> str:
    try:
        return dt.datetime.fromisoformat(str(iso)).strftime("%Y-%m-%d %H:%M %Z").strip()
    except ValueError:
        return str(iso or "—")


def flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested parameters as ``(dotted.key, compact value)`` pairs."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += flatten(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((f"{prefix}{k}", fmt_num(v)))
        else:
            out.append((f"{prefix}{k}", v if isinstance(v, str) else json.dumps(v, default=str)))
    return out


def render_markdown(text: str, refs_href: str = "references.html") -> str:
    """Markdown to HTML (escaped), with ``[@key]`` citations linked to the References page."""
    lines = text.strip().splitlines()
    if lines and lines[0].lstrip("#").strip().lower().rstrip(":") == "findings" and lines[0].startswith("#"):
        lines = lines[1:]  # the report already labels the section
    return cite_html(_markdown("\n".join(lines)), refs_href)


def read_table(path: Path) -> dict:
    import pandas as pd
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    df = pd.read_csv(path)
    numeric = [is_numeric_dtype(df[c]) and not is_bool_dtype(df[c]) for c in df.columns]
    rows = []
    for rec in df.head(MAX_TABLE_ROWS).itertuples(index=False):
        row = []
        for v, num in zip(rec, numeric):
            if num:
                row.append((fmt_num(v), "" if pd.isna(v) else repr(float(v))))
            else:
                row.append(("" if pd.isna(v) else str(v), None))
        rows.append(row)
    return {"columns": [str(c) for c in df.columns], "numeric": numeric, "rows": rows, "n_rows": len(df)}


# -- reading run folders ------------------------------------------------------------------------------------------


def _safe_rel(folder: Path, file) -> Path | None:
    """``folder/file`` when ``file`` is a relative path that stays inside ``folder``."""
    if not isinstance(file, str) or not file:
        return None
    rel = Path(file)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    return folder / rel


def read_run(notebook: str, folder: Path) -> Run:
    run = Run(notebook=notebook, folder=folder)
    try:
        meta = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        run.problem = "run.json is missing"
        return run
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        run.problem = f"run.json is not valid JSON: {e}"
        return run
    if not isinstance(meta, dict):
        run.problem = f"run.json holds a {type(meta).__name__}, not an object"
        return run
    bad = [f"{k} ({'missing' if k not in meta else type(meta[k]).__name__ + ', not ' + t.__name__})"
           for k, t in REQUIRED.items() if not isinstance(meta.get(k), t)]
    if meta.get("status") not in ("ok", "failed", None) and isinstance(meta.get("status"), str):
        bad.append(f"status ({meta['status']!r}, not 'ok' or 'failed')")
    if bad:
        run.problem = "run.json has bad or missing keys: " + ", ".join(bad)
        return run
    for k, default in (("figures", []), ("tables", []), ("versions", {})):
        if not isinstance(meta.get(k), type(default)):
            if meta.get(k) is not None:
                run.warnings.append(f"run.json: {k} is not a {type(default).__name__}; ignored")
            meta[k] = default
    for k in ("error", "verdict"):
        if meta.get(k) is not None and not isinstance(meta[k], dict):
            run.warnings.append(f"run.json: {k} is not an object; ignored")
            meta[k] = None
    run.meta = meta
    if (folder / "findings.md").is_file():
        run.findings = render_markdown((folder / "findings.md").read_text(encoding="utf-8", errors="replace"))
    if (folder / "claims.json").is_file():
        try:
            claim = json.loads((folder / "claims.json").read_text(encoding="utf-8"))
            if not isinstance(claim, dict) or not isinstance(claim.get("parts"), list):
                raise ValueError("no list of parts")
            run.claim = claim
        except (OSError, UnicodeDecodeError, ValueError) as e:
            run.warnings.append(f"claims.json is unusable ({e}); left out of the Claims page")
    return run


#: runs from JupyterLab, nbval or ``salience store`` (no parameter file behind them): left out unless asked for
INTERACTIVE = "interactive"


def discover(outputs: Path, skip: set[Path], include_interactive: bool = False) -> list[dict]:
    """Notebooks and their param sets: ``[{name, sets: [{name, latest: Run, last_good: Run|None}]}]``."""
    notebooks = []
    if not outputs.is_dir():
        return notebooks
    for nb_dir in sorted(p for p in outputs.iterdir() if p.is_dir()):
        if nb_dir.name.startswith((".", "_")) or nb_dir.resolve() in skip:
            continue
        sets: dict[str, dict] = {}
        for folder in sorted(p for p in nb_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            if not ((folder / "run.json").exists() or (folder / "executed.ipynb").exists()):
                continue  # not a run folder (or one still being written)
            failed = folder.name.endswith(".failed")
            name = folder.name[: -len(".failed")] if failed else folder.name
            if name == INTERACTIVE and not include_interactive:
                continue
            run = read_run(nb_dir.name, folder)
            if failed and not run.problem and run.meta["status"] != "failed":
                run.warnings.append(f"run.json says status {run.meta['status']!r} in a .failed folder; shown as failed")
                run.meta["status"] = "failed"
            sets.setdefault(name, {})["failed" if failed else "good"] = run
        entries = []
        for name, s in sets.items():
            latest = s.get("failed") or s["good"]
            last_good = s.get("good") if "failed" in s else None
            if last_good is not None and last_good.status == "failed":
                last_good = None
            changes = []  # parameters that differ between the last good run and the failed one
            if last_good and not last_good.problem and not latest.problem:
                old, new = dict(flatten(last_good.meta["params"])), dict(flatten(latest.meta["params"]))
                changes = [(k, old.get(k, "—"), new.get(k, "—")) for k in {**old, **new} if old.get(k) != new.get(k)]
            entries.append({"name": name, "latest": latest, "last_good": last_good, "param_changes": changes})
        if entries:
            notebooks.append({"name": nb_dir.name, "sets": entries})
    return notebooks


# -- building -----------------------------------------------------------------------------------------------------


def _copy_assets(run: Run, build: Path) -> None:
    """Copy figures and tables under ``assets/`` and fill in the run's relative links."""
    assets = Path("assets") / run.notebook / run.folder.name
    listed = [f for f in run.meta.get("figures", []) if isinstance(f, dict)]
    seen = set()
    for f in listed + [{"file": p.relative_to(run.folder).as_posix(), "caption": ""}
                       for p in sorted((run.folder / "figures").glob("*.png"))]:
        src = _safe_rel(run.folder, f.get("file"))
        if src is None:
            run.warnings.append(f"figure {f.get('file')!r}: not a relative path inside the run folder")
            continue
        if src in seen:
            continue
        seen.add(src)
        fig = {"file": f["file"], "caption": str(f.get("caption") or "")}
        if src.is_file():
            (build / assets / f["file"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, build / assets / f["file"])
            fig["src"] = quote((assets / f["file"]).as_posix())
        run.figures.append(fig)
    for t in run.meta.get("tables", []):
        src = _safe_rel(run.folder, t.get("file") if isinstance(t, dict) else None)
        if src is None or not src.is_file():
            run.warnings.append(f"table {t.get('file') if isinstance(t, dict) else t!r}: file not found")
            continue
        (build / assets / t["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, build / assets / t["file"])
        entry = {"file": t["file"], "caption": str(t.get("caption") or ""), "href": quote((assets / t["file"]).as_posix())}
        if t.get("key"):
            try:
                entry.update(read_table(src))
            except Exception as e:  # noqa: BLE001 - a bad CSV is reported, not fatal
                entry["error"] = f"{type(e).__name__}: {e}"
            run.tables.append(entry)
        else:
            run.other_tables.append(entry)


def _render_notebook(run: Run, build: Path, exporter, back: str) -> None:
    src = run.folder / "executed.ipynb"
    if not src.is_file():
        return
    import nbformat

    page = Path("notebooks") / f"{run.notebook}--{run.folder.name}.html"
    try:
        nb = nbformat.read(src, as_version=4)
        body, _ = exporter.from_notebook_node(
            nb, resources={"metadata": {"name": f"{run.notebook} / {run.folder.name}"}, "report_back": back}
        )
    except Exception as e:  # noqa: BLE001 - one unreadable notebook must not sink the report
        run.warnings.append(f"executed.ipynb could not be rendered: {type(e).__name__}: {e}")
        return
    (build / page).parent.mkdir(parents=True, exist_ok=True)
    (build / page).write_text(body, encoding="utf-8")
    run.notebook_href = quote(page.as_posix())


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _header_commit(notebooks: list[dict]) -> tuple[str, str]:
    """The repository's HEAD; without one (no git, no commit yet), the commit the runs recorded, if they agree."""
    head = _git_commit()
    if head != "unknown":
        return head, ""
    runs = {r.meta.get("git_commit") for nb in notebooks for s in nb["sets"] for r in (s["latest"], s["last_good"])
            if r is not None and not r.problem}
    runs.discard(None)
    return (str(runs.pop())[:12], "recorded by the runs; no git HEAD here") if len(runs) == 1 else ("unknown", "")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(num=fmt_num, seconds=fmt_seconds, time=fmt_time, flatten=flatten)
    return env


def _build_into(build: Path, outputs: Path, skip: set[Path], include_interactive: bool = False) -> None:
    from nbconvert import HTMLExporter

    notebooks = discover(outputs, skip, include_interactive)
    exporter = HTMLExporter(template_name="lab", extra_template_paths=[str(TEMPLATES)],
                            template_file="notebook.html.j2")
    counts = {"ok": 0, "failed": 0, "broken": 0}
    for nb in notebooks:
        for s in nb["sets"]:
            counts[s["latest"].status] += 1
            s["anchor"] = f"{nb['name']}--{s['name']}"
            for run in filter(None, (s["latest"], s["last_good"])):
                if not run.problem:
                    _copy_assets(run, build)
                _render_notebook(run, build, exporter, back=f"../index.html#{quote(s['anchor'])}")
        good = [s["last_good"] or s["latest"] for s in nb["sets"]]
        first = next((r for r in good if not r.problem), None)
        nb["title"] = first.meta["title"] if first else nb["name"]
        nb["claim"] = first.meta["claim"] if first else ""
    env = _environment()
    built = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    html = env.get_template("report.html.j2").render(
        workbook=WORKBOOK, notebooks=notebooks, counts=counts, commit=_header_commit(notebooks),
        trouble=[(nb, s) for nb in notebooks for s in nb["sets"] if s["latest"].status != "ok"],
        built=built, outputs=str(outputs),
    )
    (build / "index.html").write_text(html, encoding="utf-8")
    (build / "claims.html").write_text(env.get_template("claims.html.j2").render(
        workbook=WORKBOOK, rows=claim_rows(notebooks), built=built, outputs=str(outputs),
        forest_range=FOREST_RANGE), encoding="utf-8")
    (build / "references.html").write_text(env.get_template("references.html.j2").render(
        workbook=WORKBOOK, refs=reference_rows(notebooks)), encoding="utf-8")
    write_sweeps_page(build, outputs, env, workbook=WORKBOOK, built=built)


def build_report(outputs_dir: Path | None = None, dest: Path | None = None, include_interactive: bool = False) -> Path:
    """Build the report for ``outputs_dir`` (default ``salience.paths.outputs_dir()``) into ``dest`` (default
    ``<outputs>/report``) and return the path of its ``index.html``. The folder is replaced atomically.

    Runs of the ``interactive`` set (JupyterLab, nbval, ``salience store``) are left out unless ``include_interactive``.
    """
    outputs = Path(outputs_dir) if outputs_dir is not None else default_outputs_dir()
    dest = Path(dest) if dest is not None else outputs / "report"
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.*-*"):  # left over by a crashed build an hour or more ago
        if stale.is_dir() and time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    build = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        build.chmod(0o755)
        _build_into(build, outputs, skip={dest.resolve(), build.resolve()}, include_interactive=include_interactive)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    if dest.exists():
        os.replace(dest, old)
    os.replace(build, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest / "index.html"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m salience.report", description=__doc__.splitlines()[0])
    ap.add_argument("outputs", nargs="?", type=Path, help="run outputs folder (default: $SALIENCE_OUTPUTS or outputs/)")
    ap.add_argument("--dest", type=Path, help="report folder (default: <outputs>/report)")
    args = ap.parse_args(argv)
    print(build_report(args.outputs, args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
