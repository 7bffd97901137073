"""Notebook ``kv-leaderboard``: every KV-cache scorer of family A × budgets × tasks, in one ranked table.

Protocol (prefill compression, query-agnostic, :mod:`salience.harness.kv_prefill_compression` through
:mod:`salience.kv_tasks`): a context is prefilled, its cache cut to a budget per layer and KV head by each scorer
(every scorer keeps the same ``n_sink`` first and ``recent_window`` last context tokens, so ``recency`` *is*
StreamingLLM), and then

* **Wikipedia continuation**: the next ``continuation_tokens`` tokens are scored on the compressed cache: mean
  KL(full ∥ compressed) of the next-token distributions and perplexity (:func:`kv_tasks.continuation_metrics`);
* **passkey retrieval**: the question is fed after compression and the greedy answer must contain the passkey
  (:func:`kv_tasks.needle_accuracy`); the share of the needle's cache entries kept is a diagnostic.

Each scorer's quality-vs-budget curve is summarised per document (per prompt for the passkey) by its area
(:func:`kv_tasks.area_under_budget_curve`, every curve closed at budget 1 with the uncompressed value); the table gives
the mean and the standard deviation over documents / prompts and ranks scorers by their mean rank over the three
areas (KL, log-perplexity, passkey accuracy). The uncompressed model is the baseline row.

Which scorers: :data:`KV_SCORERS`, the explicit list of family A (methods.md; issue 3's list). The registry also holds
vision-only scorers other notebooks add; :func:`registry_coverage` shows each registered scorer outside the list and
whether it even runs on a causal KV view (most fail with a clear error: no [CLS] role, no patch grid, no hidden states).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm  # text bars: stored notebooks stay readable without widgets

from ..metrics import LOG_PERPLEXITY_AUC, Metric, sort_by_metric
from ..params import ModelName, NotebookParams
from ..scorers import AttentionView, Scorer, available_scorers, get_scorer

TITLE = "KV-cache eviction leaderboard: family-A scorers × budgets × tasks (s97, s235, s93, s68, s184, s223, s208, s1)"
CLAIM = (
    "Attention-based scorers evict better than random and recency (StreamingLLM) eviction, and PageRank over the "
    "attention graph (LexRank's centrality as a KV scorer, our own) is competitive with them."
)

#: Family A, explicitly: registered name → table label. StreamingLLM is ``recency`` under the shared sink protection.
KV_SCORERS = {
    "random": "random",
    "recency": "recency + sinks (StreamingLLM)",
    "accumulated_attention": "accumulated (H2O)",
    "normalized_attention": "normalized (ZipCache)",
    "normalized_attention_probe": "probe normalized (ZipCache approx.)",
    "forgetting_attention": "forgetting factor (A2SF)",
    "tova": "last query (TOVA)",
    "snapkv": "SnapKV",
    "keyformer": "Keyformer",
    "key_norm": "key norm (KnormPress)",
    "vatp": "VATP",
    "caote": "CAOTE",
    "sepllm": "SepLLM (separators + sinks)",
    "attention_pagerank": "attention PageRank (ours)",
}
KVScorerName = Literal[tuple(KV_SCORERS)]  # type: ignore[valid-type]
BASELINE = "uncompressed"
CONTROLS = ("random", "recency")
CENTRALITY = "attention_pagerank"

KL_AUC = Metric("kl_auc", True, 0.0, "eviction", "area under mean KL(full ∥ compressed) vs kept-budget ratio")
NEEDLE_AUC = Metric("needle_auc", False, 1.0, "eviction", "area under passkey accuracy vs kept-budget ratio")
MEAN_RANK = Metric("mean_rank", True, 1.0, "eviction", "mean of a scorer's ranks by KL, log-perplexity and passkey AUC")
RANKED = (KL_AUC, LOG_PERPLEXITY_AUC, NEEDLE_AUC)


class Params(NotebookParams):
    """Parameters of ``kv-leaderboard`` (defaults: the CPU run, about two minutes on 2 cores)."""

    notebook = "kv-leaderboard"

    model: ModelName = Field("smollm2-135m", description="embedded model name, local folder or Hugging Face id")
    scorers: list[KVScorerName] = Field(list(KV_SCORERS), min_length=2, description="family-A scorers ranked")
    budgets: list[float] = Field([0.125, 0.5], min_length=2, description="kept ratios of the context, in (0, 1)")
    context_tokens: int = Field(128, ge=32, le=131072, description="context tokens compressed (both tasks)")
    continuation_tokens: int = Field(32, ge=2, le=4096, description="Wikipedia tokens scored after compression")
    n_documents: int = Field(2, ge=1, le=1000, description="Wikipedia continuations")
    depths: list[float] = Field([0.25, 0.75], min_length=1, description="passkey depths in [0, 1]")
    n_passkeys: int = Field(1, ge=1, le=100, description="passkeys (seeds) per depth")
    answer_prefix: str = Field("The secret passkey is", description="fed after the question in every run")
    max_new_tokens: int = Field(7, ge=1, le=64, description="greedy answer length")
    n_sink: int = Field(4, ge=0, le=1024, description="first context tokens every scorer keeps")
    recent_window: int = Field(4, ge=0, le=4096, description="last context tokens every scorer keeps")
    head_mode: Literal["per_kv_head", "shared"] = Field("per_kv_head", description="one kept set per KV head or one")
    observation_window: int = Field(8, ge=1, le=4096, description="SnapKV and CAOTE: newest queries they read")
    snapkv_kernel: int = Field(5, ge=1, le=63, description="SnapKV pooling kernel (odd; 1 = none)")
    forgetting_factor: float = Field(0.99, gt=0.0, le=1.0, description="A2SF decay per query step")
    keyformer_tau: float = Field(1.0, gt=0.0, le=100.0, description="Keyformer Gumbel-softmax temperature")
    probe_fraction: float = Field(0.1, gt=0.0, le=1.0, description="share of queries the ZipCache probe uses")
    pagerank_damping: float = Field(0.85, gt=0.0, lt=1.0, description="PageRank damping d")

    @field_validator("budgets")
    @classmethod
    def _ratios(cls, budgets: list[float]) -> list[float]:
        bad = [b for b in budgets if not 0.0 < b < 1.0]
        if bad:
            raise ValueError(f"every budget must be a ratio in (0, 1) (1 is the uncompressed baseline row), got {bad}")
        return sorted(set(budgets))

    @field_validator("depths")
    @classmethod
    def _depths(cls, depths: list[float]) -> list[float]:
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"every depth must lie in [0, 1], got {bad}")
        return depths

    @field_validator("scorers")
    @classmethod
    def _unique(cls, scorers: list[str]) -> list[str]:
        if len(set(scorers)) != len(scorers):
            raise ValueError(f"scorers must be unique, got {scorers}")
        return scorers

    @model_validator(mode="after")
    def _fits(self) -> "Params":
        # a passkey context may come out ~10% short (cut at a sentence end), so size the check on 0.9 x
        smallest = math.ceil(min(self.budgets) * math.floor(0.9 * self.context_tokens))
        if self.n_sink + self.recent_window > smallest:
            raise ValueError(f"the smallest budget ({min(self.budgets)} x ~{math.floor(0.9 * self.context_tokens)} "
                             f"tokens = {smallest}) must hold n_sink + recent_window = "
                             f"{self.n_sink + self.recent_window} protected tokens")
        if self.observation_window > self.context_tokens // 2:
            raise ValueError(f"observation_window must lie in [1, {self.context_tokens // 2}] (half the context), "
                             f"got {self.observation_window}")
        if self.snapkv_kernel % 2 == 0:
            raise ValueError(f"snapkv_kernel must be odd, got {self.snapkv_kernel}")
        return self


def make_scorer(name: str, params: Params) -> Scorer:
    """A family-A scorer by registered name, with this notebook's settings."""
    settings = {
        "forgetting_attention": dict(factor=params.forgetting_factor),
        "snapkv": dict(window=params.observation_window, kernel_size=params.snapkv_kernel),
        "caote": dict(window=params.observation_window),
        "keyformer": dict(tau=params.keyformer_tau),
        "normalized_attention_probe": dict(probe_fraction=params.probe_fraction),
        "attention_pagerank": dict(damping=params.pagerank_damping),
    }
    return get_scorer(name, **settings.get(name, {}))


