"""Notebook ``vit-multilayer-flow``: do multi-layer rules (FlowCut, HiPrune) prune better than one layer's [CLS] attention?

Tokens of the embedded DINOv2-S are dropped after block ``l`` (really removed, [CLS] always kept) by each scorer, and
the rest of the network runs on the survivors. A logistic-regression probe trained once on **unpruned** MNIST features
(``concat([CLS], patch mean)``) classifies the pruned test features; the [CLS] cosine to the unpruned model measures
how far the representation moved. Scorers: single-layer [CLS] attention at the pruning layer and the one before
(FasterVLM's rule), VTC-CLS's layer ensemble, attention rollout, FlowCut's flow rule, HiPrune's anchor / buffer /
register rule, and random as the floor. Comparisons are paired over test images (the same images under both scorers),
so the standard errors come from the images, not from an assumed binomial.

The evaluation helpers here (:func:`evaluate_grid`, :func:`cell_summary`, :func:`paired_difference`,
:func:`plot_curves`) are shared with ``vit-diversity``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from ..params import ModelName, NotebookParams
from ..scorers import Scorer, get_scorer
from .vision_params import ImageSize, KeepRatios, PruneLayers

TITLE = "Multi-layer flow vs single-layer [CLS] attention on a ViT: FlowCut (s23), HiPrune (s13), FasterVLM (s148)"
CLAIM = (
    "Scoring tokens from the information flow over several layers (FlowCut) or from the hierarchy of attention across "
    "layers (HiPrune's anchor, buffer and register tokens) keeps more of a ViT's accuracy than single-layer [CLS] "
    "attention at the same number of kept tokens."
)
SINGLE_LAYER = ("cls_attention", "cls_attention_prev")
MULTI_LAYER = ("flowcut", "hiprune")



class Params(NotebookParams):
    """Parameters of ``vit-multilayer-flow`` (defaults: the CPU run, about two minutes on 2 idle cores)."""

    notebook = "vit-multilayer-flow"

    model: ModelName = Field("dinov2-s", description="embedded ViT name, local folder or Hugging Face id")
    dataset: Literal["mnist", "digits"] = Field("mnist", description="digits data set of the probe")
    image_size: ImageSize = Field(112, description="input side in pixels, a multiple of the patch size 14")
    n_train: int = Field(200, ge=20, le=5000, description="unpruned train images of the probe")
    n_test: int = Field(150, ge=20, le=5000, description="test images, pruned under every configuration")
    layers: PruneLayers = Field([6, 9], description="prune after these blocks (1 .. depth - 1)")
    keeps: KeepRatios = Field([0.5, 0.25, 0.1], description="kept share of the patches, (0, 1]")
    hiprune_alpha: float = Field(0.1, gt=0.0, le=1.0, description="HiPrune share of anchor + buffer tokens")
    probe_C: float = Field(1.0, gt=0.0, description="inverse L2 strength of the logistic-regression probe")
    batch_size: int = Field(100, ge=1, le=4096, description="images per forward pass")
    photo: str = Field("astronaut", description="sample photo for the kept-token overlay")
    photo_keep: float = Field(0.1, gt=0.0, le=1.0, description="kept share in the overlay figure")



def scorers(params: Params) -> dict[str, Scorer]:
    """The compared rules, labelled as in the tables."""
    return {
        "random": get_scorer("random"),
        "cls_attention": get_scorer("cls_attention", layer=-1),
        "cls_attention_prev": get_scorer("cls_attention", layer=-2),
        "multilayer_cls_attention": get_scorer("multilayer_cls_attention"),
        "attention_rollout": get_scorer("attention_rollout"),
        "flowcut": get_scorer("flowcut"),
        "hiprune": get_scorer("hiprune", alpha=params.hiprune_alpha),
    }


# ------------------------------------------------------------------------------------------ shared evaluation
def load_data(params):
    """``(train, test)``, each ``(pixels, labels)`` from the digits set at ``image_size``; disjoint splits."""
    from ..vision_tasks import digit_pixels

    train = digit_pixels(params.dataset, "train", n=params.n_train, size=params.image_size, seed=params.seed)
    test = digit_pixels(params.dataset, "test", n=params.n_test, size=params.image_size, seed=params.seed)
    return train, test


def evaluate_grid(model, train, test, scorer_map: Mapping[str, Scorer], keeps: Sequence[float],
                  layers: Sequence[int], *, batch_size: int = 100, seed: int = 0, probe_C: float = 1.0,
                  random_replicates: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-image correctness and [CLS] cosine under every layer × scorer × keep, probe trained on unpruned features.

    ``random`` (any scorer named so) runs ``random_replicates`` times with different seeds (one prefix each).
    Returns ``(per_image, configs)``. per_image: layer, scorer, keep, replicate, image, label, correct, cls_cosine
    (the unpruned reference is layer 0, scorer ``unpruned``, keep 1). configs: layer, scorer, keep, replicate,
    kept_patches, gflops_ratio, seconds (suffix wall time of the test set, prefix included).
    """
    from ..harness.vit_pruning import check_keep, check_layer, vit_parts
    from ..vision_tasks import Reduction, cls_cosine, reduced_features, train_probe, unpruned_features

    depth = vit_parts(model).depth
    for layer in layers:  # fail before the first forward pass, naming the valid range
        check_layer(layer, depth)
    for k in keeps:
        check_keep(float(k))
    if random_replicates < 1:
        raise ValueError(f"random_replicates must be ≥ 1, got {random_replicates}")
    train_x, train_y = train
    test_x, test_y = test
    ref_train = unpruned_features(model, train_x, batch_size=batch_size, desc="unpruned train features")
    probe = train_probe(ref_train.features, train_y, seed=seed, C=probe_C)
    ref = unpruned_features(model, test_x, batch_size=batch_size, desc="unpruned test features")
    frames, configs = [], []

    def add(layer, name, keep, replicate, fs):
        correct = probe.predict(fs.features) == test_y
        cos = cls_cosine(fs.cls, ref.cls) if fs.cls is not None else np.full(len(test_y), np.nan)
        frames.append(pd.DataFrame(dict(layer=layer, scorer=name, keep=keep, replicate=replicate,
                                        image=np.arange(len(test_y)), label=test_y, correct=correct,
                                        cls_cosine=cos)))
        configs.append(dict(layer=layer, scorer=name, keep=keep, replicate=replicate, kept_patches=fs.kept_patches,
                            gflops_ratio=fs.flops / ref.flops, seconds=fs.seconds))

    add(0, "unpruned", 1.0, 0, ref)
    stochastic = {n: s for n, s in scorer_map.items() if n == "random"}
    fixed = {n: s for n, s in scorer_map.items() if n not in stochastic}
    for layer in layers:
        if fixed:
            plan = {(n, float(k)): Reduction(s, float(k)) for n, s in fixed.items() for k in keeps}
            got = reduced_features(model, test_x, layer, plan, batch_size=batch_size, seed=seed,
                                   desc=f"layer {layer}: {len(plan)} reductions")
            for (name, k), fs in got.items():
                add(layer, name, k, 0, fs)
        for name, s in stochastic.items():
            for r in range(random_replicates):
                plan = {float(k): Reduction(s, float(k)) for k in keeps}
                got = reduced_features(model, test_x, layer, plan, batch_size=batch_size, seed=seed + 1000 * (r + 1),
                                       desc=f"layer {layer}: {name} replicate {r}")
                for k, fs in got.items():
                    add(layer, name, k, r, fs)
    return pd.concat(frames, ignore_index=True), pd.DataFrame(configs)


