"""Notebook ``vit-leaderboard``: every visual-token scorer (and the two merging methods) × kept share, in both
settings, ranked by a per-image area under the reader-score vs kept-share curve.

Each entry's curve per test image is the deciding reader's true-class probability at every kept share, closed by the
unpruned value at keep 1; its area (trapezoid, divided by the span, so it is a mean height in probability units) is
one number per image, so entries are compared paired over images. After-encoder entries (the VLM setting) reduce the
encoder's output tokens; in-encoder entries reduce after block l and run the later blocks on fewer tokens (EViT / ToMe
setting). Entries: every registered scorer that reads a vision view (KV-only rules that need a causal query stream or
text roles are left out), ToMe [@tome] and VisionZip [@visionzip].
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from .. import evidence
from ..vision_readers import READERS
from .vision_params import KeepRatios, VisionParams, check_labels
from .vit_common import MergeSpec, check_merges, judge_parts, keeps_text, setting_text

TITLE = "Visual-token leaderboard: every scorer × kept share, after and inside the encoder"
PAPERS = ["fastervlm", "vtc_cls", "hiprune", "flowcut", "todre", "dart", "divprune", "gprune", "visionzip", "tome",
          "attention_flow", "lexrank", "h2o", "zipcache", "feather"]
CLAIM = (
    "Attention-derived visual-token scorers find the patches a reader needs better than chance — [CLS]-attention "
    "dropping beats random selection — while random selection is as strong as the best entry (DART's observation)."
)
AREA = "area under true-class probability vs kept share (mean height, closed at keep 1)"
ATTENTION_BEATS_RANDOM = evidence.PartSpec(
    id="attention_beats_random", statement="[CLS]-attention dropping has a larger area than random selection "
                                           "(after the encoder)", metric=AREA, unit="image", papers=("fastervlm",))
RANDOM_STRONG = evidence.PartSpec(
    id="random_as_strong", statement="random selection's area is within ±δ of the best entry's (after the encoder)",
    metric=AREA, unit="image", papers=("dart",))
JUDGED = (ATTENTION_BEATS_RANDOM, RANDOM_STRONG)
#: registered scorers that need a causal token stream or text roles: not visual-token rules
KV_ONLY = ("caote", "forgetting_attention", "keyformer", "normalized_attention_probe", "recency", "sepllm", "snapkv",
           "tova", "vatp")


class Params(VisionParams):
    """Parameters of ``vit-leaderboard``; the defaults live in ``params/vit-leaderboard.yaml``."""

    notebook = "vit-leaderboard"
    judged = JUDGED

    merges: list[MergeSpec] = Field(description="merging entries: {method: tome | visionzip, label, dominant}")
    in_encoder_layer: int = Field(ge=1, description="in-encoder entries reduce after this block")
    in_encoder_keeps: KeepRatios = Field(description="in-encoder kept shares (< 1)")
    in_encoder_entries: list[str] = Field(min_length=1, description="labels also run inside the encoder (scorers "
                                                                    "or merges; random must be among them)")
    attention_entry: str = Field(description="label of the attention-based entry judged against random")
    random: str = Field(description="label of the random scorer")
    attention_based: list[str] = Field(description="labels of the entries whose rule reads attention (the board "
                                                   "groups them)")

    @field_validator("keeps", "in_encoder_keeps")
    @classmethod
    def _below_one(cls, keeps):
        if any(k >= 1 for k in keeps):
            raise ValueError(f"every kept share must be < 1 (keep 1 is the unpruned closure of each curve), got {keeps}")
        return keeps

    @model_validator(mode="after")
    def _roles(self) -> "Params":
        kv_only = [s.key for s in self.scorers if s.name in KV_ONLY]
        if kv_only:
            raise ValueError(f"scorers {kv_only} need a causal query stream or text roles, not a vision view")
        check_merges(self.merges, self.scorers)
        check_labels([self.attention_entry, self.random, *self.attention_based], self.scorers,
                     "attention_entry / random / attention_based")
        known = [s.key for s in self.scorers] + [m.label for m in self.merges]
        unknown = [e for e in self.in_encoder_entries if e not in known]
        if unknown or self.random not in self.in_encoder_entries:
            raise ValueError(f"in_encoder_entries {self.in_encoder_entries} must name known entries ({known}) and "
                             f"include the random baseline {self.random!r}")
        return self


def area_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per test image (rows) and (reader, setting, entry) (columns): the trapezoid area under the reader's
    true-class probability vs kept share (replicates averaged), closed by the unpruned value at keep 1, divided by
    the span ``1 − min keep`` (a mean height). Computed once per table; every board and part reads it."""
    unpruned = table[table.entry == "unpruned"].groupby(["reader", "image"]).p_true.mean()
    means = table[table.entry != "unpruned"].groupby(["reader", "setting", "entry", "keep", "image"]).p_true.mean()
    columns = {}
    for (reader, setting, entry), s in means.groupby(level=["reader", "setting", "entry"], sort=False):
        wide = s.droplevel(["reader", "setting", "entry"]).unstack("keep")
        wide[1.0] = unpruned.loc[reader]
        wide = wide.sort_index(axis=1)
        if wide.isna().any().any():
            raise ValueError(f"entry {entry!r} ({setting}) needs values at every kept share for every image")
        keeps = wide.columns.to_numpy(dtype=float)
        columns[(reader, setting, entry)] = np.trapezoid(wide.to_numpy(), keeps, axis=1) / (keeps[-1] - keeps[0])
    return pd.DataFrame(columns, index=unpruned.index.get_level_values("image").unique().sort_values())


