"""Tasks and metrics for prefill KV compression (:mod:`salience.harness.kv_prefill_compression`).

Every function returns a tidy ``pandas.DataFrame``, one row per (sample,) scorer and budget, and its first row(s) are
the **uncompressed model** (``scorer == "uncompressed"``, ``budget == 1.0``), computed without the harness:

* :func:`continuation_metrics` (and its views :func:`continuation_nll`, :func:`kl_to_full_cache`): the context is
  compressed, the continuation is fed on the compressed cache; mean NLL / perplexity of the continuation, and
  KL(full ∥ compressed) of the next-token distributions against one uncompressed forward pass of context +
  continuation. :func:`wikipedia_continuations` cuts (context, continuation) pairs from the shipped Wikipedia text.
* :func:`needle_accuracy`: passkey retrieval from a compressed haystack, query-agnostic or query-aware, with a
  diagnostic of how much of the needle's token span survived in each layer and KV head.
* :func:`area_under_budget_curve`: one number per scorer, the mean height of its quality-vs-budget curve.

Which positions count: continuation token 0 is predicted by the prefill itself, before compression takes effect
(as in kvpress), so it is the same for every scorer and left out. NLL covers the ``n − 1`` tokens predicted by fed
continuation tokens; KL covers all ``n`` predictions those fed tokens make (the last one has no target).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import nn

from .harness.attention_capture import check_attention_path
from .harness.kv_prefill_compression import (
    HEAD_MODES,
    _check_ids,
    _check_protection,
    _check_scorer_window,
    _plain_number,
    _eos_ids,
    as_scorer,
    compress_prefill,
    continuation_logits,
    full_prefill,
    greedy_tokens,
)
from .metrics import area_under_curve
from .scorers.base import Scorer
from .selection import resolve_budget

if TYPE_CHECKING:  # the data package pulls in `datasets`; only the type is needed here
    from .data.needle import NeedlePrompt

BASELINE = "uncompressed"


def _scorer_items(scorers) -> list[tuple[str, Scorer]]:
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
    if len(set(labels)) != len(labels) or BASELINE in labels:
        raise ValueError(f"scorer labels must be unique and not {BASELINE!r}, got {labels}; pass a dict "
                         "{label: scorer} to tell variants apart")
    return items


def _budget_list(budgets) -> list[float | int]:
    if isinstance(budgets, (numbers.Number, str)):
        budgets = [budgets]
    budgets = [_plain_number(b) for b in budgets]
    if not budgets:
        raise ValueError("give at least one budget: a ratio in (0, 1] or a token count")
    return budgets


def _check_settings(items, budgets, lengths, head_mode, n_sink, recent_window, attention) -> None:
    """Every bad argument fails before the first forward pass. ``lengths``: ``(context_len, prefill_len)`` pairs."""
    if head_mode not in HEAD_MODES:
        raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
    check_attention_path(attention, [s for _, s in items])
    for context_len, prefill_len in lengths:
        for _, scorer in items:
            _check_scorer_window(scorer, prefill_len)
        for budget in budgets:
            _check_protection(n_sink, recent_window, resolve_budget(_plain_number(budget), context_len), context_len)


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
    generator: torch.Generator | None = None,
    tokenizer=None,
) -> pd.DataFrame:
    """NLL, perplexity and KL to the full cache of ``continuation_ids`` ``(1, n ≥ 2)`` after compressing
    ``context_ids`` ``(1, T)`` (query-agnostic), for every scorer and budget.

    ``scorers``: one scorer or name, a list, or ``{label: scorer}``; ``budgets``: one or a list of ratios in (0, 1]
    or token counts in [1, T]. The first row is the uncompressed model (one forward pass of context + continuation),
    which is also the KL reference. ``tokenizer``: lets the harness build the token roles a scorer requires
    (SepLLM's separators). Columns: scorer, budget, budget_tokens, budget_ratio, context_len, head_mode,
    n_predicted, nll (mean nats per token), perplexity, kl_mean, kl_max (nats), top1_agreement.
    """
    context_ids = _check_ids(context_ids, "context_ids")
    continuation_ids = _check_ids(continuation_ids, "continuation_ids").to(context_ids.device)
    if continuation_ids.shape[1] < 2:
        raise ValueError(f"the continuation needs >= 2 tokens to predict any, got {continuation_ids.shape[1]}")
    items, budgets = _scorer_items(scorers), _budget_list(budgets)
    context_len = context_ids.shape[1]
    _check_settings(items, budgets, [(context_len, context_len)], head_mode, n_sink, recent_window, attention)

    targets = continuation_ids[0]
    ref = model(torch.cat([context_ids, continuation_ids], dim=1)).logits[0, context_len:].float()
    ref_logp = torch.log_softmax(ref, dim=-1)
    rows = [_continuation_row(BASELINE, 1.0, context_len, context_len, ref_logp, ref_logp, targets, head_mode=None)]
    for label, scorer in items:
        for budget in budgets:
            compressed = compress_prefill(model, context_ids, scorer, budget, head_mode=head_mode, n_sink=n_sink,
                                          recent_window=recent_window, attention=attention, generator=generator,
                                          tokenizer=tokenizer)
            logp = torch.log_softmax(continuation_logits(model, compressed, continuation_ids)[0], dim=-1)
            rows.append(_continuation_row(label, budget, compressed.budget_tokens, context_len, logp, ref_logp,
                                          targets, head_mode=head_mode))
    return pd.DataFrame(rows)


_KEYS = ["scorer", "budget", "budget_tokens", "budget_ratio", "context_len", "head_mode", "n_predicted"]


def continuation_nll(model, context_ids, continuation_ids, scorers, budgets, **kwargs) -> pd.DataFrame:
    """Perplexity of a continuation under each budget: :func:`continuation_metrics`' NLL columns."""
    return continuation_metrics(model, context_ids, continuation_ids, scorers, budgets, **kwargs)[
        _KEYS + ["nll", "perplexity"]]


def kl_to_full_cache(model, context_ids, continuation_ids, scorers, budgets, **kwargs) -> pd.DataFrame:
    """Mean (and max) KL(full ∥ compressed) of next-token distributions: :func:`continuation_metrics`' KL columns."""
    return continuation_metrics(model, context_ids, continuation_ids, scorers, budgets, **kwargs)[
        _KEYS + ["kl_mean", "kl_max", "top1_agreement"]]


@dataclass(frozen=True)
class NeedleInputs:
    """Token ids of one needle prompt, split as the harness needs them.

    ``context_ids`` ``(1, T)`` is what gets compressed (chat-template head + haystack), ``question_ids`` ``(1, T_q)``
    the question (and the template's tail), ``answer_prefix_ids`` ``(1, T_a)`` or None, fed after compression in
    both modes. ``needle_span`` is ``[start, stop)`` in ``context_ids``.
    """

    context_ids: torch.Tensor
    question_ids: torch.Tensor
    answer_prefix_ids: torch.Tensor | None
    needle_span: tuple[int, int]


def needle_inputs(tokenizer, prompt: NeedlePrompt, *, chat_template: bool = True,
                  answer_prefix: str = "") -> NeedleInputs:
    """Lay out ``prompt`` as one user turn ``context + "\\n\\n" + question`` (with the tokenizer's chat template and
    its generation prompt when it has one and ``chat_template``; else ``"\\n\\nQuestion: … \\nAnswer:"``).

    The haystack keeps ``prompt.context_ids`` exactly, so the needle span stays exact (shifted by the template head).
    """
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    marker = "\u0000CONTEXT\u0000"
    if chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": f"{marker}\n\n{prompt.question}"}],
                                                 add_generation_prompt=True, tokenize=False)
        head, tail = rendered.split(marker)
    else:
        head, tail = "", f"\n\nQuestion: {prompt.question}\nAnswer:"
    head_ids = encode(head)
    context = torch.tensor(head_ids + list(prompt.context_ids))[None]
    prefix = encode(answer_prefix)
    start, stop = prompt.needle_token_span
    return NeedleInputs(
        context_ids=context,
        question_ids=torch.tensor(encode(tail))[None],
        answer_prefix_ids=torch.tensor(prefix)[None] if prefix else None,
        needle_span=(start + len(head_ids), stop + len(head_ids)),
    )