def per_image_means(per_image: pd.DataFrame) -> pd.DataFrame:
    """Random replicates averaged per image: one row per layer, scorer, keep and image."""
    return (per_image.groupby(["layer", "scorer", "keep", "image"], sort=False)[["correct", "cls_cosine"]]
            .mean().reset_index())


def cell_summary(per_image: pd.DataFrame, configs: pd.DataFrame) -> pd.DataFrame:
    """Per layer × scorer × keep: accuracy, its standard error over images, mean [CLS] cosine, kept patches, FLOPs."""
    m = per_image_means(per_image)
    g = m.groupby(["layer", "scorer", "keep"], sort=False)
    out = g.agg(accuracy=("correct", "mean"), cls_cosine=("cls_cosine", "mean")).reset_index()
    out["accuracy_se"] = g["correct"].sem(ddof=1).fillna(0.0).to_numpy()
    c = configs.groupby(["layer", "scorer", "keep"], sort=False)[["kept_patches", "gflops_ratio"]].first()
    return out.merge(c.reset_index(), on=["layer", "scorer", "keep"])


def paired_difference(per_image: pd.DataFrame, a: str, b: str, keeps: Sequence[float] | None = None) -> dict:
    """Accuracy of scorer ``a`` minus ``b`` on the same images, averaged over every (layer, keep) cell (keeps
    restricted to ``keeps`` if given); standard error over images of the per-image mean difference."""
    m = per_image_means(per_image)
    if keeps is not None:
        m = m[m.keep.isin([float(k) for k in keeps])]
    wide = m[m.scorer.isin([a, b])].pivot_table(index=["layer", "keep", "image"], columns="scorer", values="correct")
    per_img = (wide[a] - wide[b]).groupby(level="image").mean()
    cos = m[m.scorer.isin([a, b])].pivot_table(index=["layer", "keep", "image"], columns="scorer",
                                               values="cls_cosine")
    n = len(per_img)
    se = float(per_img.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return dict(a=a, b=b, diff=float(per_img.mean()), se=se, n_images=n, cells=int(len(wide) // max(n, 1)),
                cos_diff=float((cos[a] - cos[b]).mean()))


def compare(diff: dict, z: float = 2.0) -> str:
    """``better`` / ``worse`` when the paired difference exceeds ``z`` standard errors, else ``tie``."""
    if diff["se"] != diff["se"] or diff["se"] == 0:  # NaN or no spread: only an exact zero is a tie
        return "tie" if diff["diff"] == 0 else ("better" if diff["diff"] > 0 else "worse")
    if diff["diff"] > z * diff["se"]:
        return "better"
    return "worse" if diff["diff"] < -z * diff["se"] else "tie"


def plot_curves(summary: pd.DataFrame, highlight: Sequence[str] = ()):
    """Accuracy (top) and [CLS] cosine (bottom) vs kept share, one column per pruning layer; dashed: unpruned."""
    import matplotlib.pyplot as plt

    ref = summary[summary.scorer == "unpruned"].iloc[0]
    cells = summary[summary.scorer != "unpruned"]
    layers = sorted(cells.layer.unique())
    fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 6.2), squeeze=False, sharey="row")
    for j, layer in enumerate(layers):
        for name, g in cells[cells.layer == layer].groupby("scorer", sort=False):
            g = g.sort_values("keep")
            style = dict(lw=2.2) if name in highlight else dict(lw=1.2, alpha=0.8)
            ls = ":" if name == "random" else "-"
            axes[0, j].errorbar(g.keep, g.accuracy, yerr=g.accuracy_se, ls=ls, marker="o", ms=3, label=name,
                                capsize=2, **style)
            axes[1, j].plot(g.keep, g.cls_cosine, ls=ls, marker="o", ms=3, label=name, **style)
        axes[0, j].axhline(ref.accuracy, color="k", ls="--", lw=0.8, label="unpruned")
        for i in range(2):
            axes[i, j].set_xscale("log")
            axes[i, j].set_xticks(sorted(cells.keep.unique()), [f"{k:g}" for k in sorted(cells.keep.unique())])
            axes[i, j].minorticks_off()
        axes[0, j].set(title=f"pruned after block {layer}", ylabel="probe accuracy" if j == 0 else None)
        axes[1, j].set(xlabel="kept share of patches", ylabel="[CLS] cosine to unpruned" if j == 0 else None)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def photo_figure(model, params, scorer_map: Mapping[str, Scorer], layer: int):
    """Kept patches of one sample photo (224 px) under every scorer at ``photo_keep``."""
    from ..data import photos
    from ..vision_tasks import Reduction, kept_token_figure

    image = photos([params.photo])[params.photo]
    plan = {name: Reduction(s, params.photo_keep) for name, s in scorer_map.items()}
    return kept_token_figure(model, {params.photo: image}, plan, layer, size=224, seed=params.seed)


