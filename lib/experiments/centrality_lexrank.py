"""Notebook ``centrality-lexrank``: do degree-based centralities on the idf-modified-cosine sentence graph (Degree,
LexRank, continuous LexRank) pick better extractive summaries than the centroid baseline, and is thresholded LexRank
the best of them [@lexrank]?

Task: the shipped Wikipedia articles, their lead section as the reference summary, the first ``max_sentences``
sentences of the body as the pool to extract from. Every method scores the pool's sentences; the summary takes them
best first up to ``budget_words`` words, the last one cut (:func:`salience.summarization.budget_summary`), so all
summaries have the same length; ROUGE [@rouge] against the lead decides. A sentence-count variant (the best
``count_sentences`` whole sentences) is reported beside it, not judged: ROUGE F1 there rewards long sentences.

Rows of every table: the unreduced pool (the whole pool as the summary: ROUGE recall's ceiling), the greedy ROUGE
oracle within the budget, lead (the body's first sentences), random (``random_replicates`` seeded orders averaged
per article), the centroid baseline [@mead], Degree and LexRank at each threshold, continuous LexRank, and two
graphs the paper did not have: MiniLM embeddings [@minilm] and SmolLM2's attention [@smollm2]
(:mod:`salience.sentence_graphs`; the attention graph on the first ``attention_articles`` articles only, for time).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import AfterValidator, Field, model_validator
from tqdm import tqdm

from .. import centrality, evidence
from ..data.text import wikipedia_articles
from ..params import ModelName, NotebookParams
from ..seeding import unit_seed
from ..sentences import check_document, idf_from_documents, split_sentences, words
from ..summarization import MEASURES, ROUGE_TYPES, budget_summary, count_summary, greedy_oracle_scores, rouge_scores

TITLE = "LexRank: degree centrality vs the centroid baseline in extractive summarization"
PAPERS = ["lexrank", "mead"]
CLAIM = ("Degree-based centrality on the idf-modified-cosine sentence graph (Degree, LexRank, continuous LexRank) "
         "picks better summary sentences than the centroid baseline, and thresholded LexRank beats the other "
         "degree-based variants (Degree and continuous LexRank).")
Threshold = Annotated[float, AfterValidator(centrality.check_threshold)]
CONTROLS = ("full_pool", "oracle", "lead", "random")


def method_id(kind: str, threshold: float | None = None) -> str:
    """Row label of a method: ``lexrank@0.1`` for a thresholded one, the kind otherwise."""
    return f"{kind}@{threshold:g}" if threshold is not None else kind


def _beats(a: str, b: str, text_a: str, text_b: str, papers=("lexrank",)) -> evidence.PartSpec:
    return evidence.PartSpec(id=f"{a}_beats_{b}", statement=f"{text_a} picks better sentences than {text_b}",
                             metric="{metric} against the lead at {budget} words", unit="article", papers=papers)


JUDGED = (
    _beats("degree", "centroid", "Degree (t = {t})", "the centroid baseline", ("lexrank", "mead")),
    _beats("lexrank", "centroid", "LexRank (t = {t})", "the centroid baseline", ("lexrank", "mead")),
    _beats("continuous", "centroid", "continuous LexRank", "the centroid baseline", ("lexrank", "mead")),
    _beats("lexrank", "degree", "LexRank (t = {t})", "Degree (t = {t})"),
    _beats("lexrank", "continuous", "LexRank (t = {t})", "continuous LexRank"),
)


class Params(NotebookParams):
    """Parameters of ``centrality-lexrank``; the defaults live in ``params/centrality-lexrank.yaml``."""

    notebook = "centrality-lexrank"

    articles: int = Field(ge=2, le=1000, description="articles (the units of every part), a seeded subset")
    min_lead_words: int = Field(ge=1, description="an article's lead (the reference) needs at least this many words")
    min_body_sentences: int = Field(ge=2, description="an article's body needs at least this many sentences")
    max_sentences: int = Field(ge=2, le=1000, description="pool: the first sentences of the body")
    budget_words: int = Field(ge=5, le=2000, description="summary length in words (DUC's rule: the verdict)")
    count_sentences: int = Field(ge=1, le=100, description="sentences of the sentence-count variant (reported)")
    threshold: Threshold = Field(description="threshold t of the judged Degree and LexRank")
    thresholds: list[Threshold] = Field(min_length=1, description="thresholds of Degree and LexRank reported")
    damping: float = Field(gt=0, le=1, description="probability of following an edge (the paper's d is 1 − this)")
    idf_source: Literal["collection", "document"] = Field(
        description="idf over every shipped Wikipedia article (collection) or over the article's own sentences")
    tf: Literal["raw", "max"] = Field(description="term frequency: raw counts (the paper) or divided by the largest")
    centroid_words: int | None = Field(ge=1, description="words kept in the centroid (None: all)")
    random_replicates: int = Field(ge=1, le=100, description="seeded random orders averaged per article")
    metric: Literal[ROUGE_TYPES] = Field(description="ROUGE variant the parts judge")
    measure: Literal[MEASURES] = Field(description="ROUGE measure the parts judge")
    embedding_model: ModelName | None = Field(description="text encoder of the embedding graph (None: skip)")
    attention_model: ModelName | None = Field(description="causal LM of the attention graph (None: skip)")
    attention_articles: int = Field(ge=0, le=1000, description="articles (the first ones) given an attention graph")
    attention_window: int = Field(ge=16, le=8192, description="tokens per window of the attention graph")
    parts: dict[str, evidence.PartRule] = Field(description="direction and smallest effect δ of each judged part")

    judged = JUDGED

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if self.threshold not in self.thresholds:
            raise ValueError(f"threshold {self.threshold} must be one of thresholds {self.thresholds}")
        if self.min_body_sentences > self.max_sentences:
            raise ValueError(f"min_body_sentences ({self.min_body_sentences}) > max_sentences ({self.max_sentences})")
        return self

    @property
    def judged_metric(self) -> str:
        return f"{self.metric}_{self.measure}"


# --------------------------------------------------------------------------------------------- data
def load_articles(params: Params) -> tuple[list[dict], dict[str, float]]:
    """The seeded subset of eligible articles (title, lead, pool of body sentences, their words) and the idf table
    over the collection (every shipped article with a lead and a body)."""
    collection = wikipedia_articles(min_chars=0)
    eligible = []
    for row in collection:
        body = split_sentences(row["body"])
        if len(row["lead"].split()) >= params.min_lead_words and len(body) >= params.min_body_sentences:
            pool = check_document(body[:params.max_sentences], f"body of {row['title']!r}")
            eligible.append(dict(title=row["title"], lead=row["lead"], pool=pool, words=[words(s) for s in pool]))
    if len(eligible) < params.articles:
        raise ValueError(f"only {len(eligible)} articles have a lead of >= {params.min_lead_words} words and a body "
                         f"of >= {params.min_body_sentences} sentences; ask for fewer articles or relax the limits")
    order = np.random.default_rng(params.seed).choice(len(eligible), size=params.articles, replace=False)
    idf = idf_from_documents(words(row["text"]) for row in collection)
    return [eligible[i] for i in sorted(order)], idf


# --------------------------------------------------------------------------------------------- methods
def lexical_scores(article: dict, idf: dict[str, float], params: Params) -> dict[str, np.ndarray]:
    """Centroid, Degree and LexRank at every threshold, continuous LexRank of one article's pool."""
    table = idf if params.idf_source == "collection" else idf_from_documents(article["words"])
    sim = centrality.idf_cosine(article["words"], table, tf=params.tf)
    out = {"centroid": centrality.centroid_scores(article["words"], table, params.centroid_words),
           "continuous_lexrank": centrality.lexrank(sim, params.damping)}
    for t in params.thresholds:
        graph = centrality.threshold_graph(sim, t)
        out[method_id("degree", t)] = centrality.degree_centrality(graph)
        out[method_id("lexrank", t)] = centrality.lexrank(graph, params.damping)
    return out


