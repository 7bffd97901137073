"""Notebook ``kv-normalized-attention``: is accumulated attention biased toward early tokens, and does ZipCache's
normalisation remove the bias and evict better?

H2O [@h2o] keeps the keys with the largest accumulated attention; ZipCache [@zipcache] divides it by the number of
queries that can see each key; A2SF [@a2sf] decays it with a forgetting factor; Keyformer [@keyformer] regularises
it with Gumbel noise. Three analyses on a causal LM and real text, every one over the same ``n_documents`` documents
of ``context_tokens`` tokens:

1. **Bias** (:mod:`~salience.experiments.kv_score_statistics`): one captured prefill per document; per layer and
   head, Spearman's ρ of accumulated and normalized scores with position (sinks excluded), the mean relative score by
   position and the early share of the top tokens. The same prefill measures how closely the approximate scores
   (ZipCache's probe score, Keyformer) track the exact scores they stand for, and at what share of the queries.
2. **Streamed eviction** (:func:`~salience.harness.kv_streaming.stream_batch`): each document streamed in chunks
   through a cache of each budget (a ratio of its length) under each scorer of ``scorers``, all keeping the same
   sinks and recent window; the task is perplexity. Per document and scorer: the area under log-perplexity vs budget
   (the full cache closes every curve at budget 1).
3. **Prefill compression** (:func:`salience.kv_tasks.continuation_runs`): each document's head compressed once by each
   scorer of ``prefill_scorers`` at each budget (query-agnostic, ZipCache's own setting, in which the probes are drawn
   from every prompt query), the tail scored as a continuation: KL to the uncompressed model; an oracle row.

Claim parts (:func:`judge_claim`, :mod:`salience.evidence`, paired over documents):

* ``accumulated_prefers_early`` (one-sample): accumulated attention's score falls with position, −ρ > 0;
* ``normalization_removes_preference``: normalized attention's score depends less on position, mean |ρ| smaller;
* ``normalized_evicts_better``: normalized attention's streamed area under log-perplexity is lower.

The approximations (probe score, Keyformer) and the other scorers are described with paired intervals but do not
enter the verdict.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from ..evidence import (Claim, PartRule, PartSpec, fmt_interval, judge, judge_one_sample,
                        paired_interval)
from ..kv_tasks import area_under_budget_curve, continuation_runs
from ..metrics import LOG_PERPLEXITY_AUC, area_under_curve
from ..scorers.spec import ScorerList, build_scorers
from .kv_score_statistics import REFERENCE, ScoreStatistics, bias_per_document, score_statistics
from .kv_streaming_common import FULL, Row, StreamingParams, StreamRun, run_streams, stable_seed

TITLE = "Normalized vs accumulated attention for KV-cache eviction"
CLAIM = (
    "Accumulated attention (H2O) is biased toward early tokens because early keys are seen by more queries; "
    "normalizing by the number of queries that can see each key (ZipCache) removes the bias and evicts better."
)
PAPERS = ["zipcache", "h2o", "a2sf", "keyformer"]
#: the claim's arms: keys of ``Params.arms`` and the registered scorer each must be
ARMS = {"accumulated": "accumulated_attention", "normalized": "normalized_attention"}
KL_AUC = "kl_auc"

PART_SPECS = (
    PartSpec("accumulated_prefers_early", "accumulated attention's score falls with position (prefers early tokens)",
             "−ρ(accumulated score, position), mean over layers × heads", "document", papers=("h2o", "zipcache")),
    PartSpec("normalization_removes_preference", "normalized attention's score depends less on position than "
             "accumulated attention's", "absolute ρ(score, position), mean over layers × heads", "document",
             higher_is_better=False, papers=("zipcache",)),
    PartSpec("normalized_evicts_better", "normalized attention evicts better than accumulated attention in a "
             "streamed cache", "area under log-perplexity vs budget (nats/token)", "document",
             higher_is_better=False, papers=("zipcache", "h2o")),
)


class Params(StreamingParams):
    """Parameters of ``kv-normalized-attention``; defaults in ``params/kv-normalized-attention.yaml``."""

    notebook = "kv-normalized-attention"

    budgets: list[float] = Field(min_length=2, description="kept-cache ratios of the document in (0, 1); the full "
                                                           "cache (1) closes every curve")
    scorers: ScorerList = Field(min_length=2, description="scorers of the streamed eviction sweep")
    arms: dict[str, str] = Field(description="labels in `scorers` of the accumulated and normalized arms")
    approximations: ScorerList = Field(description="approximate scores compared with the exact score they stand "
                                                   "for in the prefill (probe score, Keyformer)")
    prefill_scorers: ScorerList = Field(min_length=1, description="scorers of the prefill-compression part")
    continuation_tokens: int = Field(ge=2, le=4096, description="document tail scored after prefill compression")
    n_sink: int = Field(ge=0, le=1024, description="initial tokens every scorer keeps (attention sinks)")
    recent_window: int = Field(ge=0, le=4096, description="newest tokens every scorer keeps")
    head_mode: Literal["shared", "per_kv_head"] = Field(description="one kept set per layer, or one per KV head")
    position_bins: int = Field(ge=2, le=256, description="bins of the bias-by-position figure")
    top_fraction: float = Field(gt=0.0, lt=1.0, description="share of tokens counted as 'kept' in the early share")
    parts: dict[str, PartRule] = Field(description="direction and smallest effect of each claim part")

    @field_validator("budgets")
    @classmethod
    def _ratios(cls, budgets: list[float]) -> list[float]:
        bad = [b for b in budgets if not 0.0 < b < 1.0]
        if bad:
            raise ValueError(f"every budget must be a ratio in (0, 1) (the full cache is always included), got {bad}")
        return sorted(set(budgets))

    judged = PART_SPECS

    @field_validator("approximations")
    @classmethod
    def _approximations(cls, specs: ScorerList) -> ScorerList:
        bad = [s.key for s in specs if s.name not in REFERENCE]
        if bad:
            raise ValueError(f"approximations {bad} must be scorers with a reference score: {sorted(REFERENCE)}")
        return specs

    @model_validator(mode="after")
    def _fits(self) -> "Params":
        names = {s.key: s.name for s in self.scorers}
        if set(self.arms) != set(ARMS) or any(names.get(label) != ARMS[arm] for arm, label in self.arms.items()):
            raise ValueError(f"arms must map {list(ARMS)} to labels in `scorers` of {list(ARMS.values())} entries, got "
                             f"{self.arms} (labels: {names})")
        protected = self.n_sink + self.recent_window
        smallest = math.ceil(min(self.budgets) * self.context_tokens)
        if protected > smallest:
            raise ValueError(f"the smallest budget ({min(self.budgets)} x {self.context_tokens} = {smallest} tokens) "
                             f"must hold n_sink + recent_window = {protected} protected tokens")
        if not 2 <= self.continuation_tokens <= self.context_tokens // 2:
            raise ValueError(f"continuation_tokens must lie in [2, {self.context_tokens // 2}] (half of "
                             f"context_tokens = {self.context_tokens}), got {self.continuation_tokens}")
        head = self.context_tokens - self.continuation_tokens
        if protected > math.ceil(min(self.budgets) * head):
            raise ValueError(f"the smallest budget of the compressed head ({min(self.budgets)} x {head} tokens) must "
                             f"hold n_sink + recent_window = {protected} protected tokens")
        return self

    def budget_tokens(self, ratio: float) -> int:
        return math.ceil(ratio * self.context_tokens)


def bias_and_fidelity(model, docs, params: Params) -> ScoreStatistics:
    """Positional bias of the exact scores and fidelity of the approximations (one captured prefill per batch)."""
    return score_statistics(model, docs, n_sink=params.n_sink, recent_window=params.recent_window,
                            budgets=params.budgets, bins=params.position_bins, top_fraction=params.top_fraction,
                            approximations=build_scorers(params.approximations), seed=params.seed,
                            batch_size=params.max_rows)


def stream_sweep(model, docs, params: Params) -> StreamRun:
    """Every scorer × budget × document, streamed (see :func:`~salience.experiments.kv_streaming_common.run_streams`);
    the table's key columns: scorer, ratio."""
    rows = [Row({"scorer": spec.key, "ratio": ratio}, d, spec, params.budget_tokens(ratio), params.n_sink,
                params.recent_window, stable_seed(params.seed, spec.key, d))
            for d in range(docs.shape[0]) for ratio in params.budgets for spec in params.scorers]
    return run_streams(model, docs, rows, params, head_mode=params.head_mode,
                       desc="streaming: trunk + scorers x budgets x documents")


