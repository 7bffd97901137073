"""What the explanation notebooks share: the two tasks' parameters (a classifier of frozen encoder features with a
linear head trained in the notebook, and a causal LM's gold next token), their data, the faithfulness and agreement
tables, and the figures.

Each notebook's ``Params`` subclasses :class:`ExplanationParams` and adds its own methods and parts; the tasks
themselves live in :mod:`salience.explanation_tasks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from .. import evidence, explanation_tasks, faithfulness
from ..data.text import newsgroups_posts, sentiment_sentences, wikipedia_articles
from ..params import ModelName, NotebookParams
from ..sentences import split_sentences

TASKS = ("classifier", "lm")
TASK_TEXT = {"classifier": "the classifier", "lm": "the language model"}
Task = Literal["classifier", "lm"]


class AopcParams(NotebookParams):
    """The faithfulness settings (ERASER AOPC bins and replacements) of every notebook that perturbs inputs."""

    fractions: list[float] = Field(min_length=1, description="shares of tokens of the AOPC bins (ERASER's: 1-50%)")
    replacements: list[Literal["mask", "remove"]] = Field(
        min_length=1, description="how a perturbed token is treated: the baseline token in its place, or deleted")
    judged_replacement: Literal["mask", "remove"] = Field(description="replacement the parts judge")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        return list(faithfulness.check_fractions(value))

    @model_validator(mode="after")
    def _judged_replacement_is_run(self) -> "AopcParams":
        if self.judged_replacement not in self.replacements:
            raise ValueError(f"judged_replacement {self.judged_replacement!r} must be one of replacements "
                             f"{self.replacements}")
        if len(set(self.replacements)) != len(self.replacements):
            raise ValueError(f"replacements repeat: {self.replacements}")
        return self


class ExplanationParams(AopcParams):
    """The classifier and LM tasks, faithfulness (ERASER AOPC) and agreement settings every explanation notebook
    shares."""

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
    attention_layer: int = Field(description="layer of raw attention and attention × gradient (-1: last)")
    flow_max_tokens: int = Field(ge=2, le=64, description="attention flow only on texts with at most this many tokens")
    flow_tasks: list[Task] = Field(
        description="tasks given attention flow (one max-flow per token over every layer: slow on deep models)")
    agreement: Literal["spearman", "kendall"] = Field(description="rank agreement between two methods, per text")

    @model_validator(mode="after")
    def _consistent_tasks(self) -> "ExplanationParams":
        if self.classifier_min_tokens > self.classifier_max_tokens:
            raise ValueError(f"classifier_min_tokens ({self.classifier_min_tokens}) > classifier_max_tokens "
                             f"({self.classifier_max_tokens})")
        if self.lm_min_tokens > self.lm_max_tokens:
            raise ValueError(f"lm_min_tokens ({self.lm_min_tokens}) > lm_max_tokens ({self.lm_max_tokens})")
        return self


# --------------------------------------------------------------------------------------------- data and targets
def labelled_texts(params: ExplanationParams) -> tuple[list[str], np.ndarray]:
    """The classifier's labelled texts (whitespace collapsed) and labels."""
    rows = sentiment_sentences() if params.classifier_data == "sentiment" else newsgroups_posts()
    return [" ".join(t.split()) for t in rows["text"]], np.asarray(list(rows["label"]))


