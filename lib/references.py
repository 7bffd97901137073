"""The papers the workbook cites, by key: ``references.yaml`` at the repository root is the one list.

Text cites a paper as ``[@key]`` (pandoc's syntax), in docstrings, notebooks, Findings, ``claims.json`` (``papers``)
and the report, which links every key to its entry. An unknown key is an error (:func:`check_keys`; a test scans the
repository).

Each entry: ``title``, ``authors`` (first author, "et al." where there are more), ``year``, and where known
``venue``, ``arxiv`` (the identifier) and ``url``; ``claim`` says in our words what the workbook tests of it.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from .paths import REPO_ROOT

REFERENCES_FILE = REPO_ROOT / "references.yaml"
#: ``[@key]`` or ``[@key1; @key2]``; keys are lower-case letters, digits and underscores
CITATION = re.compile(r"\[@([a-z0-9_]+(?:\s*;\s*@[a-z0-9_]+)*)\]")
REQUIRED_FIELDS = ("title", "authors", "year")


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> dict[str, dict]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a mapping of keys to entries")
    for key, entry in data.items():
        missing = [f for f in REQUIRED_FIELDS if not (isinstance(entry, dict) and entry.get(f))]
        if missing:
            raise ValueError(f"{path.name}: entry {key!r} lacks {', '.join(missing)}")
    return data


def references(path: Path | None = None) -> dict[str, dict]:
    """``{key: entry}`` from ``references.yaml``."""
    return dict(_load(Path(path or REFERENCES_FILE)))


def cited_keys(text: str) -> list[str]:
    """Every key cited as ``[@key]`` in ``text``, in order (repeats kept)."""
    return [k.strip().lstrip("@") for group in CITATION.findall(text) for k in group.split(";")]


def check_keys(keys: Iterable[str], path: Path | None = None) -> None:
    """Raise ValueError naming every key that ``references.yaml`` does not define."""
    known = references(path)
    unknown = sorted({k for k in keys if k not in known})
    if unknown:
        raise ValueError(f"unknown reference key(s) {unknown}; define them in references.yaml")


def entry_url(entry: dict) -> str | None:
    if entry.get("url"):
        return str(entry["url"])
    if entry.get("arxiv"):
        return f"https://arxiv.org/abs/{entry['arxiv']}"
    return None


def cite_html(text: str, href: str = "references.html", path: Path | None = None) -> str:
    """Replace ``[@key]`` in already-escaped HTML by links to ``href#key`` (unknown keys stay as they are, marked)."""
    known = references(path)

    def one(key: str) -> str:
        if key not in known:
            return f'<span class="bad-ref">@{html.escape(key)}</span>'
        e = known[key]
        first = str(e["authors"]).split(",")[0].split(" et al")[0].split(" and ")[0].strip()
        label = f"{first.split()[-1] if first else key} {e['year']}"
        return f'<a class="ref" href="{href}#{key}" title="{html.escape(str(e["title"]))}">{html.escape(label)}</a>'

    return CITATION.sub(lambda m: "[" + "; ".join(one(k.strip().lstrip("@")) for k in m.group(1).split(";")) + "]",
                        text)


__all__ = ["CITATION", "REFERENCES_FILE", "check_keys", "cite_html", "cited_keys", "entry_url", "references"]