def stream_auc(run: StreamRun, params: Params) -> pd.DataFrame:
    """Documents × scorers: area under log-perplexity vs budget ratio, every curve closed by the full cache at 1."""
    full = run.full.set_index("doc").log_ppl
    out = {}
    for (label, d), g in run.table.groupby(["scorer", "doc"], sort=False):
        g = g.sort_values("ratio")
        out.setdefault(label, {})[d] = area_under_curve([*g.ratio, 1.0], [*g.log_ppl, full[d]])
    table = pd.DataFrame(out)
    table[FULL] = full
    return table.rename_axis("doc")


def stream_board(run: StreamRun, auc: pd.DataFrame) -> pd.DataFrame:
    """One row per scorer (full cache first): perplexity (exp of the mean log-perplexity over documents) at each
    budget and the mean area, best area first."""
    wide = np.exp(run.table.pivot_table(index="scorer", columns="ratio", values="log_ppl", aggfunc="mean"))
    wide.columns = [f"ppl@{c:g}" for c in wide.columns]
    wide.loc[FULL] = float(np.exp(run.full.log_ppl.mean()))
    wide[LOG_PERPLEXITY_AUC.name] = auc.mean()
    wide = wide.sort_values(LOG_PERPLEXITY_AUC.name)
    return wide.rename_axis("scorer").reset_index()


