"""What the vit-* notebooks share: the bench built from their parameters, entries from the scorer list, the
per-image series a claim part is judged on, the text that says which setting and reader a verdict is about, and the
reader-curve figure.

Every part of every vit-* claim is a paired comparison over test images of the deciding reader's true-class
probability (:func:`per_image`), judged by :mod:`salience.evidence`; random entries are averaged over their
replicates per image first.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from .. import evidence
from ..scorers.spec import build_scorers
from ..vision_eval import SETTING_TEXT, Entry, ReaderSettings, VisionBench, drop_entries, per_image_metric, summary
from ..vision_readers import READER_TEXT, READERS
from ..vision_tasks import Reduction
from . import params_class
from .vision_params import VisionParams

#: the metric every vit-* claim part reads, per test image
METRIC = "true-class probability"
WHY_READER = (
    "The attention-pooling reader decides because it reads a kept set the way the papers' language model does: "
    "trained once on unpruned tokens, applied training-free, with attention renormalised over what is kept (so a "
    "selective set is not penalised for moving the patch mean); the retrained probe measures what the kept set "
    "still carries when the reader may adapt to it, the [CLS] probe what reaches [CLS].")


class MergeSpec(BaseModel):
    """A merging entry of a notebook: ``method`` (``tome``: bipartite merging; ``visionzip``: dominant tokens by the
    scorer labelled ``dominant``, the rest merged into contextual tokens) and its ``label`` in tables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["tome", "visionzip"] = Field(description="tome or visionzip")
    label: str = Field(min_length=1, description="the entry's name in tables")
    dominant: str | None = Field(default=None, description="visionzip: label of the scorer that picks the "
                                                           "dominant tokens")


def check_merges(merges: list[MergeSpec], params_scorers) -> list[MergeSpec]:
    labels = [s.key for s in params_scorers]
    for m in merges:
        if m.method == "visionzip" and m.dominant not in labels:
            raise ValueError(f"merge {m.label!r}: visionzip needs `dominant`, one of the scorer labels {labels}")
        if m.method == "tome" and m.dominant is not None:
            raise ValueError(f"merge {m.label!r}: tome merges by key similarity and takes no `dominant` scorer")
        if m.label in labels:
            raise ValueError(f"merge label {m.label!r} is already a scorer label")
    return merges


def entries(params: VisionParams, merges: Sequence[MergeSpec] = ()) -> list[Entry]:
    """Drop entries for every scorer in ``params.scorers`` (in order), then the merging entries."""
    scorers = build_scorers(params.scorers)
    merged = [Entry(m.label, m.method, None if m.method == "tome" else scorers[m.dominant]) for m in merges]
    return drop_entries(scorers) + merged


def photo_reductions(params: VisionParams, labels: Sequence[str], keep: float, merges: Sequence[MergeSpec] = (),
                     **merge_options) -> dict:
    """``{label: Reduction}`` for the kept-token overlays: the scorers and merges named in ``labels``."""
    scorers = build_scorers(params.scorers)
    by_label = {m.label: m for m in merges}
    out = {}
    for label in labels:
        if label in scorers:
            out[label] = Reduction(scorers[label], keep)
        else:
            m = by_label[label]
            out[label] = Reduction(None if m.method == "tome" else scorers[m.dominant], keep, m.method,
                                   merge_options)
    return out


#: the notebooks that share one cached encoder pass per image set
VIT_NOTEBOOKS = ("vit-cls-attention", "vit-multilayer-flow", "vit-diversity", "vit-merging", "vit-leaderboard")
#: the parameters that decide the image sets and the encoder (siblings with the same values share the cache)
SHARED = ("model", "dataset", "image_size", "n_train", "n_test", "seed")


def in_encoder_plan(params) -> tuple[list[Entry], list[int]]:
    """The entries a notebook runs inside the encoder and the layer(s) it cuts at (none for after-encoder-only
    notebooks): ``in_encoder_entries`` when the parameters name them, else every entry."""
    if not hasattr(params, "in_encoder_layer"):
        return [], []
    merges = getattr(params, "merges", ())
    chosen = getattr(params, "in_encoder_entries", None)
    return [e for e in entries(params, merges) if chosen is None or e.label in chosen], [params.in_encoder_layer]


def sibling_requests(params: VisionParams) -> list[tuple[list[Entry], list[int]]]:
    """``(entries, in-encoder layers)`` of the other vit-* notebooks' default sets on the same images and model:
    computed in the same encoder pass when this notebook misses the cache, so the first notebook pays once."""
    groups = []
    for name in VIT_NOTEBOOKS:
        if name == params.notebook:
            continue
        other = params_class(name).defaults()
        if any(getattr(other, key) != getattr(params, key) for key in SHARED):
            continue
        groups.append((entries(other, getattr(other, "merges", ())), []))
        groups.append(in_encoder_plan(other))
    return groups


def load_bench(model, params: VisionParams, all_entries: Sequence[Entry]) -> VisionBench:
    """The prepared bench: cached activations loaded (or computed once, with the sibling notebooks' requests),
    readers trained (or loaded). In-encoder entries and layers follow :func:`in_encoder_plan`."""
    bench = VisionBench(model, dataset=params.dataset, image_size=params.image_size, n_train=params.n_train,
                        n_test=params.n_test, seed=params.seed, batch_size=params.batch_size,
                        readers=ReaderSettings(**params.reader.model_dump()))
    inside, layers = in_encoder_plan(params)
    bench.prepare(all_entries, in_encoder_layers=layers, in_encoder_entries=inside,
                  replicates=params.random_replicates, prefetch=sibling_requests(params))
    bench.train_readers()
    return bench


