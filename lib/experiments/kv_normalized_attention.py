"""Notebook ``kv-normalized-attention``: is accumulated attention biased toward early tokens, and does ZipCache's
normalisation remove the bias and evict better?

Two analyses on a causal LM and real text:

1. **Bias.** One prefill per document; every token scored by accumulated (H2O) and normalized (ZipCache) attention in
   every layer and head. Reported: the mean relative score by position, the Spearman correlation of score with position
   (0 = no positional preference) and the share of the top-scored tokens that sit in the first part of the text.
2. **Eviction.** The text is streamed through a cache of a fixed budget (a ratio of its length) with decode-time
   eviction under each scorer, all keeping the same sinks and recent window; the task is perplexity. Summarised by the
   area under the log-perplexity vs budget curve per document.

Extension (Keyformer s68, ZipCache's probe approximation s97):

3. **Probe fidelity and cost.** In the same kind of prefill, ZipCache's probe score (normalized attention from a
   ``probe_fraction`` of the queries, :class:`~salience.scorers.ProbeNormalizedAttention`) is compared per layer and
   head with the exact normalized score: Spearman rank correlation (``scipy.stats`` ranks) and the overlap of the
   tokens each would keep at the notebook's budgets (beyond the protected sinks and recent window). Cost: the share of
   queries used and the share of attention entries (``q·k`` dot products, i.e. FLOPs of ``QKᵀ`` and the softmax) the
   probe rows need. Keyformer at ``τ = 1`` is accumulated attention plus Gumbel noise (``softmax(log a) = a``), so its
   ranking is compared with accumulated attention's the same way.
4. **Prefill compression quality.** Each document's head is compressed once by each scorer (query-agnostic, the
   ZipCache setting in which the probes are drawn from all prefill queries) and its tail scored as a continuation:
   KL(full ∥ compressed) of the next-token distributions and perplexity (:func:`salience.kv_tasks.continuation_metrics`).
"""

from __future__ import annotations

from typing import Literal

import math

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from scipy.stats import rankdata
from tqdm import tqdm  # text bars: stored notebooks stay readable without widgets

from ..harness import capture_attention, prefill_scores, stream_perplexity
from ..metrics import LOG_PERPLEXITY_AUC, Metric, area_under_curve, sort_by_metric
from ..params import ModelName, NotebookParams
from ..scorers import AttentionView, get_scorer, probe_rows

TITLE = "Normalized vs accumulated attention for KV-cache eviction (ZipCache s97, H2O, A2SF s235)"
CLAIM = (
    "Accumulated attention (H2O) is biased toward early tokens because early keys are seen by more queries; "
    "normalizing by the number of queries that can see each key removes the bias and evicts better."
)
ScorerName = Literal["accumulated_attention", "normalized_attention", "forgetting_attention", "recency", "random",
                     "keyformer", "normalized_attention_probe"]
LABELS = {
    "accumulated_attention": "accumulated (H2O)",
    "normalized_attention": "normalized (ZipCache)",
    "forgetting_attention": "forgetting factor (A2SF)",
    "recency": "recency (StreamingLLM)",
    "random": "random",
    "keyformer": "Keyformer (Gumbel)",
    "normalized_attention_probe": "probe normalized (ZipCache approx.)",
}
PROBE = "normalized_attention_probe"


