"""Notebook ``guided-whisper-pruning``: does text-guided pruning of Whisper's encoder frames (FastV's rule [@fastv]:
keep what the decoder's first steps attend to) beat text-free and uniform pruning at equal kept share, and how much
of the 30 s window is silence that any rule should drop first?

Task: ``utterances`` English sentences of known text (seeded from the shipped Wikipedia leads), spoken by espeak-ng
(:mod:`salience.data.speech`) and transcribed by Whisper tiny.en [@whisper]. For each kept share, each rule keeps
that many of the 1500 encoder frames; the rest are removed from ``encoder_hidden_states`` before the decoder reads
them (:mod:`salience.harness.whisper_pruning`), and the greedy transcript's word error rate (jiwer) decides.

Rows of every table: ``unpruned`` (all 1500 frames), the judged rules (``cross_attention``, ``self_attention``,
``energy``, ``uniform``), ``random`` (``random_replicates`` seeded draws averaged per utterance), the
``oracle_speech_span`` (knows from the synthesis where the audio ends: frames spread over the speech span), and
``speech_only`` (exactly the frames that hold audio, at each utterance's own share: the silence analysis).
"""

from __future__ import annotations

import dataclasses
import re

import jiwer
import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from .. import evidence
from ..harness import whisper_pruning as wp
from ..seeding import unit_seed
from .speech_params import SpeechParams, load_speech  # noqa: F401 (the notebook calls exp.load_speech)

TITLE = "Text-guided pruning of Whisper's encoder frames: cross-attention vs self-attention, energy and uniform"
PAPERS = ["fastv", "fastervlm", "whisper"]
CLAIM = ("Pruning Whisper's encoder frames by the decoder's cross-attention of its first decoding steps (text-guided, "
         "FastV-style) gives a lower word error rate than pruning by encoder self-attention received (text-free), by "
         "frame energy, or by uniform temporal sampling at equal kept share; and dropping the padding after the speech "
         "leaves the word error rate unchanged.")
RULES = ("cross_attention", "self_attention", "energy", "uniform")
CONTROLS = ("unpruned", "random", "oracle_speech_span", "speech_only")


def _beats(b: str, text_b: str) -> evidence.PartSpec:
    return evidence.PartSpec(id=f"cross_attention_beats_{b}", unit="utterance", higher_is_better=False,
                             statement=f"Cross-attention of the first {{m}} decoding steps keeps better frames than "
                                       f"{text_b}", metric="WER, mean over kept shares {shares}", papers=("fastv",))


JUDGED = (
    _beats("self_attention", "encoder self-attention received (text-free)"),
    _beats("energy", "frame energy (voice activity)"),
    _beats("uniform", "uniform temporal sampling"),
    evidence.PartSpec(id="silence_drop_is_free", unit="utterance", higher_is_better=False, papers=("whisper",),
                      statement="Keeping only the frames that hold audio (the padding dropped) leaves WER unchanged",
                      metric="WER, frames holding audio vs all 1500"),
)


class Params(SpeechParams):
    """Parameters of ``guided-whisper-pruning``; the defaults live in ``params/guided-whisper-pruning.yaml``."""

    notebook = "guided-whisper-pruning"

    kept_shares: list[float] = Field(min_length=1, description="shares of the 1500 encoder frames kept, each in (0, 1]")
    judged_max_share: float = Field(gt=0, le=1, description="the parts average WER over the kept shares at or below this")
    guide_steps: int = Field(ge=1, le=32, description="m: decoding steps whose cross-attention scores the frames")
    guide_layers: list[int] = Field(min_length=1, description="decoder layers whose cross-attention is averaged")
    encoder_layers: list[int] = Field(min_length=1, description="encoder layers whose self-attention is averaged")
    max_new_tokens: int = Field(ge=4, le=440, description="greedy decoding stops after this many tokens")
    random_replicates: int = Field(ge=1, le=20, description="seeded random frame sets averaged per utterance")
    timing_utterances: int = Field(ge=0, le=500, description="utterances (the first ones) timed on one thread")
    timing_repeats: int = Field(ge=1, le=20, description="repeats per timing (the fastest is reported)")
    parts: dict[str, evidence.PartRule] = Field(description="direction and smallest effect δ of each judged part")

    @field_validator("kept_shares")
    @classmethod
    def _shares(cls, shares: list[float]) -> list[float]:
        for share in shares:
            wp.check_kept_share(share)
        if len(set(shares)) != len(shares):
            raise ValueError(f"kept shares must be distinct, got {shares}")
        return sorted(shares, reverse=True)

    judged = JUDGED

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if not self.judged_shares:
            raise ValueError(f"no kept share <= judged_max_share ({self.judged_max_share}) in {self.kept_shares}")
        if self.timing_utterances > self.utterances:
            raise ValueError(f"timing_utterances ({self.timing_utterances}) > utterances ({self.utterances})")
        return self

    @property
    def judged_shares(self) -> list[float]:
        return [s for s in self.kept_shares if s <= self.judged_max_share]