def per_image(table: pd.DataFrame, reader: str, entry: str, *, setting: str = "after_encoder",
              keeps: Sequence[float] | None = None) -> pd.Series:
    """``reader``'s true-class probability per test image for ``entry`` (replicates and ``keeps`` averaged)."""
    if entry == "unpruned":
        setting = None
    return per_image_metric(table, reader=reader, entry=entry, setting=setting, keeps=keeps)


#: a part's two arms under one reader: ``reader -> (a, b)``, per-image Series indexed by test image
Arms = Callable[[str], tuple[pd.Series, pd.Series]]


def judge_parts(table: pd.DataFrame, params, arms: dict[str, tuple[evidence.PartSpec, Arms, str]], *,
                in_encoder: Collection[str] = ()) -> tuple[list[evidence.Part], list[str]]:
    """Judge every part on the deciding reader; judge it again under the other readers for the notes (reported,
    not in the label), so a verdict never shows only the reader that agrees with the paper. Parts not listed in
    ``in_encoder`` are after-encoder comparisons: the [CLS] probe is left out of their notes, [CLS] being unchanged
    there by construction (a note says so).

    ``arms``: ``{part id: (spec, reader -> (a, b), detail)}``. Returns ``(parts, notes)``.
    """
    present = [r for r in READERS if r in set(table.reader)]
    parts, notes = [], []
    for pid, (spec, arm, detail) in arms.items():
        rule = params.parts[pid]
        parts.append(evidence.judge(spec, rule, *arm(params.decide_reader), seed=params.seed, detail=detail))
        others = []
        for reader in present:
            if reader == params.decide_reader or (reader == "cls_probe" and pid not in in_encoder):
                continue
            p = evidence.judge(spec, rule, *arm(reader), seed=params.seed)
            others.append(f"{reader} {evidence.fmt_interval(p.effect, p.ci_low, p.ci_high)} ({p.verdict})")
        if others:
            notes.append(f"{pid} under the other readers (not in the label): " + "; ".join(others) + ".")
    if any(pid not in in_encoder for pid in arms):
        notes.append("After-encoder reduction leaves [CLS] unchanged (the encoder ran on every token), so the [CLS] "
                     "probe gives every such reduction the unpruned value: its differences are zero by construction.")
    return parts, notes


def keeps_text(keeps: Sequence[float]) -> str:
    """``25%, 10%, 5%``: kept shares as percentages (one decimal only where needed)."""
    return ", ".join(f"{100 * k:.3g}%" for k in keeps)


def setting_text(params: VisionParams, bench: VisionBench, settings: Sequence[str]) -> str:
    """How this run differs from the papers': model, data, where the reduction happens, the readers."""
    test = bench.sets["test"]
    patches = test.grid[0] * test.grid[1]
    where = "; ".join(SETTING_TEXT[s] for s in settings)
    return (f"Encoder {params.model} ({bench.depth} blocks, frozen) on {params.dataset} digits at "
            f"{params.image_size} px "
            f"({patches} patches + [CLS]), CPU; no language model: a reader stands in for it. Where the reduction "
            f"happens: {where}. Readers, trained on {len(bench.sets['train'])} train images: "
            + "; ".join(f"{r} = {READER_TEXT[r]}" for r in READERS)
            + f". The verdict uses the {params.decide_reader} reader's per-image true-class probability on "
              f"{len(test)} test images (each part's unit)."
            + (f" {WHY_READER}" if params.decide_reader == "attention_pool" else ""))


def reader_curves(table: pd.DataFrame, *, setting: str, entries_shown: Sequence[str] | None = None,
                  title: str | None = None):
    """Mean true-class probability (top) and accuracy (bottom) vs kept share, one column per reader; the unpruned
    value dashed. ``table``: per-image rows of one bench (with the ``unpruned`` rows)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    s = summary(table)
    ref = s[s.entry == "unpruned"].set_index("reader")
    data = s[s.setting == setting]
    if entries_shown is not None:
        data = data[data.entry.isin(entries_shown)]
    readers = [r for r in READERS if r in set(data.reader)]
    fig, axes = plt.subplots(2, len(readers), figsize=(3.6 * len(readers), 5.8), squeeze=False, sharex=True)
    for j, reader in enumerate(readers):
        d = data[data.reader == reader]
        for i, (metric, label) in enumerate((("p_true", "true-class probability"), ("accuracy", "accuracy"))):
            ax = axes[i, j]
            sns.lineplot(d, x="keep", y=metric, hue="entry", marker="o", ax=ax,
                         legend=(i == 0 and j == len(readers) - 1))
            if reader in ref.index:
                ax.axhline(float(ref.loc[reader, metric]), color="grey", ls="--", lw=1)
            ax.set_xscale("log")
            ax.set(xlabel="kept share of patches", ylabel=label if j == 0 else "", title=reader if i == 0 else "")
    if axes[0, -1].get_legend() is not None:
        sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1, 1), frameon=False, title=None)
    fig.suptitle(title or SETTING_TEXT[setting], fontsize=10)
    fig.tight_layout()
    return fig


def counts(table: pd.DataFrame) -> pd.DataFrame:
    """The harness's proof per configuration: patch tokens the reader sees, test images, replicates (nbval checks
    these: they are counts, stable on every machine)."""
    keys = ["setting", "layer", "entry", "method", "keep", "tokens"]
    out = table.groupby(keys, sort=False).agg(images=("image", "nunique"), replicates=("replicate", "nunique"))
    return out.reset_index()


__all__ = ["METRIC", "SHARED", "VIT_NOTEBOOKS", "WHY_READER", "Arms", "MergeSpec", "check_merges", "counts",
           "entries", "in_encoder_plan", "judge_parts", "keeps_text", "load_bench", "per_image", "photo_reductions",
           "reader_curves", "setting_text", "sibling_requests"]