def per_image_area(areas: pd.DataFrame, reader: str, entry: str, setting: str) -> pd.Series:
    """One entry's per-image areas from :func:`area_table` (a one-line error naming what is missing)."""
    if (reader, setting, entry) not in areas.columns:
        raise ValueError(f"no area for entry {entry!r} ({setting}) under {reader}: it needs values at every kept "
                         "share and the unpruned closure")
    return areas[(reader, setting, entry)].rename(entry)


def group_of(entry: str, method: str, params: Params) -> str:
    if method != "drop":
        return "merging"
    if entry == params.random:
        return "random"
    return "attention" if entry in params.attention_based else "attention-free"


def board(table: pd.DataFrame, params: Params, areas: pd.DataFrame) -> pd.DataFrame:
    """The ranked board per setting: mean area under every reader, rank under the deciding reader, and the deciding
    reader's paired difference to random with its 95% bootstrap interval. ``areas``: :func:`area_table` of
    ``table``."""
    rows = []
    readers = [r for r in READERS if r in set(table.reader)]
    entries = table[table.entry != "unpruned"][["setting", "entry", "method"]].drop_duplicates()
    for setting, group in entries.groupby("setting", sort=False):
        rand = per_image_area(areas, params.decide_reader, params.random, setting)
        for e in group.itertuples():
            by_reader = {r: per_image_area(areas, r, e.entry, setting) for r in readers}
            diff = (by_reader[params.decide_reader] - rand).to_numpy()
            lo, hi, _ = evidence.paired_interval(diff, seed=params.seed)
            rows.append(dict(setting=setting, entry=e.entry, method=e.method, group=group_of(e.entry, e.method, params),
                             **{f"area {r}": float(a.mean()) for r, a in by_reader.items()},
                             vs_random=float(diff.mean()), vs_random_low=lo, vs_random_high=hi))
    out = pd.DataFrame(rows)
    key = f"area {params.decide_reader}"
    out["rank"] = out.groupby("setting")[key].rank(ascending=False, method="min").astype(int)
    return out.sort_values(["setting", "rank"], kind="stable").reset_index(drop=True)


def best_entry(areas: pd.DataFrame, params: Params, reader: str, setting: str = "after_encoder") -> str:
    """The entry with the largest mean area under ``reader`` (random excluded). The claim passes the *train*
    images' areas (:func:`area_table` of ``bench.train_table()``): the best entry is chosen there and judged on the
    test images, so the choice does not inflate its arm."""
    means = {entry: areas[(r, s, entry)].mean() for r, s, entry in areas.columns
             if r == reader and s == setting and entry != params.random}
    return max(means, key=means.get)


