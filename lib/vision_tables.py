"""Tables of per-image reader outputs (:mod:`salience.vision_eval`): summaries per configuration and reader, one
value per test image for a claim part, and a wide view with one column per reader.

Rows of a per-image table: setting, layer, entry, method, keep, tokens, replicate, image, label, reader, p_true,
correct, flops_ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .vision_readers import READERS

def summary(per_image: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and reader: mean p_true, accuracy, images; replicates averaged (their spread is kept as
    ``replicate_sd`` of the accuracy)."""
    keys = ["setting", "layer", "entry", "method", "keep", "tokens", "reader"]
    per_rep = per_image.groupby(keys + ["replicate"], sort=False).agg(
        p_true=("p_true", "mean"), accuracy=("correct", "mean"), n_images=("image", "nunique"),
        flops_ratio=("flops_ratio", "first")).reset_index()
    out = per_rep.groupby(keys, sort=False).agg(
        p_true=("p_true", "mean"), accuracy=("accuracy", "mean"), replicate_sd=("accuracy", "std"),
        replicates=("replicate", "nunique"), n_images=("n_images", "first"),
        flops_ratio=("flops_ratio", "first")).reset_index()
    out["replicate_sd"] = out.replicate_sd.fillna(0.0)
    return out


def per_image_metric(per_image: pd.DataFrame, *, reader: str, entry: str, setting: str | None = None,
                     keeps: Sequence[float] | None = None, metric: str = "p_true") -> pd.Series:
    """One value per test image for ``entry`` under ``reader``: the metric averaged over the replicates and over
    ``keeps`` (all of the entry's kept shares when None). Indexed by image: the unit claims are paired over."""
    t = per_image[(per_image.reader == reader) & (per_image.entry == entry)]
    if setting is not None:
        t = t[t.setting == setting]
    if keeps is not None:
        t = t[np.isclose(t.keep.to_numpy()[:, None], np.asarray(keeps, dtype=float)[None, :]).any(axis=1)]
    if t.empty:
        raise ValueError(f"no rows for entry {entry!r} under reader {reader!r}"
                         + (f" in setting {setting!r}" if setting else "") + (f" at keeps {list(keeps)}" if keeps
                                                                               else ""))
    return t.groupby("image")[metric].mean().rename(entry)


def reader_wide(summary_table: pd.DataFrame, value: str = "p_true") -> pd.DataFrame:
    """Summary pivoted to one column per reader (``<value> <reader>``), rows per configuration."""
    keys = ["setting", "layer", "entry", "method", "keep", "tokens"]
    wide = summary_table.pivot_table(index=keys, columns="reader", values=value, sort=False)
    wide.columns = [f"{value} {r}" for r in wide.columns]
    order = [f"{value} {r}" for r in READERS if f"{value} {r}" in wide.columns]
    return wide[order].reset_index()


__all__ = ["per_image_metric", "reader_wide", "summary"]
