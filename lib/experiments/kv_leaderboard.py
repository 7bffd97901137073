"""Notebook ``kv-leaderboard``: every KV-cache scorer × budgets × tasks, judged on solvable cells only.

Protocol (prefill compression as kvpress [@kvpress] runs it, :mod:`salience.kv_tasks` and :mod:`salience.kv_passkey`):
per document or prompt **one** uncompressed prefill captures every layer's attention; every scorer scores the context
from it and every scorer × budget's compressed cache is gathered from its cache (each keeps the same ``n_sink`` first
and ``recent_window`` last context tokens, so ``recency`` *is* StreamingLLM [@streamingllm]); then

* **Wikipedia continuation**: the next ``continuation_tokens`` tokens are fed on the compressed cache: KL(full ∥
  compressed) of the next-token distributions and log-perplexity;
* **passkey retrieval**, query-agnostic and query-aware, reported separately: the teacher-forced log-probability of the
  passkey's tokens after the answer prefix (the continuous metric), greedy accuracy beside it.

Every table starts with the uncompressed row and the oracle row (continuation: the context keys the continuation's
own queries attend to; passkey: the needle kept, the rest by the answer's attention). A passkey cell (mode, budget)
whose oracle does not fit or answers fewer than ``solvable_accuracy`` of the prompts is **unsolvable**: it is shown,
and left out of every area and claim.

Per unit (document or prompt) each scorer's quality-vs-budget curve becomes its area (mean height, closed at budget 1
with the uncompressed value). The claim's parts (:func:`judge_claim`, :mod:`salience.evidence`):

1. per task, the mean area of the attention-based scorers (a scorer is attention-based when it reads attention or its
   key mass: ``not scorer.attention_free``, the rule of :class:`~salience.scorers.base.Scorer`) against **each**
   control (random and recency), paired over the units, as one intersection-union test: the part is supported only
   when the family beats every control, contradicted when it is worse than any, and reports the comparison that
   decided (:func:`against_every_control`). No control is picked by looking at the data. The family mean is one
   comparison per unit, so no single scorer's tie decides it and nothing is averaged into a rank;
2. attention PageRank (LexRank's centrality [@lexrank] as a KV scorer) is no worse, by at most δ, than the median of
   the other attention-based scorers in KL area, paired over documents.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator

from .. import kv_tasks
from ..evidence import Claim, PartRule, PartSpec, fmt_interval, judge, paired_interval
from ..kv_passkey import solvable_runs
from ..kv_tasks import BASELINE, ORACLE, area_under_budget_curve
from ..metrics import LOG_PERPLEXITY_AUC, Metric
from ..scorers import AttentionView, Scorer, available_scorers, get_scorer
from ..scorers.spec import ScorerList, build_scorers
from .kv_params import (BudgetRatios, PasskeyParams, check_protection_fits, check_windows_protected, mean_interval,
                        not_judged, run_passkey)
from .param_checks import check_labels

TITLE = "KV-cache eviction leaderboard: every prefill-compression scorer × budgets × tasks"
CLAIM = (
    "Attention-based scorers evict better than random and recency (StreamingLLM) eviction, and PageRank over the "
    "attention graph (LexRank's centrality as a KV scorer) is competitive with them."
)
PAPERS = ["h2o", "zipcache", "a2sf", "tova", "snapkv", "keyformer", "knormpress", "vatp", "caote", "sepllm",
          "streamingllm", "lexrank", "kvpress"]
ATTENTION_PAPERS = ("h2o", "zipcache", "a2sf", "tova", "snapkv", "keyformer", "vatp", "caote", "streamingllm")

KL_AUC = Metric("kl_auc", True, 0.0, "eviction", "area under mean KL(full ∥ compressed) vs kept-budget ratio")
LOGPROB_AUC = Metric("logprob_auc", False, 0.0, "eviction",
                     "area under the passkey answer's mean log-probability vs kept-budget ratio (solvable budgets)")
ACCURACY_AUC = Metric("accuracy_auc", False, 1.0, "eviction", "area under greedy passkey accuracy (solvable budgets)")
NEEDLE_KEPT_AUC = Metric("needle_kept_auc", False, 1.0, "eviction", "area under the needle entries kept")
CONTINUATION = "continuation"
PASSKEY = {"query-agnostic": "passkey, query-agnostic", "query-aware": "passkey, query-aware"}

PART_SPECS = (
    PartSpec("attention_beats_controls_continuation",
             "attention-based scorers (their mean) keep the continuation closer to the full cache than each "
             "control", "KL area (nats)", "document", higher_is_better=False, papers=ATTENTION_PAPERS),
    PartSpec("attention_beats_controls_passkey_agnostic",
             "attention-based scorers (their mean) keep the passkey answer more likely than each control, "
             "query-agnostic", "answer log-prob area (nats/token)", "prompt", papers=ATTENTION_PAPERS),
    PartSpec("attention_beats_controls_passkey_aware",
             "attention-based scorers (their mean) keep the passkey answer more likely than each control, "
             "query-aware", "answer log-prob area (nats/token)", "prompt", papers=ATTENTION_PAPERS),
    PartSpec("pagerank_competitive",
             "attention PageRank is no worse than the median other attention-based scorer", "KL area (nats)",
             "document", higher_is_better=False, papers=("lexrank",)),
)
#: each superiority part's task and metric
PART_TASKS = {
    "attention_beats_controls_continuation": (CONTINUATION, KL_AUC),
    "attention_beats_controls_passkey_agnostic": (PASSKEY["query-agnostic"], LOGPROB_AUC),
    "attention_beats_controls_passkey_aware": (PASSKEY["query-aware"], LOGPROB_AUC),
}


class Params(PasskeyParams):
    """Parameters of ``kv-leaderboard``; defaults in ``params/kv-leaderboard.yaml``."""

    notebook = "kv-leaderboard"

    scorers: ScorerList = Field(min_length=3, description="the scorers ranked, one spec each")
    controls: list[str] = Field(min_length=1, description="labels of the control scorers (random, recency)")
    centrality: str = Field(description="label of the attention PageRank entry")
    budgets: BudgetRatios = Field(description="kept ratios of the context, in (0, 1)")
    context_tokens: int = Field(ge=32, le=131072, description="context tokens compressed (both tasks)")
    continuation_tokens: int = Field(ge=2, le=4096, description="Wikipedia tokens scored after compression")
    n_documents: int = Field(ge=2, le=1000, description="Wikipedia continuations (units of the continuation parts)")
    parts: dict[str, PartRule] = Field(description="direction and smallest effect of each claim part")

    judged = PART_SPECS

    @model_validator(mode="after")
    def _fits(self) -> "Params":
        check_labels(self.controls, self.scorers, "controls")
        check_labels([self.centrality], self.scorers, "centrality")
        if self.centrality in self.controls:
            raise ValueError("centrality must not be a control")
        built = build_scorers(self.scorers)
        if built[self.centrality].attention_free:
            raise ValueError(f"centrality {self.centrality!r} must be an attention-based scorer")
        if len(attention_based_labels(self)) < 2:
            raise ValueError("scorers must hold at least two attention-based entries besides the controls")
        check_windows_protected(self.scorers, self.recent_window)
        check_protection_fits(self.budgets, self.context_tokens, self.n_sink, self.recent_window, passkey=True)
        return self


def attention_based_labels(params: Params) -> list[str]:
    """Labels of the attention-based entries (not attention-free, not a control), in the order given."""
    return [label for label, s in build_scorers(params.scorers).items()
            if not s.attention_free and label not in params.controls]


def scorer_table(params: Params) -> pd.DataFrame:
    """The entries: label, registered name, settings, and their role in the claim."""
    attn = set(attention_based_labels(params))
    rows = []
    for spec in params.scorers:
        role = ("control" if spec.key in params.controls else "centrality" if spec.key == params.centrality
                else "attention-based" if spec.key in attn else "other (attention-free)")
        rows.append({"label": spec.key, "scorer": spec.name,
                     "settings": ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "—", "role": role})
    return pd.DataFrame(rows)


def registry_coverage(params: Params) -> pd.DataFrame:
    """Every registered scorer: in this leaderboard or not, and whether it scores a tiny causal KV view.

    The view is what a decoder's prefill gives: causal ``(1, 4, 8, 8)`` attention, keys and values ``(1, 2, 8, 4)``,
    separators, no [CLS], no patch grid, no hidden states. Columns: scorer, in_leaderboard, runs_on_kv_view, error.
    """
    gen = torch.Generator().manual_seed(0)
    t, h, h_kv, d = 8, 4, 2, 4
    logits = torch.randn(1, h, t, t, generator=gen).masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    pos = torch.arange(t)
    attention = logits.softmax(-1)
    view = AttentionView(key_positions=pos, query_positions=pos, attention=attention,
                         attention_layers=[attention, attention], keys=torch.randn(1, h_kv, t, d, generator=gen),
                         values=torch.randn(1, h_kv, t, d, generator=gen), visible_queries=t - pos,
                         roles={"separator": pos % 3 == 2}, generator=gen)
    ours = {s.name: s for s in params.scorers}
    rows = []
    for name in available_scorers():
        try:
            scorer = ours[name].build() if name in ours else get_scorer(name)
            out = scorer(view)
            ok, error = bool(torch.isfinite(out).any()), ""
        except (ValueError, RuntimeError, TypeError) as err:
            ok, error = False, str(err).splitlines()[0][:120]
        rows.append(dict(scorer=name, in_leaderboard=name in ours, runs_on_kv_view=ok, error=error))
    return pd.DataFrame(rows)


def entries(params: Params) -> dict[str, Scorer]:
    return build_scorers(params.scorers)


def continuation_runs(model, tokenizer, params: Params) -> pd.DataFrame:
    """One row per document × (uncompressed, oracle, scorer × budget): KL, perplexity, ...
    (:func:`salience.kv_tasks.continuation_runs`; the notebook calls this one by this name)."""
    pairs = kv_tasks.wikipedia_continuations(tokenizer, n=params.n_documents, context_tokens=params.context_tokens,
                                             continuation_tokens=params.continuation_tokens, seed=params.seed)
    return kv_tasks.continuation_runs(model, pairs, entries(params), params.budgets, head_mode=params.head_mode,
                                      n_sink=params.n_sink, recent_window=params.recent_window, seed=params.seed,
                                      tokenizer=tokenizer, batch_size=params.batch_size)


def passkey_runs(model, tokenizer, params: Params) -> pd.DataFrame:
    """One row per prompt × mode × (uncompressed, oracle, scorer × budget) (:func:`salience.kv_passkey.passkey_runs`;
    the notebook calls this one by this name)."""
    return run_passkey(model, tokenizer, params, entries(params), params.budgets, params.context_tokens)


def unit_areas(continuation: pd.DataFrame, passkey: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Areas under the quality-vs-budget curves, one row per scorer × task × unit × metric (passkey: solvable
    budgets of each mode only; a mode without one has no passkey areas). Columns: scorer, task, unit, metric, auc."""
    frames = []
    cont = continuation.assign(log_ppl=np.log(continuation.perplexity))
    for d, g in cont.groupby("doc"):
        for column, metric in (("kl_mean", KL_AUC), ("log_ppl", LOG_PERPLEXITY_AUC)):
            frames.append(area_under_budget_curve(g, column)[["scorer", "auc"]]
                          .assign(task=CONTINUATION, unit=d, metric=metric.name))
    solvable = solvable_runs(passkey, cells).assign(accuracy=lambda df: df.greedy_correct.astype(float))
    for mode, task in PASSKEY.items():
        rows = solvable[solvable["mode"] == mode]
        if not (rows.scorer != BASELINE).any():
            continue
        for k, g in rows.groupby("prompt"):
            for column, metric in (("answer_logprob", LOGPROB_AUC), ("accuracy", ACCURACY_AUC),
                                   ("needle_kept", NEEDLE_KEPT_AUC)):
                frames.append(area_under_budget_curve(g, column)[["scorer", "auc"]]
                              .assign(task=task, unit=k, metric=metric.name))
    return pd.concat(frames, ignore_index=True)[["scorer", "task", "unit", "metric", "auc"]]


