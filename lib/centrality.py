"""Sentence graphs and their centrality: LexRank [@lexrank] and the baselines it was compared with.

Pure functions on numpy arrays; the text side (sentences, words, idf) is in :mod:`salience.sentences`.

* :func:`idf_cosine` — the paper's *idf-modified cosine* between two sentences' bags of words,
  ``Σ_w tf_{w,x} tf_{w,y} idf_w² / (‖tf_x·idf‖ ‖tf_y·idf‖)``, for every pair (self-similarity 1).
* :func:`threshold_graph` — the paper's thresholded graph: an edge where the similarity is above ``t`` (self-loops
  included, as in the paper's algorithm).
* :func:`degree_centrality` — *Degree*: a sentence's number of edges in the thresholded graph.
* :func:`lexrank` — the stationary distribution of a walk on a weighted graph with uniform jumps: with a 0/1 graph
  it is *LexRank*, with the similarities themselves *continuous LexRank*. ``damping`` is the probability of
  following an edge; the paper's ``d`` (the jump probability) is ``1 − damping``.
* :func:`centroid_scores` — the *Centroid* baseline (MEAD [@mead]): the document's centroid is the mean tf·idf vector
  of its sentences; a sentence scores the sum of the centroid weights of its distinct words (MEAD's centroid value).
* :func:`cosine_graph` — a similarity graph from any sentence vectors (here MiniLM embeddings), negatives set to 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

TfMode = Literal["raw", "max"]


def check_threshold(threshold: float) -> float:
    """A similarity threshold of the thresholded graph lies in [0, 1)."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    return float(threshold)


def check_damping(damping: float) -> float:
    """Probability of following an edge, in (0, 1]; 1 is a walk without jumps (what ``sumy`` computes)."""
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must lie in (0, 1], got {damping}")
    return float(damping)


def _check_square(matrix: np.ndarray, what: str) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty square matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError(f"{what} must be finite and non-negative")
    return matrix


def term_weights(words: Sequence[str], tf: TfMode = "raw") -> dict[str, float]:
    """Term frequencies of one sentence: raw counts (the paper) or divided by the largest count (``sumy``)."""
    counts = Counter(words)
    if tf == "raw" or not counts:
        return {w: float(c) for w, c in counts.items()}
    if tf == "max":
        top = max(counts.values())
        return {w: c / top for w, c in counts.items()}
    raise ValueError(f"tf must be 'raw' or 'max', got {tf!r}")


def idf_cosine(sentences: Sequence[Sequence[str]], idf: Mapping[str, float], tf: TfMode = "raw") -> np.ndarray:
    """``(S, S)`` idf-modified cosine between sentences given as word lists; a word missing from ``idf`` is an
    error (compute ``idf`` over a collection that contains the sentences). A sentence whose vector is zero (no
    words, or only words of idf 0) has similarity 0 with every sentence, itself included."""
    if not sentences:
        raise ValueError("idf_cosine needs at least one sentence")
    vocab = sorted({w for s in sentences for w in s})
    missing = [w for w in vocab if w not in idf]
    if missing:
        raise ValueError(f"{len(missing)} words have no idf (e.g. {missing[:3]}): compute idf over a collection that "
                         "contains these sentences")
    index = {w: i for i, w in enumerate(vocab)}
    weights = np.array([idf[w] for w in vocab], dtype=np.float64)
    vectors = np.zeros((len(sentences), len(vocab)))
    for row, words in enumerate(sentences):
        for w, f in term_weights(words, tf).items():
            vectors[row, index[w]] = f * weights[index[w]]
    return cosine_matrix(vectors)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """``(S, S)`` cosine similarity of the rows of ``vectors``; a zero row has similarity 0 with everything."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = vectors / safe[:, None]
    sim = unit @ unit.T
    sim[norms == 0, :] = 0.0
    sim[:, norms == 0] = 0.0
    return np.clip(sim, -1.0, 1.0)


def cosine_graph(vectors: np.ndarray) -> np.ndarray:
    """A weighted graph from sentence vectors (e.g. embeddings): cosine similarity with negatives set to 0."""
    return np.clip(cosine_matrix(vectors), 0.0, None)


def threshold_graph(similarity: np.ndarray, threshold: float) -> np.ndarray:
    """0/1 adjacency: an edge wherever the similarity is strictly above ``threshold`` (self-loops included)."""
    check_threshold(threshold)
    similarity = np.asarray(similarity, dtype=np.float64)
    return (similarity > threshold).astype(np.float64)


def degree_centrality(adjacency: np.ndarray) -> np.ndarray:
    """Degree of every sentence in a 0/1 graph (row sums)."""
    return _check_square(adjacency, "adjacency").sum(axis=1)


def lexrank(weights: np.ndarray, damping: float = 0.85, tol: float = 1e-10, max_iter: int = 1000) -> np.ndarray:
    """Stationary distribution ``p = (1 − damping)/S + damping · Bᵀ p`` of the walk on ``weights``.

    ``B`` is ``weights`` with each row divided by its sum (a row without edges jumps uniformly). With a 0/1 graph
    this is LexRank, with similarity weights continuous LexRank. Power iteration from the uniform vector until the
    L1 change is below ``tol``; an error if it has not converged after ``max_iter`` steps (a periodic graph with
    ``damping = 1``). Returns ``(S,)`` summing to 1.
    """
    check_damping(damping)
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"tol must be > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    weights = _check_square(weights, "weights")
    n = weights.shape[0]
    out = weights.sum(axis=1, keepdims=True)
    walk = np.where(out > 0, weights / np.where(out > 0, out, 1.0), 1.0 / n)
    p = np.full(n, 1.0 / n)
    for _ in range(max_iter):
        nxt = (1.0 - damping) / n + damping * (walk.T @ p)
        nxt /= nxt.sum()
        if np.abs(nxt - p).sum() < tol:
            return nxt
        p = nxt
    raise RuntimeError(f"lexrank did not converge in {max_iter} steps (tol {tol}); lower damping below 1")


def centroid_scores(sentences: Sequence[Sequence[str]], idf: Mapping[str, float], top_words: int | None = None,
                    ) -> np.ndarray:
    """MEAD's centroid value of every sentence: the sum, over its distinct words, of the word's weight in the
    document centroid (the mean over the document's sentences of raw tf × idf). ``top_words`` keeps only the
    centroid's heaviest words (MEAD keeps a fixed number; None keeps all)."""
    if not sentences:
        raise ValueError("centroid_scores needs at least one sentence")
    totals: Counter[str] = Counter()
    for words in sentences:
        totals.update(words)
    centroid = {w: c * idf[w] / len(sentences) for w, c in totals.items()}
    if top_words is not None:
        if top_words < 1:
            raise ValueError(f"top_words must be >= 1 or None, got {top_words}")
        keep = sorted(centroid, key=lambda w: (-centroid[w], w))[:top_words]
        centroid = {w: centroid[w] for w in keep}
    return np.array([sum(centroid.get(w, 0.0) for w in set(words)) for words in sentences])