def attention_based(scorer: Scorer) -> bool:
    """The rule of the claim: a scorer is attention-based when it reads attention (the matrix or its key mass)."""
    return bool(scorer.needs & {"attention", "key_mass"})


def scorers(params: Params) -> dict[str, Scorer]:
    """``{name: scorer}`` of the leaderboard; role-reading scorers (SepLLM) get their roles from the harness, which
    is given the tokenizer."""
    return {name: make_scorer(name, params) for name in params.scorers}


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
    rows = []
    for name in available_scorers():
        try:
            scorer = make_scorer(name, params) if name in KV_SCORERS else get_scorer(name)
            out = scorer(view)
            ok, error = bool(torch.isfinite(out).any()), ""
        except (ValueError, RuntimeError, TypeError) as err:
            ok, error = False, str(err).splitlines()[0][:120]
        rows.append(dict(scorer=name, in_leaderboard=name in params.scorers, runs_on_kv_view=ok, error=error))
    return pd.DataFrame(rows)


def continuation_runs(model, tokenizer, params: Params) -> pd.DataFrame:
    """One row per Wikipedia document × (uncompressed, then scorer × budget): KL, perplexity, ... plus ``doc``."""
    from ..kv_tasks import continuation_metrics, wikipedia_continuations

    device = next(model.parameters()).device
    pairs = wikipedia_continuations(tokenizer, n=params.n_documents, context_tokens=params.context_tokens,
                                    continuation_tokens=params.continuation_tokens, seed=params.seed)
    frames = []
    for d, (context, continuation) in enumerate(tqdm(pairs, desc="continuation: documents")):
        gen = torch.Generator().manual_seed(params.seed * 1000 + d)
        df = continuation_metrics(model, context.to(device), continuation.to(device),
                                  scorers(params), params.budgets, head_mode=params.head_mode,
                                  n_sink=params.n_sink, recent_window=params.recent_window, generator=gen,
                                  tokenizer=tokenizer)
        frames.append(df.assign(doc=d))
    return pd.concat(frames, ignore_index=True)