def evaluate(articles: list[dict], idf: dict[str, float], params: Params, embeddings=None, attention=None,
             progress: bool = True) -> pd.DataFrame:
    """One row per article × method × variant (``budget``/``count``): ROUGE-1/2/L precision, recall, F1 and the
    summary's length. ``embeddings``/``attention``: per-article sentence vectors / graphs (or None)."""
    rows = []
    for unit, art in enumerate(tqdm(articles, desc="articles", disable=not progress)):
        scores = lexical_scores(art, idf, params)
        scores["lead"] = -np.arange(len(art["pool"]), dtype=np.float64)
        scores["oracle"] = greedy_oracle_scores(art["pool"], art["lead"], params.budget_words)
        if embeddings is not None:
            scores["embedding_lexrank"] = centrality.lexrank(centrality.cosine_graph(embeddings[unit]), params.damping)
        if attention is not None and unit < len(attention):
            scores["attention_lexrank"] = centrality.lexrank(attention[unit], params.damping)
        base = dict(article=unit, title=art["title"], pool_sentences=len(art["pool"]))
        for name, s in scores.items():
            for variant, summary in _summaries(art["pool"], s, params):
                rows.append({**base, "method": name, "variant": variant, "words": summary.words,
                             **rouge_scores(summary.text, art["lead"])})
        rng = np.random.default_rng(unit_seed(params.seed, unit))
        for variant in ("budget", "count"):
            reps = [rouge_scores(dict(_summaries(art["pool"], rng.random(len(art["pool"])), params))[variant].text,
                                 art["lead"]) for _ in range(params.random_replicates)]
            rows.append({**base, "method": "random", "variant": variant, "words": np.nan,
                         **{k: float(np.mean([r[k] for r in reps])) for k in reps[0]}})
        full = " ".join(art["pool"])
        for variant in ("budget", "count"):
            rows.append({**base, "method": "full_pool", "variant": variant, "words": len(full.split()),
                         **rouge_scores(full, art["lead"])})
    return pd.DataFrame(rows)


