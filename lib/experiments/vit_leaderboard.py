"""Notebook ``vit-leaderboard``: every visual-token scorer × kept share × pruning layer, ranked by one number.

On a frozen ViT (embedded DINOv2-S) with a linear probe trained once on unpruned MNIST features, every registered
scorer that runs on a vision view drops patches after block l ([CLS] always kept), and the two merging methods (ToMe,
VisionZip) reduce to the same token counts. Each (entry, layer) gives a curve of probe accuracy vs kept share; its
area (the mean height over ``[min keep, 1]``, closed with the unpruned accuracy at keep 1) ranks the entries. The
spread of an area is propagated from the binomial standard errors of its points; ranks are also computed per layer
so a scorer that wins only at one depth shows it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from ..metrics import Metric, area_under_curve, sort_by_metric
from ..params import ModelName, NotebookParams
from ..scorers import get_scorer
from .vision_params import ImageSize

TITLE = "Visual-token leaderboard: every scorer × kept share × layer on DINOv2-S (s148, s7, s13, s23, s4, s112, s268, s242, s1)"
CLAIM = (
    "Attention-derived visual-token scorers find the patches a ViT needs better than chance: the best attention-based "
    "scorer's accuracy-vs-kept-share area beats random selection's by more than two standard errors at every pruning "
    "layer, while random stays a strong baseline (within 10% of the best area), as DART (s112) and UniPruneBench report."
)

#: leaderboard label → (method, registered scorer or None, scorer parameters). Drop entries cover every registered
#: scorer that reads a vision view; KV-only rules (sepllm needs separators, tova/snapkv/keyformer/caote read a causal
#: query stream) are left out on purpose, see ``KV_ONLY``.
ENTRIES: dict[str, tuple[str, str | None, dict]] = {
    "random": ("drop", "random", {}),
    "spatial_grid": ("drop", "spatial_grid", {}),
    "cls_attention": ("drop", "cls_attention", {"layer": -1}),
    "cls_attention_penultimate": ("drop", "cls_attention", {"layer": -2}),
    "multilayer_cls_attention": ("drop", "multilayer_cls_attention", {}),
    "attention_rollout": ("drop", "attention_rollout", {}),
    "flowcut": ("drop", "flowcut", {}),
    "hiprune": ("drop", "hiprune", {}),
    "accumulated_attention": ("drop", "accumulated_attention", {}),
    "normalized_attention": ("drop", "normalized_attention", {}),
    "attention_pagerank": ("drop", "attention_pagerank", {}),
    "key_norm": ("drop", "key_norm", {}),
    "divprune": ("drop", "divprune", {}),
    "dart": ("drop", "dart", {}),
    "todre": ("drop", "todre", {}),
    "graph_propagation": ("drop", "graph_propagation", {}),
    "tome": ("tome", None, {}),
    "visionzip": ("visionzip", "cls_attention", {"layer": -1}),
}
#: registered scorers that need a causal token stream or text roles, so they are not visual-token rules
KV_ONLY = ("caote", "forgetting_attention", "keyformer", "normalized_attention_probe", "recency", "sepllm", "snapkv",
           "tova", "vatp")
#: dropping entries whose rule reads attention (the claim's "attention-based" group); VisionZip also reads [CLS]
#: attention but merges what it does not keep, so it is compared with dropping in ``vit-merging``, not here
ATTENTION_BASED = ("cls_attention", "cls_attention_penultimate", "multilayer_cls_attention", "attention_rollout",
                   "flowcut", "hiprune", "accumulated_attention", "normalized_attention", "attention_pagerank")
ACCURACY_AUC = Metric("accuracy_auc", False, 1.0, "vision pruning",
                      "area under probe accuracy vs kept share of patches (trapezoid, mean height, closed at keep 1)")


class Params(NotebookParams):
    """Parameters of ``vit-leaderboard`` (defaults: the CPU run, about two minutes on 2 idle cores)."""

    notebook = "vit-leaderboard"

    model: ModelName = Field("dinov2-s", description="embedded ViT name, local folder or Hugging Face id")
    dataset: Literal["mnist", "digits"] = Field("mnist", description="mnist (28x28) or digits (sklearn 8x8)")
    image_size: ImageSize = Field(112, description="input resolution, a multiple of the patch size 14")
    n_train: int = Field(200, ge=20, le=4000, description="train images for the probe (unpruned features)")
    n_test: int = Field(100, ge=20, le=1000, description="test images (reduced features)")
    layers: list[int] = Field([4, 8], min_length=1, description="prune after these blocks (2..depth-1)")
    keeps: list[float] = Field([0.5, 0.25, 0.1, 0.05], min_length=2, description="kept shares of patches, in (0, 1)")
    entries: list[str] = Field(list(ENTRIES), min_length=1, description="leaderboard entries (see ENTRIES)")
    batch_size: int = Field(60, ge=1, le=4096, description="images per forward pass")
    probe_c: float = Field(1.0, gt=0, le=1e6, description="inverse L2 strength of the logistic-regression probe")
    random_margin: float = Field(0.1, gt=0, lt=1, description="random counts as strong within this share of the best")

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[int]) -> list[int]:
        if any(layer < 2 for layer in layers):
            raise ValueError(f"every layer must be >= 2 (the penultimate-layer entries read layer l-1), got {layers}")
        return sorted(set(layers))

    @field_validator("keeps")
    @classmethod
    def _keeps(cls, keeps: list[float]) -> list[float]:
        bad = [k for k in keeps if not 0.0 < k < 1.0]
        if bad:
            raise ValueError(f"every keep must be a ratio in (0, 1) (keep 1 is the unpruned row), got {bad}")
        if len(set(keeps)) < 2:
            raise ValueError("an area needs at least two distinct kept shares")
        return sorted(set(keeps), reverse=True)

    @field_validator("entries")
    @classmethod
    def _entries(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in ENTRIES]
        if unknown:
            raise ValueError(f"unknown entries {unknown}; choices: {', '.join(ENTRIES)}")
        if "random" not in names:
            raise ValueError("the leaderboard needs the 'random' entry: it is the baseline every rule is judged by")
        return list(dict.fromkeys(names))


def check_depth(params: Params, depth: int) -> None:
    """Layers must leave at least one block after the cut (known once the model's config is read)."""
    bad = [layer for layer in params.layers if not 2 <= layer <= depth - 1]
    if bad:
        raise ValueError(f"layers {bad} are outside [2, {depth - 1}] for this {depth}-layer model")


def reductions(params: Params, keep: float) -> dict:
    """``{entry: Reduction}`` at one kept share."""
    from ..vision_tasks import Reduction

    out = {}
    for name in params.entries:
        method, scorer, kwargs = ENTRIES[name]
        out[name] = Reduction(None if scorer is None else get_scorer(scorer, **kwargs), keep, method)
    return out


def leaderboard_runs(model, params: Params) -> pd.DataFrame:
    """Probe accuracy, [CLS] cosine and FLOPs per entry × layer × keep, plus the unpruned row (entry "unpruned").

    ``accuracy`` is the main probe's (features ``concat([CLS], patch mean)``), ``accuracy_cls`` a second probe's on
    [CLS] alone (both trained on unpruned train images). The model must have a [CLS] token.
    """
    from ..vision_tasks import cls_cosine, digit_pixels, reduced_features, train_probe, unpruned_features

    train_x, train_y = digit_pixels(params.dataset, "train", n=params.n_train, size=params.image_size,
                                    seed=params.seed)
    test_x, test_y = digit_pixels(params.dataset, "test", n=params.n_test, size=params.image_size, seed=params.seed)
    ref_train = unpruned_features(model, train_x, batch_size=params.batch_size, desc="unpruned train features")
    probe = train_probe(ref_train.features, train_y, seed=params.seed, C=params.probe_c)
    # a second probe on [CLS] alone: the main features' patch mean shifts when patches go, the [CLS] does less
    cls_probe = train_probe(ref_train.cls, train_y, seed=params.seed, C=params.probe_c)
    ref = unpruned_features(model, test_x, batch_size=params.batch_size, desc="unpruned test features")
    rows = [dict(entry="unpruned", method="none", layer=0, keep=1.0, kept_patches=ref.kept_patches,
                 accuracy=float(probe.score(ref.features, test_y)),
                 accuracy_cls=float(cls_probe.score(ref.cls, test_y)), cls_cosine=1.0, flops_ratio=1.0)]
    for layer in params.layers:
        plan = {(name, keep): r for keep in params.keeps for name, r in reductions(params, keep).items()}
        feats = reduced_features(model, test_x, layer, plan, batch_size=params.batch_size, seed=params.seed,
                                 desc=f"layer {layer}: {len(plan)} reductions")
        for (name, keep), fs in feats.items():
            rows.append(dict(entry=name, method=ENTRIES[name][0], layer=layer, keep=keep,
                             kept_patches=fs.kept_patches, accuracy=float(probe.score(fs.features, test_y)),
                             accuracy_cls=float(cls_probe.score(fs.cls, test_y)),
                             cls_cosine=float(cls_cosine(fs.cls, ref.cls).mean()) if fs.cls is not None else np.nan,
                             flops_ratio=fs.flops / ref.flops))
    table = pd.DataFrame(rows)
    table["accuracy_se"] = np.sqrt(table.accuracy * (1 - table.accuracy) / len(test_y))
    table["n_test"] = len(test_y)
    return table


def _trapezoid_weights(xs: np.ndarray) -> np.ndarray:
    """Weights w with area_under_curve(xs, ys) == w @ ys (xs sorted ascending), to propagate standard errors."""
    w = np.zeros(len(xs))
    gaps = np.diff(xs)
    w[:-1] += gaps / 2
    w[1:] += gaps / 2
    return w / (xs[-1] - xs[0])


def entry_areas(table: pd.DataFrame) -> pd.DataFrame:
    """Area under accuracy vs keep per entry and layer, closed at keep 1 with the unpruned accuracy.

    Columns: entry, layer, accuracy_auc, auc_se (binomial SEs propagated through the trapezoid, treating points as
    independent), rank (1 = best within the layer), accuracy_at_min_keep, and cls_probe_auc (the same area for the
    [CLS]-only probe) when the runs have ``accuracy_cls``.
    """
    ref = table[table.entry == "unpruned"].iloc[0]
    rows = []
    for (entry, layer), g in table[table.entry != "unpruned"].groupby(["entry", "layer"], sort=False):
        g = g.sort_values("keep")
        xs = np.append(g.keep.to_numpy(float), 1.0)
        ys = np.append(g.accuracy.to_numpy(float), ref.accuracy)
        ses = np.append(g.accuracy_se.to_numpy(float), ref.accuracy_se)
        w = _trapezoid_weights(xs)
        row = dict(entry=entry, layer=int(layer), accuracy_auc=area_under_curve(xs, ys),
                   auc_se=float(np.sqrt((w ** 2 * ses ** 2).sum())), accuracy_at_min_keep=float(g.accuracy.iloc[0]))
        if "accuracy_cls" in g:
            row["cls_probe_auc"] = area_under_curve(xs, np.append(g.accuracy_cls.to_numpy(float), ref.accuracy_cls))
        rows.append(row)
    areas = pd.DataFrame(rows)
    areas["rank"] = areas.groupby("layer").accuracy_auc.rank(ascending=False, method="min").astype(int)
    return areas


def leaderboard(areas: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """One row per entry, best first: mean area over layers (± propagated SE), area per layer, mean and worst rank."""
    wide = areas.pivot_table(index="entry", columns="layer", values="accuracy_auc")
    wide.columns = [f"auc layer {c}" for c in wide.columns]
    aggregations = dict(accuracy_auc=("accuracy_auc", "mean"),
                        auc_se=("auc_se", lambda s: float(np.sqrt((s ** 2).sum())) / len(s)),
                        mean_rank=("rank", "mean"), worst_rank=("rank", "max"))
    if "cls_probe_auc" in areas:
        aggregations["cls_probe_auc"] = ("cls_probe_auc", "mean")
    stats = areas.groupby("entry").agg(**aggregations)
    board = stats.join(wide).reset_index()
    board.insert(1, "method", board.entry.map(lambda e: ENTRIES[e][0]))
    board.insert(2, "attention_based", board.entry.isin(ATTENTION_BASED))
    ref = table[table.entry == "unpruned"].iloc[0]
    unpruned = {"entry": "unpruned", "method": "none", "attention_based": False, "accuracy_auc": ref.accuracy,
                "auc_se": ref.accuracy_se, "mean_rank": np.nan, "worst_rank": np.nan}
    unpruned.update({c: ref.accuracy for c in wide.columns})
    if "cls_probe_auc" in board:
        unpruned["cls_probe_auc"] = ref.accuracy_cls
    board = sort_by_metric(board, ACCURACY_AUC)
    return pd.concat([pd.DataFrame([unpruned]), board], ignore_index=True)


def plot_curves(table: pd.DataFrame, top: int = 6):
    """Accuracy vs kept share per layer for the ``top`` entries by mean area, random and the unpruned line."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    areas = entry_areas(table)
    order = areas.groupby("entry").accuracy_auc.mean().sort_values(ascending=False).index.tolist()
    shown = list(dict.fromkeys(order[:top] + ["random"]))
    ref = float(table[table.entry == "unpruned"].accuracy.iloc[0])
    data = table[table.entry.isin(shown)]
    layers = sorted(data.layer.unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], layers):
        sns.lineplot(data=data[data.layer == layer], x="keep", y="accuracy", hue="entry", hue_order=shown,
                     marker="o", ax=ax, legend=ax is axes[0][-1])
        ax.axhline(ref, color="black", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"drop / merge after layer {layer}")
        ax.set_xlabel("kept share of patches (log)")
    axes[0][0].set_ylabel("probe accuracy")
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    return fig


def plot_board(board: pd.DataFrame):
    """Horizontal bars of the mean area with ±2 SE, attention-based entries coloured apart."""
    import matplotlib.pyplot as plt

    b = board[board.entry != "unpruned"].iloc[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(b) + 1.2))
    colors = ["tab:blue" if a else ("tab:green" if m != "drop" else "tab:gray")
              for a, m in zip(b.attention_based, b.method)]
    ax.barh(b.entry, b.accuracy_auc, xerr=2 * b.auc_se, color=colors)
    ax.axvline(float(board[board.entry == "unpruned"].accuracy_auc.iloc[0]), color="black", ls="--", lw=1)
    lo = float((b.accuracy_auc - 3 * b.auc_se).min())
    ax.set_xlim(max(0.0, lo), None)
    ax.set_xlabel("area under accuracy vs kept share (mean over layers); blue: attention-based, green: merging")
    fig.tight_layout()
    return fig


def verdict(areas: pd.DataFrame, board: pd.DataFrame, params: Params) -> tuple[str, str, str]:
    """The claim's verdict from this run's areas. Returns ``(label, one-line summary, Findings markdown)``.

    1. **Attention beats chance**: at every layer, the best attention-based dropping entry's area exceeds random's by
       more than 2 combined standard errors.
    2. **Random is a strong baseline**: random's mean area is within ``random_margin`` (relative) of the best
       dropping entry's (merging keeps information dropping loses, so it is reported beside, not judged).

    Label: both hold → supported; exactly one → partly supported; neither → not supported; no attention-based entry
    ran → inconclusive.
    """
    ran_attention = [e for e in ATTENTION_BASED if e in set(areas.entry)]
    ref = board[board.entry == "unpruned"].iloc[0]
    ranked = board[board.entry != "unpruned"]
    dropping = ranked[ranked.method == "drop"]
    best = dropping.iloc[0]
    rand = ranked[ranked.entry == "random"].iloc[0]
    lines = []
    part1 = False
    if ran_attention:
        wins = []
        for layer, g in areas.groupby("layer"):
            att = g[g.entry.isin(ran_attention)].sort_values("accuracy_auc", ascending=False).iloc[0]
            r = g[g.entry == "random"].iloc[0]
            margin = att.accuracy_auc - r.accuracy_auc
            se = float(np.hypot(att.auc_se, r.auc_se))
            wins.append(margin > 2 * se)
            lines.append(f"  - layer {layer}: best attention-based {att.entry} {att.accuracy_auc:.3f} vs random "
                         f"{r.accuracy_auc:.3f} (difference {margin:+.3f}, 2 SE = {2 * se:.3f})")
        part1 = all(wins)
    gap = (best.accuracy_auc - rand.accuracy_auc) / best.accuracy_auc
    part2 = bool(gap <= params.random_margin)
    if not ran_attention:
        label = "inconclusive"
    elif part1 and part2:
        label = "supported"
    elif part1 or part2:
        label = "partly supported"
    else:
        label = "not supported"
    top3 = ", ".join(f"{r.entry} ({r.accuracy_auc:.3f})" for r in dropping.head(3).itertuples())
    bottom = dropping.iloc[-1]
    merging = ranked[ranked.method != "drop"]
    merge_note = ("Merging entries (not judged): " + ", ".join(
        f"{r.entry} {r.accuracy_auc:.3f} (rank {list(ranked.entry).index(r.entry) + 1} of {len(ranked)})"
        for r in merging.itertuples()) + ".") if len(merging) else ""
    cls_note = ""
    if "cls_probe_auc" in ranked:
        by_cls = ranked.sort_values("cls_probe_auc", ascending=False, kind="stable")
        cls_rank = list(by_cls.entry).index("random") + 1
        cls_note = (f" On the [CLS]-only probe (not used for the verdict) the best is {by_cls.iloc[0].entry} "
                    f"({by_cls.iloc[0].cls_probe_auc:.3f}) and random ranks {cls_rank} of {len(by_cls)}.")
    summary = (f"best dropping rule {best.entry} (area {best.accuracy_auc:.3f}); random {rand.accuracy_auc:.3f}, "
               f"{gap:.0%} below it; attention-based dropping {'beats' if part1 else 'does not clearly beat'} random "
               f"at every layer")
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run ({params.model}, {params.dataset} at {params.image_size}x{params.image_size}
px, probe trained on {params.n_train} unpruned images, {params.n_test} test images; {len(params.entries)} entries,
kept shares {", ".join(f"{k:.0%}" for k in params.keeps)}, pruning after layers {", ".join(map(str, params.layers))};
seed {params.seed}). Unpruned accuracy {ref.accuracy_auc:.3f}. Areas are mean heights of accuracy over
[{min(params.keeps):.0%}, 100%] of the patches, closed with the unpruned accuracy at 100%.

1. **Attention-based dropping beats random at every layer** — {'holds' if part1 else 'does not hold'}:
{chr(10).join(lines) if lines else '  - no attention-based entry ran'}
2. **Random is a strong baseline (within {params.random_margin:.0%} of the best dropping area)** —
   {'holds' if part2 else 'does not hold'}: random {rand.accuracy_auc:.3f} is {gap:.1%} below the best dropping
   rule ({best.entry}, {best.accuracy_auc:.3f}).

Dropping, top three: {top3}; last: {bottom.entry} ({bottom.accuracy_auc:.3f}); random ranks
{list(dropping.entry).index("random") + 1} of {len(dropping)}. {merge_note}{cls_note}

Caveats: the probe is trained on unpruned features, so accuracy loss mixes lost information with distribution
shift; the standard errors treat the points of a curve as independent binomials (the same test images serve every
point, so they are conservative for differences); MNIST digits on a black background make background patches
trivially redundant, which favours any rule that finds the strokes.
"""
    return label, summary, findings
