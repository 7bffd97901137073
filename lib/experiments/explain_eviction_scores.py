"""Notebook ``explain-eviction-scores``: the KV-cache scorers read as attributions of what the model predicts next.
Which are faithful (ERASER AOPC [@eraser] against random and a gradient attribution [@gradient_x_input]), and does a
scorer's faithfulness predict how well it evicts?

Per Wikipedia document (the kv-leaderboard's continuation task): one uncompressed prefill of context + continuation
captures every layer's attention; every scorer scores the context from it (the oracle reads the continuation's
attention); every scorer × budget's compressed cache is fed the continuation (KL to the full cache, its area over the
budgets: the eviction quality, :mod:`salience.kv_tasks`). The **same** scores, aggregated over layers and heads
(:func:`salience.eviction_attribution.token_attribution`), are the scorer's attribution of the continuation's mean
log-probability, whose AOPC comprehensiveness and sufficiency are measured by masking (or removing) context tokens
of the input (:mod:`salience.eviction_attribution`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from .. import evidence, faithfulness, kv_tasks
from ..eviction_attribution import (continuation_target, faithfulness_rows, protected_positions,
                                    rank_correlation_per_unit, token_attribution)
from ..kv_tasks import BASELINE, ORACLE
from ..scorers import get_scorer
from ..scorers.attribution_target import explanation_view
from ..scorers.spec import ScorerList, build_scorers
from .explain_common import AopcParams, mean_interval
from .kv_params import BudgetRatios, KVParams, check_protection_fits, check_windows_protected
from .param_checks import check_labels

TITLE = "KV eviction scores as explanations: faithfulness (ERASER AOPC) and whether it predicts eviction quality"
PAPERS = ["eraser", "h2o", "tova", "snapkv", "vatp", "caote", "knormpress", "lexrank", "gradient_x_input"]
CLAIM = ("Read as attributions of the continuation's log-probability, attention-based KV scorers are more faithful "
         "than random (ERASER AOPC comprehensiveness and sufficiency) but less than gradient × input, and a scorer's "
         "faithfulness predicts how well it evicts (rank correlation across scorers, per document).")
GRADIENT = "gradient × input"
ATTENTION_FAMILY = "attention-based scorers (mean)"
PART_SPECS = (
    evidence.PartSpec("attention_more_comprehensive_than_random",
                      "attention-based scorers (their mean) are more comprehensive than random",
                      "AOPC comprehensiveness (nats/token)", "document", True, ("eraser", "h2o")),
    evidence.PartSpec("attention_more_sufficient_than_random",
                      "the top tokens of attention-based scorers (their mean) are more sufficient than random's",
                      "AOPC sufficiency (nats/token)", "document", False, ("eraser", "h2o")),
    evidence.PartSpec("gradient_more_comprehensive_than_attention",
                      "gradient × input is more comprehensive than the attention-based scorers (their mean)",
                      "AOPC comprehensiveness (nats/token)", "document", True, ("gradient_x_input", "eraser")),
    evidence.PartSpec("comprehensiveness_predicts_eviction",
                      "across scorers, a more comprehensive attribution evicts better (lower KL area)",
                      "Spearman ρ across scorers (comprehensiveness, −KL area)", "document", True, ("eraser",)),
    evidence.PartSpec("sufficiency_predicts_eviction",
                      "across scorers, a more sufficient attribution (lower sufficiency) evicts better",
                      "Spearman ρ across scorers (−sufficiency, −KL area)", "document", True, ("eraser",)),
)


class Params(KVParams, AopcParams):
    """Parameters of ``explain-eviction-scores``; defaults in ``params/explain-eviction-scores.yaml``."""

    notebook = "explain-eviction-scores"

    scorers: ScorerList = Field(min_length=3, description="the KV scorers read as attributions, one spec each")
    random_label: str = Field(description="label of the random scorer (the control of the faithfulness parts)")
    controls: list[str] = Field(min_length=1, description="labels left out of the attention-based family (random, "
                                                          "recency)")
    budgets: BudgetRatios = Field(description="kept ratios of the context, in (0, 1) (the eviction area's budgets)")
    context_tokens: int = Field(ge=32, le=4096, description="context tokens: compressed, and attributed")
    continuation_tokens: int = Field(ge=2, le=1024, description="tokens after the context: fed on the compressed "
                                                                "cache, and the explained log-probability")
    n_documents: int = Field(ge=2, le=1000, description="Wikipedia documents (the units of every part)")
    aggregate: Literal["rank_mean", "score_mean"] = Field(
        description="how a scorer's per-layer, per-head scores become one score per token")
    baseline_token: str = Field(description="token a masked context token becomes")
    parts: dict[str, evidence.PartRule] = Field(description="direction and smallest effect δ of each judged part")

    judged = PART_SPECS

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        check_labels([self.random_label], self.scorers, "random_label")
        check_labels(self.controls, self.scorers, "controls")
        if self.random_label not in self.controls:
            raise ValueError(f"random_label {self.random_label!r} must be one of the controls {self.controls}")
        if len(attention_labels(self)) < 2:
            raise ValueError("scorers must hold at least two attention-based entries besides the controls")
        check_windows_protected(self.scorers, self.recent_window)
        check_protection_fits(self.budgets, self.context_tokens, self.n_sink, self.recent_window)
        return self


def attention_labels(params: Params) -> list[str]:
    """Labels of the attention-based entries (reading attention or its key mass; not a control), in order."""
    return [label for label, s in build_scorers(params.scorers).items()
            if not s.attention_free and label not in params.controls]


# --------------------------------------------------------------------------------------------- running
def documents(tokenizer, params: Params) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The kv-leaderboard's continuation documents: ``(context (1, C), continuation (1, M))`` per document."""
    return kv_tasks.wikipedia_continuations(tokenizer, n=params.n_documents, context_tokens=params.context_tokens,
                                            continuation_tokens=params.continuation_tokens, seed=params.seed)