def _summaries(pool: list[str], scores: np.ndarray, params: Params):
    return [("budget", budget_summary(pool, scores, params.budget_words)),
            ("count", count_summary(pool, scores, params.count_sentences))]


# --------------------------------------------------------------------------------------------- tables and verdict
def per_article(table: pd.DataFrame, method: str, column: str, variant: str = "budget") -> pd.Series:
    rows = table[(table.method == method) & (table.variant == variant)]
    if rows.empty:
        raise ValueError(f"no rows for method {method!r} ({variant}); methods: {sorted(table.method.unique())}")
    return rows.set_index("article")[column]


def method_table(table: pd.DataFrame, params: Params, variant: str = "budget", baseline: str | None = None,
                 ) -> pd.DataFrame:
    """Per method: articles, mean ROUGE-1/2/L F1 and recall, and the paired difference from ``baseline`` (default:
    the judged LexRank) of the judged metric with its 95% bootstrap interval over the articles both have."""
    baseline = baseline or method_id("lexrank", params.threshold)
    ref = per_article(table, baseline, params.judged_metric, variant)
    rows = []
    for name, group in table[table.variant == variant].groupby("method", sort=False):
        row = dict(method=name, articles=len(group))
        for kind in ROUGE_TYPES:
            row[f"{kind} F1"] = group[f"{kind}_fmeasure"].mean()
            row[f"{kind} R"] = group[f"{kind}_recall"].mean()
        diff = (per_article(table, name, params.judged_metric, variant) - ref).dropna()
        if name != baseline and diff.size >= 2:
            lo, hi, _ = evidence.paired_interval(diff.to_numpy(), seed=params.seed)
            row[f"vs {baseline}"] = evidence.fmt_interval(float(diff.mean()), lo, hi)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(f"{params.metric} F1", ascending=False).reset_index(drop=True)


