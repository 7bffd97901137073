"""Tasks for attention-vs-gradient explanation studies: what each notebook of that kind explains, and how.

Two tasks, one attribution target per text:

* **classifier**: a linear head (logistic regression) trained on mean-pooled frozen encoder features
  (:func:`pooled_features`, :func:`train_linear_head`, which refuses a head below a stated held-out accuracy); the
  readout is the head's probability (or log-probability) of the class it predicts on the full text
  (:func:`classifier_target`).
* **lm**: a causal LM's log-probability (or probability) of the gold next token after a prefix
  (:func:`lm_target`, :func:`lm_prefixes`).

:func:`explain_texts` runs every explanation scorer on each target and scores the result with the ERASER
faithfulness metrics (AOPC comprehensiveness and sufficiency, :mod:`salience.faithfulness`) under each declared
replacement; :func:`agreement_rows` gives the rank agreement between every pair of methods per text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from . import faithfulness
from .models.minilm import mean_pool
from .scorers import get_scorer
from .scorers.attribution_target import AttributionTarget, attribution_target, explanation_view
from .scorers.base import Scorer
from .seeding import unit_seed

#: the row every study adds as a control: seeded uniform random token scores
RANDOM = "random"


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------------ classifier head
@dataclass(frozen=True)
class LinearHead:
    """A linear classifier on mean-pooled encoder features: ``logits = features @ weight.T + bias``.

    Attributes: weight ``(C, d)``; bias ``(C,)``; train_accuracy / test_accuracy on the texts it was fit on and on
    the held-out texts; n_train / n_test their counts.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    train_accuracy: float
    test_accuracy: float
    n_train: int
    n_test: int

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` logits of ``(N, d)`` pooled features."""
        return features.float() @ self.weight.T.to(features.device) + self.bias.to(features.device)


def pooled_features(model: torch.nn.Module, tokenizer, texts: Sequence[str], *, max_tokens: int,
                    batch_size: int = 32) -> np.ndarray:
    """``(N, d)`` mean-pooled (not normalised) last hidden states of ``texts`` cut at ``max_tokens`` tokens."""
    if not texts:
        raise ValueError("no texts to embed")
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                            max_length=max_tokens, return_tensors="pt")
            enc = {k: v.to(_device(model)) for k, v in enc.items()}
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            out.append(mean_pool(hidden, enc["attention_mask"], normalize=False).float().cpu().numpy())
    return np.concatenate(out)


def train_linear_head(train_features: np.ndarray, train_labels, test_features: np.ndarray, test_labels, *,
                      inverse_regularization: float, min_accuracy: float, seed: int = 0) -> LinearHead:
    """Fit an L2 logistic regression on the train features; raise ValueError when its held-out accuracy is below
    ``min_accuracy`` (a classifier near chance has nothing to explain)."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if len(np.unique(train_labels)) < 2:
        raise ValueError("the training texts hold a single class: a classifier needs at least two")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("features and labels differ in length")
    fit = LogisticRegression(C=inverse_regularization, max_iter=5000, random_state=seed)
    fit.fit(train_features, train_labels)
    test_accuracy = float((fit.predict(test_features) == test_labels).mean())
    if test_accuracy < min_accuracy:
        raise ValueError(f"the linear head reaches {test_accuracy:.1%} held-out accuracy, below min_accuracy "
                         f"{min_accuracy:.0%}: a classifier this close to chance explains nothing; use more training "
                         "texts, another data set or another encoder")
    weight = torch.as_tensor(fit.coef_, dtype=torch.float32)
    bias = torch.as_tensor(fit.intercept_, dtype=torch.float32)
    if weight.shape[0] == 1:  # binary: sklearn stores one row (class 1 vs 0); two logits give the same softmax
        weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    return LinearHead(weight, bias, float((fit.predict(train_features) == train_labels).mean()), test_accuracy,
                      len(train_labels), len(test_labels))


def head_readout(head: LinearHead, label: int, output: str) -> Callable:
    """``readout(outputs, attention_mask) → (N,)``: the head's probability / log-probability / logit of ``label``
    on the mean-pooled last hidden state (what :class:`AttributionTarget` calls)."""
    def readout(outputs, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = head.logits(mean_pool(outputs.last_hidden_state, attention_mask, normalize=False))
        if output == "logit":
            return logits[:, label]
        chosen = logits.softmax(-1) if output == "probability" else logits.log_softmax(-1)
        return chosen[:, label]
    return readout


def classifier_target(model: torch.nn.Module, tokenizer, head: LinearHead, text: str, *, max_tokens: int,
                      baseline_token: str, output: str) -> AttributionTarget:
    """The attribution target of one text: the head's ``output`` for the class it predicts on the full text."""
    enc = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.no_grad():
        enc = {k: v.to(_device(model)) for k, v in enc.items()}
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        label = int(head.logits(mean_pool(hidden, enc["attention_mask"], normalize=False)).argmax(-1))
    return attribution_target(model, enc["input_ids"], enc["attention_mask"], tokenizer=tokenizer,
                              readout=head_readout(head, label, output), baseline_token=baseline_token)


# ------------------------------------------------------------------------------------------------ language model
def lm_prefixes(tokenizer, sentences: Sequence[str], *, n: int, min_tokens: int, max_tokens: int,
                seed: int) -> list[dict]:
    """``n`` prefixes (``ids`` of a seeded length in ``[min_tokens, max_tokens]``) each with its ``gold`` next token,
    from the first sentences long enough, in order; raises when too few sentences are long enough."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    out = []
    for sentence in sentences:
        ids = tokenizer(sentence).input_ids
        if len(ids) <= min_tokens:
            continue
        rng = np.random.default_rng(unit_seed(seed, len(out)))
        length = int(rng.integers(min_tokens, min(max_tokens, len(ids) - 1) + 1))
        out.append(dict(text=sentence, ids=ids[:length], gold=ids[length]))
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} sentences have more than {min_tokens} tokens; {n} were asked for")


def lm_target(model: torch.nn.Module, tokenizer, ids: Sequence[int], gold: int, *, baseline_token: str,
              output: str) -> AttributionTarget:
    """The attribution target of one prefix: the LM's ``output`` of the gold next token after it."""
    return attribution_target(model, torch.tensor([list(ids)]), tokenizer=tokenizer, target_index=int(gold),
                              output=output, baseline_token=baseline_token)


# ------------------------------------------------------------------------------------------------ explaining
def protected_positions(target: AttributionTarget, tokenizer) -> torch.Tensor:
    """``(1, K)`` bool: the tokenizer's special tokens ([CLS], [SEP]), never perturbed nor ranked."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = target.input_ids.cpu()
    return torch.tensor([[int(t) in special for t in ids[0]]])


def method_scores(target: AttributionTarget, scorers: dict[str, Scorer], tokenizer, *, seed: int,
                  flow_max_tokens: int) -> dict[str, torch.Tensor]:
    """``{method: (K,) scores}`` of one single-text target: every scorer (attention flow only when the text has at
    most ``flow_max_tokens`` tokens) and the seeded random control."""
    if target.input_ids.shape[0] != 1:
        raise ValueError("method_scores explains one text at a time (a batch of one)")
    view = explanation_view(target, tokenizer=tokenizer)
    k = target.input_ids.shape[1]
    out = {}
    for name, scorer in scorers.items():
        if scorer.name == "attention_flow" and k > flow_max_tokens:
            continue
        out[name] = scorer(view).detach().float().cpu().reshape(-1, k).mean(0)
    out[RANDOM] = torch.rand(k, generator=torch.Generator().manual_seed(seed))
    return out


class CachedPredictor:
    """``predict(ids (N, K'), mask (N, K')) → (N,)`` of one single-text target that evaluates each distinct variant
    once: the full text is shared by every method's curves, and at short texts several ERASER bins pick the same
    tokens (``ceil(1% · 20) = ceil(5% · 20) = 1``)."""

    def __init__(self, target: AttributionTarget):
        self._predict = target.predictor(0)
        self._seen: dict[tuple, float] = {}
        self.evaluated = 0

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keys = [(tuple(i.tolist()), tuple(m.tolist())) for i, m in zip(input_ids, attention_mask)]
        new = [r for r, key in enumerate(keys) if key not in self._seen]
        if new:
            rows = sorted({keys[r]: r for r in new}.values())
            values = self._predict(input_ids[rows], attention_mask[rows]).reshape(-1).tolist()
            self._seen.update({keys[r]: v for r, v in zip(rows, values)})
            self.evaluated += len(rows)
        return torch.tensor([self._seen[key] for key in keys])


def explain_texts(targets: Sequence[AttributionTarget], scorers: dict[str, Scorer], tokenizer, *,
                  replacements: dict[str, faithfulness.Replacement], fractions: Sequence[float], seed: int,
                  flow_max_tokens: int, task: str, progress: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """Explain every target with every method and score each explanation.

    Returns ``(table, scores)``: one row per text × method × replacement with ``comprehensiveness`` and
    ``sufficiency`` (ERASER AOPC over ``fractions``), ``f_full`` (the readout on the full text) and ``tokens``
    (perturbable ones); ``scores[i]`` the ``{method: (K,) scores}`` of text ``i`` plus its ``protected`` mask.
    """
    if not targets:
        raise ValueError("no texts to explain")
    if not replacements:
        raise ValueError("give at least one replacement (mask or remove)")
    fractions = faithfulness.check_fractions(fractions)
    rows, all_scores = [], []
    for unit, target in enumerate(tqdm(targets, desc=f"{task} texts", disable=not progress)):
        protected = protected_positions(target, tokenizer)
        scores = method_scores(target, scorers, tokenizer, seed=unit_seed(seed, unit), flow_max_tokens=flow_max_tokens)
        predict = CachedPredictor(target)
        for method, s in scores.items():
            for label, how in replacements.items():
                comp = faithfulness.comprehensiveness(predict, target.input_ids, s[None], how, fractions=fractions,
                                                      attention_mask=target.attention_mask, protected=protected)
                suff = faithfulness.sufficiency(predict, target.input_ids, s[None], how, fractions=fractions,
                                                attention_mask=target.attention_mask, protected=protected)
                rows.append(dict(task=task, text=unit, method=method, replacement=label,
                                 comprehensiveness=float(comp.per_example[0]),
                                 sufficiency=float(suff.per_example[0]), f_full=float(comp.curve[0, 0]),
                                 tokens=int((~protected).sum())))
        all_scores.append({**scores, "protected": protected})
    return pd.DataFrame(rows), all_scores


def completeness_gap(target: AttributionTarget, scores: torch.Tensor, baseline: str) -> float:
    """``|Σ_k s_k − (f(x) − f(x'))| / |f(x) − f(x')|`` of integrated-gradients scores ``(K,)`` of a one-text
    target, ``x'`` the ``baseline`` (``token``: every position the baseline token; ``zeros``: zero embeddings)."""
    with torch.no_grad():
        reference = (target.baseline_embeddings("completeness_gap") if baseline == "token"
                     else torch.zeros_like(target.embeddings))
        gap = float(target.forward(target.embeddings, target.attention_mask)
                    - target.forward(reference, target.attention_mask))
    return abs(float(scores.sum()) - gap) / max(abs(gap), 1e-12)


def agreement_rows(scores: Sequence[dict], *, method: str, task: str) -> pd.DataFrame:
    """One row per text × unordered pair of methods: rank agreement (``method``: spearman or kendall) over the
    text's unprotected tokens (NaN where a ranking is constant)."""
    rows = []
    for unit, per_text in enumerate(scores):
        names = [m for m in per_text if m != "protected"]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                result = faithfulness.rank_agreement(per_text[a][None], per_text[b][None], method,
                                                     protected=per_text["protected"])
                rows.append(dict(task=task, text=unit, method_a=a, method_b=b, agreement=result.value))
    return pd.DataFrame(rows)


def build_scorers(config: dict[str, dict]) -> dict[str, Scorer]:
    """``{method: scorer}`` from ``{method: {"scorer": registered name, **options}}``."""
    out = {}
    for method, options in config.items():
        options = dict(options)
        if "scorer" not in options:
            raise ValueError(f"method {method!r} names no scorer (give scorer: <registered name>)")
        out[method] = get_scorer(options.pop("scorer"), **options)
    if RANDOM in out:
        raise ValueError(f"{RANDOM!r} is the built-in control; name the method otherwise")
    return out


__all__ = ["CachedPredictor", "LinearHead", "RANDOM", "agreement_rows", "build_scorers", "classifier_target",
           "completeness_gap", "explain_texts", "head_readout", "lm_prefixes", "lm_target", "method_scores",
           "pooled_features", "protected_positions", "train_linear_head"]
