"""Checks every notebook's parameters share, vision and KV alike."""

from __future__ import annotations

from collections.abc import Iterable

from ..scorers.spec import ScorerList


def check_labels(names: Iterable[str], scorers: ScorerList, what: str) -> None:
    """Every name must be the label of one of ``scorers`` (a role a notebook gives to one of its entries)."""
    labels = [s.key for s in scorers]
    missing = [n for n in names if n not in labels]
    if missing:
        raise ValueError(f"{what} {missing} must be labels in `scorers` (labels: {', '.join(labels)})")


__all__ = ["check_labels"]
