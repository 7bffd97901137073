"""Notebook ``vit-cls-attention``: how much accuracy survives when a ViT keeps only the patches its [CLS] attends to?

FasterVLM (s148) ranks visual tokens by the [CLS] token's attention in the vision encoder; VTC-CLS (s7) ensembles
[CLS] scores over layers. Here, on a frozen ViT (embedded DINOv2-S) with a linear probe trained on unpruned features
of MNIST digits, patches are dropped after layer l (l in ``layers``) keeping 25 %, 10 %, 5 % of them ([CLS] always
kept), ranked by [CLS] attention of the last layer before the cut, of the layer before it, by the multi-layer
ensemble, or at random. Measured: probe accuracy of the reduced test features and the cosine of the reduced [CLS]
to the unpruned one. Photos show which patches each scorer keeps.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from ..params import ModelName, NotebookParams
from ..scorers import get_scorer
from .vision_params import ImageSize, KeepRatios, PhotoNames

TITLE = "[CLS] attention pruning of ViT tokens: FasterVLM (s148) and VTC-CLS (s7)"
CLAIM = (
    "Ranking patches by [CLS] attention (FasterVLM) finds the tokens a ViT needs: keeping 5% of the patches retains "
    "at least 90% of the unpruned probe accuracy at the best pruning layer, [CLS] attention beats random selection, "
    "and VTC-CLS's multi-layer ensemble does at least as well as the single last layer."
)
ScorerName = Literal["cls_last", "cls_penultimate", "multilayer", "random"]
#: the notebook's scorer labels → registered scorer and parameters
SCORERS = {
    "cls_last": ("cls_attention", {"layer": -1}),
    "cls_penultimate": ("cls_attention", {"layer": -2}),
    "multilayer": ("multilayer_cls_attention", {}),
    "random": ("random", {}),
}


class Params(NotebookParams):
    """Parameters of ``vit-cls-attention`` (defaults: the CPU run, about a minute on 2 idle cores)."""

    notebook = "vit-cls-attention"

    model: ModelName = Field("dinov2-s", description="embedded ViT name, local folder or Hugging Face id")
    dataset: Literal["mnist", "digits"] = Field("mnist", description="MNIST (28x28) or sklearn digits (8x8)")
    image_size: ImageSize = Field(112, description="input resolution, a multiple of the patch size 14")
    n_train: int = Field(200, ge=20, le=4000, description="train images for the probe (unpruned features)")
    n_test: int = Field(150, ge=20, le=1000, description="test images (pruned features)")
    layers: list[int] = Field([3, 6, 9], min_length=1, description="prune after these blocks (2..depth-1)")
    keeps: KeepRatios = Field([0.25, 0.1, 0.05], description="kept shares of patches, in (0, 1]")
    scorers: list[ScorerName] = Field(["cls_last", "cls_penultimate", "multilayer", "random"], min_length=1)
    batch_size: int = Field(50, ge=1, le=4096, description="images per forward pass")
    probe_c: float = Field(1.0, gt=0, le=1e6, description="inverse L2 strength of the logistic-regression probe")
    photos: PhotoNames = Field(["astronaut", "chelsea", "coffee", "rocket"],
                              description="sample photos for the overlays")
    photo_size: ImageSize = Field(224, description="photo resolution (multiple of 14)")
    photo_keep: float = Field(0.1, gt=0, le=1, description="kept share of patches in the overlays")
    photo_layer: int = Field(6, ge=2, description="pruning layer of the overlays")
    retention_target: float = Field(0.9, gt=0, le=1, description="FasterVLM's retained share of accuracy")

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[int]) -> list[int]:
        if any(layer < 2 for layer in layers):
            raise ValueError(f"every layer must be >= 2 (the penultimate-layer scorer reads layer l-1), got {layers}")
        return sorted(set(layers))



def make_scorers(names) -> dict:
    return {name: get_scorer(SCORERS[name][0], **SCORERS[name][1]) for name in names}


def check_depth(params: Params, depth: int) -> None:
    """Layers must leave at least one block after the cut (known once the model's config is read)."""
    bad = [layer for layer in [*params.layers, params.photo_layer] if not 2 <= layer <= depth - 1]
    if bad:
        raise ValueError(f"layers {bad} are outside [2, {depth - 1}] for this {depth}-layer model")


def accuracy_grid(model, params: Params) -> pd.DataFrame:
    """Probe accuracy and [CLS] cosine per layer × scorer × keep (drop), plus the unpruned row."""
    from ..vision_tasks import accuracy_vs_keep, digit_pixels

    train = digit_pixels(params.dataset, "train", n=params.n_train, size=params.image_size, seed=params.seed)
    test = digit_pixels(params.dataset, "test", n=params.n_test, size=params.image_size, seed=params.seed)
    table, _ = accuracy_vs_keep(model, train, test, make_scorers(params.scorers), params.keeps, params.layers,
                                batch_size=params.batch_size, seed=params.seed, probe_C=params.probe_c)
    return table


def retention(table: pd.DataFrame, column: str = "accuracy") -> pd.DataFrame:
    """``column`` (accuracy or accuracy_cls) as a share of its unpruned value, wide: rows (scorer, keep), columns
    layers."""
    ref = float(table[table.scorer == "unpruned"][column].iloc[0])
    t = table[table.scorer != "unpruned"].assign(retention=lambda d: d[column] / ref)
    wide = t.pivot_table(index=["scorer", "keep"], columns="layer", values="retention")
    wide.columns = [f"layer {c}" for c in wide.columns]
    return wide.reset_index().sort_values(["scorer", "keep"], ascending=[True, False], kind="stable")


def photo_overlays(model, params: Params):
    """Figure and table of the patches each scorer keeps on the photos (drop at ``photo_keep``, ``photo_layer``)."""
    from ..data import photos
    from ..vision_tasks import Reduction, kept_token_figure

    reductions = {name: Reduction(s, params.photo_keep) for name, s in make_scorers(params.scorers).items()}
    return kept_token_figure(model, photos(params.photos), reductions, params.photo_layer, size=params.photo_size,
                             seed=params.seed)


def _paired(table: pd.DataFrame, a: str, b: str, column: str = "accuracy") -> pd.DataFrame:
    """Per (layer, keep): ``column`` of scorer a minus b and its standard error (independent binomials:
    conservative)."""
    ta = table[table.scorer == a].set_index(["layer", "keep"])[column]
    tb = table[table.scorer == b].set_index(["layer", "keep"])[column]
    n = table.n_test.iloc[0]
    out = pd.DataFrame({"diff": ta - tb, "se": np.sqrt((ta * (1 - ta) + tb * (1 - tb)) / n)})
    out["win"] = out["diff"] > 2 * out.se
    out["loss"] = out["diff"] < -2 * out.se
    return out


def verdict(table: pd.DataFrame, params: Params) -> tuple[str, str, str]:
    """The claim's verdict, computed from this run's numbers. Returns ``(label, one-line summary, Findings markdown)``.

    1. **Retention (FasterVLM)**: at the smallest kept share, the best layer's cls_last accuracy is at least
       ``retention_target`` x the unpruned accuracy.
    2. **[CLS] beats random**: over the layer x keep grid cls_last is ahead of random by more than 2 standard errors
       in at least half of the cells and behind by more than 2 SE in none.
    3. **Ensemble (VTC-CLS)**: multilayer's mean accuracy over the grid is at least cls_last's minus one (mean)
       standard error.

    Label: all three hold → supported; part 2 holds → partly supported; parts 1 and 2 both fail → not supported
    (part 3 alone says nothing when both scorers fail); else inconclusive. Parts whose scorers were not run count
    as not holding.
    """
    ref = table[table.scorer == "unpruned"].iloc[0]
    ran = set(table.scorer)
    kmin = min(params.keeps)
    lines = []
    part1 = part2 = part3 = False
    best_ret = float("nan")
    if "cls_last" in ran:
        at_min = table[(table.scorer == "cls_last") & (table.keep == kmin)].set_index("layer").accuracy
        best_layer, best = int(at_min.idxmax()), float(at_min.max())
        kept = int(table[(table.scorer == "cls_last") & (table.keep == kmin)].kept_patches.iloc[0])
        best_ret = best / ref.accuracy
        part1 = best_ret >= params.retention_target
        lines.append(f"1. **Retention at {kmin:.0%} of the patches ({kept} of {int(ref.kept_patches)}) + [CLS]** — "
                     f"{'holds' if part1 else 'does not hold'}: best layer {best_layer}, accuracy {best:.3f} = "
                     f"{best / ref.accuracy:.0%} of the unpruned {ref.accuracy:.3f} (target "
                     f"{params.retention_target:.0%}).")
    if {"cls_last", "random"} <= ran:
        p = _paired(table, "cls_last", "random")
        part2 = bool(p.win.sum() >= len(p) / 2 and not p.loss.any())
        lines.append(f"2. **[CLS] attention beats random** — {'holds' if part2 else 'does not hold'}: ahead by more "
                     f"than 2 SE in {int(p.win.sum())}/{len(p)} (layer, keep) cells, behind in {int(p.loss.sum())}; "
                     f"mean difference {p['diff'].mean():+.3f} (SE of one cell about {p.se.mean():.3f}).")
    if {"cls_last", "multilayer"} <= ran:
        grid = table[table.scorer.isin(["cls_last", "multilayer"])].groupby("scorer")
        mean, se = grid.accuracy.mean(), grid.accuracy_se.mean()
        part3 = bool(mean["multilayer"] >= mean["cls_last"] - se["cls_last"])
        lines.append(f"3. **VTC-CLS ensemble at least as good as the last layer** — "
                     f"{'holds' if part3 else 'does not hold'}: mean accuracy over the grid {mean['multilayer']:.3f} "
                     f"(multilayer) vs {mean['cls_last']:.3f} (cls_last).")
    if "cls_last" in ran and not np.isnan(ref.accuracy_cls):
        c = table[(table.scorer == "cls_last") & (table.keep == kmin)].accuracy_cls
        text = (f"- A probe on [CLS] alone (no patch mean, so no shift of the mean when patches go; secondary, not in "
                f"the label): unpruned {ref.accuracy_cls:.3f}; at {kmin:.0%} of the patches cls_last reaches "
                f"{c.max():.3f} ({c.max() / ref.accuracy_cls:.0%}) at its best layer")
        if "random" in ran:
            pc = _paired(table, "cls_last", "random", "accuracy_cls")
            text += (f"; against random it is ahead by more than 2 SE in {int(pc.win.sum())}/{len(pc)} cells, behind "
                     f"in {int(pc.loss.sum())} (mean difference {pc['diff'].mean():+.3f})")
        lines.append(text + ".")
    if "cls_penultimate" in ran and "cls_last" in ran:
        pen = _paired(table, "cls_penultimate", "cls_last")
        lines.append(f"- Penultimate vs last layer's [CLS] attention (FasterVLM/VisionZip read the penultimate): mean "
                     f"difference {pen['diff'].mean():+.3f}, ahead in {int(pen.win.sum())}, behind in "
                     f"{int(pen.loss.sum())} of {len(pen)} cells (2 SE).")
    if part1 and part2 and part3:
        label = "supported"
    elif part2:
        label = "partly supported"
    elif not part1:
        label = "not supported"  # neither FasterVLM's retention nor an edge over random
    else:
        label = "inconclusive"
    best_rows = (table[table.scorer != "unpruned"].sort_values("accuracy", ascending=False, kind="stable")
                 .groupby("keep", sort=False).head(1).sort_values("keep", ascending=False))
    best_text = "; ".join(f"{r.keep:.0%}: {r.scorer} after layer {r.layer} ({r.accuracy:.3f})"
                          for r in best_rows.itertuples())
    summary = (f"at {kmin:.0%} of the patches cls_last keeps {best_ret:.0%} of the unpruned accuracy (best layer); "
               f"[CLS] attention {'ahead of' if part2 else 'not clearly ahead of'} random")
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run ({params.model}, {params.dataset} at {params.image_size}x{params.image_size}
px, probe trained on {params.n_train} unpruned train images, {params.n_test} test images; patches dropped after layers
{", ".join(map(str, params.layers))}, [CLS] always kept; seed {params.seed}). Unpruned probe accuracy
{ref.accuracy:.3f} ± {ref.accuracy_se:.3f} (binomial SE).

{chr(10).join(lines)}

Best scorer and layer per kept share: {best_text}.

Caveats: a probe trained on unpruned features sees pruned features out of distribution (their patch mean is taken
over far fewer, and different, patches), so accuracy loss mixes lost information with distribution shift; the [CLS]
cosine column separates the two somewhat. Differences are judged against binomial standard errors of {params.n_test}
test images (independent-sample SE, conservative for these paired runs).
"""
    return label, summary, findings
