"""Notebook ``vit-diversity``: at extreme kept shares, does diversity (DivPrune [@divprune], DART [@dart], ToDRE
[@todre]) keep better visual tokens than [CLS]-attention importance [@fastervlm], and is random selection as strong
as importance (DART's observation)?

Setting: after-encoder, as in the three papers: the encoder (embedded DINOv2-S) runs once on every token; DivPrune and
ToDRE read the last block's hidden states (ToDRE also its [CLS] attention as relevance), DART its keys against a few
pivot tokens; the kept output patches go to the readers. Spatial grid sampling [@feather] is shown beside them.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
from pydantic import Field, model_validator

from .. import evidence
from .vision_params import ImageSize, PhotoName, VisionParams, check_labels
from .vit_common import METRIC, judge_parts, keeps_text, per_image, setting_text

TITLE = "Diversity vs importance at extreme kept shares: DivPrune, DART and ToDRE"
PAPERS = ["divprune", "dart", "todre", "fastervlm"]
CLAIM = (
    "At extreme kept shares (10% of the patches or fewer), diversity-based selection (DivPrune, DART, ToDRE) keeps a "
    "better set of visual tokens than [CLS]-attention importance, and random selection is as strong as importance "
    "(DART's observation)."
)
DIVERSITY = ("divprune", "dart", "todre")
BEATS = {name: evidence.PartSpec(
    id=f"{name}_beats_cls", statement=f"{name} keeps a better set than [CLS] attention (mean over {{keeps}})",
    metric=METRIC, unit="image", papers=(name,)) for name in DIVERSITY}
RANDOM_STRONG = evidence.PartSpec(
    id="random_as_strong", statement="random selection is as good as [CLS] attention, within ±δ (mean over {keeps})",
    metric=METRIC, unit="image", papers=("dart",))
JUDGED = (*BEATS.values(), RANDOM_STRONG)


class Params(VisionParams):
    """Parameters of ``vit-diversity``; the defaults live in ``params/vit-diversity.yaml``."""

    notebook = "vit-diversity"
    judged = JUDGED

    extreme_keep: float = Field(gt=0, le=1, description="kept shares at or below this are 'extreme' (judged)")
    importance: str = Field(description="label of the [CLS]-attention scorer (the importance baseline)")
    random: str = Field(description="label of the random scorer")
    photo: PhotoName = Field(description="sample photo for the kept-patch overlay")
    photo_size: ImageSize = Field(description="photo resolution (multiple of 14)")
    photo_keep: float = Field(gt=0, le=1, description="kept share in the overlay")

    @model_validator(mode="after")
    def _roles(self) -> "Params":
        check_labels([self.importance, self.random, *DIVERSITY], self.scorers,
                     "importance / random / the diversity rules")
        if not self.extreme_keeps:
            raise ValueError(f"no kept share in keeps {self.keeps} is ≤ extreme_keep {self.extreme_keep}: "
                             "add one or raise extreme_keep")
        return self

    @property
    def extreme_keeps(self) -> list[float]:
        return [k for k in self.keeps if k <= self.extreme_keep]


def judge_claim(table: pd.DataFrame, params: Params, bench) -> evidence.Claim:
    """Each diversity rule against [CLS] attention (better) and random against [CLS] attention (equivalence, two
    one-sided tests against ±δ), on the deciding reader's per-image true-class probability averaged over the extreme
    kept shares; the label follows :func:`salience.evidence.overall_label`."""
    keeps = params.extreme_keeps
    fill = dict(keeps=keeps_text(keeps))

    def against_importance(entry):
        return lambda reader: (per_image(table, reader, entry, keeps=keeps),
                               per_image(table, reader, params.importance, keeps=keeps))

    arms = {spec.id: (dataclasses.replace(spec, statement=spec.statement.format(**fill)), against_importance(name),
                      f"a: {name}; b: {params.importance}") for name, spec in BEATS.items()}
    arms[RANDOM_STRONG.id] = (
        dataclasses.replace(RANDOM_STRONG, statement=RANDOM_STRONG.statement.format(**fill)),
        against_importance(params.random),
        f"a: {params.random} averaged over {params.random_replicates} seeds per image; b: {params.importance}")
    parts, notes = judge_parts(table, params, arms)
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting_text(params, bench, ["after_encoder"]), notes=notes, seed=params.seed)