def plot_board(b: pd.DataFrame, params: Params):
    """Mean area per entry (deciding reader) with the interval of its difference to random, one panel per setting."""
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(b.setting))
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 0.28 * b.groupby("setting").size().max()
                                                        + 1.6), squeeze=False)
    colours = {"attention": "tab:blue", "attention-free": "tab:green", "merging": "tab:purple", "random": "tab:red"}
    key = f"area {params.decide_reader}"
    for ax, setting in zip(axes[0], settings):
        d = b[b.setting == setting].iloc[::-1]
        y = np.arange(len(d))
        rand = float(d[d.entry == params.random][key].iloc[0])
        ax.barh(y, d[key], color=[colours[g] for g in d.group], alpha=0.8)
        ax.errorbar(rand + d.vs_random, y, xerr=[d.vs_random - d.vs_random_low, d.vs_random_high - d.vs_random],
                    fmt="none", ecolor="black", lw=1)
        ax.axvline(rand, color="tab:red", ls="--", lw=1)
        ax.set(yticks=y, yticklabels=d.entry, xlabel=f"area: mean true-class probability ({params.decide_reader})",
               title=setting)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.8) for c in colours.values()]
    fig.legend(handles, list(colours), loc="lower center", ncol=4, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def judge_claim(table: pd.DataFrame, params: Params, bench, areas: pd.DataFrame) -> evidence.Claim:
    """[CLS]-attention dropping vs random (better) and random vs the best entry (equivalence), on per-image areas
    after the encoder (``areas``: :func:`area_table` of ``table``); the best entry is chosen per reader on the train
    images (``bench.train_table()``) and judged on the test images. The label follows
    :func:`salience.evidence.overall_label`."""
    train = bench.train_table()
    train_areas = area_table(train[train.setting != "in_encoder"])
    n_train = train.image.nunique()

    def attention_vs_random(reader):
        return (per_image_area(areas, reader, params.attention_entry, "after_encoder"),
                per_image_area(areas, reader, params.random, "after_encoder"))

    def random_vs_best(reader):
        return (per_image_area(areas, reader, params.random, "after_encoder"),
                per_image_area(areas, reader, best_entry(train_areas, params, reader), "after_encoder"))

    best = best_entry(train_areas, params, params.decide_reader)
    test_best = best_entry(areas, params, params.decide_reader)
    curve = f"curves over {keeps_text(params.keeps)} and 100% (unpruned)"
    arms = {
        ATTENTION_BEATS_RANDOM.id: (ATTENTION_BEATS_RANDOM, attention_vs_random,
                                    f"a: {params.attention_entry}; b: {params.random} averaged over "
                                    f"{params.random_replicates} seeds per image; {curve}"),
        RANDOM_STRONG.id: (RANDOM_STRONG, random_vs_best,
                           f"a: {params.random}; b: {best}, the entry with the largest mean area on the {n_train} "
                           f"train images under {params.decide_reader} (chosen there, judged on the test images); "
                           f"{curve}"),
    }
    parts, notes = judge_parts(table, params, arms)
    notes.append(f"{RANDOM_STRONG.id}: the best entry is chosen on the train images (the same reductions of the train "
                 "digits, read by the same reader; the retrained probe's train values are in-sample) and judged on "
                 "the test images, so choosing it does not inflate its arm"
                 + (f"; on the test images the best would have been {test_best}." if test_best != best else
                    "; it is also the best on the test images."))
    notes.append(f"The in-encoder board ({', '.join(params.in_encoder_entries)} after block "
                 f"{params.in_encoder_layer}, at {keeps_text(params.in_encoder_keeps)}) is reported, not judged.")
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting_text(params, bench, ["after_encoder", "in_encoder"]), notes=notes,
                          seed=params.seed)