def _cat(*parts: torch.Tensor | None) -> torch.Tensor | None:
    parts = [p for p in parts if p is not None and p.numel()]
    return torch.cat(parts, dim=1) if parts else None


@torch.inference_mode()
def needle_accuracy(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[NeedlePrompt],
    scorers,
    budgets,
    *,
    query_aware: bool = False,
    head_mode: str = "per_kv_head",
    n_sink: int = 0,
    recent_window: int = 0,
    attention: str = "eager",
    generator: torch.Generator | None = None,
    max_new_tokens: int = 12,
    chat_template: bool = True,
    answer_prefix: str = "",
) -> pd.DataFrame:
    """Passkey retrieval from a compressed context: one row per prompt × (uncompressed, then scorer × budget).

    Query-agnostic: the context is compressed alone, then question + answer prefix are fed. Query-aware: context and
    question are prefilled together (the question's attention rows score the context, the question stays in the
    cache outside the budget), then the answer prefix is fed. The answer is greedy (``max_new_tokens``, stopping at
    end-of-sequence); ``correct`` means ``prompt.answer`` appears in it. The uncompressed row decodes from a plain
    prefill of the same tokens.

    Diagnostic columns: ``needle_kept`` is the share of (layer, KV head, needle token) entries kept, and
    ``needle_heads_intact`` the share of (layer, KV head) pairs that kept the whole needle span.
    """
    items, budgets = _scorer_items(scorers), _budget_list(budgets)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("give at least one needle prompt")
    device = next(model.parameters()).device
    inputs = [needle_inputs(tokenizer, p, chat_template=chat_template, answer_prefix=answer_prefix) for p in prompts]
    lengths = [(x.context_ids.shape[1], x.context_ids.shape[1] + (x.question_ids.shape[1] if query_aware else 0))
               for x in inputs]
    _check_settings(items, budgets, lengths, head_mode, n_sink, recent_window, attention)
    eos = _eos_ids(model, tokenizer)
    rows = []
    for k, (prompt, x) in enumerate(zip(prompts, inputs)):
        context = x.context_ids.to(device)
        question = x.question_ids.to(device)
        prefix = None if x.answer_prefix_ids is None else x.answer_prefix_ids.to(device)
        base = {"prompt": k, "depth": prompt.depth, "context_len": context.shape[1], "needle_start": x.needle_span[0],
                "needle_stop": x.needle_span[1], "answer": prompt.answer, "query_aware": query_aware}

        def row(label, budget, compressed, feed, mode) -> dict:
            tokens = greedy_tokens(model, compressed, feed, max_new_tokens, eos)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            kept = compressed.span_kept(*x.needle_span)
            return {**base, "scorer": label, "budget": budget, "budget_tokens": compressed.budget_tokens,
                    "budget_ratio": compressed.budget_ratio, "head_mode": mode, "generated": text,
                    "n_generated": len(tokens), "correct": prompt.answer in text,
                    "needle_kept": float(kept.mean()), "needle_heads_intact": float((kept == 1).float().mean())}

        rows.append(row(BASELINE, 1.0, full_prefill(model, context, question), prefix, None))
        for label, scorer in items:
            for budget in budgets:
                compressed = compress_prefill(
                    model, context, scorer, budget, question_ids=question if query_aware else None,
                    query_aware=query_aware, head_mode=head_mode, n_sink=n_sink, recent_window=recent_window,
                    attention=attention, generator=generator, tokenizer=tokenizer)
                rows.append(row(label, budget, compressed, prefix if query_aware else _cat(question, prefix),
                                head_mode))
    return pd.DataFrame(rows)


def area_under_budget_curve(df: pd.DataFrame, metric: str, *, x: str = "budget", by: str = "scorer",
                            baseline: str = BASELINE, full_x: float | None = 1.0) -> pd.DataFrame:
    """Area under ``metric`` vs ``x`` for each ``by`` group (rows first averaged per budget, e.g. over prompts), as
    the mean height of the trapezoid curve (:func:`salience.metrics.area_under_curve`).

    The uncompressed model is the first row, its area the flat value of its rows. With ``full_x`` (default 1.0, a
    ratio budget of 1, where every scorer equals the uncompressed model), a curve with no point there is closed with
    the uncompressed value; pass ``full_x=None`` for token-count budgets or to keep the curves open. Columns:
    ``by``, metric, auc, n_budgets, x_min, x_max.
    """
    if metric not in df.columns:
        raise ValueError(f"metric {metric!r} is not a column; choose from {list(df.columns)}")
    for col in (x, by):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is missing; the table has {list(df.columns)}")
    values = df.assign(_y=df[metric].astype(float), _x=df[x].astype(float))
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
