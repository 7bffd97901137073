"""The report's Claims and References pages, built from the runs' ``claims.json`` and ``references.yaml``.

Claims page: one row per judged part of every notebook's claim (the shown run of each parameter set), sortable,
with a small forest plot per row: the part's improvement (positive = the claimed-better arm is better) and its
interval, in units of the part's smallest effect of interest δ, beside the zero line and ±δ. Exhaustive checks have
no interval and show their pass count instead.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

from .evidence import Part, fmt_interval
from .references import cited_keys, entry_url, references

FOREST_RANGE = 4.0  # the plot spans ±4 δ; longer intervals are clipped with an arrow
_W, _H, _PAD = 160, 22, 8


@dataclass
class ClaimRow:
    """One judged part, ready for the table."""

    notebook: str
    param_set: str
    anchor: str
    title: str
    label: str
    part: Part
    papers: list[str]
    effect_text: str = ""
    scaled: tuple[float, float, float] | None = None  # improvement / δ: (point, low, high)
    svg: str = ""


def _x(v: float) -> float:
    v = max(-FOREST_RANGE, min(FOREST_RANGE, v))
    return _PAD + (v + FOREST_RANGE) / (2 * FOREST_RANGE) * (_W - 2 * _PAD)


def forest_svg(point: float, low: float, high: float, verdict: str) -> str:
    """A one-row forest plot (inline SVG): dashed lines at ±1 (δ), solid at 0, the interval and the point."""
    color = {"supported": "#1a7f37", "contradicted": "#b42318"}.get(verdict, "#8a5a00")
    parts = [f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img" '
             f'aria-label="improvement {point:.2f} delta, interval {low:.2f} to {high:.2f}">']
    for v, dash in ((-1, "3,2"), (1, "3,2"), (0, "")):
        x = _x(v)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="2" y2="{_H - 2}" stroke="#a0a8b4"{extra}/>')
    y = _H / 2
    parts.append(f'<line x1="{_x(low):.1f}" x2="{_x(high):.1f}" y1="{y}" y2="{y}" stroke="{color}" '
                 'stroke-width="2"/>')
    for v, side in ((low, -1), (high, 1)):
        if abs(v) > FOREST_RANGE:  # clipped: an arrow head at the edge
            x = _x(v)
            parts.append(f'<path d="M{x:.1f},{y} l{-4 * side},-4 v8 z" fill="{color}"/>')
    parts.append(f'<circle cx="{_x(point):.1f}" cy="{y}" r="3.5" fill="{color}"/>')
    parts.append("</svg>")
    return "".join(parts)


def claim_rows(notebooks: list[dict]) -> list[ClaimRow]:
    """Rows of the Claims page from the report's discovered notebooks (the run each set shows)."""
    rows = []
    for nb in notebooks:
        for s in nb["sets"]:
            run = s["last_good"] or s["latest"]
            if run.problem or not run.claim:
                continue
            claim = run.claim
            for raw in claim.get("parts", []):
                try:
                    part = Part(**raw)
                except TypeError as e:
                    run.warnings.append(f"claims.json: a part could not be read ({e})")
                    continue
                row = ClaimRow(notebook=nb["name"], param_set=s["name"], anchor=s["anchor"], title=nb["title"],
                               label=str(claim.get("label", "")), part=part,
                               papers=[str(k) for k in (part.papers or claim.get("papers", []))])
                if part.direction == "check":
                    row.effect_text = part.method.removeprefix("exhaustive check: ")
                else:
                    row.effect_text = fmt_interval(part.effect, part.ci_low, part.ci_high)
                    imp, lo, hi = part.improvement
                    d = part.smallest_effect
                    if d > 0 and all(math.isfinite(v) for v in (imp, lo, hi)):
                        row.scaled = (imp / d, lo / d, hi / d)
                        row.svg = forest_svg(*row.scaled, part.verdict)
                rows.append(row)
    return rows


@dataclass
class ReferenceRow:
    key: str
    entry: dict
    url: str | None
    cited_by: list[tuple[str, str]] = field(default_factory=list)  # (notebook title, anchor)


def reference_rows(notebooks: list[dict]) -> list[ReferenceRow]:
    """Every entry of references.yaml, with the notebooks whose claims or Findings cite it."""
    cited: dict[str, list[tuple[str, str]]] = {}
    for nb in notebooks:
        for s in nb["sets"]:
            run = s["last_good"] or s["latest"]
            if run.problem:
                continue
            keys = set((run.claim or {}).get("papers", []))
            for part in (run.claim or {}).get("parts", []):
                keys.update(part.get("papers", []) if isinstance(part, dict) else [])
            keys.update(cited_keys(run.meta.get("title", "") + " " + run.meta.get("claim", "")))
            for key in keys:
                entry = (nb["title"], s["anchor"])
                if entry not in cited.setdefault(key, []):
                    cited[key].append(entry)
    return [ReferenceRow(key, entry, entry_url(entry), cited.get(key, []))
            for key, entry in sorted(references().items())]


__all__ = ["ClaimRow", "ReferenceRow", "claim_rows", "forest_svg", "reference_rows"]