def prefill_quality(model, docs, params: Params) -> pd.DataFrame:
    """Each document's head (all but the last ``continuation_tokens``) compressed by every ``prefill_scorers`` entry
    and the oracle at every budget; the tail scored on the compressed cache
    (:func:`salience.kv_tasks.continuation_runs`'s columns: kl_mean, perplexity, cache_len, ...)."""
    tail = params.continuation_tokens
    pairs = [(docs[d : d + 1, :-tail], docs[d : d + 1, -tail:]) for d in range(docs.shape[0])]
    return continuation_runs(model, pairs, build_scorers(params.prefill_scorers), params.budgets, oracle=True,
                             head_mode=params.head_mode, n_sink=params.n_sink, recent_window=params.recent_window,
                             seed=params.seed, batch_size=params.max_rows)


def prefill_auc(quality: pd.DataFrame) -> pd.DataFrame:
    """Documents × scorers (uncompressed and oracle included): area under mean KL vs budget, closed at 0 KL at 1."""
    frames = {d: area_under_budget_curve(g, "kl_mean").set_index("scorer").auc for d, g in quality.groupby("doc")}
    return pd.DataFrame(frames).T.rename_axis("doc")


def compared_pairs(labels: dict[str, str], control: str = "random") -> list[tuple[str, str]]:
    """``(a, b)`` pairs to describe: each approximation against the exact score it stands for (:data:`REFERENCE`),
    and every scorer against the ``control`` entry. ``labels``: ``{label: registered name}``."""
    by_name = {}
    for label, name in labels.items():
        by_name.setdefault(name, label)
    pairs = [(label, by_name[REFERENCE[name]]) for label, name in labels.items()
             if name in REFERENCE and REFERENCE[name] in by_name]
    pairs += [(label, by_name[control]) for label, name in labels.items() if control in by_name and name != control]
    return pairs


def paired_summary(values: pd.DataFrame, pairs: list[tuple[str, str]], metric: str, seed: int) -> pd.DataFrame:
    """Descriptive paired comparisons over documents (rows of ``values``): per pair, the mean of a − b with its 95%
    interval (:func:`salience.evidence.paired_interval`, the evidence layer's bootstrap)."""
    rows = []
    for a, b in pairs:
        diff = (values[a] - values[b]).to_numpy(dtype=float)
        lo, hi, _ = paired_interval(diff, seed=stable_seed(seed, metric, a, b))
        rows.append({"a": a, "b": b, "metric": metric, "n": len(diff), "a_mean": float(values[a].mean()),
                     "b_mean": float(values[b].mean()), "effect": float(diff.mean()), "ci_low": lo, "ci_high": hi,
                     "effect a−b [95% CI]": fmt_interval(float(diff.mean()), lo, hi)})
    return pd.DataFrame(rows)