def eviction_runs(model, tokenizer, pairs, params: Params, progress: bool = True
                  ) -> tuple[pd.DataFrame, dict[int, dict[str, torch.Tensor]]]:
    """Every scorer × budget evicting each document's context (:func:`kv_tasks.continuation_runs`, with the
    uncompressed and oracle rows), and the scores each scorer gave it in that same prefill: ``(runs, {doc: {label:
    (layers, H, C)}})`` (the oracle's under ``"oracle"``)."""
    scores: dict[int, dict[str, torch.Tensor]] = {}

    def keep_scores(doc: int, prefill) -> None:
        scores[doc] = {label: value.detach().float().cpu() for (_, label), value in prefill.scores.items()}

    runs = kv_tasks.continuation_runs(model, pairs, build_scorers(params.scorers), params.budgets,
                                      head_mode=params.head_mode, n_sink=params.n_sink,
                                      recent_window=params.recent_window, seed=params.seed, tokenizer=tokenizer,
                                      batch_size=params.batch_size, progress=progress, on_prefill=keep_scores)
    if sorted(scores) != list(range(len(pairs))):
        raise RuntimeError(f"scores were kept for documents {sorted(scores)}, not all {len(pairs)}")
    return runs, scores


def faithfulness_table(model, tokenizer, pairs, scores: dict[int, dict[str, torch.Tensor]], params: Params,
                       progress: bool = True) -> pd.DataFrame:
    """One row per document × method × replacement: AOPC comprehensiveness and sufficiency of each scorer's
    attribution (its eviction scores aggregated), the oracle's, gradient × input's, and ``f_full`` (the
    continuation's mean log-probability on the full input)."""
    how = {mode: faithfulness.replacement(mode, params.baseline_token if mode == "mask" else None, tokenizer)
           for mode in params.replacements}
    gradient = get_scorer("gradient_x_input")
    rows = []
    for doc, (context, continuation) in enumerate(tqdm(pairs, desc="attributions", disable=not progress)):
        target = continuation_target(model, tokenizer, context, continuation, baseline_token=params.baseline_token)
        c, m = context.shape[1], continuation.shape[1]
        attributions = {label: token_attribution(value, params.aggregate) for label, value in scores[doc].items()}
        attributions[GRADIENT] = gradient(explanation_view(target, attention=False, tokenizer=tokenizer)).detach().reshape(-1)[:c]
        protected = protected_positions(c, m, n_sink=params.n_sink, recent_window=params.recent_window)
        rows += faithfulness_rows(target, attributions, protected, how, params.fractions, doc=doc)
    return pd.DataFrame(rows)


