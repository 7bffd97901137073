"""Passkey retrieval from a compressed context, query-agnostic and query-aware, with uncompressed and oracle rows.

A passkey sentence is planted in Wikipedia prose (:func:`salience.data.build_needle_prompt`); the prompt is one user
turn ``context + question`` then the answer prefix (``"The secret passkey is"``). Per prompt **one** uncompressed
forward pass of ``context + question + answer prefix + answer`` (teacher forcing) serves everything
(:func:`~salience.harness.kv_prefill.shared_prefill`):

* **query-agnostic** scores read the context's own rows; the cache keeps the compressed context only, and the
  question, the answer prefix and the answer are fed on it;
* **query-aware** scores read the rows of context + question (the question's rows last); the question stays in the
  cache whole, outside the budget, and the answer prefix and answer are fed;
* the **uncompressed** row is that forward pass's own prediction of the answer (the same in both modes);
* the **oracle** keeps the needle's token span, at the same budget and protections, and fills the rest of the budget
  with the context keys the question, prefix and answer rows attend to most (knowledge no real scorer has). When the
  needle and the protected tokens do not fit the budget, the oracle row has no numbers (``oracle_fits`` False).

Per row, over the answer's ``m`` tokens (teacher-forced after the answer prefix): ``answer_logprob``, the mean
log-probability of the answer tokens (nats per token, the continuous metric claims use); ``answer_kl``, the mean
KL(uncompressed ∥ compressed) of their next-token distributions; ``greedy_correct``, whether every answer token is the
argmax, i.e. whether greedy decoding after the answer prefix emits the passkey first (exactly the same event; tested
against real greedy decoding); ``needle_kept`` (share of the needle's (layer, KV head, token) cache entries kept) and
``needle_heads_intact`` (share of (layer, KV head) pairs that kept the whole span).

:func:`passkey_runs` lays the prompts out (:func:`needle_inputs`) and runs them with :func:`needle_runs`, which also
takes hand-made :class:`NeedleInputs`. :func:`solvable_cells` marks each (mode, budget) cell: **solvable** when the
oracle fits and answers at least a given share of the prompts greedily; claims and ranks use solvable cells only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from .harness.kv_feed import feed_batched
from .harness.kv_prefill import ScoringView, shared_prefill
from .harness.kv_prefill_compression import compress_shared, context_protection
from .kv_tasks import BASELINE, ORACLE, budget_list, check_settings, measured_cache_len, oracle_scorer, scorer_items
from .seeding import unit_seed
from .validation import checked_budget

if TYPE_CHECKING:  # the data package pulls in `datasets`; only the type is needed here
    from .data.needle import NeedlePrompt

#: the two protocols, as they appear in the ``mode`` column
MODES = ("query-agnostic", "query-aware")


@dataclass(frozen=True)
class NeedleInputs:
    """Token ids of one needle prompt, split as the harness needs them.

    ``context_ids`` ``(1, T)`` is what gets compressed (chat-template head + haystack), ``question_ids`` ``(1, T_q)``
    the question (and the template's tail), ``answer_prefix_ids`` ``(1, T_a)`` or None, fed after compression in
    both modes, ``answer_ids`` ``(1, m)`` the passkey's tokens as they follow the prefix. ``needle_span`` is
    ``[start, stop)`` in ``context_ids``. ``depth`` and ``answer`` (the needle's depth and the passkey's text) only
    label the rows of :func:`needle_runs`.
    """

    context_ids: torch.Tensor
    question_ids: torch.Tensor
    answer_prefix_ids: torch.Tensor | None
    needle_span: tuple[int, int]
    answer_ids: torch.Tensor | None = None
    depth: float = float("nan")
    answer: str = ""


def needle_inputs(tokenizer, prompt: NeedlePrompt, *, chat_template: bool = True,
                  answer_prefix: str = "") -> NeedleInputs:
    """Lay out ``prompt`` as one user turn ``context + "\\n\\n" + question`` (with the tokenizer's chat template and
    its generation prompt when it has one and ``chat_template``; else ``"\\n\\nQuestion: … \\nAnswer:"``).

    The haystack keeps ``prompt.context_ids`` exactly, so the needle span stays exact (shifted by the template head).
    The answer's tokens are those of ``answer_prefix + " " + answer`` after the prefix's own tokens.
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
    with_answer = encode(f"{answer_prefix} {prompt.answer}" if answer_prefix else f" {prompt.answer}")
    if with_answer[: len(prefix)] != prefix or len(with_answer) == len(prefix):
        raise ValueError(f"the answer prefix {answer_prefix!r} does not tokenize the same before the answer; "
                         "end it at a word boundary")
    start, stop = prompt.needle_token_span
    return NeedleInputs(
        context_ids=context,
        question_ids=torch.tensor(encode(tail))[None],
        answer_prefix_ids=torch.tensor(prefix)[None] if prefix else None,
        needle_span=(start + len(head_ids), stop + len(head_ids)),
        answer_ids=torch.tensor(with_answer[len(prefix):])[None],
        depth=float(prompt.depth),
        answer=prompt.answer,
    )


def _answer_metrics(logits: torch.Tensor, ref_logp: torch.Tensor, answer: torch.Tensor) -> dict:
    """``logits``/``ref_logp`` ``(m, vocab)`` predicting the ``m`` answer tokens ``answer`` ``(m,)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0.0)
    return {"answer_logprob": float(logp.gather(-1, answer[:, None]).mean()), "answer_kl": float(kl.mean()),
            "greedy_correct": bool((logp.argmax(-1) == answer).all())}


def _needle_mask(context_len: int, span: tuple[int, int], device) -> torch.Tensor:
    mask = torch.zeros(context_len, dtype=torch.bool, device=device)
    mask[slice(*span)] = True
    return mask


@torch.inference_mode()
def passkey_runs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[NeedlePrompt],
    scorers,
    budgets,
    *,
    modes: Sequence[str] = MODES,
    oracle: bool = True,
    head_mode: str = "per_kv_head",
    n_sink: int = 0,
    recent_window: int = 0,
    seed: int = 0,
    answer_prefix: str = "The secret passkey is",
    chat_template: bool = True,
    batch_size: int = 32,
    units_per_batch: int = 4,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per prompt × mode × (uncompressed, oracle, scorer × budget); see the module docstring.

    The prompts are laid out by :func:`needle_inputs` and run by :func:`needle_runs` (its columns).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("give at least one needle prompt")
    if not answer_prefix:
        raise ValueError("answer_prefix must be non-empty: in query-aware mode its tokens are what is fed after "
                         "compression, so the answer is predicted from the compressed cache")
    inputs = [needle_inputs(tokenizer, p, chat_template=chat_template, answer_prefix=answer_prefix) for p in prompts]
    return needle_runs(model, inputs, scorers, budgets, tokenizer=tokenizer, modes=modes, oracle=oracle,
                       head_mode=head_mode, n_sink=n_sink, recent_window=recent_window, seed=seed,
                       batch_size=batch_size, units_per_batch=units_per_batch, progress=progress)


@torch.inference_mode()
def needle_runs(
    model: nn.Module,
    inputs: Sequence[NeedleInputs],
    scorers,
    budgets,
    *,
    tokenizer=None,
    modes: Sequence[str] = MODES,
    oracle: bool = True,
    head_mode: str = "per_kv_head",
    n_sink: int = 0,
    recent_window: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    units_per_batch: int = 4,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`passkey_runs` on prompts already laid out as :class:`NeedleInputs` (each with its answer prefix and
    answer ids); ``tokenizer`` only builds the token roles a scorer requires (SepLLM's separators).

    Prompt ``k`` seeds its stochastic scorers with :func:`~salience.seeding.unit_seed` (``seed * 1000 + k``; each
    (mode, scorer) its own generator). Columns: prompt, depth, context_len, question_len, needle_start, needle_stop,
    answer, mode, scorer, budget, budget_tokens, budget_ratio, cache_len (entries per layer, measured and asserted),
    oracle_fits, answer_logprob, answer_kl, greedy_correct, needle_kept, needle_heads_intact.
    """
    items, budgets = scorer_items(scorers), budget_list(budgets)
    inputs = list(inputs)
    if not inputs:
        raise ValueError("give at least one needle prompt")
    if any(x.answer_prefix_ids is None or x.answer_ids is None for x in inputs):
        raise ValueError("every needle input needs answer_prefix_ids and answer_ids (needle_inputs with a non-empty "
                         "answer_prefix)")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be among {MODES}, got {list(modes)}")
    device = next(model.parameters()).device
    lengths = [(x.context_ids.shape[1], x.context_ids.shape[1] + x.question_ids.shape[1]) for x in inputs]
    check_settings(items, budgets, lengths, head_mode, n_sink, recent_window, "eager")
    rows = []
    bar = tqdm(total=len(inputs), desc="passkey prompts", disable=not progress)
    for first in range(0, len(inputs), units_per_batch):
        work, feeds = [], []
        for k in range(first, min(first + units_per_batch, len(inputs))):
            unit = _passkey_unit(model, tokenizer, inputs[k], k, items, budgets, modes, oracle, head_mode, n_sink,
                                 recent_window, seed, device)
            work.append(unit)
            feeds += [(c, feed) for *_, c, feed in unit["jobs"] if c is not None]
        rows_needed = max(unit["m"] for unit in work)  # the answer's predictions are the last rows of every feed
        logits = iter(feed_batched(model, feeds, logits_rows=rows_needed, batch_size=batch_size))
        for unit in work:
            rows += _passkey_rows(unit, logits)
            bar.update()
    bar.close()
    return pd.DataFrame(rows)


def _passkey_unit(model, tokenizer, x: NeedleInputs, k, items, budgets, modes, oracle, head_mode, n_sink,
                  recent_window, seed, device) -> dict:
    """One prompt's shared prefill and its compressions: ``jobs`` of (mode, label, budget, compressed, feed)."""
    context, question = x.context_ids.to(device), x.question_ids.to(device)
    prefix, answer = x.answer_prefix_ids.to(device), x.answer_ids.to(device)
    c_len, q_len, m = context.shape[1], question.shape[1], answer.shape[1]
    taught = torch.cat([prefix, answer[:, :-1]], dim=1)  # the last m rows of (... + taught) predict the answer
    ids = torch.cat([context, question, taught], dim=1)
    prefix_len = {"query-agnostic": c_len, "query-aware": c_len + q_len}
    views = [ScoringView(mode, prefix_len[mode], dict(items)) for mode in modes]
    if oracle:
        views.append(ScoringView("future", ids.shape[1], {ORACLE: oracle_scorer()}, first_query=c_len))
    prefill = shared_prefill(model, ids, c_len, views, logits_rows=m, generator=unit_seed(seed, k),
                             tokenizer=tokenizer)
    needle = _needle_mask(c_len, x.needle_span, device)
    tokens = {b: checked_budget(b, c_len, n_sink=n_sink, recent_window=recent_window) for b in budgets}
    # the oracle keeps the needle besides sinks and window: a budget it cannot hold is marked, not compressed
    oracle_protected = int(context_protection(c_len, n_sink=n_sink, recent_window=recent_window, protect=needle,
                                              device=device).sum())
    jobs = []
    for mode in modes:
        feed = taught if mode == "query-aware" else torch.cat([question, taught], dim=1)
        settings = dict(prefix_len=prefix_len[mode], head_mode=head_mode, n_sink=n_sink, recent_window=recent_window)
        if oracle:
            for budget in budgets:
                fits = oracle_protected <= tokens[budget]
                c = (compress_shared(prefill, ("future", ORACLE), tokens[budget], protect=needle,
                                     scorer_name=ORACLE, **settings) if fits else None)
                jobs.append((mode, ORACLE, budget, c, feed))
        for label, _ in items:
            for budget in budgets:
                c = compress_shared(prefill, (mode, label), tokens[budget], scorer_name=label, **settings)
                jobs.append((mode, label, budget, c, feed))
    base = {"prompt": k, "depth": round(float(x.depth), 3), "context_len": c_len, "question_len": q_len,
            "needle_start": x.needle_span[0], "needle_stop": x.needle_span[1], "answer": x.answer}
    return {"base": base, "modes": modes, "prefix_len": prefix_len, "tokens": tokens, "answer": answer[0], "m": m,
            "ref_logp": torch.log_softmax(prefill.logits, dim=-1), "jobs": jobs}


def _passkey_rows(unit: dict, logits) -> list[dict]:
    base, answer, ref_logp, m = unit["base"], unit["answer"], unit["ref_logp"], unit["m"]
    c_len = base["context_len"]
    rows = []
    for mode in unit["modes"]:
        rows.append({**base, "mode": mode, "scorer": BASELINE, "budget": 1.0, "budget_tokens": c_len,
                     "budget_ratio": 1.0, "cache_len": unit["prefix_len"][mode], "oracle_fits": True,
                     **_answer_metrics(ref_logp, ref_logp, answer), "needle_kept": 1.0,
                     "needle_heads_intact": 1.0})
        for job_mode, label, budget, c, _ in unit["jobs"]:
            if job_mode != mode:
                continue
            tokens = unit["tokens"][budget]
            row = {**base, "mode": mode, "scorer": label, "budget": budget, "budget_tokens": tokens,
                   "budget_ratio": tokens / c_len}
            if c is None:
                rows.append({**row, "cache_len": None, "oracle_fits": False, "answer_logprob": float("nan"),
                             "answer_kl": float("nan"), "greedy_correct": None, "needle_kept": float("nan"),
                             "needle_heads_intact": float("nan")})
                continue
            kept = c.span_kept(base["needle_start"], base["needle_stop"])
            rows.append({**row, "cache_len": measured_cache_len(c), "oracle_fits": True,
                         **_answer_metrics(next(logits)[-m:], ref_logp, answer),
                         "needle_kept": float(kept.mean()), "needle_heads_intact": float((kept == 1).float().mean())})
    return rows


def solvable_cells(runs: pd.DataFrame, min_accuracy: float) -> pd.DataFrame:
    """Per mode and budget: the oracle's and the uncompressed model's greedy accuracy over prompts, and whether the
    cell is **solvable**: the oracle fits the budget and answers at least ``min_accuracy`` of the prompts.

    Columns: mode, budget, oracle_fits, oracle_accuracy, oracle_logprob, uncompressed_accuracy, n_prompts, solvable.
    """
    if not 0.0 < min_accuracy <= 1.0:
        raise ValueError(f"min_accuracy must lie in (0, 1], got {min_accuracy}")
    rows = []
    for mode, g in runs.groupby("mode", sort=False):
        base = g[g.scorer == BASELINE]
        oracle = g[g.scorer == ORACLE]
        for budget, cell in oracle.groupby("budget"):
            fits = bool(cell.oracle_fits.all())
            acc = float(cell.greedy_correct.astype(float).mean()) if fits else float("nan")
            rows.append({"mode": mode, "budget": budget, "oracle_fits": fits, "oracle_accuracy": acc,
                         "oracle_logprob": float(cell.answer_logprob.mean()) if fits else float("nan"),
                         "uncompressed_accuracy": float(base.greedy_correct.astype(float).mean()),
                         "n_prompts": int(cell.prompt.nunique()), "solvable": fits and acc >= min_accuracy})
    if not rows:
        raise ValueError("the runs hold no oracle rows: run passkey_runs with oracle=True")
    return pd.DataFrame(rows)


def solvability_table(cells: pd.DataFrame, runs: pd.DataFrame | None = None, label: str | None = None) -> pd.DataFrame:
    """What a stored notebook checks of :func:`solvable_cells`: counts and labels, no continuous numbers. With
    ``runs`` and a scorer ``label``, the cache entries per layer that entry's rows held in each cell (asserted)."""
    n = cells.n_prompts
    correct = (cells.oracle_accuracy * n).round()
    table = pd.DataFrame({
        "mode": cells["mode"], "budget": cells.budget, "oracle_fits": cells.oracle_fits,
        "oracle_correct": [f"{int(c)}/{k}" if fits else "—" for c, k, fits in zip(correct, n, cells.oracle_fits)],
        "uncompressed_correct": [f"{int(round(a * k))}/{k}" for a, k in zip(cells.uncompressed_accuracy, n)],
        "solvable": cells.solvable})
    if runs is not None and label is not None:
        rows = runs[runs.scorer == label]
        table["cache_len"] = [sorted({int(x) for x in rows[(rows["mode"] == m) & (rows.budget == b)].cache_len})
                              for m, b in zip(cells["mode"], cells.budget)]
    return table


def solvable_runs(runs: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """The rows of solvable cells, plus every uncompressed row (the curves' closing value)."""
    ok = cells[cells.solvable][["mode", "budget"]]
    inside = runs.merge(ok, on=["mode", "budget"], how="inner")
    return pd.concat([runs[runs.scorer == BASELINE], inside[inside.scorer != BASELINE]], ignore_index=True)
