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

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from .. import evidence, explanation_tasks, faithfulness
from ..data.text import newsgroups_posts, sentiment_sentences, wikipedia_articles
from ..params import ModelName, NotebookParams
from ..sentences import split_sentences

TITLE = "Attention vs gradients as explanations: faithfulness (ERASER AOPC) and agreement, classifier and LM"
PAPERS = ["attention_not_explanation", "order_in_the_court", "eraser", "integrated_gradients", "attention_flow"]
CLAIM = ("Raw attention is a less faithful explanation than a gradient-based attribution (higher ERASER AOPC "
         "comprehensiveness and lower sufficiency for the gradient method), and the two rank tokens differently "
         "(low rank agreement), for a classifier and a language model.")
TASKS = ("classifier", "lm")
RAW = "raw_attention"
#: every method in the order of the tables (the seeded random control is added by explanation_tasks)
METHODS = ("raw_attention", "attention_rollout", "attention_flow", "globenc", "attention_x_gradient",
           "gradient_x_input", "integrated_gradients", "occlusion")
TASK_TEXT = {"classifier": "the classifier", "lm": "the language model"}


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


class Params(NotebookParams):
    """Parameters of ``explain-attention-vs-gradients``; the defaults live in
    ``params/explain-attention-vs-gradients.yaml``."""

    notebook = "explain-attention-vs-gradients"

    classifier_model: ModelName = Field(description="frozen text encoder under the linear head")
    classifier_data: Literal["sentiment", "newsgroups"] = Field(
        description="shipped labelled texts: Pang & Lee sentiment sentences or two newsgroups (first tokens)")
    train_fraction: float = Field(gt=0.1, lt=0.95, description="share of the labelled texts the head is trained on")
    classifier_min_tokens: int = Field(ge=3, description="explained texts have at least this many tokens")
    classifier_max_tokens: int = Field(ge=4, le=512, description="texts are cut at this many tokens (training too)")
    classifier_texts: int = Field(ge=2, le=1000, description="held-out texts explained (units of the classifier parts)")
    head_inverse_regularization: float = Field(gt=0, description="C of the L2 logistic regression")
    min_accuracy: float = Field(ge=0, le=1, description="stop with an error when the head's held-out accuracy is lower")
    classifier_output: Literal["probability", "log_probability", "logit"] = Field(
        description="what of the predicted class the classifier's attributions explain")
    classifier_baseline_token: str = Field(description="mask token of the classifier (replacement and IG baseline)")
    lm_model: ModelName = Field(description="causal language model")
    lm_articles: int = Field(ge=1, le=1000, description="shipped Wikipedia articles the LM sentences come from")
    lm_texts: int = Field(ge=2, le=1000, description="prefixes explained (units of the LM parts)")
    lm_min_tokens: int = Field(ge=2, description="shortest prefix, tokens")
    lm_max_tokens: int = Field(ge=2, le=2048, description="longest prefix, tokens (each prefix's length is seeded)")
    lm_output: Literal["probability", "log_probability", "logit"] = Field(
        description="what of the gold next token the LM's attributions explain")
    lm_baseline_token: str = Field(description="mask token of the LM (replacement and IG baseline)")
    fractions: list[float] = Field(min_length=1, description="shares of tokens of the AOPC bins (ERASER's: 1-50%)")
    replacements: list[Literal["mask", "remove"]] = Field(
        min_length=1, description="how a perturbed token is treated: the baseline token in its place, or deleted")
    judged_replacement: Literal["mask", "remove"] = Field(description="replacement the parts judge")
    attention_layer: int = Field(description="layer of raw attention and attention × gradient (-1: last)")
    gradient_methods: dict[Literal["classifier", "lm"], Literal["integrated_gradients", "gradient_x_input"]] = Field(
        description="the judged gradient-based method of each task")
    ig_max_gap: float = Field(gt=0, description="integrated gradients is judged only where its median completeness "
                                                "gap (share of f(x) − f(baseline) its scores miss) is at most this")
    ig_steps: int = Field(ge=1, le=1000, description="integrated gradients: Gauss-Legendre steps")
    ig_baseline: Literal["token", "zeros"] = Field(
        description="integrated gradients: baseline token or zero embeddings")
    flow_max_tokens: int = Field(ge=2, le=64, description="attention flow only on texts with at most this many tokens")
    flow_tasks: list[Literal["classifier", "lm"]] = Field(
        description="tasks given attention flow (one max-flow per token over every layer: slow on deep models)")
    agreement: Literal["spearman", "kendall"] = Field(description="rank agreement between two methods, per text")
    agreement_bound: float = Field(gt=-1, lt=1, description="agreement below this is 'low' (the disagreement parts)")
    parts: dict[str, evidence.PartRule] = Field(description="direction and smallest effect δ of each judged part")

    @field_validator("parts")
    @classmethod
    def _part_ids(cls, rules: dict[str, evidence.PartRule]) -> dict[str, evidence.PartRule]:
        return evidence.check_part_rules(rules, JUDGED)

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        return list(faithfulness.check_fractions(value))

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if self.judged_replacement not in self.replacements:
            raise ValueError(f"judged_replacement {self.judged_replacement!r} must be one of replacements "
                             f"{self.replacements}")
        if self.classifier_min_tokens > self.classifier_max_tokens:
            raise ValueError(f"classifier_min_tokens ({self.classifier_min_tokens}) > classifier_max_tokens "
                             f"({self.classifier_max_tokens})")
        if self.lm_min_tokens > self.lm_max_tokens:
            raise ValueError(f"lm_min_tokens ({self.lm_min_tokens}) > lm_max_tokens ({self.lm_max_tokens})")
        if len(set(self.replacements)) != len(self.replacements):
            raise ValueError(f"replacements repeat: {self.replacements}")
        return self


