"""Notebook ``vit-merging``: merging vs dropping ViT tokens at equal token counts, and what reduction buys in time.

Methods (all in :mod:`salience.harness.vit_pruning`, reduce after block l to the same number of patch tokens):

- ``drop``: keep the top patches by a scorer ([CLS] attention = FasterVLM s148, or random), drop the rest;
- ``tome``: ToMe bipartite soft matching on the layer's keys, size-weighted averages, proportional attention
  (``log(size)`` added to merged keys' logits in every later block); one call removes more than half of the tokens
  by repeating the matching;
- ``visionzip`` (s242): dominant tokens by the scorer, the remaining patches merged by key similarity into a few
  contextual tokens (``contextual`` share of the same budget), with proportional attention.

Part 1: probe accuracy (probe trained on unpruned features) and [CLS] cosine per layer, kept share and method.
Part 2: measured wall time of the whole forward pass (prefix + scoring + merge + suffix) and estimated FLOPs vs kept
share, interleaved over repeats so load changes hit every configuration alike.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from tqdm import tqdm

from ..params import ModelName, NotebookParams
from ..scorers import get_scorer
from .vision_params import ImageSize, KeepRatios, PhotoNames, PruneLayers

TITLE = "Merging vs dropping ViT tokens: ToMe and VisionZip (s242) against [CLS]-attention dropping (s148)"
CLAIM = (
    "At equal token counts, merging (ToMe's size-weighted bipartite merging; VisionZip's dominant + contextual tokens) "
    "keeps more accuracy and [CLS] fidelity than dropping the same number of patches by [CLS] attention, and reducing "
    "tokens really speeds the ViT up (VisionZip: prefilling time cut by 8x)."
)
#: scorer labels of the notebook → registered scorer + parameters
SCORERS = {"cls": ("cls_attention", {"layer": -1}), "random": ("random", {})}


class Params(NotebookParams):
    """Parameters of ``vit-merging`` (defaults: the CPU run, about a minute on 2 idle cores)."""

    notebook = "vit-merging"

    model: ModelName = Field("dinov2-s", description="embedded ViT name, local folder or Hugging Face id")
    dataset: Literal["mnist", "digits"] = Field("mnist", description="MNIST (28x28) or sklearn digits (8x8)")
    image_size: ImageSize = Field(112, description="input resolution, a multiple of the patch size 14")
    n_train: int = Field(200, ge=20, le=4000, description="train images for the probe (unpruned features)")
    n_test: int = Field(150, ge=20, le=1000, description="test images (reduced features)")
    layers: PruneLayers = Field([3, 6], description="reduce after these blocks (1..depth-1)")
    keeps: KeepRatios = Field([0.25, 0.1, 0.05], description="kept shares of patches, in (0, 1]")
    contextual: float = Field(0.16, ge=0, lt=1, description="VisionZip: share of the budget given to merged tokens")
    proportional_attention: bool = Field(True, description="add log(size) to merged keys' attention logits")
    batch_size: int = Field(50, ge=1, le=4096, description="images per forward pass")
    probe_c: float = Field(1.0, gt=0, le=1e6, description="inverse L2 strength of the logistic-regression probe")
    latency_size: ImageSize = Field(224, description="resolution of the timing runs (224: 256 patches)")
    latency_batch: int = Field(8, ge=1, le=1024, description="images per timed forward pass")
    latency_keeps: KeepRatios = Field([0.5, 0.25, 0.1], description="kept shares timed")
    latency_layer: int = Field(3, ge=1, description="reduction layer of the timing runs")
    repeats: int = Field(3, ge=1, le=100, description="timed repeats (median), after one warm-up round")
    photos: PhotoNames = Field(["astronaut", "chelsea", "coffee"], description="photos for overlays")
    photo_keep: float = Field(0.1, gt=0, le=1, description="kept share in the overlays")
    photo_layer: int = Field(3, ge=1, description="reduction layer of the overlays")
    min_speedup: float = Field(1.25, ge=1, le=100, description="speed-up at the smallest timed share that counts "
                                                                "as really faster")



def scorers() -> dict:
    return {name: get_scorer(s, **kw) for name, (s, kw) in SCORERS.items()}


def check_depth(params: Params, depth: int) -> None:
    bad = [layer for layer in [*params.layers, params.latency_layer, params.photo_layer] if not 1 <= layer <= depth - 1]
    if bad:
        raise ValueError(f"layers {bad} are outside [1, {depth - 1}] for this {depth}-layer model")


def _options(params: Params) -> dict:
    merge = {"proportional_attention": params.proportional_attention}
    return {"tome": merge, "visionzip": dict(merge, contextual=params.contextual)}


def accuracy_grid(model, params: Params) -> pd.DataFrame:
    """Accuracy and [CLS] cosine per layer × method × scorer × keep; column ``config`` = method/scorer."""
    from ..vision_tasks import accuracy_vs_keep, digit_pixels

    train = digit_pixels(params.dataset, "train", n=params.n_train, size=params.image_size, seed=params.seed)
    test = digit_pixels(params.dataset, "test", n=params.n_test, size=params.image_size, seed=params.seed)
    table, _ = accuracy_vs_keep(model, train, test, scorers(), params.keeps, params.layers,
                                methods=("drop", "tome", "visionzip"), batch_size=params.batch_size,
                                seed=params.seed, probe_C=params.probe_c, options=_options(params))
    table.insert(1, "config", np.where(table.method.isin(["tome", "none"]), table.scorer,
                                       table.method + "/" + table.scorer))
    return table


def equal_count_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Wide view: accuracy and [CLS] cosine per (layer, keep, kept_patches) with one column per configuration.

    Fails loudly if the configurations of a cell did not process the same number of tokens.
    """
    t = table[table.scorer != "unpruned"]
    counts = t.groupby(["layer", "keep"]).kept_patches.nunique()
    if (counts > 1).any():
        raise AssertionError(f"unequal token counts within a cell: {counts[counts > 1].to_dict()}")
    wide = t.pivot_table(index=["layer", "keep", "kept_patches"], columns="config",
                         values=["accuracy", "cls_cosine"])
    short = {"accuracy": "acc", "cls_cosine": "cos"}
    wide.columns = [f"{short[metric]} {config}" for metric, config in wide.columns]
    return wide.reset_index().sort_values(["layer", "keep"], ascending=[True, False], kind="stable")


