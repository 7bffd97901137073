"""Notebook ``vit-diversity``: at extreme pruning ratios, does diversity beat [CLS] importance, and is random strong?

Same protocol as ``vit-multilayer-flow`` (DINOv2-S, tokens really dropped after block ``l``, [CLS] kept, a linear probe
trained on unpruned MNIST features, paired comparisons over test images; helpers imported from there). Scorers:
importance ([CLS] attention, FasterVLM), diversity (DivPrune's max–min, DART's duplication against pivots, ToDRE's
k-center with [CLS] relevance), spatial coverage (uniform grid, the downsampling baseline) and random (several seeds).
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import Field, model_validator

from ..params import ModelName, NotebookParams
from ..scorers import Scorer, get_scorer
from .vision_params import ImageSize, KeepRatios, PruneLayers
from .vit_multilayer_flow import compare, paired_difference, per_image_means

TITLE = "Diversity vs importance at extreme pruning ratios on a ViT: DivPrune (s268), DART (s112), ToDRE (s4)"
CLAIM = (
    "At extreme pruning ratios (10% of the patches or fewer) diversity-based selection (DivPrune, DART, ToDRE) keeps "
    "more of a ViT's accuracy than importance-based [CLS] attention, and random pruning is a strong baseline that "
    "importance-based pruning does not beat (DART; UniPruneBench)."
)
DIVERSITY = ("divprune", "dart", "todre")


class Params(NotebookParams):
    """Parameters of ``vit-diversity`` (defaults: the CPU run, about two minutes on 2 idle cores)."""

    notebook = "vit-diversity"

    model: ModelName = Field("dinov2-s", description="embedded ViT name, local folder or Hugging Face id")
    dataset: Literal["mnist", "digits"] = Field("mnist", description="digits data set of the probe")
    image_size: ImageSize = Field(112, description="input side in pixels, a multiple of the patch size 14")
    n_train: int = Field(200, ge=20, le=5000, description="unpruned train images of the probe")
    n_test: int = Field(150, ge=20, le=5000, description="test images, pruned under every configuration")
    layers: PruneLayers = Field([6, 9], description="prune after these blocks (1 .. depth - 1)")
    keeps: KeepRatios = Field([0.25, 0.1, 0.05], description="kept share of the patches, (0, 1]")
    extreme_keep: float = Field(0.1, gt=0.0, le=1.0, description="kept shares at or below this are 'extreme'")
    random_replicates: int = Field(2, ge=1, le=20, description="seeds of the random baseline (averaged per image)")
    feature: Literal["hidden", "keys"] = Field("hidden", description="token features of DivPrune and ToDRE")
    dart_pivots: int = Field(4, ge=1, le=64, description="DART pivot tokens (chosen by key norm)")
    todre_relevance_weight: float = Field(0.5, ge=0.0, le=100.0, description="ToDRE weight of [CLS] relevance")
    probe_C: float = Field(1.0, gt=0.0, description="inverse L2 strength of the logistic-regression probe")
    batch_size: int = Field(100, ge=1, le=4096, description="images per forward pass")
    photo: str = Field("astronaut", description="sample photo for the kept-token overlay")
    photo_keep: float = Field(0.05, gt=0.0, le=1.0, description="kept share in the overlay figure")

    @model_validator(mode="after")
    def _has_extreme_cells(self) -> "Params":
        if not any(k <= self.extreme_keep for k in self.keeps):
            raise ValueError(f"no kept share in keeps {self.keeps} is ≤ extreme_keep {self.extreme_keep}: "
                             "add one or raise extreme_keep")
        return self


def scorers(params: Params) -> dict[str, Scorer]:
    """The compared rules, labelled as in the tables."""
    return {
        "random": get_scorer("random"),
        "cls_attention": get_scorer("cls_attention"),
        "divprune": get_scorer("divprune", feature=params.feature),
        "dart": get_scorer("dart", n_pivots=params.dart_pivots),
        "todre": get_scorer("todre", feature=params.feature, relevance_weight=params.todre_relevance_weight),
        "spatial_grid": get_scorer("spatial_grid"),
    }


def extreme_keeps(params: Params) -> list[float]:
    return [k for k in params.keeps if k <= params.extreme_keep]


def comparisons(per_image: pd.DataFrame, params: Params) -> pd.DataFrame:
    """At the extreme kept shares: every rule against [CLS] attention, and every rule against random (paired over
    images; [CLS] attention vs random appears once, in the second group)."""
    keeps = extreme_keeps(params)
    names = [s for s in per_image_means(per_image).scorer.unique() if s != "unpruned"]
    rows = []
    for vs in ("cls_attention", "random"):
        for name in names:
            if name == vs or (vs == "cls_attention" and name == "random"):  # that pair is listed once, vs random
                continue
            d = paired_difference(per_image, name, vs, keeps)
            rows.append(dict(scorer=name, vs=vs, acc_diff=d["diff"], se=d["se"], cos_diff=d["cos_diff"],
                             outcome=compare(d)))
    return pd.DataFrame(rows)


def verdict(summary: pd.DataFrame, table: pd.DataFrame, params: Params) -> tuple[str, str, str]:
    """The claim's verdict from this run's numbers. Returns ``(label, one-line summary, Findings markdown)``.

    Only the extreme cells (kept share ≤ ``extreme_keep``) count; differences are paired over images and averaged over
    those cells; "better"/"worse" beyond two standard errors.

    1. Diversity beats importance: at least two of DivPrune, DART and ToDRE are better than [CLS] attention.
    2. Random is strong: [CLS] attention is not better than random.

    Both: supported; one: partly supported; neither: not supported; every comparison of the two parts a tie:
    inconclusive (the run cannot separate the rules at these ratios).
    """
    t = table.set_index(["scorer", "vs"])
    div = {s: t.loc[(s, "cls_attention"), "outcome"] for s in DIVERSITY}
    imp_vs_random = t.loc[("cls_attention", "random"), "outcome"]
    part1 = sum(o == "better" for o in div.values()) >= 2
    part2 = imp_vs_random != "better"
    if all(o == "tie" for o in [*div.values(), imp_vs_random]):
        label = "inconclusive"
    elif part1 and part2:
        label = "supported"
    elif part1 or part2:
        label = "partly supported"
    else:
        label = "not supported"
    keeps = extreme_keeps(params)
    div_line = ", ".join(f"{s} {t.loc[(s, 'cls_attention'), 'acc_diff']:+.3f} ({o})" for s, o in div.items())
    r = t.loc[("cls_attention", "random")]
    summary_line = (f"at kept shares ≤ {params.extreme_keep:g}, accuracy vs [CLS] attention: {div_line}; "
                    f"[CLS] attention vs random {r.acc_diff:+.3f} ± {r.se:.3f} ({imp_vs_random})")
    cells = summary[summary.scorer != "unpruned"]
    ref = summary[summary.scorer == "unpruned"].iloc[0]
    pivot = cells.pivot_table(index="scorer", columns=["layer", "keep"], values="accuracy")
    header = " | ".join(f"l{int(la)} k{k:g}" for la, k in pivot.columns)
    body = "\n".join(f"| {s} | " + " | ".join(f"{v:.3f}" for v in pivot.loc[s]) + " |" for s in pivot.index)
    rows = "\n".join(f"| {x.scorer} | {x.vs} | {x.acc_diff:+.3f} | {x.se:.3f} | {x.cos_diff:+.4f} | {x.outcome} |"
                     for x in table.itertuples())
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run ({params.model}, {params.dataset} at {params.image_size} px, probe
trained on {params.n_train} unpruned images, {params.n_test} test images, pruning after blocks
{", ".join(map(str, params.layers))}, kept shares {", ".join(f"{k:g}" for k in params.keeps)} of the patches
(extreme: {", ".join(f"{k:g}" for k in keeps)}), [CLS] always kept, random averaged over {params.random_replicates}
seeds; seed {params.seed}). Unpruned probe accuracy {ref.accuracy:.3f}.

Probe accuracy per scorer (columns: pruning block l, kept share k):

| scorer | {header} |
|---|{"---|" * len(pivot.columns)}
{body}

Paired differences at the extreme kept shares (accuracy averaged over those cells; ± one standard error over images;
[CLS] cosine difference; "better"/"worse" beyond two standard errors):

| scorer | vs | accuracy diff | s.e. | [CLS] cosine diff | outcome |
|---|---|---|---|---|---|
{rows}

1. **Diversity beats importance** (≥ 2 of DivPrune, DART, ToDRE better than [CLS] attention) —
   {"holds" if part1 else "does not hold"}: {div_line}.
2. **Random is a strong baseline** ([CLS] attention not better than random) — {"holds" if part2 else "does not hold"}:
   {r.acc_diff:+.3f} ± {r.se:.3f}.

The diversity rules are this workbook's readings of the papers (see the scorers' docstrings, *(interp.)*); DART's
pivots are the largest-key-norm tokens, ToDRE's task relevance is the [CLS] attention of the pruning block. The
probe is trained on unpruned features, so very small token sets also shift the patch-mean half of the features.
"""
    if params.n_test < 500:
        findings += (f"\nWith {params.n_test} test images one image is {1 / params.n_test:.1%} of accuracy; "
                     "differences below two standard errors are reported as ties. The GPU set runs 1000 images.\n")
    return label, summary_line, findings
