"""Text to sentences and words, and idf over a collection: the text side of :mod:`salience.centrality`.

Sentences: paragraphs (blank-line separated) are split after ``.``, ``!`` or ``?`` (and a closing quote or bracket)
followed by white space and an upper-case letter, a digit or an opening quote/bracket, except after a common
abbreviation or a single capital initial ("e.g.", "Dr.", "J. S. Bach"). No NLTK model is used (none ships offline);
``tests/test_centrality.py`` checks the rule on hand-made text.

Words: lower-cased runs of letters and digits (Unicode-aware, underscores and punctuation dropped); no stemming and
no stop list, so the idf alone down-weights function words, as in the paper's idf-modified cosine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

_BOUNDARY = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
#: tokens ending in "." after which a sentence does not end
ABBREVIATIONS = frozenset({
    "e.g.", "i.e.", "etc.", "cf.", "vs.", "viz.", "al.", "approx.", "ca.", "c.", "fl.", "no.", "nos.", "vol.",
    "pp.", "p.", "ed.", "eds.", "fig.", "mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "sr.", "jr.", "mt.", "ft.",
    "gen.", "col.", "lt.", "capt.", "rev.", "gov.", "sen.", "rep.", "inc.", "ltd.", "co.", "corp.", "jan.", "feb.",
    "mar.", "apr.", "jun.", "jul.", "aug.", "sep.", "sept.", "oct.", "nov.", "dec.", "u.s.", "u.k.", "a.d.", "b.c.",
})  # fmt: skip


def _ends_with_abbreviation(chunk: str) -> bool:
    last = chunk.rsplit(None, 1)[-1].lower().lstrip("(\"'“‘[")
    return last in ABBREVIATIONS or bool(re.fullmatch(r"[a-z]\.", last))


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` in order (white space inside a sentence collapsed); an error for empty text."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("split_sentences needs a non-empty text")
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if not paragraph:
            continue
        start = 0
        for match in _BOUNDARY.finditer(paragraph):
            candidate = paragraph[start:match.end()].strip()
            if not _ends_with_abbreviation(candidate):
                sentences.append(candidate)
                start = match.end()
        if paragraph[start:].strip():
            sentences.append(paragraph[start:].strip())
    return sentences


def words(sentence: str) -> list[str]:
    """Lower-cased words of one sentence (letters and digits)."""
    return _WORD.findall(sentence.lower())


def idf_from_documents(documents: Iterable[Iterable[str]], smooth: bool = False) -> dict[str, float]:
    """``idf_w = log(N / n_w)`` over ``N`` documents given as word iterables, ``n_w`` documents containing ``w``.

    ``smooth=True`` gives ``log(N / (1 + n_w))``, the variant ``sumy`` computes over the sentences of one document.
    """
    counts: dict[str, int] = {}
    n_docs = 0
    for doc in documents:
        n_docs += 1
        for w in set(doc):
            counts[w] = counts.get(w, 0) + 1
    if n_docs == 0:
        raise ValueError("idf_from_documents needs at least one document")
    extra = 1 if smooth else 0
    return {w: math.log(n_docs / (n + extra)) for w, n in counts.items()}


def check_document(sentences: list[str], what: str = "document") -> list[str]:
    """A document to summarise needs at least two sentences (one sentence has nothing to rank)."""
    if len(sentences) < 2:
        raise ValueError(f"the {what} has {len(sentences)} sentence(s); ranking needs at least 2")
    return sentences
