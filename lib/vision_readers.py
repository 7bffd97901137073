"""Readers of a reduced set of visual tokens: what decides how much a kept set is worth.

A probe trained on the *unpruned* mean of the patch tokens rewards a kept set for staying near the unpruned mean
(random selection does, a selective set does not), so it measures distribution shift as much as information. Three
readers, reported side by side for every reduction:

- ``attention_pool`` (:class:`AttentionPoolReader`): reads a *set* of tokens the way a VLM's language model does —
  learned queries attend over the tokens (softmax renormalises over whatever is kept; a merged token of size ``s``
  gets ``+log s`` on its logits, ToMe's proportional attention, so it counts as ``s`` copies), then a linear head.
  Trained once (seeded, Adam, fixed epochs) on the unpruned patch tokens of the train images and applied
  training-free to every kept set.
- ``retrained_mean``: a logistic regression retrained on identically reduced *train* features (the size-weighted
  mean of the kept patch tokens): how much the kept set still carries when the reader may adapt to it.
- ``cls_probe``: a logistic regression on the output [CLS] token, trained on unpruned train images. After-encoder
  reduction leaves [CLS] unchanged by construction (the encoder ran on every token), so there it equals the
  unpruned row; in-encoder reduction changes it.

Per image every reader gives the probability of the true class (continuous: claims are judged on it, so no verdict
hinges on one flipped image) and whether its top class is right (accuracy is reported beside it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

READERS = ("attention_pool", "retrained_mean", "cls_probe")
READER_TEXT = {
    "attention_pool": "attention-pooling reader (learned queries over the kept set, trained once on unpruned tokens)",
    "retrained_mean": "probe retrained on identically reduced train features (size-weighted mean of kept tokens)",
    "cls_probe": "[CLS]-only probe trained on unpruned [CLS]",
}


@dataclass(frozen=True)
class ReaderSettings:
    """Training settings of the attention-pooling reader and the probes. No defaults here: they are the notebooks'
    parameters (``reader:`` in ``params/vit-*.yaml``, checked by ``ReaderParams``)."""

    heads: int
    key_dim: int
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    probe_c: float


def class_count(labels: np.ndarray) -> int:
    """Classes a reader predicts: labels are ``0..C-1``, so ``C = max label + 1``."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() < 0:
        raise ValueError("labels must be a non-empty array of class indices 0..C-1")
    return int(labels.max()) + 1


@dataclass
class KeptTokens:
    """A reduced set of output tokens per image: ``patches (N, n, d)`` kept or merged patch tokens, ``sizes (N, n)``
    patches each one stands for, ``cls (N, d)`` the output [CLS] (None without one)."""

    patches: torch.Tensor
    sizes: torch.Tensor
    cls: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.patches.dim() != 3 or self.sizes.shape != self.patches.shape[:2]:
            raise ValueError(f"patches must be (N, n, d) and sizes (N, n), got {tuple(self.patches.shape)} and "
                             f"{tuple(self.sizes.shape)}")

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.patches.shape[1])

    def mean(self) -> torch.Tensor:
        """``(N, d)`` size-weighted mean of the patch tokens (what a merged token preserves by construction)."""
        w = self.sizes.to(self.patches.dtype)
        return (self.patches * w[..., None]).sum(1) / w.sum(1, keepdim=True)