def against_accumulated(auc: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Every other streamed scorer's area against the accumulated arm's (:func:`paired_summary`)."""
    acc = params.arms["accumulated"]
    pairs = [(spec.key, acc) for spec in params.scorers if spec.key != acc]
    return paired_summary(auc, pairs, LOG_PERPLEXITY_AUC.name, params.seed)


def fidelity_summary(fid_doc: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Per approximation: cost shares and mean Spearman / overlaps over documents, Spearman with its 95% interval."""
    rows = []
    for variant, g in fid_doc.groupby("variant", sort=False):
        lo, hi, _ = paired_interval(g.spearman.to_numpy(), seed=stable_seed(seed, "fidelity", variant))
        row = {"variant": variant, "reference": g.reference.iloc[0], "n": len(g),
               "query_share": g.query_share.mean(), "entry_share": g.entry_share.mean(),
               "spearman [95% CI]": fmt_interval(g.spearman.mean(), lo, hi, sign=False)}
        row.update({c: g[c].mean() for c in g.columns if c.startswith("overlap@")})
        rows.append(row)
    return pd.DataFrame(rows)


def judge_claim(bias: pd.DataFrame, auc: pd.DataFrame, params: Params) -> Claim:
    """The three parts, paired over documents (see the module docstring)."""
    per_doc = bias_per_document(bias).pivot(index="doc", columns="scorer")
    specs, rules = {s.id: s for s in PART_SPECS}, params.parts
    acc, norm = params.arms["accumulated"], params.arms["normalized"]
    budgets = ", ".join(f"{b:g}" for b in params.budgets)
    parts = [
        judge_one_sample(specs["accumulated_prefers_early"], rules["accumulated_prefers_early"],
                         -per_doc["rho"]["accumulated_attention"], seed=params.seed,
                         detail=f"prefill scores, the first {params.n_sink} (sink) tokens excluded"),
        judge(specs["normalization_removes_preference"], rules["normalization_removes_preference"],
              per_doc["abs_rho"]["normalized_attention"], per_doc["abs_rho"]["accumulated_attention"],
              seed=params.seed, detail=f"mean ρ: accumulated {per_doc['rho']['accumulated_attention'].mean():+.2f}, "
                                       f"normalized {per_doc['rho']['normalized_attention'].mean():+.2f} (a sign "
                                       "flip is a preference for recent tokens)"),
        judge(specs["normalized_evicts_better"], rules["normalized_evicts_better"], auc[norm], auc[acc],
              seed=params.seed, detail=f"{norm} against {acc}, budgets {budgets} and the full cache"),
    ]
    setting = (f"{params.model} on {params.device} (the papers: 7B-class models, long contexts, GPUs); "
               f"{params.n_documents} {params.dataset} documents of {params.context_tokens} tokens. Bias: scores of "
               f"one prefill per document, per layer and head. Eviction: decode-time, the text streamed in chunks of "
               f"{params.chunk_size} tokens through a cache of each budget ({budgets} of the document), "
               f"{params.head_mode.replace('_', ' ')} kept sets, every scorer keeping the first {params.n_sink} and "
               f"the newest {params.recent_window} tokens; ZipCache itself compresses once after the prefill (the "
               "prefill-compression table) and quantises rather than evicts.")
    notes = [f"Streamed eviction: in the stream a scorer that reads attention rows (probe score, Keyformer) sees "
             f"only the newest chunk's {params.chunk_size} rows; in the prefill part it sees every prompt query.",
             "The approximations and the other scorers are described with paired intervals and do not enter the "
             "verdict."]
    return Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts, setting=setting,
                 notes=notes, seed=params.seed)


__all__ = ["ARMS", "CLAIM", "KL_AUC", "PAPERS", "PART_SPECS", "Params", "TITLE", "against_accumulated",
           "bias_and_fidelity", "compared_pairs", "fidelity_summary", "judge_claim", "paired_summary", "prefill_auc",
           "prefill_quality", "stream_auc", "stream_board", "stream_sweep"]