@torch.inference_mode()
def latency_table(model, params: Params) -> pd.DataFrame:
    """Median wall seconds per forward pass of ``latency_batch`` photos-sized inputs, per method and kept share.

    Configurations are interleaved within each repeat (one warm-up round first). Columns: config, keep,
    tokens_last_layer, flops (per image), seconds (median over repeats, whole batch), min_seconds, speedup (vs the
    unpruned pass through the same harness), flops_speedup, and the plain Hugging Face forward as a reference row.
    """
    from ..vision_tasks import Reduction, measure_latency

    g = torch.Generator().manual_seed(params.seed)
    pixels = torch.randn(params.latency_batch, 3, params.latency_size, params.latency_size, generator=g)
    pixels = pixels.to(params.device)
    sc = scorers()
    configs = {("unpruned", 1.0): None}
    for keep in params.latency_keeps:
        configs[("drop/cls", keep)] = Reduction(sc["cls"], keep, "drop")
        configs[("drop/random", keep)] = Reduction(sc["random"], keep, "drop")
        configs[("tome", keep)] = Reduction(None, keep, "tome", _options(params)["tome"])
        configs[("visionzip/cls", keep)] = Reduction(sc["cls"], keep, "visionzip", _options(params)["visionzip"])
    times: dict = {key: [] for key in [*configs, ("hf forward", 1.0)]}
    info = {}
    for r in tqdm(range(params.repeats + 1), desc="latency rounds"):
        for key, red in configs.items():
            m = measure_latency(model, pixels, red, params.latency_layer, repeats=1, warmup=0)
            info[key] = m
            if r:
                times[key].append(m["seconds"])
        start = time.perf_counter()
        model(pixel_values=pixels)
        if pixels.is_cuda:
            torch.cuda.synchronize()
        if r:
            times[("hf forward", 1.0)].append(time.perf_counter() - start)
    base = float(np.median(times[("unpruned", 1.0)]))
    rows = []
    for (config, keep), ts in times.items():
        m = info.get((config, keep), info[("unpruned", 1.0)])
        rows.append(dict(config=config, keep=keep, tokens_last_layer=m["tokens_last_layer"], flops=m["flops"],
                         seconds=float(np.median(ts)), min_seconds=float(np.min(ts)),
                         speedup=base / float(np.median(ts)),
                         flops_speedup=info[("unpruned", 1.0)]["flops"] / m["flops"]))
    return pd.DataFrame(rows)


