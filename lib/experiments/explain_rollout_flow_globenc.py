"""Notebook ``explain-rollout-flow-globenc``: do explanations that aggregate attention over layers (rollout and flow
[@attention_flow]) or include the whole block (GlobEnc [@globenc]: value norms, residual and layer norm) agree
better with the ablation reference (leave-one-out occlusion [@occlusion]) and explain more faithfully (ERASER AOPC
[@eraser]) than single-layer attention?

The two tasks of :mod:`.explain_common` (a frozen MiniLM with a logistic head trained here, SmolLM2's gold next
token); every method explains every text; per text, Spearman's ρ with occlusion and AOPC comprehensiveness and
sufficiency, paired against raw attention (the explained query's row at ``attention_layer``, heads averaged).
"""

from __future__ import annotations

import dataclasses

import pandas as pd
from pydantic import Field, model_validator

from .. import evidence
from . import explain_common as common
from .explain_common import TASK_TEXT, TASKS, agreement_with, per_text

TITLE = "Rollout, flow and GlobEnc vs single-layer attention: agreement with occlusion and faithfulness"
PAPERS = ["attention_flow", "globenc", "eraser", "occlusion"]
CLAIM = ("Explanations that aggregate attention over layers (rollout, flow) or include the whole block (GlobEnc) "
         "agree better with leave-one-out occlusion and are more faithful (higher ERASER AOPC comprehensiveness, lower "
         "sufficiency) than single-layer attention, for a classifier and a language model.")
RAW = "raw_attention"
REFERENCE = "occlusion"
#: the methods claimed better than raw attention, by the short name their part ids use
AGGREGATES = {"rollout": "attention_rollout", "flow": "attention_flow", "globenc": "globenc"}
METHODS = (RAW, *AGGREGATES.values(), REFERENCE)
PAPER_OF = {"rollout": "attention_flow", "flow": "attention_flow", "globenc": "globenc"}
ASPECTS = {  # aspect of a part id → (what it says, metric, higher is better)
    "agrees": ("agrees better with occlusion than raw attention does", "{agreement} ρ with occlusion", True),
    "more_comprehensive": ("is more comprehensive than raw attention", "AOPC comprehensiveness ({replacement})", True),
    "more_sufficient": ("is more sufficient than raw attention (lower AOPC sufficiency)",
                        "AOPC sufficiency ({replacement})", False),
}


def _specs() -> tuple[evidence.PartSpec, ...]:
    return tuple(
        evidence.PartSpec(f"{task}_{short}_{aspect}", f"on {TASK_TEXT[task]}, {AGGREGATES[short]} {text}", metric,
                          "text", higher, (PAPER_OF[short], "occlusion" if aspect == "agrees" else "eraser"))
        for task in TASKS for short in AGGREGATES for aspect, (text, metric, higher) in ASPECTS.items())


JUDGED = _specs()


class Params(common.ExplanationParams):
    """Parameters of ``explain-rollout-flow-globenc``; the defaults live in
    ``params/explain-rollout-flow-globenc.yaml`` (the tasks' own in :class:`~.explain_common.ExplanationParams`)."""

    notebook = "explain-rollout-flow-globenc"

    rollout_residual: float = Field(ge=0, lt=1, description="rollout and flow: weight of the identity (residual) "
                                                           "mixed into each layer's attention, as Abnar and Zuidema")
    parts: dict[str, evidence.PartRule] = Field(description="direction and smallest effect δ of each judged part")

    judged = JUDGED

    @model_validator(mode="after")
    def _flow_everywhere(self) -> "Params":
        judged_flow = {p.split("_", 1)[0] for p in self.parts if "_flow_" in p}
        missing = sorted(judged_flow - set(self.flow_tasks))
        if missing:
            raise ValueError(f"parts judge attention flow on {missing} but flow_tasks {self.flow_tasks} leaves it out")
        return self


def scorer_config(params: Params, task: str) -> dict[str, dict]:
    """Each method's registered scorer and options for ``task`` (attention flow only where ``flow_tasks`` names it)."""
    config = {
        RAW: dict(scorer="raw_attention", layer=params.attention_layer),
        "attention_rollout": dict(scorer="attention_rollout", residual=params.rollout_residual, query="auto"),
        "attention_flow": dict(scorer="attention_flow", residual=params.rollout_residual),
        "globenc": dict(scorer="globenc"),
        REFERENCE: dict(scorer="occlusion", replacement="token"),
    }
    if task not in params.flow_tasks:
        del config["attention_flow"]
    return config


def check_flow_coverage(table: pd.DataFrame, params: Params) -> None:
    """Refuse a flow part over fewer texts than the task explained: attention flow is skipped on texts longer than
    ``flow_max_tokens``, and a part over a subset would not be paired with the other parts' texts."""
    for task in params.flow_tasks:
        rows = table[table.task == task]
        texts, flowed = rows.text.nunique(), rows[rows.method == "attention_flow"].text.nunique()
        if flowed < texts:
            raise ValueError(f"attention flow ran on {flowed} of the {texts} {task} texts (the others are longer than "
                             f"flow_max_tokens {params.flow_max_tokens}): raise flow_max_tokens or shorten the texts")