def split_indices(n: int, params: ExplanationParams) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out split of ``n`` labelled texts."""
    order = np.random.default_rng(params.seed).permutation(n)
    cut = int(round(params.train_fraction * n))
    return np.sort(order[:cut]), np.sort(order[cut:])


def explained_classifier_texts(texts: list[str], held_out: np.ndarray, tokenizer, params: ExplanationParams) -> list[int]:
    """Indices of the first ``classifier_texts`` held-out texts with ``classifier_min_tokens`` to
    ``classifier_max_tokens`` tokens (special tokens included); raises when too few qualify."""
    chosen = [int(i) for i in held_out
              if params.classifier_min_tokens <= len(tokenizer(texts[i]).input_ids) <= params.classifier_max_tokens]
    if len(chosen) < params.classifier_texts:
        raise ValueError(f"only {len(chosen)} held-out texts have {params.classifier_min_tokens}-"
                         f"{params.classifier_max_tokens} tokens; ask for fewer classifier_texts or widen the range")
    return chosen[:params.classifier_texts]


def lm_sentences(params: ExplanationParams) -> list[str]:
    """Sentences of the first ``lm_articles`` shipped Wikipedia articles (seeded subset), in order."""
    articles = wikipedia_articles(n=params.lm_articles, seed=params.seed)
    return [s for text in articles["text"] for s in split_sentences(text)]


def replacements(params: ExplanationParams, tokenizer, baseline_token: str) -> dict[str, faithfulness.Replacement]:
    """``{label: Replacement}`` for each declared mode (``mask`` with the task's baseline token)."""
    return {mode: faithfulness.replacement(mode, baseline_token if mode == "mask" else None, tokenizer)
            for mode in params.replacements}


# --------------------------------------------------------------------------------------------- running a task
@dataclass
class ExplainedTask:
    """One task explained: its targets, the faithfulness ``table`` (:func:`explanation_tasks.explain_texts`), each
    text's method ``scores`` and the pairwise rank ``agreement`` (:func:`explanation_tasks.agreement_rows`)."""

    task: str
    targets: list
    table: pd.DataFrame
    scores: list[dict]
    agreement: pd.DataFrame


def explain_task(task: str, targets: list, config: dict[str, dict], tokenizer, baseline_token: str,
                 params: ExplanationParams, progress: bool = True) -> ExplainedTask:
    """Every method of ``config`` (:func:`explanation_tasks.build_scorers`) on every target, scored."""
    table, scores = explanation_tasks.explain_texts(
        targets, explanation_tasks.build_scorers(config), tokenizer,
        replacements=replacements(params, tokenizer, baseline_token), fractions=params.fractions, seed=params.seed,
        flow_max_tokens=params.flow_max_tokens, task=task, progress=progress)
    agreement = explanation_tasks.agreement_rows(scores, method=params.agreement, task=task)
    return ExplainedTask(task, list(targets), table, scores, agreement)


def classifier_head(encoder, params: ExplanationParams) -> tuple[explanation_tasks.LinearHead, pd.DataFrame, list[str],
                                                                 list[int]]:
    """Train the linear head on the frozen ``encoder`` (a loaded model: ``.model``, ``.processor``); returns
    ``(head, head_table, texts, chosen)``: its accuracies (chance: the majority class's share), the labelled texts
    and the indices of the held-out texts to explain."""
    texts, labels = labelled_texts(params)
    train, held_out = split_indices(len(texts), params)
    features = explanation_tasks.pooled_features(encoder.model, encoder.processor, texts,
                                                 max_tokens=params.classifier_max_tokens)
    head = explanation_tasks.train_linear_head(features[train], labels[train], features[held_out], labels[held_out],
                                               inverse_regularization=params.head_inverse_regularization,
                                               min_accuracy=params.min_accuracy, seed=params.seed)
    head_table = pd.DataFrame([dict(data=params.classifier_data, train_texts=head.n_train,
                                    held_out_texts=head.n_test, train_accuracy=head.train_accuracy,
                                    held_out_accuracy=head.test_accuracy,
                                    chance=float(np.bincount(labels[held_out]).max() / len(held_out)))])
    return head, head_table, texts, explained_classifier_texts(texts, held_out, encoder.processor, params)


def classifier_targets(encoder, head, texts: list[str], chosen: list[int], params: ExplanationParams) -> list:
    """The attribution target of each chosen text: the head's ``classifier_output`` of its predicted class."""
    return [explanation_tasks.classifier_target(encoder.model, encoder.processor, head, texts[i],
                                                max_tokens=params.classifier_max_tokens,
                                                baseline_token=params.classifier_baseline_token,
                                                output=params.classifier_output) for i in chosen]


def lm_targets(lm, params: ExplanationParams) -> list:
    """The attribution target of each seeded Wikipedia prefix: the LM's ``lm_output`` of its gold next token."""
    prefixes = explanation_tasks.lm_prefixes(lm.processor, lm_sentences(params), n=params.lm_texts,
                                             min_tokens=params.lm_min_tokens, max_tokens=params.lm_max_tokens,
                                             seed=params.seed)
    return [explanation_tasks.lm_target(lm.model, lm.processor, p["ids"], p["gold"],
                                        baseline_token=params.lm_baseline_token, output=params.lm_output)
            for p in prefixes]


# --------------------------------------------------------------------------------------------- tables
def per_text(table: pd.DataFrame, task: str, method: str, column: str, replacement: str) -> pd.Series:
    """One method's per-text ``column`` (comprehensiveness or sufficiency) on ``task`` under ``replacement``."""
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


def mean_interval(values: np.ndarray, seed: int) -> str:
    """``mean [low, high]`` with the 95% bootstrap interval of the mean (the mean alone below two values)."""
    if len(values) < 2:
        return f"{values.mean():.3f}" if len(values) else ""
    lo, hi, _ = evidence.paired_interval(values, seed=seed)
    return evidence.fmt_interval(float(values.mean()), lo, hi, sign=False)


def ordered(methods: Sequence[str], present) -> list[str]:
    """``methods`` then the random control, those present only."""
    present = set(present)
    return [m for m in (*methods, explanation_tasks.RANDOM) if m in present]


def method_table(table: pd.DataFrame, params: ExplanationParams, methods: Sequence[str], reference: str
                 ) -> pd.DataFrame:
    """Per task × replacement × method: texts, mean AOPC comprehensiveness and sufficiency with 95% bootstrap
    intervals, and the paired difference from the ``reference`` method."""
    rows = []
    for (task, how), group in table.groupby(["task", "replacement"], sort=False):
        for method in ordered(methods, group.method):
            row = dict(task=task, replacement=how, method=method)
            for column in ("comprehensiveness", "sufficiency"):
                values = per_text(table, task, method, column, how)
                row["texts"] = len(values)
                row[column] = mean_interval(values.to_numpy(), params.seed)
                if method != reference:
                    diff = (values - per_text(table, task, reference, column, how)).dropna()
                    row[f"{column} − {reference}"] = mean_interval(diff.to_numpy(), params.seed)
            rows.append(row)
    return pd.DataFrame(rows)


def agreement_table(agreement: pd.DataFrame, params: ExplanationParams) -> pd.DataFrame:
    """Per task and pair of methods: mean rank agreement with its 95% bootstrap interval over the texts."""
    rows = []
    for (task, a, b), group in agreement.groupby(["task", "method_a", "method_b"], sort=False):
        values = group.agreement.dropna().to_numpy()
        rows.append(dict(task=task, method_a=a, method_b=b, texts=len(values),
                         **{params.agreement: mean_interval(values, params.seed)}))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- figures
def plot_faithfulness(table: pd.DataFrame, params: ExplanationParams, methods: Sequence[str]):
    """Mean AOPC comprehensiveness and sufficiency per method (95% bootstrap interval over texts), one row of panels
    per task, under the judged replacement."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = table[table.replacement == params.judged_replacement]
    order = ordered(methods, data.method)
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


def plot_agreement(agreement: pd.DataFrame, params: ExplanationParams, methods: Sequence[str]):
    """Heat maps of the mean rank agreement between every pair of methods, one per task."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6.2 * len(TASKS), 5), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        rows = agreement[agreement.task == task]
        means = rows.groupby(["method_a", "method_b"]).agreement.mean()
        names = ordered(methods, set(rows.method_a) | set(rows.method_b))
        grid = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
        for (a, b), value in means.items():
            grid.loc[a, b] = grid.loc[b, a] = value
        sns.heatmap(grid, vmin=-1, vmax=1, cmap="vlag", annot=True, fmt=".2f", ax=ax, cbar=False,
                    annot_kws={"size": 7})
        ax.set(title=f"{task}: mean {params.agreement} ρ")
    fig.tight_layout()
    return fig
