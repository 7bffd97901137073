"""Notebook ``vit-merging``: merging vs dropping visual tokens at equal token counts, each in its own setting, and
what in-encoder reduction buys in time.

- VisionZip [@visionzip] is an **after-encoder** method: the encoder runs on every token, then the dominant output
  tokens (by [CLS] attention) are kept and the rest merged by key similarity into a few contextual tokens; its
  baseline is FasterVLM-style [CLS]-ranked dropping [@fastervlm] of the same output tokens, at the same count.
- ToMe [@tome] is an **in-encoder** method: tokens are merged after block l (bipartite soft matching, size-weighted
  averages) and the later blocks run on fewer tokens, with proportional attention (``+log size`` on merged keys);
  its baseline is in-encoder [CLS]-ranked dropping after the same block (EViT's setting [@evit]).
- Speed: the whole encoder pass with ToMe after block l against the unreduced pass, timed on the same batch in
  every repeat (configurations rotated), so each repeat is one paired unit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator

from .. import evidence
from ..paths import REPO_ROOT
from ..scorers.spec import build_scorers
from ..vision_tasks import Reduction, digit_pixels, paired_latency
from .vision_params import ImageSize, KeepRatios, PhotoNames, VisionParams, check_keep_in, check_labels
from .vit_common import METRIC, MergeSpec, check_merges, judge_parts, keeps_text, per_image, setting_text

TITLE = "Merging vs dropping visual tokens: VisionZip after the encoder, ToMe inside it"
PAPERS = ["visionzip", "tome", "fastervlm", "evit"]
CLAIM = (
    "At equal token counts, merging keeps a better set than dropping by [CLS] attention — VisionZip's dominant + "
    "contextual tokens against dropping the encoder's output tokens, ToMe's size-weighted merging against dropping "
    "inside the encoder — and reducing tokens inside the encoder really speeds it up."
)
VISIONZIP = evidence.PartSpec(
    id="visionzip_beats_drop", statement="after the encoder, VisionZip keeps a better set than [CLS]-ranked dropping "
                                         "at the same token count (mean over {keeps})",
    metric=METRIC, unit="image", papers=("visionzip",))
TOME = evidence.PartSpec(
    id="tome_beats_drop", statement="inside the encoder (after block {layer}), ToMe keeps a better set than "
                                    "[CLS]-ranked dropping at the same token count (mean over {keeps})",
    metric=METRIC, unit="image", papers=("tome", "evit"))
SPEEDUP = evidence.PartSpec(
    id="speedup", statement="ToMe after block {layer} at {keep} of the patches makes the encoder faster than the "
                            "unreduced one", metric="ln(unreduced ÷ ToMe CPU time), one thread, same batch",
    unit="timing repeat", papers=("tome",))
JUDGED = (VISIONZIP, TOME, SPEEDUP)
#: torch threads of timed CPU runs (one: process time is then the work itself, robust to a busy machine)
LATENCY_THREADS = 1


class Params(VisionParams):
    """Parameters of ``vit-merging``; the defaults live in ``params/vit-merging.yaml``."""

    notebook = "vit-merging"
    judged = JUDGED

    merges: list[MergeSpec] = Field(min_length=1, description="merging entries: {method: tome | visionzip, label, "
                                                              "dominant: <scorer label for visionzip>}")
    in_encoder_layer: int = Field(ge=1, description="in-encoder entries reduce after this block")
    in_encoder_keeps: KeepRatios = Field(description="in-encoder kept shares")
    in_encoder_entries: list[str] = Field(min_length=1, description="labels run in-encoder too (scorers or merges)")
    drop: str = Field(description="label of the dropping baseline ([CLS] attention)")
    visionzip: str = Field(description="label of the VisionZip merge")
    tome: str = Field(description="label of the ToMe merge")
    contextual: float = Field(ge=0, lt=1, description="VisionZip: share of the budget given to contextual tokens")
    proportional_attention: bool = Field(description="in-encoder merging adds log(size) to merged keys' logits")
    latency_csv: str = Field(description="paired timings written by benchmarks/bench_vit_latency.py (relative to "
                                         "the repository)")
    rerun_latency: bool = Field(description="measure the timings in this run instead of reading latency_csv")
    latency_batch: int = Field(ge=1, le=4096, description="test images per timed forward pass")
    latency_keep: float = Field(gt=0, le=1, description="kept share of the timed reductions")
    repeats: int = Field(ge=2, le=100, description="timed repeats (the paired units of the speed part)")
    timing_inner: int = Field(ge=1, le=20, description="timed runs per configuration within a repeat (the fastest "
                                                       "counts)")
    photos: PhotoNames = Field(description="sample photos for the merge-group overlays")
    photo_size: ImageSize = Field(description="photo resolution (multiple of 14)")
    photo_keep: float = Field(gt=0, le=1, description="kept share in the overlays")

    @model_validator(mode="after")
    def _roles(self) -> "Params":
        check_merges(self.merges, self.scorers)
        check_labels([self.drop], self.scorers, "drop")
        merges = {m.label: m.method for m in self.merges}
        for label, method in ((self.visionzip, "visionzip"), (self.tome, "tome")):
            if merges.get(label) != method:
                raise ValueError(f"{method}: {label!r} must be the label of a {method} entry in `merges` "
                                 f"(merges: {merges})")
        known = [s.key for s in self.scorers] + list(merges)
        unknown = [e for e in self.in_encoder_entries if e not in known]
        if unknown or not {self.drop, self.tome} <= set(self.in_encoder_entries):
            raise ValueError(f"in_encoder_entries {self.in_encoder_entries} must name known entries ({known}) and "
                             f"include the drop baseline {self.drop!r} and ToMe {self.tome!r}")
        check_keep_in(self.latency_keep, self.in_encoder_keeps, "latency_keep")
        return self


def measure_latency(model, params: Params, threads: int | None = LATENCY_THREADS) -> pd.DataFrame:
    """Paired timings now: the unreduced encoder, ToMe and [CLS]-ranked dropping after ``in_encoder_layer`` at
    ``latency_keep``, on the first ``latency_batch`` test images (:func:`salience.vision_tasks.paired_latency`)."""
    pixels, _ = digit_pixels(params.dataset, "test", n=params.n_test, size=params.image_size, seed=params.seed)
    pixels = pixels[:params.latency_batch].to(params.device)
    scorer = build_scorers(params.scorers)[params.drop]
    merge = {"proportional_attention": params.proportional_attention}
    reductions = {params.tome: Reduction(None, params.latency_keep, "tome", merge),
                  params.drop: Reduction(scorer, params.latency_keep, "drop")}
    with torch.inference_mode():
        return paired_latency(model, pixels, reductions, params.in_encoder_layer, repeats=params.repeats,
                              inner=params.timing_inner, threads=threads)


def latency_settings(params: Params) -> dict:
    """What stored timings must have been measured with, by CSV column (``benchmarks/bench_vit_latency.py`` writes
    them): model, image size, device, layer, kept share, batch, repeats, inner runs, and on the CPU the threads."""
    want = {"model": params.model, "image_size": params.image_size, "device": params.device.split(":")[0],
            "layer": params.in_encoder_layer, "keep": params.latency_keep, "batch": params.latency_batch,
            "repeats": params.repeats, "timing_inner": params.timing_inner}
    if want["device"] == "cpu":
        want["threads"] = LATENCY_THREADS
    return want


def _differs(got: list, want) -> bool:
    if len(got) != 1:
        return True
    if isinstance(want, float):
        return not np.isclose(float(got[0]), want)
    return str(got[0]) != str(want)


def latency(model, params: Params) -> tuple[pd.DataFrame, str]:
    """The timings the speed part is judged on and where they come from: ``latency_csv`` (written by
    ``benchmarks/bench_vit_latency.py``), or a measurement in this run when ``rerun_latency`` is true.

    A stored CSV must have been measured with this run's settings (:func:`latency_settings`; a one-line error
    naming what differs otherwise).
    """
    if params.rerun_latency:
        return measure_latency(model, params), "measured in this run"
    csv = Path(params.latency_csv).expanduser()
    csv = csv if csv.is_absolute() else REPO_ROOT / csv
    if not csv.is_file():
        raise ValueError(f"latency_csv {params.latency_csv!r} does not exist: run `python benchmarks/"
                         "bench_vit_latency.py` first, or set rerun_latency: true")
    lat = pd.read_csv(csv)
    want = latency_settings(params)
    rerun = "re-run benchmarks/bench_vit_latency.py or set rerun_latency: true"
    missing = [k for k in want if k not in lat.columns]
    if missing:
        raise ValueError(f"{params.latency_csv} does not say which {', '.join(missing)} it was measured with: {rerun}")
    reduced = lat[lat.config != "unreduced"]
    got = {k: sorted(set(reduced[k])) for k in want}
    differ = [k for k in want if _differs(got[k], want[k])]
    if differ:
        measured = ", ".join(f"{k}={'/'.join(map(str, got[k]))}" for k in differ)
        asked = ", ".join(f"{k}={want[k]}" for k in differ)
        raise ValueError(f"{params.latency_csv} was measured with {measured}, this run asks for {asked}: {rerun}")
    first = lat.iloc[0]
    return lat, (f"{csv.relative_to(REPO_ROOT) if csv.is_relative_to(REPO_ROOT) else csv} "
                 f"({first.device}, {first.threads} thread(s), torch {first.torch}, load {first.load_avg_1m} when "
                 f"measured)")


def speedups(lat: pd.DataFrame) -> pd.DataFrame:
    """Per repeat and reduction: ``ln(unreduced / reduced)`` of wall and CPU time, and the FLOPs ratio."""
    base = lat[lat.config == "unreduced"].set_index("repeat")
    rows = []
    for config, d in lat[lat.config != "unreduced"].groupby("config", sort=False):
        d = d.set_index("repeat")
        rows.append(pd.DataFrame({"config": config, "repeat": d.index,
                                  "log_speedup": np.log(base.seconds / d.seconds).to_numpy(),
                                  "log_speedup_cpu": np.log(base.cpu_seconds / d.cpu_seconds).to_numpy(),
                                  "flops_ratio": (d.flops / base.flops).to_numpy()}))
    return pd.concat(rows, ignore_index=True)


def speedup_summary(sp: pd.DataFrame) -> pd.DataFrame:
    """Per reduction: geometric-mean speed-up over the repeats (wall and CPU time) and the FLOPs ratio."""
    return sp.groupby("config", sort=False).agg(
        speedup=("log_speedup", lambda x: float(np.exp(x.mean()))),
        speedup_cpu=("log_speedup_cpu", lambda x: float(np.exp(x.mean()))),
        flops_ratio=("flops_ratio", "first")).reset_index()


def judge_claim(table: pd.DataFrame, lat: pd.DataFrame, params: Params, bench, source: str = "") -> evidence.Claim:
    """Two paired comparisons over test images (after-encoder VisionZip vs drop, in-encoder ToMe vs drop; the
    deciding reader's true-class probability, mean over kept shares) and the speed part (one-sample over timing
    repeats); the label follows :func:`salience.evidence.overall_label`."""
    fill_after = dict(keeps=keeps_text(params.keeps))
    fill_in = dict(keeps=keeps_text(params.in_encoder_keeps), layer=params.in_encoder_layer,
                   keep=keeps_text([params.latency_keep]))

    def pair(entry, setting, keeps):
        return lambda reader: (per_image(table, reader, entry, setting=setting, keeps=keeps),
                               per_image(table, reader, params.drop, setting=setting, keeps=keeps))

    def fmt(spec, fill):
        return dataclasses.replace(spec, statement=spec.statement.format(**fill))

    arms = {
        VISIONZIP.id: (fmt(VISIONZIP, fill_after), pair(params.visionzip, "after_encoder", params.keeps),
                       f"a: {params.visionzip} (dominant by {params.drop}, {params.contextual:.0%} of the budget "
                       f"contextual); b: {params.drop}, dropping, same output token count"),
        TOME.id: (fmt(TOME, fill_in), pair(params.tome, "in_encoder", params.in_encoder_keeps),
                  f"a: {params.tome}; b: {params.drop}; both after block {params.in_encoder_layer}, "
                  "blocks after it run on the same token count"),
    }
    parts, notes = judge_parts(table, params, arms, in_encoder=[TOME.id])
    sp = speedups(lat)
    tome = sp[sp.config == params.tome].set_index("repeat")
    flops = float(tome.flops_ratio.iloc[0])
    parts.append(evidence.judge_one_sample(
        fmt(SPEEDUP, fill_in), params.parts[SPEEDUP.id], tome.log_speedup_cpu, seed=params.seed,
        detail=f"{params.latency_batch} test images per pass on one CPU thread (process time: the work itself, robust "
               f"to a busy machine; wall time is in the tables); {len(tome)} repeats after one warm-up, in each the "
               f"fastest of {params.timing_inner} interleaved runs per configuration (order rotated each repeat); "
               f"FLOPs estimate {flops:.2f} × the unreduced pass; timings from {source or 'this run'}"))
    notes.append("VisionZip also claims faster prefilling of the language model; with no language model here only "
                 "the encoder's own time is measured, and after-encoder reduction leaves it unchanged.")
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting_text(params, bench, ["after_encoder", "in_encoder"]), notes=notes,
                          seed=params.seed)