def _wide(areas: pd.DataFrame, task: str, metric: Metric) -> pd.DataFrame:
    """Units × scorers of one task's area."""
    sel = areas[(areas.task == task) & (areas.metric == metric.name)]
    return sel.pivot(index="unit", columns="scorer", values="auc")


def leaderboard(areas: pd.DataFrame, params: Params) -> pd.DataFrame:
    """One row per entry: the mean of each area over its units with a 95% bootstrap interval (``_lo``, ``_hi``).

    The uncompressed and oracle rows come first, then the scorers by mean continuation KL area (best first). Passkey
    columns are per mode (solvable budgets only; NaN where no cell of the mode is solvable)."""
    columns = [(CONTINUATION, KL_AUC, "kl_auc"), (CONTINUATION, LOG_PERPLEXITY_AUC, "log_ppl_auc")]
    for mode, task in PASSKEY.items():
        short = "agnostic" if mode == "query-agnostic" else "aware"
        columns += [(task, LOGPROB_AUC, f"logprob_auc_{short}"), (task, ACCURACY_AUC, f"accuracy_auc_{short}")]
    roles = scorer_table(params).set_index("label").role
    labels = [BASELINE, ORACLE] + [s.key for s in params.scorers]
    board = pd.DataFrame({"scorer": labels, "role": [roles.get(label, "reference") for label in labels]})
    for task, metric, name in columns:
        wide = _wide(areas, task, metric)
        stats = [mean_interval(wide[label], params.seed) if label in wide else (math.nan,) * 3 for label in labels]
        board[name], board[f"{name}_lo"], board[f"{name}_hi"] = zip(*stats)
    refs, ranked = board.iloc[:2], board.iloc[2:].sort_values("kl_auc", kind="stable")
    return pd.concat([refs, ranked], ignore_index=True)