def judge_claim(table: pd.DataFrame, params: Params) -> evidence.Claim:
    """The five parts (each paired over articles on the judged ROUGE at the word budget); the label follows
    :func:`salience.evidence.overall_label`."""
    t = params.threshold
    arms = {"degree": method_id("degree", t), "lexrank": method_id("lexrank", t),
            "continuous": "continuous_lexrank", "centroid": "centroid"}
    fill = dict(t=f"{t:g}", metric=f"{params.metric} {params.measure}", budget=params.budget_words)
    parts = []
    for spec, rule in evidence.parts_for(JUDGED, params.parts):
        a_key, b_key = spec.id.split("_beats_")
        spec = dataclasses.replace(spec, statement=spec.statement.format(**fill), metric=spec.metric.format(**fill))
        a = per_article(table, arms[a_key], params.judged_metric)
        b = per_article(table, arms[b_key], params.judged_metric)
        parts.append(evidence.judge(spec, rule, a, b, seed=params.seed, detail=f"a: {arms[a_key]}; b: {arms[b_key]}"))
    setting = (
        f"The paper runs every centrality inside MEAD on multi-document DUC 2003/2004 clusters (with MEAD's position "
        f"and length features and its redundancy filter) and reports ROUGE-1 at 665 bytes. Here each of "
        f"{params.articles} shipped Wikipedia articles is a single document: the first {params.max_sentences} body "
        f"sentences are the pool, the lead section is the one reference, the score alone ranks sentences (no MEAD "
        f"features, no redundancy filter), and summaries are cut at {params.budget_words} words. Words are lower-cased "
        f"letters and digits, no stemming and no stop list; idf is computed over "
        + ("every shipped article" if params.idf_source == "collection" else "the article's own sentences")
        + f"; tf is {'raw counts' if params.tf == 'raw' else 'divided by the largest count'}; the walk follows an "
        f"edge with probability {params.damping:g}.")
    notes = [f"Centroid: MEAD's centroid value (sum of the centroid weights of a sentence's distinct words), "
             f"{'all words' if params.centroid_words is None else f'{params.centroid_words} words'} in the centroid.",
             f"Controls (not judged): the unreduced pool, the greedy ROUGE oracle, lead, random "
             f"({params.random_replicates} orders per article averaged)."]
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting, notes=notes, seed=params.seed)


# --------------------------------------------------------------------------------------------- figure
def plot_methods(table: pd.DataFrame, params: Params):
    """Left: every method's mean judged ROUGE at the budget, with a 95% bootstrap interval over articles. Right:
    Degree and LexRank against the threshold, continuous LexRank and the centroid as lines."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    column = params.judged_metric
    budget = table[table.variant == "budget"]
    order = budget.groupby("method")[column].mean().sort_values(ascending=False).index
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.32 * len(order) + 1.8), width_ratios=(1.3, 1))
    sns.pointplot(budget, x=column, y="method", order=order, errorbar=("ci", 95), seed=params.seed,
                  linestyles="none", ax=left)
    left.set(xlabel=f"{params.metric} {params.measure} at {params.budget_words} words", ylabel="")
    sweep = []
    for kind in ("degree", "lexrank"):
        for t in params.thresholds:
            sweep.append(dict(kind=kind, threshold=t, value=per_article(table, method_id(kind, t), column).mean()))
    sns.lineplot(pd.DataFrame(sweep), x="threshold", y="value", hue="kind", marker="o", ax=right)
    for name, style in (("continuous_lexrank", "--"), ("centroid", ":")):
        right.axhline(per_article(table, name, column).mean(), ls=style, color="grey", label=name)
    right.set(xlabel="threshold t", ylabel=f"mean {params.metric} {params.measure}")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
