"""Continuation tasks for prefill KV compression, and what every KV task table shares (areas, reference rows).

Every table is tidy, one row per (document,) scorer and budget, and it starts with the **reference rows**:

* the **uncompressed model** (``scorer == "uncompressed"``, ``budget == 1.0``): the same forward pass that scores the
  context gives its predictions, so it costs nothing extra;
* the **oracle** (``scorer == "oracle"``, with ``oracle=True``): a kept set chosen with knowledge no real scorer has.
  For a continuation it keeps, at the same budget and protections, the context keys that the continuation's own
  queries attend to most in the uncompressed forward pass of context + continuation (accumulated over those queries,
  per head, reduced to KV heads like every scorer). It reads the attention the tokens to be predicted really pay,
  so it shows what a good kept set can reach at that budget.

The shared path (:func:`~salience.harness.kv_prefill.shared_prefill`): per document one uncompressed prefill of
context + continuation captures every layer's attention once; every scorer (and the oracle) scores the context from
it; every scorer × budget's compressed cache is gathered from that prefill's cache; the continuations are fed in
batches (:func:`~salience.harness.kv_feed.feed_batched`, rows of equal cache length in one forward pass). Each
compression asserts every layer's cache length; tables record it (``cache_len``).

:func:`continuation_metrics` (and its views :func:`continuation_nll`, :func:`kl_to_full_cache`): NLL, perplexity
and KL(full ∥ compressed) of a continuation after compressing its context. :func:`continuation_runs` does it for
many documents. :func:`area_under_budget_curve`: one number per scorer, the mean height of its quality-vs-budget
curve. Passkey retrieval lives in :mod:`salience.kv_passkey`.

Which positions count: continuation token 0 is predicted by the prefill itself, before compression takes effect
(as in kvpress), so it is the same for every scorer and left out. NLL covers the ``n − 1`` tokens predicted by fed
continuation tokens; KL covers all ``n`` predictions those fed tokens make (the last one has no target).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from .harness.attention_capture import check_attention_path
from .harness.kv_feed import feed_batched
from .harness.kv_prefill import ScoringView, shared_prefill
from .harness.kv_prefill_compression import HEAD_MODES, as_scorer, compress_shared
from .metrics import area_under_curve
from .scorers.accumulated_attention import AccumulatedAttention
from .scorers.base import Scorer
from .seeding import unit_seed
from .validation import check_choice, check_ids, check_scorer_window, checked_budget, plain_number

BASELINE = "uncompressed"
ORACLE = "oracle"
REFERENCES = (BASELINE, ORACLE)


def scorer_items(scorers) -> list[tuple[str, Scorer]]:
    """``[(label, scorer)]`` from one scorer/name, a sequence of them, or a ``{label: scorer}`` mapping."""
    if isinstance(scorers, (Scorer, str)):
        scorers = [scorers]
    if isinstance(scorers, Mapping):
        items = [(str(label), as_scorer(s)) for label, s in scorers.items()]
    else:
        items = [(s.name, s) for s in map(as_scorer, scorers)]
    labels = [label for label, _ in items]
    if not items:
        raise ValueError("give at least one scorer")
    if len(set(labels)) != len(labels) or set(labels) & set(REFERENCES):
        raise ValueError(f"scorer labels must be unique and not {BASELINE!r} or {ORACLE!r}, got {labels}; pass a "
                         "dict {label: scorer} to tell variants apart")
    return items


def budget_list(budgets) -> list[float | int]:
    if isinstance(budgets, (numbers.Number, str)):
        budgets = [budgets]
    budgets = [plain_number(b) for b in budgets]
    if not budgets:
        raise ValueError("give at least one budget: a ratio in (0, 1] or a token count")
    return budgets


def check_settings(items, budgets, lengths, head_mode, n_sink, recent_window, attention) -> None:
    """Every bad argument fails before the first forward pass. ``lengths``: ``(context_len, prefill_len)`` pairs."""
    check_choice(head_mode, HEAD_MODES, "head_mode")
    check_attention_path(attention, [s for _, s in items])
    for context_len, prefill_len in lengths:
        for _, scorer in items:
            check_scorer_window(scorer, prefill_len)
        for budget in budgets:
            checked_budget(budget, context_len, n_sink=n_sink, recent_window=recent_window)


def measured_cache_len(c) -> int:
    """Cache entries per layer of a compression (a :class:`~salience.harness.kv_prefill_compression.CompressedPrefill`)
    as measured in every layer right after it, checked against the expected ``budget_tokens + question_len``."""
    if set(c.cache_lengths) != {c.compressed_length}:
        raise RuntimeError(f"cache lengths {c.cache_lengths} differ from the expected {c.compressed_length}")
    return int(c.cache_lengths[0])


def oracle_scorer() -> Scorer:
    """The oracle's rule, applied to the rows of the tokens that follow the context: attention they pay, summed."""
    return AccumulatedAttention()