def plot_latency(lat: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns

    d = lat[~lat.config.isin(["unpruned", "hf forward"])]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    sns.lineplot(d, x="keep", y="speedup", hue="config", marker="o", ax=axes[0])
    flops = d.drop_duplicates("keep")
    axes[0].plot(flops.keep, flops.flops_speedup, "k--", lw=1, label="FLOPs estimate (model only)")
    axes[0].axhline(1, color="grey", lw=0.8)
    axes[0].set(xscale="log", xlabel="kept share of patches", ylabel="speed-up vs unpruned (measured)",
                title="Measured speed-up")
    axes[0].legend(frameon=False, fontsize=7)
    sns.scatterplot(d, x="flops", y="seconds", hue="config", ax=axes[1], legend=False)
    ref = lat[lat.config == "unpruned"]
    axes[1].scatter(ref.flops, ref.seconds, color="black", marker="x", label="unpruned")
    axes[1].set(xlabel="estimated FLOPs per image", ylabel="median seconds per batch", title="Time vs FLOPs")
    axes[1].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig


def photo_overlays(model, params: Params):
    """Kept patches (drop) and merged groups (ToMe, VisionZip) on photos at ``photo_keep`` after ``photo_layer``."""
    from ..data import photos
    from ..vision_tasks import Reduction, kept_token_figure

    sc = scorers()
    opts = _options(params)
    reductions = {"drop/cls": Reduction(sc["cls"], params.photo_keep, "drop"),
                  "tome": Reduction(None, params.photo_keep, "tome", opts["tome"]),
                  "visionzip/cls": Reduction(sc["cls"], params.photo_keep, "visionzip", opts["visionzip"])}
    return kept_token_figure(model, photos(params.photos), reductions, params.photo_layer, size=params.latency_size,
                             seed=params.seed)


def _versus(table: pd.DataFrame, a: str, b: str) -> dict:
    ta = table[table.config == a].set_index(["layer", "keep"])
    tb = table[table.config == b].set_index(["layer", "keep"])
    diff = ta.accuracy - tb.accuracy
    se = np.sqrt(ta.accuracy_se ** 2 + tb.accuracy_se ** 2)
    cos = ta.cls_cosine - tb.cls_cosine
    win, loss = int((diff > 2 * se).sum()), int((diff < -2 * se).sum())
    holds = bool(win >= len(diff) / 2 and loss == 0 and cos.mean() > 0)
    return dict(holds=holds, win=win, loss=loss, n=len(diff), diff=float(diff.mean()), cos=float(cos.mean()),
                cos_higher=int((cos > 0).sum()), cls_probe_diff=float((ta.accuracy_cls - tb.accuracy_cls).mean()))


def accuracy_parts(table: pd.DataFrame) -> dict:
    """The deterministic parts of the verdict: VisionZip vs drop and ToMe vs drop (both [CLS]-ranked drop)."""
    return {"visionzip/cls": _versus(table, "visionzip/cls", "drop/cls"), "tome": _versus(table, "tome", "drop/cls")}


def speed_part(lat: pd.DataFrame, params: Params) -> dict:
    """Every method's measured speed-up at the smallest timed share reaches ``min_speedup``."""
    kmin = min(params.latency_keeps)
    at = lat[(lat.keep == kmin) & ~lat.config.isin(["unpruned", "hf forward"])].set_index("config")
    return dict(holds=bool((at.speedup >= params.min_speedup).all()), keep=kmin, speedup=at.speedup.to_dict(),
                flops_speedup=float(at.flops_speedup.iloc[0]))


def verdict(table: pd.DataFrame, lat: pd.DataFrame, params: Params) -> tuple[str, str, str]:
    """The claim's verdict from this run's numbers. Returns ``(label, one-line summary, Findings markdown)``.

    A merge method "beats" [CLS]-ranked dropping when, over the layer x keep grid, its accuracy is ahead by more
    than 2 binomial SE in at least half of the cells, behind by more than 2 SE in none, and its mean [CLS] cosine to
    the unpruned model is higher. Parts: (1) VisionZip beats dropping, (2) ToMe beats dropping, (3) every method is
    at least ``min_speedup`` x faster than the unpruned pass at the smallest timed share (measured wall time).

    Label: all three → supported; (1) or (2) → partly supported; neither, with both merges behind on mean accuracy
    → not supported; otherwise inconclusive.
    """
    parts = accuracy_parts(table)
    speed = speed_part(lat, params)
    vz, tome = parts["visionzip/cls"], parts["tome"]
    if vz["holds"] and tome["holds"] and speed["holds"]:
        label = "supported"
    elif vz["holds"] or tome["holds"]:
        label = "partly supported"
    elif vz["diff"] < 0 and tome["diff"] < 0:
        label = "not supported"
    else:
        label = "inconclusive"
    ref = table[table.scorer == "unpruned"].iloc[0]

    def line(name, p):
        return (f"**{name} beats [CLS]-ranked dropping** — {'holds' if p['holds'] else 'does not hold'}: ahead by "
                f"more than 2 SE in {p['win']}/{p['n']} cells, behind in {p['loss']}; mean accuracy difference "
                f"{p['diff']:+.3f}; [CLS] cosine higher in {p['cos_higher']}/{p['n']} cells (mean {p['cos']:+.3f}); "
                f"[CLS]-only probe accuracy difference {p['cls_probe_diff']:+.3f}.")

    speeds = ", ".join(f"{k} {v:.2f}x" for k, v in speed["speedup"].items())
    hf = lat[lat.config == "hf forward"].seconds.iloc[0]
    un = lat[lat.config == "unpruned"].seconds.iloc[0]
    overhead = "harness overhead within 10%" if un <= 1.1 * hf else f"harness overhead {un / hf - 1:.0%}"
    summary = (f"VisionZip vs drop: {vz['diff']:+.3f} accuracy; ToMe vs drop: {tome['diff']:+.3f}; speed-up at "
               f"{speed['keep']:.0%}: {speeds}")
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run ({params.model}, {params.dataset} at {params.image_size} px, probe trained
on {params.n_train} unpruned train images, {params.n_test} test images, reduction after layers
{", ".join(map(str, params.layers))}; VisionZip contextual share {params.contextual:g}; proportional attention
{"on" if params.proportional_attention else "off"}; seed {params.seed}). Unpruned accuracy {ref.accuracy:.3f}.
Every configuration of a (layer, keep) cell processes the same number of tokens (asserted).

1. {line("VisionZip (dominant by [CLS] attention + contextual merging)", vz)}
2. {line("ToMe (bipartite merging, size-weighted)", tome)}
3. **Reduction really speeds the ViT up** (at least {params.min_speedup:g}x at {speed['keep']:.0%} of the patches,
   reduction after layer {params.latency_layer}, {params.latency_batch} images of {params.latency_size} px, median of
   {params.repeats}) — {"holds" if speed["holds"] else "does not hold"}: measured {speeds}; the FLOPs estimate
   predicts {speed["flops_speedup"]:.2f}x. The harness's unpruned pass takes {un:.3f} s per batch, the plain
   Hugging Face forward {hf:.3f} s ({overhead}).

Caveats: timings come from a shared 2-core CPU (noisy; the configurations are interleaved so load changes hit all of
them); the FLOPs estimate counts the model only (scoring and merging cost shows as the gap to the measured speed-up).
Accuracy differences are judged against binomial SEs of {params.n_test} test images (conservative for paired runs).
"""
    return label, summary, findings