# ------------------------------------------------------------------------------------------------------ verdict
def comparisons(per_image: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Each multi-layer rule (and the other aggregates) against the better single-layer [CLS] attention.

    The baseline is whichever of ``cls_attention`` (the pruning layer) and ``cls_attention_prev`` (the block before)
    has the higher mean accuracy over all cells: the claim is tested against the strongest single-layer variant.
    """
    m = per_image_means(per_image)
    mean_acc = m[m.scorer.isin(SINGLE_LAYER)].groupby("scorer").correct.mean()
    baseline = str(mean_acc.idxmax())
    others = [s for s in m.scorer.unique() if s not in (*SINGLE_LAYER, "unpruned")]
    rows = []
    for name in others:
        d = paired_difference(per_image, name, baseline)
        rows.append(dict(scorer=name, vs=baseline, acc_diff=d["diff"], se=d["se"], cos_diff=d["cos_diff"],
                         outcome=compare(d)))
    return baseline, pd.DataFrame(rows)


def verdict(summary: pd.DataFrame, table: pd.DataFrame, baseline: str, params: Params) -> tuple[str, str, str]:
    """The claim's verdict from this run's numbers. Returns ``(label, one-line summary, Findings markdown)``.

    Paired over test images, accuracy averaged over every (layer, keep) cell; "better" / "worse" = the difference
    exceeds two standard errors. FlowCut and HiPrune both better than the best single-layer [CLS] attention:
    supported; one better: partly supported; neither better and at least one worse: not supported; both ties:
    inconclusive (the run cannot tell them apart).
    """
    outcome = table.set_index("scorer").outcome
    multi = {s: outcome[s] for s in MULTI_LAYER}
    n_better = sum(o == "better" for o in multi.values())
    if n_better == 2:
        label = "supported"
    elif n_better == 1:
        label = "partly supported"
    elif any(o == "worse" for o in multi.values()):
        label = "not supported"
    else:
        label = "inconclusive"
    t = table.set_index("scorer")
    line = "; ".join(f"{s} {t.acc_diff[s]:+.3f} ± {t.se[s]:.3f} ({multi[s]})" for s in MULTI_LAYER)
    summary_line = f"accuracy vs {baseline}, paired over images and averaged over layers × keeps: {line}"
    cells = summary[summary.scorer != "unpruned"]
    ref = summary[summary.scorer == "unpruned"].iloc[0]
    pivot = cells.pivot_table(index="scorer", columns=["layer", "keep"], values="accuracy")
    header = " | ".join(f"l{int(la)} k{k:g}" for la, k in pivot.columns)
    body = "\n".join(f"| {s} | " + " | ".join(f"{v:.3f}" for v in pivot.loc[s]) + " |" for s in pivot.index)
    rest = "\n".join(f"| {r.scorer} | {r.acc_diff:+.3f} | {r.se:.3f} | {r.cos_diff:+.4f} | {r.outcome} |"
                     for r in table.itertuples())
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run ({params.model}, {params.dataset} at {params.image_size} px,
probe trained on {params.n_train} unpruned images, {params.n_test} test images, pruning after blocks
{", ".join(map(str, params.layers))}, kept shares {", ".join(f"{k:g}" for k in params.keeps)} of the patches,
[CLS] always kept; seed {params.seed}). Unpruned probe accuracy {ref.accuracy:.3f}. The single-layer baseline is
**{baseline}** (the better of [CLS] attention at the pruning block and at the block before).

Probe accuracy per scorer (columns: pruning block l, kept share k):

| scorer | {header} |
|---|{"---|" * len(pivot.columns)}
{body}

Paired differences against {baseline} (accuracy averaged over all cells; ± one standard error over images; [CLS]
cosine difference; "better"/"worse" beyond two standard errors):

| scorer | accuracy diff | s.e. | [CLS] cosine diff | outcome |
|---|---|---|---|---|
{rest}

FlowCut here is an interpretation of the paper's rule (concentration-weighted [CLS] flow over layers × value norm;
see `salience.scorers.flowcut`), HiPrune reads attention received (no [CLS]) with anchors at the middle captured
layer. Both are scored on a small self-supervised ViT and a digits probe, not on the LLaVA models of the papers.
The probe is trained on unpruned features, so small token sets also shift the patch-mean half of the features: part of
every drop is that shift, shared by all scorers.
"""
    if params.n_test < 500:
        findings += (f"\nWith {params.n_test} test images one image is {1 / params.n_test:.1%} of accuracy; "
                     "differences below two standard errors are reported as ties. The GPU set runs 1000 images.\n")
    return label, summary_line, findings
