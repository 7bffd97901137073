"""Metrics with metadata (ferret's idea): each knows its direction, best value and family, so tables sort themselves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str
    lower_is_better: bool
    best_value: float | None
    family: str
    description: str = ""


LOG_PERPLEXITY_AUC = Metric(
    "log_ppl_auc", True, None, "eviction", "area under log-perplexity vs kept-budget ratio (trapezoid, ratio on x)"
)


def sort_by_metric(df, metric: Metric, column: str | None = None):
    """Rows best first by ``metric`` (column defaults to the metric's name)."""
    col = column or metric.name
    return df.sort_values(col, ascending=metric.lower_is_better, kind="stable")


def area_under_curve(x, y) -> float:
    """Trapezoid area of ``y`` over ``x`` (sorted by ``x``), normalised by the x-range so curves of different spans
    compare as mean heights."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    if x.size < 2 or x[-1] == x[0]:
        raise ValueError("an area needs at least two distinct x values")
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))
