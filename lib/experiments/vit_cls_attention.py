"""Notebook ``vit-cls-attention``: keep the output patches the [CLS] token attends to (FasterVLM [@fastervlm]),
or those of VTC-CLS's layer ensemble [@vtc_cls], and read the kept set the way a VLM's language model would.

Setting: after-encoder, as in both papers. The encoder (embedded DINOv2-S) runs once on every token of each MNIST
digit; the scorers read that pass ([CLS] attention of the last block, of the block before it, the mean over all
blocks); the reduction keeps the top patches of the encoder's *output*; a reader stands in for the language model.
Nothing is re-run per reduction: it is a selection over cached output tokens (:mod:`salience.vision_eval`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from .. import evidence
from ..vision_tables import summary
from .vision_params import ImageSize, PhotoNames, VisionParams, check_keep_in, check_labels
from .vit_common import METRIC, judge_parts, keeps_text, per_image, setting_text

TITLE = "[CLS]-attention pruning of visual tokens: FasterVLM and VTC-CLS"
PAPERS = ["fastervlm", "vtc_cls"]
CLAIM = (
    "Ranking a vision encoder's output patches by [CLS] attention (FasterVLM) keeps what the reader needs: at 5% of "
    "the patches it retains at least 90% of the unpruned score, it beats random selection, and VTC-CLS's "
    "multi-layer ensemble is at least as good as the last layer alone."
)
RETENTION = evidence.PartSpec(
    id="retention", statement="at {claim_keep} of the patches, [CLS]-attention pruning keeps ≥ {share:.0%} of the "
                              "unpruned score of each image",
    metric=METRIC + " (b = {share:.0%} × unpruned)", unit="image", papers=("fastervlm",))
BEATS_RANDOM = evidence.PartSpec(
    id="beats_random", statement="[CLS] attention keeps a better set than random selection (mean over {keeps})",
    metric=METRIC, unit="image", papers=("fastervlm",))
ENSEMBLE = evidence.PartSpec(
    id="ensemble_no_worse", statement="VTC-CLS's layer ensemble is at least as good as the last layer's [CLS] "
                                      "attention, within δ (mean over {keeps})",
    metric=METRIC, unit="image", papers=("vtc_cls",))
JUDGED = (RETENTION, BEATS_RANDOM, ENSEMBLE)


class Params(VisionParams):
    """Parameters of ``vit-cls-attention``; the defaults live in ``params/vit-cls-attention.yaml``."""

    notebook = "vit-cls-attention"
    judged = JUDGED

    claim_keep: float = Field(gt=0, le=1, description="the kept share FasterVLM's retention is claimed at")
    retention_share: float = Field(gt=0, le=1, description="share of the unpruned score FasterVLM claims to keep")
    last_layer: str = Field(description="label of the last block's [CLS]-attention scorer (FasterVLM)")
    ensemble: str = Field(description="label of VTC-CLS's layer-ensemble scorer")
    random: str = Field(description="label of the random scorer (the floor)")
    photos: PhotoNames = Field(description="sample photos for the kept-patch overlays")
    photo_size: ImageSize = Field(description="photo resolution (multiple of 14)")
    photo_keep: float = Field(gt=0, le=1, description="kept share in the overlays")

    @model_validator(mode="after")
    def _roles(self) -> "Params":
        check_labels([self.last_layer, self.ensemble, self.random], self.scorers, "last_layer / ensemble / random")
        check_keep_in(self.claim_keep, self.keeps, "claim_keep")
        return self


def _spec(spec: evidence.PartSpec, params: Params) -> evidence.PartSpec:
    fill = dict(claim_keep=keeps_text([params.claim_keep]), share=params.retention_share,
                keeps=keeps_text(params.keeps))
    return dataclasses.replace(spec, statement=spec.statement.format(**fill), metric=spec.metric.format(**fill))


def retention_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean true-class probability of each entry as a share of the unpruned one, per reader and kept share."""
    s = summary(table)
    ref = s[s.entry == "unpruned"].set_index("reader").p_true
    s = s[s.entry != "unpruned"].assign(retention=lambda d: d.p_true / d.reader.map(ref))
    wide = s.pivot_table(index=["entry", "keep", "tokens"], columns="reader", values="retention", sort=False)
    return wide.reset_index()


def judge_claim(table: pd.DataFrame, params: Params, bench) -> evidence.Claim:
    """The three parts on the deciding reader's per-image true-class probability (after-encoder), each re-judged
    under the other readers in the notes; the label follows :func:`salience.evidence.overall_label`."""
    keeps = params.keeps

    def retention(reader):
        return (per_image(table, reader, params.last_layer, keeps=[params.claim_keep]),
                params.retention_share * per_image(table, reader, "unpruned"))

    def beats_random(reader):
        return (per_image(table, reader, params.last_layer, keeps=keeps),
                per_image(table, reader, params.random, keeps=keeps))

    def ensemble(reader):
        return (per_image(table, reader, params.ensemble, keeps=keeps),
                per_image(table, reader, params.last_layer, keeps=keeps))

    at_claim = (table.entry == params.last_layer) & np.isclose(table.keep, params.claim_keep)
    tokens = int(table[at_claim].tokens.iloc[0])
    arms = {
        RETENTION.id: (_spec(RETENTION, params), retention,
                       f"a: {params.last_layer} at {keeps_text([params.claim_keep])} ({tokens} of the "
                       f"{int(table[table.entry == 'unpruned'].tokens.iloc[0])} patches); b: "
                       f"{params.retention_share:g} × the unpruned value of the same image"),
        BEATS_RANDOM.id: (_spec(BEATS_RANDOM, params), beats_random,
                          f"a: {params.last_layer}; b: {params.random} averaged over {params.random_replicates} "
                          "seeds per image"),
        ENSEMBLE.id: (_spec(ENSEMBLE, params), ensemble, f"a: {params.ensemble}; b: {params.last_layer}"),
    }
    parts, notes = judge_parts(table, params, arms)
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting_text(params, bench, ["after_encoder"]), notes=notes, seed=params.seed)