def method_table(table: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per task × replacement × method: mean AOPC comprehensiveness and sufficiency [95% interval] and the paired
    difference from raw attention."""
    return common.method_table(table, params, METHODS, RAW)


def occlusion_agreement_table(agreement: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per task and method: mean rank agreement with occlusion [95% interval over texts] and its paired difference
    from raw attention's."""
    rows = []
    for task in sorted(set(agreement.task), key=TASKS.index):
        raw = agreement_with(agreement, task, RAW, REFERENCE)
        for method in common.ordered([m for m in METHODS if m != REFERENCE], set(agreement.method_a)
                                     | set(agreement.method_b)):
            try:
                rho = agreement_with(agreement, task, method, REFERENCE)
            except ValueError:
                continue
            both = pd.concat([rho, raw], axis=1, keys=["method", "raw"]).dropna()
            rows.append(dict(task=task, method=method, texts=len(both),
                             **{f"{params.agreement} with occlusion": common.mean_interval(both["method"].to_numpy(),
                                                                                           params.seed),
                                "− raw attention's": ("" if method == RAW else common.mean_interval(
                                    (both["method"] - both["raw"]).to_numpy(), params.seed))}))
    return pd.DataFrame(rows)


def judge_claim(table: pd.DataFrame, agreement: pd.DataFrame, params: Params, accuracy: float) -> evidence.Claim:
    """Per task and aggregate method (rollout, flow, GlobEnc), three parts paired over texts against raw attention:
    Spearman ρ with occlusion (better), AOPC comprehensiveness (better) and sufficiency (better: lower) under the
    judged replacement. Texts where a ranking is constant (ρ undefined) leave the agreement parts."""
    check_flow_coverage(table, params)
    how = params.judged_replacement
    fill = dict(agreement=params.agreement.capitalize(), replacement=how)
    parts = []
    for spec, rule in evidence.parts_for(JUDGED, params.parts):
        task, rest = spec.id.split("_", 1)
        short, aspect = rest.split("_", 1)
        method = AGGREGATES[short]
        spec = dataclasses.replace(spec, metric=spec.metric.format(**fill))
        if aspect == "agrees":
            both = pd.concat([agreement_with(agreement, task, method, REFERENCE),
                              agreement_with(agreement, task, RAW, REFERENCE)], axis=1, keys=["a", "b"]).dropna()
            parts.append(evidence.judge(spec, rule, both["a"], both["b"], seed=params.seed,
                                        detail=f"a: ρ({method}, occlusion); b: ρ(raw attention, occlusion); "
                                               "texts with a constant ranking left out"))
            continue
        column = "comprehensiveness" if aspect == "more_comprehensive" else "sufficiency"
        parts.append(evidence.judge(spec, rule, per_text(table, task, method, column, how),
                                    per_text(table, task, RAW, column, how), seed=params.seed,
                                    detail=f"a: {method}; b: raw attention (layer {params.attention_layer}, heads "
                                           f"averaged); {how} replacement"))
    setting = (
        "Abnar and Zuidema compare rollout and flow with blank-out (occlusion) and input gradients on a 6-layer "
        "Transformer trained for subject-verb agreement and on fine-tuned DistilBERT; GlobEnc is compared with "
        "gradient × input saliency on BERT fine-tuned for classification. Here the reference is leave-one-out "
        f"occlusion with the mask token, on two tasks: frozen {params.classifier_model} with a logistic head trained "
        f"in the notebook on {params.classifier_data} (held-out accuracy {accuracy:.1%}), explaining its predicted "
        f"class's {params.classifier_output.replace('_', '-')} on held-out texts of "
        f"{params.classifier_min_tokens}-{params.classifier_max_tokens} tokens, and {params.lm_model} explaining the "
        f"gold next token's {params.lm_output.replace('_', '-')} after Wikipedia prefixes of {params.lm_min_tokens}-"
        f"{params.lm_max_tokens} tokens. Raw attention is the explained query's row at layer "
        f"{params.attention_layer} ([CLS] for the classifier, the last token for the LM), heads averaged; rollout "
        f"and flow mix {params.rollout_residual:g} of the identity into each layer's head-averaged attention. AOPC "
        "bins: " + ", ".join(f"{p:.0%}" for p in params.fractions) + f" of the tokens; judged replacement: {how}; "
        "special tokens are never perturbed.")
    notes = ["Occlusion is the reference of the agreement parts and a row of the method table (the ablation every "
             "attribution is measured against); random is a seeded control.",
             "GlobEnc is the norm-based variant with the residual and both layer norms (N_ResLN), rolled out over "
             "layers; on SmolLM2 the pre-LN residual stream and RMSNorm replace BERT's post-LN."]
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting, notes=notes, seed=params.seed)


def plot_faithfulness(table: pd.DataFrame, params: Params):
    """Mean AOPC comprehensiveness and sufficiency per method, one row of panels per task (judged replacement)."""
    return common.plot_faithfulness(table, params, METHODS)


def plot_agreement(agreement: pd.DataFrame, params: Params):
    """Heat maps of the mean rank agreement between every pair of methods, one per task."""
    return common.plot_agreement(agreement, params, METHODS)