def eviction_areas(runs: pd.DataFrame) -> pd.DataFrame:
    """Documents × methods: the area under KL(full ∥ compressed) vs kept ratio (closed at ratio 1 with the
    uncompressed model's 0; lower is better), the uncompressed and oracle columns included."""
    frames = [kv_tasks.area_under_budget_curve(g, "kl_mean")[["scorer", "auc"]].assign(doc=d)
              for d, g in runs.groupby("doc")]
    return pd.concat(frames).pivot(index="doc", columns="scorer", values="auc")


# --------------------------------------------------------------------------------------------- tables and verdict
def wide(table: pd.DataFrame, column: str, replacement: str) -> pd.DataFrame:
    """Documents × methods of one faithfulness column under one replacement."""
    rows = table[table.replacement == replacement]
    if rows.empty:
        raise ValueError(f"no rows under replacement {replacement!r}")
    return rows.pivot(index="doc", columns="method", values=column)


def method_table(table: pd.DataFrame, areas: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per method (scorers in the given order, the attention family's mean, the oracle, gradient × input) under
    the judged replacement: comprehensiveness, sufficiency and their paired differences from random, and the
    eviction KL area, each ``mean [95% interval]`` over documents; the uncompressed row first."""
    how = params.judged_replacement
    comp, suff = wide(table, "comprehensiveness", how), wide(table, "sufficiency", how)
    family = attention_labels(params)
    comp[ATTENTION_FAMILY], suff[ATTENTION_FAMILY] = comp[family].mean(axis=1), suff[family].mean(axis=1)
    areas = areas.assign(**{ATTENTION_FAMILY: areas[family].mean(axis=1)})
    labels = [s.key for s in params.scorers]
    rows = [dict(method=BASELINE, role="uncompressed", **{"KL area": mean_interval(areas[BASELINE].to_numpy(),
                                                                                   params.seed)})]
    for method in [*labels, ATTENTION_FAMILY, ORACLE, GRADIENT]:
        role = ("control" if method in params.controls else "attention-based" if method in family
                else "family mean" if method == ATTENTION_FAMILY else "oracle (reads the continuation)"
                if method == ORACLE else "gradient reference" if method == GRADIENT else "attention-free")
        row = dict(method=method, role=role)
        for name, values in (("comprehensiveness", comp), ("sufficiency", suff)):
            row[name] = mean_interval(values[method].to_numpy(), params.seed)
            if method != params.random_label:
                row[f"{name} − random"] = mean_interval((values[method] - values[params.random_label]).to_numpy(),
                                                        params.seed)
        row["KL area"] = mean_interval(areas[method].to_numpy(), params.seed) if method in areas else ""
        rows.append(row)
    return pd.DataFrame(rows)


def prediction_table(table: pd.DataFrame, areas: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per document: Spearman's ρ across the scorers (every entry of ``scorers``; not the oracle, gradient or
    uncompressed rows) between each faithfulness measure (oriented so higher is better) and eviction quality
    (−KL area)."""
    how = params.judged_replacement
    labels = [s.key for s in params.scorers]
    quality = -areas[labels]
    comp = wide(table, "comprehensiveness", how)[labels]
    suff = -wide(table, "sufficiency", how)[labels]
    return pd.DataFrame({"comprehensiveness": rank_correlation_per_unit(comp, quality),
                         "sufficiency": rank_correlation_per_unit(suff, quality)}).rename_axis("doc")


def judge_claim(table: pd.DataFrame, areas: pd.DataFrame, params: Params) -> evidence.Claim:
    """Five parts paired over documents (judged replacement): the attention family's mean against random on
    comprehensiveness and sufficiency, gradient × input against the family's mean on comprehensiveness, and the
    per-document rank correlation between faithfulness and eviction quality against zero."""
    how = params.judged_replacement
    family = attention_labels(params)
    comp, suff = wide(table, "comprehensiveness", how), wide(table, "sufficiency", how)
    prediction = prediction_table(table, areas, params)
    parts = []
    for spec, rule in evidence.parts_for(PART_SPECS, params.parts):
        if spec.id == "attention_more_comprehensive_than_random":
            a, b, detail = comp[family].mean(axis=1), comp[params.random_label], f"a: mean of {len(family)} scorers"
        elif spec.id == "attention_more_sufficient_than_random":
            a, b, detail = suff[family].mean(axis=1), suff[params.random_label], f"a: mean of {len(family)} scorers"
        elif spec.id == "gradient_more_comprehensive_than_attention":
            a, b, detail = comp[GRADIENT], comp[family].mean(axis=1), f"b: mean of {len(family)} scorers"
        else:
            rho = prediction["comprehensiveness" if spec.id.startswith("comprehensiveness") else "sufficiency"]
            rho = rho.dropna()
            parts.append(evidence.judge_one_sample(
                spec, rule, rho, seed=params.seed,
                detail=f"per document, ρ across the {len(params.scorers)} scorers; documents where either is constant "
                       f"left out ({int(prediction.shape[0] - rho.size)})"))
            continue
        parts.append(evidence.judge(spec, rule, a, b, seed=params.seed, detail=f"{detail}; {how} replacement"))
    setting = (
        "No paper reads eviction scores as explanations: H2O, TOVA, SnapKV, VATP, CAOTE and the others are judged by "
        "what a compressed cache still generates, and explanation methods by input perturbations on classifiers. "
        f"Here both are measured on the same {params.n_documents} Wikipedia documents with {params.model}: "
        f"{params.context_tokens} context tokens, then {params.continuation_tokens} continuation tokens. Eviction: "
        f"prefill compression (kvpress's protocol, {params.head_mode}, the first {params.n_sink} and last "
        f"{params.recent_window} context tokens always kept) at kept ratios "
        + ", ".join(f"{b:g}" for b in params.budgets) + ", KL(full ∥ compressed) over the continuation, its area "
        f"closed at ratio 1. Attribution: the same scores, {params.aggregate.replace('_', ' ')} over layers and "
        "heads, explaining the continuation's mean log-probability; AOPC bins "
        + ", ".join(f"{p:.0%}" for p in params.fractions) + f" of the rankable context tokens (the protected ones and "
        f"the continuation are never perturbed), judged replacement: {how} ({params.baseline_token!r}).")
    notes = [f"Attention-based family: {', '.join(family)}; controls: {', '.join(params.controls)}.",
             "Gradient × input stands for the gradient attribution: integrated gradients did not converge on "
             "SmolLM2 at affordable step counts (explain-attention-vs-gradients measures its completeness gap).",
             "The oracle row is the eviction oracle's attribution (the continuation's attention to the context): "
             "it reads the future, so it is neither in the family nor in the correlations."]
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting, notes=notes, seed=params.seed)


# --------------------------------------------------------------------------------------------- figures
def plot_faithfulness_vs_eviction(table: pd.DataFrame, areas: pd.DataFrame, params: Params):
    """Per scorer: mean AOPC comprehensiveness (left) and sufficiency (right) against mean eviction KL area, with
    95% bootstrap intervals over documents; random and recency marked as controls."""
    import matplotlib.pyplot as plt

    how = params.judged_replacement
    labels = [s.key for s in params.scorers]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, column, better in ((axes[0], "comprehensiveness", "higher"), (axes[1], "sufficiency", "lower")):
        values = wide(table, column, how)
        for label in labels:
            x, y = values[label].to_numpy(), areas[label].to_numpy()
            ax.errorbar(x.mean(), y.mean(), xerr=x.std(ddof=1) / np.sqrt(x.size),
                        yerr=y.std(ddof=1) / np.sqrt(y.size), fmt="o",
                        color="grey" if label in params.controls else "C0", capsize=2)
            ax.annotate(label, (x.mean(), y.mean()), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=f"AOPC {column} ({better} is better, {how})", ylabel="eviction KL area (lower is better)")
    fig.suptitle("KV scorers: faithfulness as attributions vs eviction quality (mean ± s.e. over documents)")
    fig.tight_layout()
    return fig