class Params(NotebookParams):
    """Parameters of ``kv-normalized-attention`` (defaults: the CPU run, about two minutes on 2 cores)."""

    notebook = "kv-normalized-attention"

    model: ModelName = Field("smollm2-135m", description="embedded model name, local folder or Hugging Face id")
    dataset: Literal["wikipedia", "news"] = "wikipedia"
    n_documents: int = Field(2, ge=1, le=100, description="documents streamed per scorer and budget")
    context_tokens: int = Field(384, ge=64, le=131072, description="tokens per document (longer ones are cut)")
    budgets: list[float] = Field(
        [0.1, 0.25, 0.5, 1.0], min_length=2, description="kept-cache ratios of the document length, in (0, 1]"
    )
    scorers: list[ScorerName] = Field(
        ["accumulated_attention", "normalized_attention", "forgetting_attention", "recency", "random", "keyformer",
         PROBE], min_length=1, description="scorers of the streamed eviction sweep"
    )
    forgetting_factor: float = Field(0.99, gt=0.0, le=1.0, description="A2SF decay per query step")
    keyformer_tau: float = Field(1.0, gt=0.0, le=100.0, description="Keyformer Gumbel-softmax temperature")
    probe_fraction: float = Field(0.1, gt=0.0, le=1.0, description="share of queries the probe scorer uses")
    probe_recent_share: float = Field(0.5, ge=0.0, le=1.0, description="share of the probes taken from the newest queries")
    probe_fractions: list[float] = Field(
        [0.02, 0.05, 0.1, 0.25], min_length=1, description="probe shares of the fidelity analysis, in (0, 1]"
    )
    kl_scorers: list[ScorerName] = Field(
        ["normalized_attention", PROBE, "keyformer", "accumulated_attention", "random"], min_length=1,
        description="scorers of the prefill-compression KL part"
    )
    continuation_tokens: int = Field(32, ge=2, le=4096, description="document tail scored after prefill compression")
    n_sink: int = Field(4, ge=0, le=1024, description="initial tokens every scorer keeps (attention sinks)")
    recent_window: int = Field(8, ge=0, le=4096, description="newest tokens every scorer keeps")
    chunk_size: int = Field(16, ge=1, le=4096, description="tokens per forward pass between evictions")
    position_bins: int = Field(16, ge=2, le=256, description="bins of the bias-by-position figure")
    top_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of tokens counted as 'kept' in the bias test")

    @field_validator("budgets")
    @classmethod
    def _ratios(cls, budgets: list[float]) -> list[float]:
        bad = [b for b in budgets if not 0.0 < b <= 1.0]
        if bad:
            raise ValueError(f"every budget must be a ratio in (0, 1], got {bad}")
        return sorted(set(budgets))

    @field_validator("probe_fractions")
    @classmethod
    def _fractions(cls, fractions: list[float]) -> list[float]:
        bad = [f for f in fractions if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"every probe fraction must lie in (0, 1], got {bad}")
        return sorted(set(fractions))

    @model_validator(mode="after")
    def _budget_holds_protected(self) -> "Params":
        smallest = int(np.ceil(min(self.budgets) * self.context_tokens))
        if self.n_sink + self.recent_window > smallest:
            raise ValueError(
                f"the smallest budget ({min(self.budgets)} x {self.context_tokens} = {smallest} tokens) must hold "
                f"n_sink + recent_window = {self.n_sink + self.recent_window} protected tokens"
            )
        if not 2 <= self.continuation_tokens <= self.context_tokens // 2:
            raise ValueError(f"continuation_tokens must lie in [2, {self.context_tokens // 2}] (half of "
                             f"context_tokens = {self.context_tokens}), got {self.continuation_tokens}")
        head = self.context_tokens - self.continuation_tokens
        if self.n_sink + self.recent_window > int(np.ceil(min(self.budgets) * head)):
            raise ValueError(f"the smallest budget of the compressed head ({min(self.budgets)} x {head} tokens) must "
                             f"hold n_sink + recent_window = {self.n_sink + self.recent_window} protected tokens")
        return self


def make_scorer(name: str, params: Params, probe_fraction: float | None = None):
    """A scorer by name with this notebook's settings (``probe_fraction`` overrides the probe scorer's share)."""
    if name == "forgetting_attention":
        return get_scorer(name, factor=params.forgetting_factor)
    if name == "keyformer":
        return get_scorer(name, tau=params.keyformer_tau)
    if name == PROBE:
        fraction = params.probe_fraction if probe_fraction is None else probe_fraction
        return get_scorer(name, probe_fraction=fraction, recent_share=params.probe_recent_share)
    return get_scorer(name)


def load_documents(params: Params, tokenizer) -> list[torch.Tensor]:
    """``n_documents`` texts of at least ``context_tokens`` tokens, each as ``(1, context_tokens)`` ids."""
    from ..data import load_text_dataset

    texts = load_text_dataset(params.dataset)["text"]
    order = np.random.default_rng(params.seed).permutation(len(texts))
    docs = []
    for i in order:
        ids = tokenizer(texts[int(i)], return_tensors="pt").input_ids
        if ids.shape[1] >= params.context_tokens:
            docs.append(ids[:, : params.context_tokens].to(params.device))
        if len(docs) == params.n_documents:
            return docs
    raise ValueError(
        f"only {len(docs)} {params.dataset} documents have ≥ {params.context_tokens} tokens; lower n_documents "
        "or context_tokens"
    )