# --------------------------------------------------------------------------------------------- data and targets
def labelled_texts(params: Params) -> tuple[list[str], np.ndarray]:
    """The classifier's labelled texts (whitespace collapsed) and labels."""
    rows = sentiment_sentences() if params.classifier_data == "sentiment" else newsgroups_posts()
    return [" ".join(t.split()) for t in rows["text"]], np.asarray(list(rows["label"]))


def split_indices(n: int, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out split of ``n`` labelled texts."""
    order = np.random.default_rng(params.seed).permutation(n)
    cut = int(round(params.train_fraction * n))
    return np.sort(order[:cut]), np.sort(order[cut:])


def explained_classifier_texts(texts: list[str], held_out: np.ndarray, tokenizer, params: Params) -> list[int]:
    """Indices of the first ``classifier_texts`` held-out texts with ``classifier_min_tokens`` to
    ``classifier_max_tokens`` tokens (special tokens included); raises when too few qualify."""
    chosen = [int(i) for i in held_out
              if params.classifier_min_tokens <= len(tokenizer(texts[i]).input_ids) <= params.classifier_max_tokens]
    if len(chosen) < params.classifier_texts:
        raise ValueError(f"only {len(chosen)} held-out texts have {params.classifier_min_tokens}-"
                         f"{params.classifier_max_tokens} tokens; ask for fewer classifier_texts or widen the range")
    return chosen[:params.classifier_texts]


def lm_sentences(params: Params) -> list[str]:
    """Sentences of the first ``lm_articles`` shipped Wikipedia articles (seeded subset), in order."""
    articles = wikipedia_articles(n=params.lm_articles, seed=params.seed)
    return [s for text in articles["text"] for s in split_sentences(text)]


def scorer_config(params: Params, task: str) -> dict[str, dict]:
    """Each method's registered scorer and options for ``task`` (raw attention at ``attention_layer``, heads
    averaged; attention flow only where ``flow_tasks`` names the task)."""
    config = {
        "raw_attention": dict(scorer="raw_attention", layer=params.attention_layer),
        "attention_rollout": dict(scorer="attention_rollout"),
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


def replacements(params: Params, tokenizer, baseline_token: str) -> dict[str, faithfulness.Replacement]:
    """``{label: Replacement}`` for each declared mode (``mask`` with the task's baseline token)."""
    return {mode: faithfulness.replacement(mode, baseline_token if mode == "mask" else None, tokenizer)
            for mode in params.replacements}


# --------------------------------------------------------------------------------------------- tables and verdict
def per_text(table: pd.DataFrame, task: str, method: str, column: str, replacement: str) -> pd.Series:
    rows = table[(table.task == task) & (table.method == method) & (table.replacement == replacement)]
    if rows.empty:
        raise ValueError(f"no rows for {task}/{method}/{replacement}; methods: {sorted(table.method.unique())}")
    return rows.set_index("text")[column]


def agreement_with(agreement: pd.DataFrame, task: str, a: str, b: str) -> pd.Series:
    """Per-text agreement between methods ``a`` and ``b`` (either order) on ``task``."""
    rows = agreement[(agreement.task == task) & (((agreement.method_a == a) & (agreement.method_b == b))
                                                 | ((agreement.method_a == b) & (agreement.method_b == a)))]
    if rows.empty:
        raise ValueError(f"no agreement rows between {a} and {b} on {task}")
    return rows.set_index("text")["agreement"]


def method_table(table: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per task × replacement × method: texts, mean AOPC comprehensiveness and sufficiency with 95% bootstrap
    intervals, and the paired difference from raw attention."""
    rows = []
    for (task, how), group in table.groupby(["task", "replacement"], sort=False):
        for method in [m for m in (*METHODS, explanation_tasks.RANDOM) if m in set(group.method)]:
            row = dict(task=task, replacement=how, method=method)
            for column in ("comprehensiveness", "sufficiency"):
                values = per_text(table, task, method, column, how)
                row["texts"] = len(values)
                row[column] = _mean_interval(values.to_numpy(), params.seed)
                if method != RAW:
                    diff = (values - per_text(table, task, RAW, column, how)).dropna()
                    row[f"{column} − raw"] = _mean_interval(diff.to_numpy(), params.seed)
            rows.append(row)
    return pd.DataFrame(rows)


def agreement_table(agreement: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per task and pair of methods: mean rank agreement with its 95% bootstrap interval over the texts."""
    rows = []
    for (task, a, b), group in agreement.groupby(["task", "method_a", "method_b"], sort=False):
        values = group.agreement.dropna().to_numpy()
        rows.append(dict(task=task, method_a=a, method_b=b, texts=len(values),
                         **{params.agreement: _mean_interval(values, params.seed)}))
    return pd.DataFrame(rows)


def _mean_interval(values: np.ndarray, seed: int) -> str:
    if len(values) < 2:
        return f"{values.mean():.3f}" if len(values) else ""
    lo, hi, _ = evidence.paired_interval(values, seed=seed)
    return evidence.fmt_interval(float(values.mean()), lo, hi, sign=False)


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
    """Mean AOPC comprehensiveness and sufficiency per method (95% bootstrap interval over texts), one row of panels
    per task, under the judged replacement."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = table[table.replacement == params.judged_replacement]
    order = [m for m in (*METHODS, explanation_tasks.RANDOM) if m in set(data.method)]
    fig, axes = plt.subplots(len(TASKS), 2, figsize=(11, 3.2 * len(TASKS)), squeeze=False)
    for row, task in enumerate(TASKS):
        for col, (column, better) in enumerate((("comprehensiveness", "higher"), ("sufficiency", "lower"))):
            ax = axes[row, col]
            sns.pointplot(data[data.task == task], x=column, y="method", order=order, errorbar=("ci", 95),
                          seed=params.seed, linestyles="none", ax=ax)
            ax.axvline(0, color="grey", lw=0.5)
            ax.set(title=f"{task}: AOPC {column} ({better} is better)", ylabel="", xlabel=column)
    fig.tight_layout()
    return fig


def plot_agreement(agreement: pd.DataFrame, params: Params):
    """Heat maps of the mean rank agreement between every pair of methods, one per task."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6.2 * len(TASKS), 5), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        rows = agreement[agreement.task == task]
        means = rows.groupby(["method_a", "method_b"]).agreement.mean()
        names = [m for m in (*METHODS, explanation_tasks.RANDOM) if m in set(rows.method_a) | set(rows.method_b)]
        grid = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
        for (a, b), value in means.items():
            grid.loc[a, b] = grid.loc[b, a] = value
        sns.heatmap(grid, vmin=-1, vmax=1, cmap="vlag", annot=True, fmt=".2f", ax=ax, cbar=False,
                    annot_kws={"size": 7})
        ax.set(title=f"{task}: mean {params.agreement} ρ")
    fig.tight_layout()
    return fig