def needle_prompts(params: Params, tokenizer):
    """``n_passkeys`` seeded passkeys at every depth, planted in Wikipedia prose of ``context_tokens`` tokens."""
    from ..data import build_needle_prompt, random_passkey, wikipedia_haystack

    hay = wikipedia_haystack(min_chars=max(20_000, 16 * params.context_tokens), seed=params.seed)
    return [build_needle_prompt(tokenizer, hay, *random_passkey(seed=params.seed * 1000 + s), depth=d,
                                context_tokens=params.context_tokens)
            for s in range(params.n_passkeys) for d in params.depths]


def needle_runs(model, tokenizer, prompts, params: Params) -> pd.DataFrame:
    """One row per prompt × (uncompressed, then scorer × budget): correct, needle_kept, generated, ..."""
    from ..kv_tasks import needle_accuracy, needle_inputs

    frames = []
    for k, prompt in enumerate(tqdm(prompts, desc="passkey: prompts")):
        context = needle_inputs(tokenizer, prompt, answer_prefix=params.answer_prefix).context_ids
        gen = torch.Generator().manual_seed(params.seed * 1000 + 500 + k)
        df = needle_accuracy(model, tokenizer, [prompt], scorers(params), params.budgets,
                             head_mode=params.head_mode, n_sink=params.n_sink, recent_window=params.recent_window,
                             generator=gen, max_new_tokens=params.max_new_tokens, answer_prefix=params.answer_prefix)
        frames.append(df.assign(prompt=k))
    return pd.concat(frames, ignore_index=True)


def unit_areas(continuation: pd.DataFrame, needle: pd.DataFrame) -> pd.DataFrame:
    """Areas under the quality-vs-budget curves, one row per scorer × unit (document or prompt) × metric.

    Columns: scorer, task, unit, metric, auc. Curves are closed at budget 1 with the uncompressed value.
    """
    from ..kv_tasks import area_under_budget_curve

    frames = []
    cont = continuation.assign(log_ppl=np.log(continuation.perplexity))
    for d, g in cont.groupby("doc"):
        for column, metric in (("kl_mean", KL_AUC.name), ("log_ppl", LOG_PERPLEXITY_AUC.name)):
            frames.append(area_under_budget_curve(g, column)[["scorer", "auc"]]
                          .assign(task="continuation", unit=d, metric=metric))
    ndl = needle.assign(accuracy=needle.correct.astype(float))
    for k, g in ndl.groupby("prompt"):
        frames.append(area_under_budget_curve(g, "accuracy")[["scorer", "auc"]]
                      .assign(task="passkey", unit=k, metric=NEEDLE_AUC.name))
        frames.append(area_under_budget_curve(g, "needle_kept")[["scorer", "auc"]]
                      .assign(task="passkey", unit=k, metric="needle_kept_auc"))
    return pd.concat(frames, ignore_index=True)[["scorer", "task", "unit", "metric", "auc"]]