def pairwise(areas: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Descriptive: each attention-based scorer against each control, per task's claim metric: the mean paired
    difference (scorer − control) and its 95% bootstrap interval, oriented so that positive favours the scorer."""
    rows = []
    for part_id, (task, metric) in PART_TASKS.items():
        wide = _wide(areas, task, metric)
        if wide.empty:
            continue
        sign = -1.0 if metric.lower_is_better else 1.0
        for label in attention_based_labels(params):
            for control in params.controls:
                diff = (sign * (wide[label] - wide[control])).to_numpy(dtype=float)
                low, high, _ = paired_interval(diff, seed=params.seed)
                rows.append({"task": task, "metric": metric.name, "scorer": label, "control": control,
                             "improvement": float(diff.mean()), "lo": low, "hi": high,
                             "better": low > 0, "worse": high < 0})
    return pd.DataFrame(rows)


def against_every_control(spec: PartSpec, rule: PartRule, family: pd.Series, wide: pd.DataFrame,
                          controls: list[str], seed: int, what: str):
    """One part, judged against each control and combined by the intersection-union rule: contradicted when the
    family loses to any control, supported only when it beats all, inconclusive otherwise. The part carries the
    numbers of the comparison that decided (the contradicted one, else the least favourable by its interval's
    bound toward the claim); ``detail`` lists every control's verdict and interval."""
    judged = {c: judge(spec, rule, family, wide[c], seed=seed) for c in controls}
    lost = [c for c, p in judged.items() if p.verdict == "contradicted"]
    if lost:
        decider = lost[0]
    else:
        # the comparison whose interval reaches least far toward the claim's side
        decider = min(controls, key=lambda c: judged[c].improvement[1])
    summary = "; ".join(f"{c}: {p.verdict}, {fmt_interval(p.effect, p.ci_low, p.ci_high)}"
                        for c, p in judged.items())
    part = judged[decider]
    part.detail = f"{what} against each control ({summary}); the numbers shown are against {decider}"
    return part


def judge_claim(areas: pd.DataFrame, cells: pd.DataFrame, params: Params) -> Claim:
    """The claim judged from this run's per-unit areas (module docstring: the parts and why)."""
    attn = attention_based_labels(params)
    parts = []
    for spec in PART_SPECS:
        rule = params.parts[spec.id]
        if spec.id == "pagerank_competitive":
            wide = _wide(areas, CONTINUATION, KL_AUC)
            others = [s for s in attn if s != params.centrality]
            parts.append(judge(spec, rule, wide[params.centrality], wide[others].median(axis=1), seed=params.seed,
                               detail=f"{params.centrality} against the per-document median of {len(others)} "
                                      "attention-based scorers"))
            continue
        task, metric = PART_TASKS[spec.id]
        wide = _wide(areas, task, metric)
        if wide.empty:
            parts.append(not_judged(spec, rule, f"no solvable {task} cell: the oracle failed at every budget"))
            continue
        parts.append(against_every_control(spec, rule, wide[attn].mean(axis=1), wide, params.controls, params.seed,
                                           f"mean of {len(attn)} attention-based scorers, {len(wide)} {spec.unit}s,"))
    unsolvable = cells[~cells.solvable]
    notes = [f"Passkey cells solvable (oracle fits and answers ≥ {params.solvable_accuracy:.0%} of the prompts): "
             + "; ".join(f"{r.mode} @ {r.budget:g}: {'yes' if r.solvable else 'no'}" for r in cells.itertuples())
             + ". Unsolvable cells are shown in the tables and left out of every area and part."
             if len(unsolvable) else
             f"Every passkey cell is solvable (the oracle fits and answers ≥ {params.solvable_accuracy:.0%} of the "
             "prompts)."]
    n_prompts = params.n_prompts
    heads = "one kept set per KV head" if params.head_mode == "per_kv_head" else "one kept set for all heads"
    setting = (f"{params.model} on {params.device} (the papers use 7B-70B models and contexts of thousands of "
               f"tokens); {params.n_documents} Wikipedia contexts of {params.context_tokens} tokens with "
               f"{params.continuation_tokens}-token continuations, and {n_prompts} passkey prompts of "
               f"~{params.context_tokens} tokens; prefill compression after an uncompressed prefill (kvpress's "
               f"protocol), {heads}, budgets "
               f"{', '.join(f'{b:g}' for b in params.budgets)} of the context, every scorer keeping "
               f"{params.n_sink} sinks and the last {params.recent_window} context tokens. Per unit, the area under "
               "the quality-vs-budget curve (closed at budget 1 with the uncompressed value).")
    return Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                 setting=setting, notes=notes, seed=params.seed)