class AttentionPoolReader(nn.Module):
    """Learned-query attention pooling over a token set, then a linear head (a VLM's language model in miniature).

    ``logits_{h,i} = q_h · (W_k x_i) / sqrt(d_k) + log s_i``; ``α_h = softmax_i(logits_h)`` over the tokens present;
    ``z = concat_h Σ_i α_{h,i} x_i``; class logits ``= W_o z + b``. Dropped tokens are simply absent (or masked);
    a token of size ``s`` weighs exactly like ``s`` copies of it.

    Parameters: dim ``d`` of the tokens, n_classes, heads (queries), key_dim ``d_k``. Input ``tokens (N, n, d)``,
    ``sizes (N, n)`` (None = ones), optional ``mask (N, n)`` bool (False = not present); output ``(N, n_classes)``.
    """

    def __init__(self, dim: int, n_classes: int, heads: int, key_dim: int):
        super().__init__()
        self.key = nn.Linear(dim, key_dim, bias=False)
        self.queries = nn.Parameter(torch.randn(heads, key_dim) / key_dim**0.5)
        self.head = nn.Linear(heads * dim, n_classes)

    def attention(self, tokens: torch.Tensor, sizes: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, heads, n)`` pooling weights (each row sums to 1 over the present tokens)."""
        logits = torch.einsum("hk,nik->nhi", self.queries, self.key(tokens)) / self.queries.shape[-1] ** 0.5
        if sizes is not None:
            logits = logits + sizes.to(logits.dtype).log()[:, None, :]
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1)

    def forward(self, tokens: torch.Tensor, sizes: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = torch.einsum("nhi,nid->nhd", self.attention(tokens, sizes, mask), tokens)
        return self.head(pooled.flatten(1))

    @torch.inference_mode()
    def proba(self, kept: KeptTokens, batch_size: int = 500) -> np.ndarray:
        """``(N, n_classes)`` class probabilities of every image's kept set."""
        out = [torch.softmax(self(kept.patches[i:i + batch_size], kept.sizes[i:i + batch_size]), dim=-1)
               for i in range(0, len(kept), batch_size)]
        return torch.cat(out).double().numpy()


def train_attention_reader(kept: KeptTokens, labels: np.ndarray, settings: ReaderSettings, *,
                           seed: int) -> AttentionPoolReader:
    """Train an :class:`AttentionPoolReader` on ``kept`` (the unpruned train tokens): Adam, cross-entropy, a fixed
    number of epochs over seeded shuffles (``settings``); everything seeded by ``seed``; one class per label value
    (:func:`class_count`)."""
    if len(kept) != len(labels):
        raise ValueError(f"{len(kept)} token sets but {len(labels)} labels")
    epochs, batch_size = settings.epochs, settings.batch_size
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reader = AttentionPoolReader(kept.patches.shape[-1], class_count(labels), heads=settings.heads,
                                     key_dim=settings.key_dim)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    x, s = kept.patches.float(), kept.sizes.float()
    opt = torch.optim.Adam(reader.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    reader.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(reader(x[idx], s[idx]), y[idx]).backward()
            opt.step()
    reader.eval()
    return reader


def fit_probe(features: np.ndarray, labels: np.ndarray, *, C: float, seed: int, max_iter: int = 1000):
    """Standardise + multinomial logistic regression (sklearn, seeded). BLAS runs on one thread: on a small problem
    several threads only contend (10x slower on a busy 2-core machine)."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    with threadpool_limits(1):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed)).fit(
            np.asarray(features, dtype=np.float64), labels)


def probe_proba(probe, features: np.ndarray) -> np.ndarray:
    """``(N, n_classes)`` probabilities of a :func:`fit_probe` probe (one BLAS thread, as in fitting)."""
    with threadpool_limits(1):
        return probe.predict_proba(np.asarray(features, dtype=np.float64))


def true_class(proba: np.ndarray, labels: np.ndarray, classes: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(p_true, correct)`` per row: the probability given to the true label and whether the top class is it.
    ``classes`` maps columns to labels (a sklearn probe's ``classes_``; default ``0..C-1``)."""
    labels = np.asarray(labels)
    classes = np.arange(proba.shape[1]) if classes is None else np.asarray(classes)
    column = np.searchsorted(classes, labels)
    if np.any(column >= len(classes)) or np.any(classes[np.minimum(column, len(classes) - 1)] != labels):
        raise ValueError("a label is not among the reader's classes")
    p_true = proba[np.arange(len(labels)), column]
    return p_true, classes[proba.argmax(axis=1)] == labels


__all__ = ["READERS", "READER_TEXT", "AttentionPoolReader", "KeptTokens", "ReaderSettings", "class_count", "fit_probe",
           "probe_proba", "train_attention_reader", "true_class"]