def leaderboard(areas: pd.DataFrame, params: Params) -> pd.DataFrame:
    """One row per scorer (uncompressed first): mean and std over units of each area, the mean rank over the three
    ranked areas (rank 1 = best among the scorers; the uncompressed row is not ranked), best mean rank first."""
    stats = areas.groupby(["scorer", "metric"]).auc.agg(["mean", "std"]).unstack("metric")
    board = pd.DataFrame(index=stats.index)
    for m in [*RANKED, Metric("needle_kept_auc", False, 1.0, "eviction")]:
        board[m.name] = stats[("mean", m.name)]
        board[f"{m.name}_std"] = stats[("std", m.name)]
    evicting = board.drop(index=BASELINE)
    ranks = pd.concat([evicting[m.name].rank(ascending=m.lower_is_better, method="average") for m in RANKED], axis=1)
    board[MEAN_RANK.name] = ranks.mean(axis=1)
    board = board.reset_index()
    board.insert(1, "label", board.scorer.map(KV_SCORERS).fillna(board.scorer))
    board.insert(2, "attention_based", board.scorer.map(
        lambda s: attention_based(make_scorer(s, params)) if s in KV_SCORERS else None))
    base = board[board.scorer == BASELINE]
    ranked = sort_by_metric(board[board.scorer != BASELINE], MEAN_RANK)
    return pd.concat([base, ranked], ignore_index=True)


def verdict(board: pd.DataFrame, areas: pd.DataFrame, params: Params) -> tuple[str, str, str]:
    """The claim's verdict from this run's numbers. Returns ``(label, one-line summary, Findings markdown)``.

    Rules (every area per unit first, then means):

    1. *attention-based scorers beat random and recency*: a scorer beats a control when its mean rank is lower.
       Holds when at least 75% of the attention-based scorers beat both controls; fails below 50%; partly between.
    2. *attention PageRank is competitive*: it beats both controls **and** its mean rank lies in the better half of
       the attention-based scorers.

    Both hold: supported; one holds (or part 1 is partial and part 2 holds): partly supported; neither: not supported.
    """
    b = board.set_index("scorer")
    present = [c for c in CONTROLS if c in b.index]
    attn = [s for s in b.index if s != BASELINE and s not in CONTROLS and bool(b.loc[s, "attention_based"])]
    if not present or not attn:
        raise ValueError(f"the verdict needs a control among {CONTROLS} and an attention-based scorer; "
                         f"got scorers {list(b.index)}")
    worst_control = max(b.loc[c, MEAN_RANK.name] for c in present)
    best_control = min(b.loc[c, MEAN_RANK.name] for c in present)
    beats = [s for s in attn if b.loc[s, MEAN_RANK.name] < best_control]
    share = len(beats) / len(attn)
    part1 = "holds" if share >= 0.75 else "fails" if share < 0.5 else "partly holds"

    # per-metric view: how many attention-based scorers have a lower (better) mean area than both controls
    per_metric = []
    for m in RANKED:
        col = b[m.name]
        better = [s for s in attn
                  if (col[s] < col[present].min() if m.lower_is_better else col[s] > col[present].max())]
        per_metric.append(f"{m.name}: {len(better)}/{len(attn)}")

    order = b.drop(index=BASELINE)[MEAN_RANK.name].sort_values()
    if CENTRALITY in b.index:
        attn_order = order[order.index.isin(attn)]
        position = list(attn_order.index).index(CENTRALITY) + 1
        pr_beats = CENTRALITY in beats
        competitive = pr_beats and position <= math.ceil(len(attn_order) / 2)
        part2 = "holds" if competitive else "fails"
        pr_text = (f"rank {position} of {len(attn_order)} attention-based scorers by mean rank "
                   f"({b.loc[CENTRALITY, MEAN_RANK.name]:.2f}); beats both controls: {'yes' if pr_beats else 'no'}")
    else:
        part2, pr_text = "untested", f"{CENTRALITY} is not among this run's scorers"

    if part1 == "holds" and part2 == "holds":
        label = "supported"
    elif part1 == "fails" and part2 != "holds":
        label = "not supported"
    elif part2 == "untested" and part1 != "holds":
        label = "inconclusive" if part1 == "partly holds" else "not supported"
    else:
        label = "partly supported"

    n_docs = int(areas[areas.task == "continuation"].unit.nunique())
    n_prompts = int(areas[areas.task == "passkey"].unit.nunique())
    summary = (f"{len(beats)}/{len(attn)} attention-based scorers out-rank both random and recency; attention "
               f"PageRank {pr_text.split(';')[0]}")
    top = ", ".join(f"{KV_SCORERS.get(s, s)} {v:.2f}" for s, v in order.items())
    base = b.loc[BASELINE]
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run ({params.model}, contexts of {params.context_tokens} tokens, budgets
{params.budgets}, {n_docs} Wikipedia document(s) and {n_prompts} passkey prompt(s), seed {params.seed}; every scorer
keeps the same {params.n_sink} sink and {params.recent_window} recent tokens). The uncompressed model scores KL 0,
log-perplexity {base[LOG_PERPLEXITY_AUC.name]:.3f} and passkey accuracy {base[NEEDLE_AUC.name]:.0%}.

