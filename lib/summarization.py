"""Extractive summaries from sentence scores, ROUGE against a reference [@rouge], and a greedy oracle.

* :func:`budget_summary` — DUC's fixed-length rule: sentences are taken best first until ``budget_words`` words (white
  space separated) are reached, the last one cut at the budget, so every method's summary has the same length and
  ROUGE's F1 cannot reward methods that pick longer sentences. The picked sentences are printed in document order.
* :func:`count_summary` — the best ``k`` whole sentences (a sentence-count variant, shown beside the budget).
* :func:`rouge_scores` — ROUGE-1/2/L precision, recall and F1 from Google's ``rouge-score`` (Porter stemming on).
* :func:`greedy_oracle_scores` — an extractive upper reference: greedily adds the sentence that most increases the
  summary's unigram + bigram overlap with the reference (stemmed tokens as ``rouge-score`` makes them), within the
  same word budget; returned as scores so it goes through :func:`budget_summary` like every method.

Ties between equal scores go to the earlier sentence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer, tokenizers

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
MEASURES = ("precision", "recall", "fmeasure")


@dataclass(frozen=True)
class Summary:
    """An extractive summary: its text, the picked sentence indices (document order) and its length in words."""

    text: str
    picked: tuple[int, ...]
    words: int


def _ranking(scores: Sequence[float]) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not np.isfinite(scores).all():
        raise ValueError(f"scores must be a finite 1-D array, got shape {scores.shape}")
    return np.lexsort((np.arange(scores.size), -scores))  # best first, earlier first among ties


def _check_pool(sentences: Sequence[str], scores: Sequence[float]) -> None:
    if len(sentences) == 0:
        raise ValueError("no sentences to summarise")
    if len(sentences) != len(scores):
        raise ValueError(f"{len(sentences)} sentences but {len(scores)} scores")


def budget_summary(sentences: Sequence[str], scores: Sequence[float], budget_words: int) -> Summary:
    """Best-first sentences up to exactly ``budget_words`` words (fewer only when the pool is shorter)."""
    _check_pool(sentences, scores)
    if budget_words < 1:
        raise ValueError(f"budget_words must be >= 1, got {budget_words}")
    taken: dict[int, list[str]] = {}
    left = budget_words
    for i in _ranking(scores):
        if left == 0:
            break
        tokens = sentences[i].split()[:left]
        if tokens:
            taken[int(i)] = tokens
            left -= len(tokens)
    picked = tuple(sorted(taken))
    return Summary(" ".join(" ".join(taken[i]) for i in picked), picked, budget_words - left)


def count_summary(sentences: Sequence[str], scores: Sequence[float], k: int) -> Summary:
    """The ``k`` best whole sentences, in document order."""
    _check_pool(sentences, scores)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    picked = tuple(sorted(int(i) for i in _ranking(scores)[:k]))
    text = " ".join(sentences[i] for i in picked)
    return Summary(text, picked, len(text.split()))


_SCORER = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=True)


def rouge_scores(summary: str, reference: str) -> dict[str, float]:
    """``{"rouge1_fmeasure": …, "rouge2_recall": …, …}`` of ``summary`` against ``reference``."""
    if not reference.strip():
        raise ValueError("the reference summary is empty")
    result = _SCORER.score(reference, summary)
    return {f"{kind}_{m}": float(getattr(result[kind], m)) for kind in ROUGE_TYPES for m in MEASURES}


def _grams(tokens: list[str]) -> Counter:
    return Counter(tokens) + Counter(zip(tokens, tokens[1:]))


def greedy_oracle_scores(sentences: Sequence[str], reference: str, budget_words: int) -> np.ndarray:
    """Scores that make :func:`budget_summary` return the greedy oracle: picked sentences get ``S − step`` (in the
    order they were picked), the rest 0 (so a budget the oracle leaves unfilled is filled in document order). Each
    step adds the sentence (cut to the words left) whose addition most increases the unigram + bigram overlap with
    ``reference``; it stops when the budget is full or no sentence adds overlap."""
    _check_pool(sentences, [0.0] * len(sentences))
    if budget_words < 1:
        raise ValueError(f"budget_words must be >= 1, got {budget_words}")
    target = _grams(_TOKENIZER.tokenize(reference))
    # stemmed tokens of every white-space word, so a sentence cut at the budget needs no new tokenisation
    word_tokens = [[_TOKENIZER.tokenize(w) for w in s.split()] for s in sentences]
    scores = np.zeros(len(sentences))
    chosen: list[str] = []
    left = budget_words
    for step in range(len(sentences)):
        current = sum((_grams(chosen) & target).values())
        best, best_gain, best_cut = -1, 0, []
        for i, tokens_of_words in enumerate(word_tokens):
            if scores[i] > 0:
                continue
            cut = [t for tokens in tokens_of_words[:left] for t in tokens]
            gain = sum((_grams(chosen + cut) & target).values()) - current
            if gain > best_gain:
                best, best_gain, best_cut = i, gain, cut
        if best < 0:
            break
        scores[best] = len(sentences) - step
        chosen += best_cut
        left -= min(left, len(word_tokens[best]))
        if left <= 0:
            break
    return scores