def wikipedia_continuations(tokenizer, n: int = 4, context_tokens: int = 96, continuation_tokens: int = 32,
                            seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` ``(context_ids (1, C), continuation_ids (1, N))`` pairs: the first ``C + N`` tokens of seeded Wikipedia
    articles (``text``: lead then body) long enough to hold them."""
    from .data.text import wikipedia_articles

    if n < 1 or context_tokens < 1 or continuation_tokens < 2:
        raise ValueError(f"need n >= 1, context_tokens >= 1 and continuation_tokens >= 2, got {n}, {context_tokens}, "
                         f"{continuation_tokens}")
    need = context_tokens + continuation_tokens
    pairs = []
    for article in wikipedia_articles(seed=seed):
        ids = tokenizer(article["text"][: need * 16], add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            ids = torch.tensor(ids[:need])[None]
            pairs.append((ids[:, :context_tokens], ids[:, context_tokens:]))
            if len(pairs) == n:
                return pairs
    raise ValueError(f"only {len(pairs)} Wikipedia articles hold {need} tokens; ask for fewer or shorter samples")


def _continuation_row(label, budget, budget_tokens, context_len, logp, ref_logp, targets, **extra) -> dict:
    nll = float(-logp[:-1].gather(-1, targets[1:, None]).mean())
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0.0)  # (n,)
    return {
        "scorer": label,
        "budget": budget,
        "budget_tokens": budget_tokens,
        "budget_ratio": budget_tokens / context_len,
        "context_len": context_len,
        **extra,
        "n_predicted": int(targets.shape[0] - 1),
        "nll": nll,
        "perplexity": math.exp(nll),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean()),
    }


def _continuation_jobs(model, context, continuation, items, budgets, *, oracle, head_mode, n_sink, recent_window,
                       attention, generator, tokenizer, on_prefill=None):
    """One shared prefill of context + continuation: the reference log-probs and every (label, budget) compression
    (``on_prefill(prefill)`` sees the prefill first, with the continuation's attention rows kept)."""
    context_len, n = context.shape[1], continuation.shape[1]
    ids = torch.cat([context, continuation], dim=1)
    views = [ScoringView("context", context_len, dict(items))]
    if oracle:
        views.append(ScoringView("future", context_len + n, {ORACLE: oracle_scorer()}, first_query=context_len))
    if attention == "fused":  # key mass over every row: score the context alone, take the reference separately
        if oracle:
            raise ValueError("the continuation oracle reads the continuation's attention rows: use attention='eager'")
        prefill = shared_prefill(model, context, context_len, views, attention="fused", generator=generator,
                                 tokenizer=tokenizer)
        reference = model(ids, logits_to_keep=n).logits[0].float()
    else:
        prefill = shared_prefill(model, ids, context_len, views, logits_rows=n, generator=generator,
                                 tokenizer=tokenizer, rows_from=context_len if on_prefill else None)
        reference = prefill.logits
    if on_prefill is not None:
        on_prefill(prefill)
    labels = ([(ORACLE, "future")] if oracle else []) + [(label, "context") for label, _ in items]
    jobs = [(label, budget, compress_shared(prefill, (view, label), budget, head_mode=head_mode,
                                            n_sink=n_sink, recent_window=recent_window, scorer_name=label))
            for label, view in labels for budget in budgets]
    return torch.log_softmax(reference, dim=-1), jobs


@torch.inference_mode()
def continuation_runs(
    model: nn.Module,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scorers,
    budgets,
    *,
    oracle: bool = True,
    head_mode: str = "per_kv_head",
    n_sink: int = 0,
    recent_window: int = 0,
    attention: str = "eager",
    seed: int | torch.Generator | None = 0,
    tokenizer=None,
    batch_size: int = 32,
    units_per_batch: int = 4,
    progress: bool = True,
    on_prefill=None,
) -> pd.DataFrame:
    """:func:`continuation_metrics` for many ``(context (1, C), continuation (1, N))`` pairs, with the oracle rows.

    One shared prefill per document; the rows of ``units_per_batch`` documents are fed together in batches of up to
    ``batch_size`` (rows of equal cache length share a forward pass). ``seed``: an int gives every (document, scorer)
    its own seeded generator (document ``d`` uses :func:`~salience.seeding.unit_seed`, ``seed * 1000 + d``); a
    ``torch.Generator`` is used by every stochastic scorer in turn; None leaves them unseeded. Columns: ``doc``, then
    :func:`continuation_metrics`' columns plus ``cache_len`` (entries per layer, asserted); per document the
    uncompressed row comes first, then the oracle rows, then scorer × budget. ``on_prefill(doc, prefill)``, when
    given, is called with each document's :class:`~salience.harness.kv_prefill.SharedPrefill` (its
    ``rows_attention`` then holds the continuation's attention rows), e.g. to measure attention-output errors from
    the same pass.
    """
    items, budgets = scorer_items(scorers), budget_list(budgets)
    pairs = [(check_ids(c, "context_ids"), check_ids(n, "continuation_ids")) for c, n in pairs]
    if not pairs:
        raise ValueError("give at least one (context, continuation) pair")
    if any(n.shape[1] < 2 for _, n in pairs):
        raise ValueError("every continuation needs >= 2 tokens to predict any")
    if units_per_batch < 1:
        raise ValueError(f"units_per_batch must be >= 1, got {units_per_batch}")
    check_settings(items, budgets, [(c.shape[1], c.shape[1]) for c, _ in pairs], head_mode, n_sink, recent_window,
                   attention)
    device = next(model.parameters()).device
    rows = []
    bar = tqdm(total=len(pairs), desc="continuations", disable=not progress)
    for first in range(0, len(pairs), units_per_batch):
        work = []
        for d in range(first, min(first + units_per_batch, len(pairs))):
            context, continuation = (t.to(device) for t in pairs[d])
            gen = unit_seed(seed, d)
            ref_logp, jobs = _continuation_jobs(model, context, continuation, items, budgets, oracle=oracle,
                                                head_mode=head_mode, n_sink=n_sink, recent_window=recent_window,
                                                attention=attention, generator=gen, tokenizer=tokenizer,
                                                on_prefill=None if on_prefill is None else
                                                (lambda prefill, d=d: on_prefill(d, prefill)))
            work.append((d, context.shape[1], continuation[0], ref_logp, jobs))
        feeds = [(c, continuation[None]) for _, _, continuation, _, jobs in work for _, _, c in jobs]
        logits = iter(feed_batched(model, feeds, batch_size=batch_size))
        for d, context_len, targets, ref_logp, jobs in work:
            rows.append({"doc": d, **_continuation_row(BASELINE, 1.0, context_len, context_len, ref_logp, ref_logp,
                                                       targets, head_mode=None, cache_len=context_len)})
            for label, budget, c in jobs:
                logp = torch.log_softmax(next(logits), dim=-1)
                rows.append({"doc": d, **_continuation_row(label, budget, c.budget_tokens, context_len, logp,
                                                           ref_logp, targets, head_mode=head_mode,
                                                           cache_len=measured_cache_len(c))})
            bar.update()
    bar.close()
    return pd.DataFrame(rows)


@torch.inference_mode()
def continuation_metrics(
    model: nn.Module,
    context_ids: torch.Tensor,
    continuation_ids: torch.Tensor,
    scorers,
    budgets,
    *,
    head_mode: str = "per_kv_head",
    n_sink: int = 0,
    recent_window: int = 0,
    attention: str = "eager",
    generator: torch.Generator | int | None = 0,
    tokenizer=None,
    oracle: bool = False,
) -> pd.DataFrame:
    """NLL, perplexity and KL to the full cache of ``continuation_ids`` ``(1, n ≥ 2)`` after compressing
    ``context_ids`` ``(1, T)`` (query-agnostic), for every scorer and budget.

    ``scorers``: one scorer or name, a list, or ``{label: scorer}``; ``budgets``: one or a list of ratios in (0, 1]
    or token counts in [1, T]. The first row is the uncompressed model (the forward pass of context + continuation
    that also scores the context), which is the KL reference; with ``oracle`` the oracle rows follow. ``generator``
    seeds the stochastic scorers: an int as :func:`continuation_runs` seeds its first document (the default 0 gives
    the rows ``continuation_runs(..., seed=0)`` gives for document 0), a ``torch.Generator`` is used by every
    stochastic scorer in turn, None leaves them unseeded; ``tokenizer`` lets the harness build the token roles a
    scorer requires (SepLLM's separators). Columns: scorer, budget, budget_tokens, budget_ratio, context_len,
    head_mode, cache_len, n_predicted, nll (mean nats per token), perplexity, kl_mean, kl_max (nats), top1_agreement.
    """
    context_ids = check_ids(context_ids, "context_ids")
    continuation_ids = check_ids(continuation_ids, "continuation_ids").to(context_ids.device)
    if continuation_ids.shape[1] < 2:
        raise ValueError(f"the continuation needs >= 2 tokens to predict any, got {continuation_ids.shape[1]}")
    df = continuation_runs(model, [(context_ids, continuation_ids)], scorers, budgets, oracle=oracle,
                           head_mode=head_mode, n_sink=n_sink, recent_window=recent_window, attention=attention,
                           seed=generator, tokenizer=tokenizer, progress=False)
    return df.drop(columns="doc")


_KEYS = ["scorer", "budget", "budget_tokens", "budget_ratio", "context_len", "head_mode", "n_predicted"]


def continuation_nll(model, context_ids, continuation_ids, scorers, budgets, **kwargs) -> pd.DataFrame:
    """Perplexity of a continuation under each budget: :func:`continuation_metrics`' NLL columns."""
    return continuation_metrics(model, context_ids, continuation_ids, scorers, budgets, **kwargs)[
        _KEYS + ["nll", "perplexity"]]


def kl_to_full_cache(model, context_ids, continuation_ids, scorers, budgets, **kwargs) -> pd.DataFrame:
    """Mean (and max) KL(full ∥ compressed) of next-token distributions: :func:`continuation_metrics`' KL columns."""
    return continuation_metrics(model, context_ids, continuation_ids, scorers, budgets, **kwargs)[
        _KEYS + ["kl_mean", "kl_max", "top1_agreement"]]


def area_under_budget_curve(df: pd.DataFrame, metric: str, *, x: str = "budget", by: str = "scorer",
                            baseline: str = BASELINE, full_x: float | None = 1.0) -> pd.DataFrame:
    """Area under ``metric`` vs ``x`` for each ``by`` group (rows first averaged per budget, e.g. over prompts), as
    the mean height of the trapezoid curve (:func:`salience.metrics.area_under_curve`).

    The uncompressed model is the first row, its area the flat value of its rows. With ``full_x`` (default 1.0, a
    ratio budget of 1, where every scorer equals the uncompressed model), a curve with no point there is closed with
    the uncompressed value; pass ``full_x=None`` for token-count budgets or to keep the curves open. Rows whose
    metric is NaN (an oracle that does not fit its budget) are left out. Columns: ``by``, metric, auc, n_budgets,
    x_min, x_max.
    """
    if metric not in df.columns:
        raise ValueError(f"metric {metric!r} is not a column; choose from {list(df.columns)}")
    for col in (x, by):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is missing; the table has {list(df.columns)}")
    values = df.assign(_y=df[metric].astype(float), _x=df[x].astype(float)).dropna(subset=["_y"])
    base_rows = values[values[by] == baseline]
    base = float(base_rows["_y"].mean()) if len(base_rows) else None
    rows = []
    if base is not None:
        at = full_x if full_x is not None else float("nan")
        rows.append({by: baseline, "metric": metric, "auc": base, "n_budgets": 1, "x_min": at, "x_max": at})
    for name, group in values[values[by] != baseline].groupby(by, sort=False):
        curve = group.groupby("_x")["_y"].mean()
        xs, ys = list(curve.index), list(curve.values)
        if full_x is not None and base is not None and full_x not in xs:
            xs, ys = xs + [full_x], ys + [base]
        rows.append({by: name, "metric": metric, "auc": area_under_curve(xs, ys), "n_budgets": len(curve),
                     "x_min": min(xs), "x_max": max(xs)})
    return pd.DataFrame(rows)