1. **Attention-based scorers beat random and recency** — {part1}: {len(beats)}/{len(attn)} attention-based scorers
   have a lower mean rank than both controls ({', '.join(s for s in attn if s not in beats) or 'none'} do not).
   Per area, attention-based scorers better than both controls: {'; '.join(per_metric)}.
   Control mean ranks: {', '.join(f"{c} {b.loc[c, MEAN_RANK.name]:.2f}" for c in present)} (worst {worst_control:.2f}).
2. **Attention PageRank is competitive** — {part2}: {pr_text}.

Mean rank over the KL, log-perplexity and passkey areas, best first: {top}.
"""
    if min(n_docs, n_prompts) < 3:
        findings += (f"\nWith {n_docs} document(s) and {n_prompts} prompt(s) the ranks carry no confidence interval "
                     "worth the name (see the ± columns); params/kv-leaderboard.gpu.yaml runs many more.\n")
    return label, summary, findings


def plot_curves(continuation: pd.DataFrame, needle: pd.DataFrame):
    """KL vs budget (continuation) and needle entries kept vs budget (passkey), one line per scorer."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [s for s in KV_SCORERS if s in set(continuation.scorer)]
    palette = dict(zip([KV_SCORERS[s] for s in names], sns.color_palette("tab20", len(names))))
    styles = {KV_SCORERS[s]: (1, 0) if s == CENTRALITY else (4, 2) if s in CONTROLS else (1, 1) for s in names}
    for ax, df, y, title in ((axes[0], continuation, "kl_mean", "Wikipedia continuation: mean KL to the full cache"),
                             (axes[1], needle, "needle_kept", "Passkey: share of needle cache entries kept")):
        data = df[df.scorer != BASELINE].assign(scorer=lambda x: x.scorer.map(KV_SCORERS))
        sns.lineplot(data=data, x="budget", y=y, hue="scorer", style="scorer", dashes=styles, palette=palette,
                     marker="o", errorbar=None, ax=ax, legend=ax is axes[1])
        ax.set(xlabel="KV budget (fraction of the context kept)", ylabel=y, title=title)
    axes[0].set_yscale("log")
    axes[1].legend(title=None, frameon=False, fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_board(board: pd.DataFrame):
    """KL area per scorer with its spread over documents (± std), best first."""
    import matplotlib.pyplot as plt

    rows = board[board.scorer != BASELINE].sort_values(KL_AUC.name)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = ["C3" if s == CENTRALITY else "0.6" if s in CONTROLS else "C0" for s in rows.scorer]
    ax.barh(rows.label, rows[KL_AUC.name], xerr=rows[f"{KL_AUC.name}_std"].fillna(0), color=colors, capsize=3)
    ax.invert_yaxis()
    ax.set(xlabel="area under KL vs budget (lower is better; ± std over documents)",
           title="Continuation KL area per scorer (red: attention PageRank; grey: controls)")
    fig.tight_layout()
    return fig


def budget_proof(continuation: pd.DataFrame, needle: pd.DataFrame) -> pd.DataFrame:
    """Per task and budget: the context entries kept per layer and KV head (the harness asserts every layer's real
    cache length equals it), the range over documents / prompts, and how many compressions ran."""
    frames = []
    for task, df in (("continuation", continuation), ("passkey", needle)):
        g = df[df.scorer != BASELINE].groupby("budget")
        frames.append(pd.DataFrame({"task": task, "min_kept_tokens": g.budget_tokens.min(),
                                    "max_kept_tokens": g.budget_tokens.max(), "min_context": g.context_len.min(),
                                    "max_context": g.context_len.max(), "compressions": g.size()}).reset_index())
    return pd.concat(frames, ignore_index=True)