def budget_proof(continuation: pd.DataFrame, passkey: pd.DataFrame) -> pd.DataFrame:
    """Per task and budget: the context entries kept per layer and KV head and the cache entries per layer right
    after compression (the harness asserts every layer's real length equals it), over documents / prompts, and how
    many compressions ran."""
    frames = []
    tasks = [(CONTINUATION, continuation)] + [(task, passkey[passkey["mode"] == mode]) for mode, task in
                                               PASSKEY.items()]
    for task, df in tasks:
        g = df[(df.scorer != BASELINE) & df.cache_len.notna()].groupby("budget")
        frames.append(pd.DataFrame({
            "task": task, "min_kept": g.budget_tokens.min(), "max_kept": g.budget_tokens.max(),
            "min_cache_len": g.cache_len.min().astype(int), "max_cache_len": g.cache_len.max().astype(int),
            "compressions": g.size()}).reset_index())
    return pd.concat(frames, ignore_index=True)


def plot_curves(continuation: pd.DataFrame, passkey: pd.DataFrame, params: Params):
    """Continuation KL and passkey answer log-probability (per mode) vs budget, one line per entry."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [ORACLE] + [s.key for s in params.scorers]
    palette = dict(zip(labels, sns.color_palette("tab20", len(labels))))
    dashes = {s: (1, 0) if s in (params.centrality, ORACLE) else (4, 2) if s in params.controls else (1, 1)
              for s in labels}
    panels = [(continuation, "kl_mean", "Continuation: mean KL to the full cache (nats)")]
    panels += [(passkey[passkey["mode"] == mode], "answer_logprob", f"Passkey ({mode}): answer log-prob")
               for mode in PASSKEY]
    for ax, (df, y, title) in zip(axes, panels):
        data = df[df.scorer != BASELINE]
        sns.lineplot(data=data, x="budget", y=y, hue="scorer", style="scorer", dashes=dashes, palette=palette,
                     marker="o", errorbar=None, ax=ax, legend=ax is axes[-1])
        base = float(df[df.scorer == BASELINE][y].mean())
        ax.axhline(base, color="k", lw=0.8, ls=":")
        ax.set(xlabel="KV budget (share of the context kept)", ylabel=y, title=title)
    axes[0].set_yscale("log")
    axes[-1].legend(title=None, frameon=False, fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_board(board: pd.DataFrame, params: Params):
    """Continuation KL area and passkey log-prob areas per entry, with 95% intervals over units."""
    import matplotlib.pyplot as plt

    rows = board[board.scorer != BASELINE]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), sharey=True)
    colors = ["C2" if s == ORACLE else "C3" if s == params.centrality else "0.6" if s in params.controls else "C0"
              for s in rows.scorer]
    for ax, (col, title) in zip(axes, [("kl_auc", "KL area (lower is better)"),
                                       ("logprob_auc_agnostic", "passkey log-prob area, query-agnostic"),
                                       ("logprob_auc_aware", "passkey log-prob area, query-aware")]):
        err = np.abs(np.vstack([rows[col] - rows[f"{col}_lo"], rows[f"{col}_hi"] - rows[col]]))
        ax.barh(rows.scorer, rows[col].fillna(0), xerr=np.nan_to_num(err), color=colors, capsize=3)
        ax.set(title=title, xlabel="mean over units, 95% interval")
    axes[0].invert_yaxis()
    fig.suptitle("Green: oracle; red: attention PageRank; grey: controls")
    fig.tight_layout()
    return fig