# --------------------------------------------------------------------------------------------- data and WER
def normalize(text: str) -> str:
    """WER normalisation: lower-case, hyphens and slashes to spaces, every other non-letter/digit character
    (punctuation, apostrophes) removed, white space collapsed."""
    text = re.sub(r"[-/]", " ", text.lower())
    return " ".join(re.sub(r"[^a-z0-9 ]", "", text).split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """jiwer's WER of the normalised texts (an empty hypothesis scores 1; a looping one can exceed 1)."""
    ref = normalize(reference)
    if not ref:
        raise ValueError(f"reference {reference!r} has no words after normalisation")
    return float(jiwer.wer(ref, normalize(hypothesis)))


# --------------------------------------------------------------------------------------------- the experiment
def frame_sets(utt: dict, scores: dict[str, np.ndarray], k: int, rng: np.random.Generator, params: Params
               ) -> list[tuple[str, np.ndarray]]:
    """Every rule's and control's kept frames at ``k`` (random: ``random_replicates`` draws, listed separately)."""
    sets = [(rule, wp.top_k_indices(scores[rule], k)) for rule in ("cross_attention", "self_attention", "energy")]
    sets += [("uniform", wp.uniform_indices(k)), ("oracle_speech_span", wp.speech_span_indices(utt["audio"].size, k))]
    sets += [("random", wp.random_indices(k, rng)) for _ in range(params.random_replicates)]
    return sets


def evaluate(speech: list[dict], bundle, params: Params, progress: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """One row per utterance × method × kept share: WER, kept frames, the decoder's cross-attention key count, the
    transcript. Also returns each utterance's frame scores (for the figure)."""
    model, processor = bundle.model, bundle.processor
    decode = lambda tokens: processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()  # noqa: E731
    rows, all_scores = [], []
    for unit, utt in enumerate(tqdm(speech, desc="utterances", disable=not progress)):
        hidden, received = wp.encode(model, wp.log_mel(processor.feature_extractor, utt["audio"]),
                                     params.encoder_layers)
        full = wp.greedy_decode(model, hidden, params.max_new_tokens, guide_steps=params.guide_steps,
                                guide_layers=params.guide_layers)
        scores = {"cross_attention": full.guide[0], "self_attention": received, "energy": wp.frame_energy(utt["audio"])}
        all_scores.append(scores)
        base = dict(utterance=unit, reference=utt["text"])

        def add(method, share, frames, decoded, i=0):
            text = decode(decoded.tokens[i])
            rows.append({**base, "method": method, "kept_share": share, "kept_frames": frames,
                         "cross_keys": decoded.cross_keys, "wer": word_error_rate(utt["text"], text),
                         "hypothesis": text})

        add("unpruned", 1.0, wp.N_FRAMES, full)
        span = np.arange(utt["speech_frames"])
        add("speech_only", span.size / wp.N_FRAMES, span.size,
            wp.greedy_decode(model, wp.prune(hidden, span), params.max_new_tokens))
        rng = np.random.default_rng(unit_seed(params.seed, unit))
        for share in params.kept_shares:
            k = wp.kept_count(share)
            sets = frame_sets(utt, scores, k, rng, params)
            batch = torch.cat([wp.prune(hidden, idx) for _, idx in sets])
            decoded = wp.greedy_decode(model, batch, params.max_new_tokens)
            for i, (method, _) in enumerate(sets):
                add(method, share, k, decoded, i)
    table = pd.DataFrame(rows)
    table = (table.groupby(["utterance", "method", "kept_share"], as_index=False, sort=False)
             .agg(reference=("reference", "first"), kept_frames=("kept_frames", "first"),
                  cross_keys=("cross_keys", "first"), draws=("wer", "size"), wer=("wer", "mean"),
                  hypothesis=("hypothesis", "first")))
    if not (table.cross_keys == table.kept_frames).all():
        raise AssertionError("a decoder read a different number of frames than were kept")
    return table, all_scores


def silence_table(speech: list[dict], table: pd.DataFrame) -> pd.DataFrame:
    """Per utterance: spoken seconds, frames holding audio, the share of the 30 s window that is padding, and WER
    with all frames vs with the audio frames only."""
    wer = table.pivot_table(index="utterance", columns="method", values="wer", aggfunc="first")
    return pd.DataFrame([dict(utterance=u, words=s["words"], seconds=round(s["seconds"], 3),
                              speech_frames=s["speech_frames"], padding_share=1 - s["speech_frames"] / wp.N_FRAMES,
                              wer_unpruned=wer.loc[u, "unpruned"], wer_speech_only=wer.loc[u, "speech_only"])
                         for u, s in enumerate(speech)])


def time_decoding(speech: list[dict], table: pd.DataFrame, bundle, params: Params) -> pd.DataFrame:
    """Wall-clock decoder time on one torch thread (fastest of ``timing_repeats``) on the first ``timing_utterances``
    utterances: all frames; the cross-attention rule's pruned decode plus its scoring pass (``guide_steps`` steps over
    all 1500 frames with attention weights); the uniform rule's pruned decode (no scoring pass). Shown, not judged."""
    model, fe = bundle.model, bundle.processor.feature_extractor
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for unit, utt in enumerate(speech[:params.timing_utterances]):
            hidden, _ = wp.encode(model, wp.log_mel(fe, utt["audio"]), params.encoder_layers)
            full_s, full = wp.timed_decode(model, hidden, params.max_new_tokens, params.timing_repeats)
            score_s, scored = wp.timed_decode(model, hidden, params.guide_steps, params.timing_repeats,
                                              guide_steps=params.guide_steps)
            rows.append(dict(utterance=unit, rule="unpruned", kept_share=1.0, decode_s=full_s, steps=full.steps,
                             scoring_pass_s=0.0))
            for share in params.kept_shares:
                k = wp.kept_count(share)
                for rule, idx in (("cross_attention", wp.top_k_indices(scored.guide[0], k)),
                                  ("uniform", wp.uniform_indices(k))):
                    seconds, out = wp.timed_decode(model, wp.prune(hidden, idx), params.max_new_tokens,
                                                   params.timing_repeats)
                    rows.append(dict(utterance=unit, rule=rule, kept_share=share, decode_s=seconds, steps=out.steps,
                                     scoring_pass_s=score_s if rule == "cross_attention" else 0.0))
    finally:
        torch.set_num_threads(threads)
    timing = pd.DataFrame(rows)
    timing["total_s"] = timing.decode_s + timing.scoring_pass_s
    timing["ms_per_step"] = 1000 * timing.decode_s / timing.steps
    return timing


# --------------------------------------------------------------------------------------------- tables and verdict
def per_utterance(table: pd.DataFrame, method: str, shares: list[float] | None) -> pd.Series:
    """Per-utterance WER of ``method``, averaged over ``shares`` (None: its only row, e.g. unpruned)."""
    rows = table[table.method == method]
    if shares is not None:
        rows = rows[rows.kept_share.isin(shares)]
    if rows.empty:
        raise ValueError(f"no rows for method {method!r}; methods: {sorted(table.method.unique())}")
    return rows.groupby("utterance").wer.mean()


def method_table(table: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per method and kept share: utterances, mean WER, share of utterances with WER > 1 (a looping transcript),
    frames kept and read by the decoder, and the paired WER difference from the cross-attention rule [95% CI]."""
    rows = []
    own_share = table.method == "speech_only"  # each utterance at its own share: one row over all of them
    groups = table.assign(share=table.kept_share.where(~own_share, -1.0)).groupby(["method", "share"], sort=False)
    for (method, share), group in groups:
        share = group.kept_share.mean()
        row = dict(method=method, kept_share=round(share, 4), utterances=len(group), mean_wer=group.wer.mean(),
                   looping=(group.wer > 1).mean(), kept_frames=group.kept_frames.mean(),
                   keys_read=group.cross_keys.mean())
        ref = table[(table.method == "cross_attention") & (table.kept_share == share)].set_index("utterance").wer
        if method not in ("cross_attention", "speech_only", "unpruned") and len(ref) == len(group):
            diff = (group.set_index("utterance").wer - ref).to_numpy()
            lo, hi, _ = evidence.paired_interval(diff, seed=params.seed)
            row["vs cross_attention"] = evidence.fmt_interval(float(diff.mean()), lo, hi)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["kept_share", "mean_wer"], ascending=[False, True]).reset_index(drop=True)


def judge_claim(table: pd.DataFrame, params: Params) -> evidence.Claim:
    """Three rule comparisons (paired over utterances on WER averaged over the judged kept shares) and the silence
    part (audio frames only vs all frames); the label follows :func:`salience.evidence.overall_label`."""
    shares = params.judged_shares
    fill = dict(m=params.guide_steps, shares=", ".join(f"{s:g}" for s in shares))
    guided = per_utterance(table, "cross_attention", shares)
    parts = []
    for spec, rule in evidence.parts_for(JUDGED, params.parts):
        spec = dataclasses.replace(spec, statement=spec.statement.format(**fill), metric=spec.metric.format(**fill))
        if spec.id == "silence_drop_is_free":
            a, b = per_utterance(table, "speech_only", None), per_utterance(table, "unpruned", None)
            detail = "a: speech_only (frames holding audio); b: unpruned (1500 frames)"
        else:
            other = spec.id.removeprefix("cross_attention_beats_")
            a, b, detail = guided, per_utterance(table, other, shares), f"a: cross_attention; b: {other}"
        parts.append(evidence.judge(spec, rule, a, b, seed=params.seed, detail=detail))
    kept_audio = table[table.method == "speech_only"].kept_share
    setting = (
        f"FastV prunes visual tokens inside a vision-language model after layer 2, by the attention the last prompt "
        f"token pays them during prefill; here Whisper tiny.en's decoder has no text prompt, so the text-guided score "
        f"is the cross-attention of its first {params.guide_steps} greedy decoding steps over all 1500 encoder frames "
        f"(decoder layers {params.guide_layers}), after which the frames are pruned from the encoder output and "
        f"decoding restarts. FasterVLM ranks by the vision encoder's [CLS] attention; Whisper's encoder has no [CLS], so "
        f"the text-free score is the self-attention each frame receives (encoder layers {params.encoder_layers}). "
        f"Speech: {params.utterances} Wikipedia sentences of {params.min_words}-{params.max_words} words spoken by "
        f"espeak-ng (voice {params.voice}, {params.speed} wpm), resampled to 16 kHz; greedy decoding, at most "
        f"{params.max_new_tokens} tokens; WER by jiwer after lower-casing and stripping punctuation.")
    notes = [f"The audio fills {kept_audio.mean():.1%} of the 30 s window on average "
             f"(range {kept_audio.min():.1%}-{kept_audio.max():.1%}); the rest is zero padding.",
             f"Controls (not judged): all frames, random ({params.random_replicates} seeded draws averaged), and an "
             f"oracle that knows where the audio ends (frames spread evenly over the speech span)."]
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting, notes=notes, seed=params.seed)


# --------------------------------------------------------------------------------------------- figure
def plot_rules(table: pd.DataFrame, scores: list[dict], speech: list[dict], params: Params, example: int = 0):
    """Left: mean WER against the kept share per rule (95% bootstrap interval over utterances), all frames dashed,
    the mean audio share dotted. Right: one utterance's three frame scores (each scaled to its maximum) over the
    30 s window, the frames holding audio shaded."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
    swept = table[table.method.isin(RULES + ("random", "oracle_speech_span"))]
    sns.lineplot(swept, x="kept_share", y="wer", hue="method", marker="o", errorbar=("ci", 95), seed=params.seed,
                 ax=left)
    left.axhline(per_utterance(table, "unpruned", None).mean(), ls="--", color="grey", label="all frames")
    left.axvline(table[table.method == "speech_only"].kept_share.mean(), ls=":", color="grey", label="audio share")
    left.set(xscale="log", xlabel="kept share of the 1500 frames", ylabel="WER", title="WER by pruning rule")
    left.legend(fontsize=8)
    seconds = np.arange(wp.N_FRAMES) * wp.FRAME_SAMPLES / wp.SAMPLING_RATE
    for name, values in scores[example].items():
        right.plot(seconds, values / values.max(), lw=0.8, label=name)
    right.axvspan(0, speech[example]["seconds"], color="grey", alpha=0.15, label="audio")
    right.set(xlabel="time in the 30 s window (s)", ylabel="score / max", title=f"utterance {example}: frame scores")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
