"""Notebook ``explain-attention-vs-gradients``: is raw attention a less faithful explanation than a gradient-based
attribution (ERASER AOPC comprehensiveness and sufficiency [@eraser]), and do the two disagree ("Order in the Court"
[@order_in_the_court]; "Attention is not Explanation" [@attention_not_explanation])?

Two tasks, one attribution target per text (:mod:`salience.explanation_tasks`): a sentiment (or newsgroup) classifier
made of frozen MiniLM [@minilm] and a logistic-regression head trained here (readout: the predicted class's
probability), and SmolLM2 [@smollm2] predicting the gold next token of a Wikipedia prefix (readout: its
log-probability). Every method explains every text: raw attention, rollout and flow [@attention_flow], GlobEnc
[@globenc], attention × gradient [@generic_attention], gradient × input [@gradient_x_input], integrated gradients
[@integrated_gradients], occlusion [@occlusion] (the ablation reference) and a seeded random control.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import pandas as pd
from pydantic import Field

from .. import evidence
from . import explain_common as common
from .explain_common import (TASK_TEXT, TASKS, agreement_table, agreement_with, explained_classifier_texts,
                             labelled_texts, lm_sentences, per_text, replacements, split_indices)

TITLE = "Attention vs gradients as explanations: faithfulness (ERASER AOPC) and agreement, classifier and LM"
PAPERS = ["attention_not_explanation", "order_in_the_court", "eraser", "integrated_gradients", "attention_flow"]
CLAIM = ("Raw attention is a less faithful explanation than a gradient-based attribution (higher ERASER AOPC "
         "comprehensiveness and lower sufficiency for the gradient method), and the two rank tokens differently "
         "(low rank agreement), for a classifier and a language model.")
RAW = "raw_attention"
#: every method in the order of the tables (the seeded random control is added by explanation_tasks)
METHODS = ("raw_attention", "attention_rollout", "attention_flow", "globenc", "attention_x_gradient",
           "gradient_x_input", "integrated_gradients", "occlusion")


def _specs(task: str) -> tuple[evidence.PartSpec, ...]:
    unit = "text"
    papers = ("attention_not_explanation", "eraser")
    return (
        evidence.PartSpec(f"{task}_gradient_more_comprehensive",
                          f"on {TASK_TEXT[task]}, {{gradient}} is more comprehensive than raw attention",
                          "AOPC comprehensiveness ({replacement})", unit, True, papers),
        evidence.PartSpec(f"{task}_gradient_more_sufficient",
                          f"on {TASK_TEXT[task]}, the top tokens of {{gradient}} are more sufficient than raw attention's",
                          "AOPC sufficiency ({replacement})", unit, False, papers),
        evidence.PartSpec(f"{task}_methods_disagree",
                          f"on {TASK_TEXT[task]}, raw attention and {{gradient}} rank tokens differently "
                          "(agreement below {bound})", "{agreement} ρ (raw attention, {gradient}) − {bound}", unit,
                          True, ("order_in_the_court",)),
    )


JUDGED = _specs("classifier") + _specs("lm")


class Params(common.ExplanationParams):
    """Parameters of ``explain-attention-vs-gradients``; the defaults live in
    ``params/explain-attention-vs-gradients.yaml`` (the tasks' own in :class:`~.explain_common.ExplanationParams`)."""

    notebook = "explain-attention-vs-gradients"

    gradient_methods: dict[Literal["classifier", "lm"], Literal["integrated_gradients", "gradient_x_input"]] = Field(
        description="the judged gradient-based method of each task")
    ig_max_gap: float = Field(gt=0, description="integrated gradients is judged only where its median completeness "
                                                "gap (share of f(x) − f(baseline) its scores miss) is at most this")
    ig_steps: int = Field(ge=1, le=1000, description="integrated gradients: Gauss-Legendre steps")
    ig_baseline: Literal["token", "zeros"] = Field(
        description="integrated gradients: baseline token or zero embeddings")
    agreement_bound: float = Field(gt=-1, lt=1, description="agreement below this is 'low' (the disagreement parts)")
    parts: dict[str, evidence.PartRule] = Field(description="direction and smallest effect δ of each judged part")

    judged = JUDGED


# --------------------------------------------------------------------------------------------- data and targets
def scorer_config(params: Params, task: str) -> dict[str, dict]:
    """Each method's registered scorer and options for ``task`` (raw attention at ``attention_layer``, heads
    averaged; attention flow only where ``flow_tasks`` names the task)."""
    config = {
        "raw_attention": dict(scorer="raw_attention", layer=params.attention_layer),
        "attention_rollout": dict(scorer="attention_rollout", query="auto"),
        "attention_flow": dict(scorer="attention_flow"),
        "globenc": dict(scorer="globenc"),
        "attention_x_gradient": dict(scorer="attention_x_gradient", layer=params.attention_layer),
        "gradient_x_input": dict(scorer="gradient_x_input"),
        "integrated_gradients": dict(scorer="integrated_gradients", n_steps=params.ig_steps,
                                     baseline=params.ig_baseline, completeness_tolerance=None),
        "occlusion": dict(scorer="occlusion", replacement="token"),
    }
    if task not in params.flow_tasks:
        del config["attention_flow"]
    return config


# --------------------------------------------------------------------------------------------- tables and verdict
def method_table(table: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per task × replacement × method: mean AOPC comprehensiveness and sufficiency [95% interval] and the paired
    difference from raw attention."""
    return common.method_table(table, params, METHODS, RAW)


def check_completeness(gaps: pd.DataFrame, params: Params) -> None:
    """Refuse to judge integrated gradients on a task where its path integral has not converged: the median
    completeness gap over the task's texts must be at most ``ig_max_gap`` (a non-converged IG is not IG)."""
    for task, method in params.gradient_methods.items():
        if method != "integrated_gradients":
            continue
        median = float(gaps[gaps.task == task].completeness_gap.median())
        if not median <= params.ig_max_gap:
            raise ValueError(f"integrated gradients has not converged on the {task} task (median completeness gap "
                             f"{median:.0%} > ig_max_gap {params.ig_max_gap:.0%}): raise ig_steps or judge "
                             f"gradient_x_input there (gradient_methods)")


def judge_claim(table: pd.DataFrame, agreement: pd.DataFrame, gaps: pd.DataFrame, params: Params,
                accuracy: float) -> evidence.Claim:
    """Six parts, paired over texts: per task, the task's gradient method against raw attention on
    comprehensiveness (better) and sufficiency (better, lower is better) under the judged replacement, and their
    rank agreement against ``agreement_bound`` (worse: the interval of ρ − bound below zero). Integrated gradients
    is judged only where it converged (:func:`check_completeness`)."""
    check_completeness(gaps, params)
    how = params.judged_replacement
    parts = []
    for spec, rule in evidence.parts_for(JUDGED, params.parts):
        task = spec.id.split("_", 1)[0]
        gradient = params.gradient_methods[task]
        fill = dict(gradient=gradient.replace("_", " "), replacement=how, agreement=params.agreement.capitalize(),
                    bound=f"{params.agreement_bound:g}")
        spec = dataclasses.replace(spec, statement=spec.statement.format(**fill), metric=spec.metric.format(**fill))
        if spec.id.endswith("_disagree"):
            rho = agreement_with(agreement, task, RAW, gradient).dropna()
            parts.append(evidence.judge(spec, rule, rho, rho * 0 + params.agreement_bound, seed=params.seed,
                                        detail=f"a: per-text {params.agreement} ρ; b: the bound "
                                               f"{params.agreement_bound:g}; texts with a constant ranking left out"))
            continue
        column = "comprehensiveness" if "comprehensive" in spec.id else "sufficiency"
        parts.append(evidence.judge(spec, rule, per_text(table, task, gradient, column, how),
                                    per_text(table, task, RAW, column, how), seed=params.seed,
                                    detail=f"a: {gradient}; b: raw attention (layer {params.attention_layer}, heads "
                                           f"averaged); {how} replacement"))
    setting = (
        "Jain & Wallace and ERASER explain BiLSTM/BERT classifiers fine-tuned on their tasks, and Neely et al. "
        f"compare methods on fine-tuned DistilBERT. Here the classifier is frozen {params.classifier_model} with a "
        f"logistic head trained in the notebook on {params.classifier_data} ({params.train_fraction:.0%} of the texts; "
        f"held-out accuracy {accuracy:.1%}), explaining its predicted class's "
        f"{params.classifier_output.replace('_', '-')} on held-out texts of {params.classifier_min_tokens}-"
        f"{params.classifier_max_tokens} tokens; the LM is "
        f"{params.lm_model}, explaining the gold next token's {params.lm_output.replace('_', '-')} after Wikipedia "
        f"prefixes of {params.lm_min_tokens}-{params.lm_max_tokens} tokens. AOPC bins: "
        + ", ".join(f"{p:.0%}" for p in params.fractions) + f" of the tokens; judged replacement: {how} (mask tokens "
        f"{params.classifier_baseline_token!r} / {params.lm_baseline_token!r}); special tokens are never perturbed.")
    gap_text = "; ".join(f"{task} median {gaps[gaps.task == task].completeness_gap.median():.0%}"
                         for task in sorted(set(gaps.task)))
    notes = ["Gradient method judged: " + ", ".join(f"{task}: {m}" for task, m in params.gradient_methods.items())
             + f"; integrated gradients: {params.ig_steps} Gauss-Legendre steps from the {params.ig_baseline} "
             f"baseline, completeness gap {gap_text} (judged only where ≤ {params.ig_max_gap:.0%}); raw attention: the "
             "explained query's row ([CLS] for the classifier, the last token for the LM), heads averaged.",
             f"Every method under every replacement is in the method table (occlusion is the ablation reference, "
             f"random a seeded control; attention flow on texts of at most {params.flow_max_tokens} tokens of "
             f"{', '.join(params.flow_tasks) or 'no task'} only)."]
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting, notes=notes, seed=params.seed)


# --------------------------------------------------------------------------------------------- figures
def plot_faithfulness(table: pd.DataFrame, params: Params):
    """Mean AOPC comprehensiveness and sufficiency per method, one row of panels per task (judged replacement)."""
    return common.plot_faithfulness(table, params, METHODS)


def plot_agreement(agreement: pd.DataFrame, params: Params):
    """Heat maps of the mean rank agreement between every pair of methods, one per task."""
    return common.plot_agreement(agreement, params, METHODS)


__all__ = ["CLAIM", "JUDGED", "METHODS", "PAPERS", "Params", "RAW", "TASKS", "TASK_TEXT", "TITLE", "agreement_table",
           "agreement_with", "check_completeness", "explained_classifier_texts", "judge_claim", "labelled_texts",
           "lm_sentences", "method_table", "per_text", "plot_agreement", "plot_faithfulness", "replacements",
           "scorer_config", "split_indices"]