def _spearman_with_position(scores: np.ndarray) -> np.ndarray:
    """Row-wise Spearman rho of ``scores (..., T)`` against position ``0..T-1``."""
    ranks = rankdata(scores, axis=-1)
    pos = np.arange(scores.shape[-1], dtype=float)
    ranks = ranks - ranks.mean(axis=-1, keepdims=True)
    pos = pos - pos.mean()
    denom = np.sqrt((ranks**2).sum(-1) * (pos**2).sum())
    return (ranks * pos).sum(-1) / np.where(denom == 0, 1.0, denom)


def positional_bias(model, docs: list[torch.Tensor], params: Params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every token of each document once (prefill) with accumulated and normalized attention.

    Returns:
        profile: scorer, doc, bin_center, relative_score — mean score in each position bin divided by the mean over
            all non-sink positions (per layer and head, then averaged), so 1 means "average".
        bias: scorer, doc, position_spearman (mean over layers × heads of rho(score, position), sinks excluded),
            early_share (share of each layer's top ``top_fraction`` tokens that lie in the first ``top_fraction`` of
            the non-sink positions; no bias gives ``top_fraction``).
    """
    names = ["accumulated_attention", "normalized_attention"]
    profile_rows, bias_rows = [], []
    for d, ids in enumerate(tqdm(docs, desc="bias: prefill scoring", leave=False)):
        scores = prefill_scores(model, ids, {n: make_scorer(n, params) for n in names})
        for name in names:
            s = scores[name][..., params.n_sink :].cpu().numpy()  # (L, H, T') without the sinks
            t = s.shape[-1]
            rel = s / s.mean(axis=-1, keepdims=True)
            edges = np.linspace(0, t, params.position_bins + 1).astype(int)
            for lo, hi in zip(edges[:-1], edges[1:]):
                profile_rows.append(
                    dict(scorer=name, doc=d, bin_center=params.n_sink + (lo + hi - 1) / 2,
                         relative_score=float(rel[..., lo:hi].mean()))
                )
            per_layer = s.mean(axis=1)  # (L, T') head-averaged, as a shared eviction ranks
            k = max(1, int(round(params.top_fraction * t)))
            top = np.argsort(-per_layer, axis=-1, kind="stable")[:, :k]
            early = float((top < params.top_fraction * t).mean())
            bias_rows.append(
                dict(scorer=name, doc=d, position_spearman=float(_spearman_with_position(s).mean()), early_share=early)
            )
    return pd.DataFrame(profile_rows), pd.DataFrame(bias_rows)


def budget_sweep(model, docs: list[torch.Tensor], params: Params) -> pd.DataFrame:
    """Stream every document under every scorer and budget; one row per run, with the harness's proof of eviction.

    Columns: doc, scorer, budget, budget_tokens, perplexity, evictions, max_cache_len. The full budget (1.0) never
    evicts, so it is run once per document (scorer ``full cache``) and is the baseline row of every table.
    """
    rows = []
    jobs = [(d, b, s) for d in range(len(docs)) for b in params.budgets if b < 1.0 for s in params.scorers]
    for d, ids in enumerate(docs):
        # a budget of the whole text never evicts: the uncompressed baseline, whatever the scorer
        full = stream_perplexity(model, ids, make_scorer("recency", params), ids.shape[1], chunk_size=params.chunk_size)
        rows.append(dict(doc=d, scorer="full cache", budget=1.0, budget_tokens=ids.shape[1],
                         perplexity=full.perplexity, evictions=full.evictions, max_cache_len=ids.shape[1]))
    for d, b, name in tqdm(jobs, desc="eviction: documents x budgets x scorers"):
        ids = docs[d]
        tokens = int(np.ceil(b * ids.shape[1]))
        gen = torch.Generator().manual_seed(params.seed * 1000 + d)
        r = stream_perplexity(model, ids, make_scorer(name, params), tokens, n_sink=params.n_sink,
                              recent_window=params.recent_window, chunk_size=params.chunk_size, generator=gen)
        rows.append(dict(doc=d, scorer=name, budget=b, budget_tokens=tokens, perplexity=r.perplexity,
                         evictions=r.evictions, max_cache_len=r.max_cache_len))
    return pd.DataFrame(rows)


def auc_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per scorer and document: area under log-perplexity vs budget, every scorer sharing the full-cache point at 1.0.

    Lower is better (the scorer keeps perplexity low over more of the budget range).
    """
    full = sweep[sweep.scorer == "full cache"].set_index("doc").perplexity
    rows = []
    for (name, d), g in sweep[sweep.scorer != "full cache"].groupby(["scorer", "doc"]):
        x = list(g.budget) + [1.0]
        y = list(np.log(g.perplexity)) + [float(np.log(full[d]))]
        rows.append(dict(scorer=name, doc=d, **{LOG_PERPLEXITY_AUC.name: area_under_curve(x, y)}))
    return pd.DataFrame(rows)


def eviction_proof(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per budget: the token budget, how many runs used it, the largest cache any layer held after an eviction step
    (the harness asserts it equals the budget in every layer) and the range of eviction steps."""
    g = sweep.groupby("budget")
    return pd.DataFrame({
        "budget_tokens": g.budget_tokens.max(),
        "runs": g.size(),
        "max_cache_len": g.max_cache_len.max(),
        "min_evictions": g.evictions.min(),
        "max_evictions": g.evictions.max(),
    }).reset_index()


def leaderboard(sweep: pd.DataFrame, auc: pd.DataFrame) -> pd.DataFrame:
    """One row per scorer plus the full cache: mean perplexity at each budget and the mean AUC, best first.

    Every scorer shares the full-cache point at budget 1.0 (nothing is evicted there); the full cache's own AUC is the
    flat line at its perplexity, the floor no eviction rule can beat.
    """
    full = sweep[sweep.scorer == "full cache"]
    evicting = pd.concat([sweep[sweep.scorer != "full cache"]]
                         + [full.assign(scorer=s) for s in sweep.scorer.unique() if s != "full cache"])
    wide = pd.concat([evicting, full]).pivot_table(index="scorer", columns="budget", values="perplexity", aggfunc="mean")
    wide.columns = [f"ppl@{c:g}" for c in wide.columns]
    wide[LOG_PERPLEXITY_AUC.name] = auc.groupby("scorer")[LOG_PERPLEXITY_AUC.name].mean()
    wide.loc["full cache", LOG_PERPLEXITY_AUC.name] = float(np.log(full.perplexity).mean())
    wide = wide.reset_index()
    wide.insert(1, "label", wide.scorer.map(LABELS).fillna(wide.scorer))
    return sort_by_metric(wide, LOG_PERPLEXITY_AUC).reset_index(drop=True)

KL_AUC = Metric("kl_auc", True, 0.0, "eviction", "area under mean KL(full ∥ compressed) vs kept-budget ratio")


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho of each row of ``a (R, K)`` with the same row of ``b``: Pearson correlation of
    ``scipy.stats.rankdata`` ranks (ties averaged), which is what ``scipy.stats.spearmanr`` computes for one pair, here
    for all rows at once. A constant row gives NaN."""
    ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    denom = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(-1) / denom


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(H, K)`` → ``(H, k)`` indices of the ``k`` best keys per head."""
    return scores.topk(k, dim=-1).indices


def _overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> np.ndarray:
    """Per head, the share of ``a``'s top ``k`` keys that are also in ``b``'s top ``k``."""
    if k < 1:
        return np.full(a.shape[0], np.nan)
    hits = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, _top(a, k), True)
    return (hits.gather(-1, _top(b, k)).sum(-1).float() / k).numpy()


@torch.inference_mode()
def probe_fidelity(model, docs: list[torch.Tensor], params: Params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One prefill per document; in every layer the exact normalized score, the probe score at each of
    ``probe_fractions`` and Keyformer's score are computed from the same attention matrix.

    Rank agreement is measured over the candidate keys only (neither among the ``n_sink`` sinks nor the
    ``recent_window`` newest keys, which the eviction keeps anyway), per layer and query head.

    Returns:
        fidelity: doc, layer, head, variant, reference, probe_fraction, spearman, ``overlap@<budget>`` for each budget
            below 1 (share of the reference's kept candidates that the variant keeps too, at that budget).
        cost: doc, layer, probe_fraction, queries_used, queries_total, query_share, entry_share (attention entries
            ``(q, k ≤ q)`` the probe rows hold over all ``T(T+1)/2`` of the causal matrix: the share of ``QKᵀ`` and
            softmax FLOPs a FlashAttention prefill would have to add to produce the probe score).
    """
    budgets = [b for b in params.budgets if b < 1.0]
    fid_rows, cost_rows = [], []
    normalized = get_scorer("normalized_attention")
    keyformer = make_scorer("keyformer", params)
    protected = params.n_sink + params.recent_window
    for d, ids in enumerate(tqdm(docs, desc="probe fidelity: prefill scoring", leave=False)):
        total = ids.shape[1]
        positions = torch.arange(total, device=ids.device)
        cand = slice(params.n_sink, total - params.recent_window)
        keep = {b: math.ceil(b * total) - protected for b in budgets}

        def on_attention(layer: int, probs: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
            view = AttentionView(key_positions=positions, query_positions=positions, attention=probs)
            exact = normalized(view)[0, :, cand].float().cpu()
            accumulated = view.mass()[0, :, cand].float().cpu()
            variants = []
            for i, fraction in enumerate(params.probe_fractions):
                seed = ((params.seed * 1009 + d) * 1009 + layer) * 101 + i
                view.generator = torch.Generator().manual_seed(seed)
                score = make_scorer(PROBE, params, fraction)(view)[0, :, cand].float().cpu()
                variants.append((f"probe@{fraction:g}", "normalized_attention", fraction, score, exact))
                rows = probe_rows(total, fraction, torch.Generator().manual_seed(seed), params.probe_recent_share)
                cost_rows.append(dict(doc=d, layer=layer, probe_fraction=fraction, queries_used=len(rows),
                                      queries_total=total, query_share=len(rows) / total,
                                      entry_share=float((rows + 1).sum()) / (total * (total + 1) / 2)))
            view.generator = torch.Generator().manual_seed(((params.seed * 1009 + d) * 1009 + layer) * 101 + 99)
            kf = keyformer(view)[0, :, cand].float().cpu()
            variants.append(("keyformer", "accumulated_attention", np.nan, kf, accumulated))
            for name, reference, fraction, score, ref in variants:
                overlaps = {f"overlap@{b:g}": _overlap(ref, score, keep[b]) for b in budgets}
                rho = rowwise_spearman(ref.numpy(), score.numpy())
                for h in range(score.shape[0]):
                    fid_rows.append(dict(doc=d, layer=layer, head=h, variant=name, reference=reference,
                                         probe_fraction=fraction, spearman=float(rho[h]),
                                         **{c: float(v[h]) for c, v in overlaps.items()}))

        with capture_attention(model, on_attention):
            model(ids, use_cache=False)
    return pd.DataFrame(fid_rows), pd.DataFrame(cost_rows)


def fidelity_summary(fidelity: pd.DataFrame, cost: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: its cost (query and attention-entry shares, mean over documents and layers) and its
    agreement with the reference (Spearman, :func:`rowwise_spearman`, mean and std over documents × layers × heads, mean top-k overlaps)."""
    overlap_cols = [c for c in fidelity.columns if c.startswith("overlap@")]
    g = fidelity.groupby(["variant", "reference"], sort=False)
    out = g[["spearman"] + overlap_cols].mean()
    out.insert(1, "spearman_std", g.spearman.std())
    out = out.reset_index()
    shares = cost.groupby("probe_fraction")[["query_share", "entry_share"]].mean()
    fraction = out.variant.str.extract(r"probe@(.*)")[0].astype(float)
    out.insert(2, "query_share", fraction.map(shares.query_share).fillna(1.0).values)
    out.insert(3, "entry_share", fraction.map(shares.entry_share).fillna(1.0).values)
    return out


def prefill_quality(model, docs: list[torch.Tensor], params: Params) -> pd.DataFrame:
    """Compress each document's head (all but the last ``continuation_tokens``) by every ``kl_scorers`` entry at
    every budget below 1, then score the tail on the compressed cache: one row per document × (uncompressed, then
    scorer × budget) with :func:`salience.kv_tasks.continuation_metrics`' columns (kl_mean, perplexity, ...)."""
    from ..kv_tasks import continuation_metrics

    budgets = [b for b in params.budgets if b < 1.0]
    frames = []
    for d, ids in enumerate(tqdm(docs, desc="prefill compression: documents", leave=False)):
        head, tail = ids[:, : -params.continuation_tokens], ids[:, -params.continuation_tokens :]
        scorers = {name: make_scorer(name, params) for name in params.kl_scorers}
        gen = torch.Generator().manual_seed(params.seed * 1000 + d)
        df = continuation_metrics(model, head, tail, scorers, budgets, n_sink=params.n_sink,
                                  recent_window=params.recent_window, generator=gen)
        frames.append(df.assign(doc=d))
    return pd.concat(frames, ignore_index=True)


def prefill_auc(quality: pd.DataFrame) -> pd.DataFrame:
    """Per scorer and document: area under mean KL vs budget (closed at 0 KL at budget 1) and under log-perplexity."""
    from ..kv_tasks import area_under_budget_curve

    frames = []
    for d, g in quality.groupby("doc"):
        kl = area_under_budget_curve(g, "kl_mean").set_index("scorer").auc.rename(KL_AUC.name)
        ppl = area_under_budget_curve(g.assign(log_ppl=np.log(g.perplexity)), "log_ppl")
        frames.append(pd.concat([kl, ppl.set_index("scorer").auc.rename(LOG_PERPLEXITY_AUC.name)], axis=1)
                      .reset_index().assign(doc=d))
    return pd.concat(frames, ignore_index=True)


def prefill_leaderboard(quality: pd.DataFrame, auc: pd.DataFrame) -> pd.DataFrame:
    """Mean KL and perplexity by budget, and the mean areas, one row per scorer (uncompressed first), best KL first."""
    wide = quality.pivot_table(index="scorer", columns="budget", values=["kl_mean", "perplexity"], aggfunc="mean")
    wide = wide.drop(columns=[c for c in wide.columns if c[1] == 1.0])
    wide.columns = [f"{'kl' if m == 'kl_mean' else 'ppl'}@{b:g}" for m, b in wide.columns]
    means = auc.groupby("scorer")[[KL_AUC.name, LOG_PERPLEXITY_AUC.name]].mean()
    wide = wide.join(means, how="outer").reset_index()
    wide.insert(1, "label", wide.scorer.map(LABELS).fillna(wide.scorer))
    return sort_by_metric(wide, KL_AUC).reset_index(drop=True)


def _wins(auc: pd.DataFrame, metric: str, better: str, worse: str) -> tuple[int, int, float] | None:
    """(documents where ``better``'s area is lower than ``worse``'s, documents, mean of worse − better)."""
    pivot = auc.pivot(index="doc", columns="scorer", values=metric)
    if better not in pivot or worse not in pivot:
        return None
    diff = pivot[worse] - pivot[better]
    return int((diff > 0).sum()), len(diff), float(diff.mean())


def extension_findings(fid_summary: pd.DataFrame, stream_auc: pd.DataFrame, quality_auc: pd.DataFrame,
                       params: Params, close_spearman: float = 0.9, close_overlap: float = 0.8) -> str:
    """Findings of the extension (Keyformer, probe approximation), every sentence computed from the tables.

    A probe fraction "tracks" the exact score when its mean Spearman is ≥ ``close_spearman`` **and** its mean top-k
    overlap is ≥ ``close_overlap`` at every budget below 1.
    """
    overlap_cols = [c for c in fid_summary.columns if c.startswith("overlap@")]
    probes = fid_summary[fid_summary.variant.str.startswith("probe@")]
    lines = []
    for _, r in probes.iterrows():
        ov = ", ".join(f"{r[c]:.0%} at {c.split('@')[1]}" for c in overlap_cols)
        lines.append(f"   - `{r.variant}`: {r.query_share:.1%} of the queries, {r.entry_share:.1%} of the attention "
                     f"entries; Spearman **{r.spearman:.3f}** (± {r.spearman_std:.3f}); kept-set overlap {ov}")
    tracking = probes[(probes.spearman >= close_spearman) & (probes[overlap_cols] >= close_overlap).all(axis=1)]
    if len(tracking):
        best = tracking.sort_values("query_share").iloc[0]
        verdict_probe = (f"the smallest probe share that tracks the exact score (rule: Spearman ≥ {close_spearman}, "
                         f"overlap ≥ {close_overlap:.0%} at every budget) is **{best.variant}**, at "
                         f"{best.entry_share:.1%} of the attention entries")
    else:
        verdict_probe = (f"no probe share tried tracks the exact score by the rule (Spearman ≥ {close_spearman} and "
                         f"overlap ≥ {close_overlap:.0%} at every budget)")
    why = ""
    if params.probe_recent_share > 0 and (probes.entry_share > probes.query_share).all():
        why = (f" The entry share exceeds the query share because {params.probe_recent_share:.0%} of the probes are "
               "the newest queries, which see the most keys.")
    text = f"""
### Extension: ZipCache's probe approximation and Keyformer

1. **Probe fidelity and cost** (per layer and head over the candidate keys, {params.n_documents} document(s)):
{chr(10).join(lines)}

   So {verdict_probe}.{why}
"""
    kf = fid_summary[fid_summary.variant == "keyformer"]
    parts = []

    def compare(auc, metric, a, b, what):
        w = _wins(auc, metric, a, b)
        if w is None:
            return None
        won, n, mean = w
        return (f"{LABELS[a]} lower than {LABELS[b]} on {won}/{n} document(s) ({what}; mean of {LABELS[b]} minus "
                f"{LABELS[a]}: {mean:+.4f}, positive when {LABELS[a]} is better)")

    for a, b in ((PROBE, "normalized_attention"), ("keyformer", "accumulated_attention"),
                 (PROBE, "random"), ("keyformer", "random")):
        for auc, metric, what in ((stream_auc, LOG_PERPLEXITY_AUC.name, "streamed log-ppl AUC"),
                                  (quality_auc, KL_AUC.name, "prefill KL AUC")):
            line = compare(auc, metric, a, b, what)
            if line:
                parts.append(f"   - {line}")
    text += "\n2. **Quality** (lower area is better; the probe scorer uses a share of "
    text += f"{params.probe_fraction:g} of the queries it is shown):\n" + "\n".join(parts) + "\n"
    if len(kf):
        k = kf.iloc[0]
        text += (f"\n3. **Keyformer** (τ = {params.keyformer_tau:g}) vs accumulated attention: Spearman "
                 f"**{k.spearman:.3f}**; the Gumbel noise changes "
                 + ", ".join(f"{1 - k[c]:.0%} of the kept set at {c.split('@')[1]}" for c in overlap_cols) + ".\n")
    text += (f"\nIn the streamed sweep a scorer that reads the attention matrix (probe, Keyformer) sees only the newest "
             f"chunk's {params.chunk_size} query rows (the harness keeps no older rows), so the probe there draws "
             f"{math.ceil(params.probe_fraction * params.chunk_size)} probes per chunk and Keyformer sums over that "
             "chunk; in the prefill-compression part both see every query of the prompt, ZipCache's own setting.\n")
    return text


def verdict(bias: pd.DataFrame, auc: pd.DataFrame, params: Params) -> tuple[str, str, str]:
    """The claim's verdict, computed from this run's numbers. Returns ``(label, one-line summary, Findings markdown)``.

    The claim has three parts, each judged by a stated rule:

    1. accumulated attention prefers early tokens: its mean position-Spearman is negative **and** more than
       ``top_fraction`` of its top tokens lie in the first ``top_fraction`` of the text;
    2. normalization removes that preference: normalized attention's |Spearman| and its early-share excess are each at
       most half of accumulated attention's;
    3. normalization evicts better: lower area under log-perplexity vs budget than accumulated attention on every
       document (higher on every document: fails; mixed: inconclusive).

    All three hold: supported. Part 1 fails or part 3 fails: not supported. Otherwise: partly supported (or inconclusive
    when part 3 is mixed).
    """
    b = bias.groupby("scorer")[["position_spearman", "early_share"]].mean()
    acc, norm = b.loc["accumulated_attention"], b.loc["normalized_attention"]
    q = params.top_fraction
    early_bias = acc.position_spearman < 0 and acc.early_share > q
    removed = (abs(norm.position_spearman) <= 0.5 * abs(acc.position_spearman)
               and abs(norm.early_share - q) <= 0.5 * abs(acc.early_share - q))
    reversed_ = norm.position_spearman > 0 and norm.early_share < q

    pivot = auc.pivot(index="doc", columns="scorer", values=LOG_PERPLEXITY_AUC.name)
    diff = pivot["accumulated_attention"] - pivot["normalized_attention"]  # > 0: normalized evicts better
    n = len(diff)
    evict = "holds" if (diff > 0).all() else "fails" if (diff < 0).all() else "mixed"

    if early_bias and removed and evict == "holds":
        label = "supported"
    elif not early_bias or evict == "fails":
        label = "not supported"
    elif evict == "mixed":
        label = "inconclusive"
    else:
        label = "partly supported"

    summary = (
        f"position-Spearman {acc.position_spearman:+.2f} (accumulated) vs {norm.position_spearman:+.2f} (normalized); "
        f"log-ppl AUC lower for normalized on {int((diff > 0).sum())}/{n} documents"
    )
    ranking = auc.groupby("scorer")[LOG_PERPLEXITY_AUC.name].mean().sort_values()
    order = ", ".join(f"{LABELS.get(s, s)} {v:.3f}" for s, v in ranking.items())
    spread = f"mean {diff.mean():+.4f}, min {diff.min():+.4f}, max {diff.max():+.4f} over {n} document(s)"
    if removed:
        part2 = "holds"
    elif reversed_:
        part2 = "does not hold: normalization reverses the preference toward recent tokens"
    else:
        part2 = "does not hold"
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run ({params.model}, {params.dataset}, {n} document(s) of
{params.context_tokens} tokens, seed {params.seed}). Position statistics exclude the {params.n_sink} sink tokens and
average over layers × heads; "early share" is the share of each layer's top {q:.0%} tokens that lie in the first
{q:.0%} of the text ({q:.0%} means no preference).

1. **Accumulated attention prefers early tokens** — {"holds" if early_bias else "does not hold"}: Spearman of score
   with position **{acc.position_spearman:+.3f}**, early share **{acc.early_share:.1%}**.
2. **Normalization removes the preference** — {part2}: Spearman **{norm.position_spearman:+.3f}**, early share
   **{norm.early_share:.1%}** (rule: both deviations at most half of accumulated attention's).
3. **Normalization evicts better** — {evict} ({int((diff > 0).sum())}/{n} documents). Area under log-perplexity vs
   budget, accumulated minus normalized: {spread}. Mean AUC by scorer, best first: {order}.
"""
    if n < 3:
        findings += (
            f"\nWith {n} document(s) the eviction comparison has no confidence interval worth the name; the GPU "
            "parameter set runs 16 documents.\n"
        )
    return label, summary, findings


def plot_bias(profile: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 3.6))
    data = profile.assign(scorer=profile.scorer.map(LABELS))
    sns.lineplot(data=data, x="bin_center", y="relative_score", hue="scorer", marker="o", errorbar=None, ax=ax)
    ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set(xlabel="token position", ylabel="score / its mean (log scale)", title="Mean score by position (sinks excluded)")
    ax.legend(title=None, frameon=False)
    fig.tight_layout()
    return fig


def plot_sweep(sweep: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns

    full = sweep[sweep.scorer == "full cache"].perplexity.mean()
    data = sweep[sweep.scorer != "full cache"].assign(scorer=lambda df: df.scorer.map(LABELS))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    sns.lineplot(data=data, x="budget", y="perplexity", hue="scorer", marker="o", errorbar=None, ax=ax)
    ax.axhline(full, color="k", lw=1, ls="--", label="full cache")
    ax.set(xlabel="KV budget (fraction of the text kept)", ylabel="perplexity (mean over documents)",
           title="Streamed perplexity under decode-time eviction")
    ax.legend(title=None, frameon=False)
    fig.tight_layout()
    return fig


def plot_fidelity(fid_summary: pd.DataFrame):
    """Spearman and kept-set overlap of the probe score with the exact score, against the share of attention entries
    the probes need."""
    import matplotlib.pyplot as plt

    probes = fid_summary[fid_summary.variant.str.startswith("probe@")].sort_values("entry_share")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.errorbar(probes.entry_share, probes.spearman, yerr=probes.spearman_std, marker="o", capsize=3,
                label="Spearman (± std over layers × heads)")
    for c in [c for c in probes.columns if c.startswith("overlap@")]:
        ax.plot(probes.entry_share, probes[c], marker="s", ls="--", label=f"kept-set overlap, budget {c.split('@')[1]}")
    for _, r in probes.iterrows():
        ax.annotate(f"{r.query_share:.0%} of queries", (r.entry_share, r.spearman), textcoords="offset points",
                    xytext=(4, -12), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="share of attention entries the probe rows need (log scale)", ylabel="agreement with exact score",
           title="ZipCache probe approximation vs exact normalized attention")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_prefill_quality(quality: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = quality[quality.scorer != "uncompressed"].assign(scorer=lambda df: df.scorer.map(LABELS))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.lineplot(data=data, x="budget", y="kl_mean", hue="scorer", marker="o", errorbar=None, ax=ax)
    ax.set_yscale("log")
    ax.set(xlabel="KV budget (fraction of the compressed head kept)", ylabel="mean KL(full ∥ compressed), nats",
           title="Prefill compression: KL of the continuation's next-token distributions")
    ax.legend(title=None, frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
