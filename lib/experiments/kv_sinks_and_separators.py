"""Notebook ``kv-sinks-and-separators``: what breaks when the attention sinks go, and do separators earn their place?

StreamingLLM [@streamingllm] keeps the first tokens (attention sinks) and a recent window; SepLLM [@sepllm] keeps the
initial tokens, the separator tokens (``. , ? ! ; :`` and newlines, as summaries of their segments) and a recent
window. On a causal LM streaming real text (:func:`salience.harness.kv_streaming.stream_batch`: decode-time
eviction at a fixed cache size, every policy's rows batched and forked from one uncompressed stream per document):

1. **Policies × cache sizes.** Streaming log-perplexity per document for every eviction policy in ``policies``: a
   scorer (one YAML line, as everywhere) plus which protections it gets (the first ``n_sink`` tokens; a recent
   window of ``recent_share`` × the cache). StreamingLLM = recency behind the sinks; the recent-only window = recency
   without them; SepLLM and its controls keep the same sinks and recent window and fill the rest with separators
   (newest first), random tokens, or (GPU set) accumulated attention.
2. **Sink sweep** (descriptive): StreamingLLM's scorer at ``sink_budget`` with each of ``sink_counts`` sinks.
3. **Attention by token role**, read off the uncompressed stream's own attention rows (no extra prefill): per
   document and layer, the attention queries (from position ``min_query`` on) pay to the sinks, the separators and
   the ordinary tokens, against their share of the visible keys.

Claim parts (:func:`judge_claim`, :mod:`salience.evidence`, paired over documents; the perplexity parts on the
document's log-perplexity averaged over the cache sizes, so both arms see the same sizes):

* ``sinks_needed``: StreamingLLM streams with lower log-perplexity than the recent-only window;
* ``separators_attended``: a separator receives more attention than an ordinary token (one-sample: the mean over
  layers of log(attention per separator ÷ attention per ordinary token) above 0; sinks are neither);
* ``sepllm_beats_streamingllm`` and ``sepllm_beats_random``: SepLLM streams with lower log-perplexity than
  StreamingLLM and than the random control, at equal cache size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..evidence import Claim, PartRule, PartSpec, judge, judge_one_sample
from ..scorers import separator_mask
from ..scorers.spec import ScorerSpec
from .kv_streaming_common import FULL, Row, StreamingParams, StreamRun, run_streams, stable_seed

TITLE = "Attention sinks and separators: StreamingLLM and SepLLM under streaming eviction"
CLAIM = (
    "Evicting the first tokens (attention sinks) breaks streaming: StreamingLLM streams better than a recent-only "
    "window of the same cache size. Separator tokens draw disproportionate attention, and keeping them streams "
    "better than sinks + recent window (StreamingLLM) and than a random control of the same cache size (SepLLM)."
)
PAPERS = ["streamingllm", "sepllm"]
#: the claim's arms: keys of ``Params.arms``
ARMS = ("streamingllm", "recent_only", "sepllm", "random_control")
LOG_PPL = "log-perplexity (nats/token), mean over cache sizes"

PART_SPECS = (
    PartSpec("sinks_needed", "StreamingLLM (sinks + recent) streams better than the recent-only window of the same "
             "cache size", LOG_PPL, "document", higher_is_better=False, papers=("streamingllm",)),
    PartSpec("separators_attended", "a separator receives more attention than an ordinary token",
             "log(attention per separator ÷ per ordinary token), mean over layers", "document", papers=("sepllm",)),
    PartSpec("sepllm_beats_streamingllm", "SepLLM streams better than StreamingLLM at equal cache size", LOG_PPL,
             "document", higher_is_better=False, papers=("sepllm",)),
    PartSpec("sepllm_beats_random", "SepLLM streams better than a random control with the same sinks and recent "
             "window", LOG_PPL, "document", higher_is_better=False, papers=("sepllm",)),
)


class Policy(BaseModel):
    """One eviction policy: a scorer and the protections it gets at every cache size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(min_length=1, description="the policy's name in tables and in `arms`")
    scorer: ScorerSpec = Field(description="the scorer that fills the unprotected part of the cache")
    sinks: bool = Field(description="keep the first n_sink tokens")
    recent: bool = Field(description="protect a recent window of recent_share x the cache size")


class Params(StreamingParams):
    """Parameters of ``kv-sinks-and-separators``; defaults in ``params/kv-sinks-and-separators.yaml``."""

    notebook = "kv-sinks-and-separators"

    budgets: list[int] = Field(min_length=1, description="cache sizes in tokens, each below context_tokens")
    policies: list[Policy] = Field(min_length=2, description="eviction policies compared at every cache size")
    arms: dict[str, str] = Field(description="the policy label of each arm of the claim: streamingllm, recent_only, "
                                             "sepllm, random_control")
    n_sink: int = Field(ge=1, le=1024, description="initial tokens kept by the policies with sinks")
    recent_share: float = Field(gt=0.0, lt=1.0, description="share of the cache protected as the recent window (for "
                                                            "the policies with a recent window)")
    sink_budget: int = Field(ge=2, le=131072, description="cache size of the sink sweep, below context_tokens")
    sink_counts: list[int] = Field(min_length=2, description="initial tokens kept in the sink sweep (include 0)")
    min_query: int = Field(ge=1, le=131072, description="attention statistics use the queries from this position on")
    parts: dict[str, PartRule] = Field(description="direction and smallest effect of each claim part")

    @field_validator("budgets", "sink_counts")
    @classmethod
    def _sorted_unique(cls, values: list[int]) -> list[int]:
        return sorted(set(values))

    judged = PART_SPECS

    @model_validator(mode="after")
    def _fits(self) -> "Params":
        labels = [p.label for p in self.policies]
        if len(set(labels)) != len(labels):
            raise ValueError(f"policy labels must be unique, got {labels}")
        if set(self.arms) != set(ARMS) or not set(self.arms.values()) <= set(labels):
            raise ValueError(f"arms must map exactly {list(ARMS)} to policy labels ({', '.join(labels)}), got "
                             f"{self.arms}")
        too_big = [b for b in [*self.budgets, self.sink_budget] if b >= self.context_tokens]
        if too_big:
            raise ValueError(f"cache sizes {too_big} must be below context_tokens ({self.context_tokens}): a cache "
                             "that holds the whole text never evicts")
        smallest = min(self.budgets)
        if self.n_sink + recent_tokens(smallest, self.recent_share) > smallest:
            raise ValueError(f"the smallest budget ({smallest}) must hold n_sink ({self.n_sink}) + its recent window "
                             f"({recent_tokens(smallest, self.recent_share)}): raise it or lower n_sink / recent_share")
        if max(self.sink_counts) >= self.sink_budget:
            raise ValueError(f"sink_counts must stay below sink_budget ({self.sink_budget}), got "
                             f"{max(self.sink_counts)}")
        if 0 not in self.sink_counts:
            raise ValueError("sink_counts must include 0 (the window without sinks)")
        if self.min_query >= self.context_tokens:
            raise ValueError(f"min_query must be below context_tokens ({self.context_tokens}), got {self.min_query}")
        return self

    def policy(self, arm: str) -> Policy:
        """The policy playing ``arm`` (a key of :data:`ARMS`)."""
        return next(p for p in self.policies if p.label == self.arms[arm])


def recent_tokens(budget: int, share: float) -> int:
    return int(round(budget * share))


def protection(policy: Policy, budget: int, params: Params) -> tuple[int, int]:
    """``(n_sink, recent_window)`` of ``policy`` at a cache of ``budget`` tokens."""
    return (params.n_sink if policy.sinks else 0,
            recent_tokens(budget, params.recent_share) if policy.recent else 0)


def document_separators(docs: torch.Tensor, tokenizer) -> torch.Tensor:
    """``(D, T)`` bool mask of each document's separator tokens (SepLLM's set, :func:`salience.scorers.separator_mask`).
    Raises ValueError when a document has none (its separator statistics would be undefined)."""
    mask = separator_mask(docs.cpu(), tokenizer).to(docs.device)
    empty = [d for d in range(mask.shape[0]) if not mask[d].any()]
    if empty:
        raise ValueError(f"documents {empty} hold no separator token")
    return mask


def stream_rows(docs: torch.Tensor, params: Params) -> list[Row]:
    """Every policy × cache size × document, then the sink sweep (StreamingLLM's scorer at ``sink_budget``)."""
    rows = []
    for d in range(docs.shape[0]):
        for budget in params.budgets:
            for p in params.policies:
                n_sink, recent = protection(p, budget, params)
                rows.append(Row({"sweep": "policies", "policy": p.label}, d, p.scorer, budget, n_sink, recent,
                                scorer_seed(params, p.scorer, d)))
        streaming = params.policy("streamingllm")
        for count in params.sink_counts:
            _, recent = protection(streaming, params.sink_budget, params)
            rows.append(Row({"sweep": "sinks", "policy": streaming.label}, d, streaming.scorer, params.sink_budget,
                            count, recent, scorer_seed(params, streaming.scorer, d)))
    return rows


def scorer_seed(params: Params, spec: ScorerSpec, doc: int) -> int:
    """One seed per scorer setting and document, so rows that stream alike (the sink sweep's 0 and ``n_sink``
    sinks, the policies' recency rows) are identical and run once."""
    return stable_seed(params.seed, spec.model_dump_json(exclude={"label"}), doc)


class RoleAttention:
    """Attention the uncompressed stream's queries pay to each token role, per document and layer.

    Pass an instance as ``observe=`` to :func:`~salience.harness.kv_streaming.stream_batch`: every chunk's attention
    rows ``(D, H, Q, K)`` of the queries at positions ``>= min_query`` are reduced on the fly. Roles: the sinks
    (``sink``, ``(D, T)`` bool), the separators that are not sinks, and the ordinary tokens (neither).
    """

    ROLES = ("sink", "separator", "ordinary")

    def __init__(self, sink: torch.Tensor, separator: torch.Tensor, min_query: int) -> None:
        sink = sink.to(torch.bool)
        separator = separator.to(torch.bool) & ~sink
        self.masks = torch.stack([sink, separator, ~(sink | separator)], dim=-1).float().cpu()  # (D, T, 3)
        self.counts = self.masks.cumsum(dim=1)  # keys of each role among positions 0..p
        self.min_query = min_query
        self.sums: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, layer: int, probs: torch.Tensor, positions: torch.Tensor, docs: range | None = None) -> None:
        """Reduce one chunk's rows ``probs`` ``(B, H, Q, K)`` of the queries at ``positions`` of documents ``docs``
        (default: all, in order)."""
        keep = positions >= self.min_query
        if not bool(keep.any()):
            return
        docs = range(self.masks.shape[0]) if docs is None else docs
        rows, at = probs[:, :, keep].float(), positions[keep]
        heads = rows.shape[1]
        masks = self.masks[docs.start : docs.stop, : rows.shape[-1]].to(rows.device)
        mass = torch.einsum("dhqk,dkr->dr", rows, masks)  # (B, 3) summed over heads and queries
        counts = self.counts[docs.start : docs.stop][:, at.cpu()]  # (B, Q', 3)
        share = counts / (at.cpu() + 1).to(counts)[None, :, None]
        acc = self.sums.setdefault(layer, {"mass": torch.zeros(self.masks.shape[0], 3, dtype=torch.float64),
                                           "count": torch.zeros(self.masks.shape[0], 3, dtype=torch.float64),
                                           "share": torch.zeros(self.masks.shape[0], 3, dtype=torch.float64),
                                           "rows": torch.zeros(self.masks.shape[0], dtype=torch.float64)})
        acc["mass"][docs.start : docs.stop] += mass.double().cpu()
        acc["count"][docs.start : docs.stop] += heads * counts.sum(dim=1).double()
        acc["share"][docs.start : docs.stop] += heads * share.sum(dim=1).double()
        acc["rows"][docs.start : docs.stop] += heads * int(at.numel())

    def table(self) -> pd.DataFrame:
        """doc, layer; per role its mean attention mass per query (``*_mass``) and mean share of the visible keys
        (``*_share``); ``sink_enrichment`` = mass ÷ share; ``separator_per_token`` and ``ordinary_per_token`` = the
        attention one such token receives per query (summed mass ÷ summed count); ``separator_ratio`` = their ratio."""
        records = []
        for layer, acc in sorted(self.sums.items()):
            mass, share = acc["mass"] / acc["rows"][:, None], acc["share"] / acc["rows"][:, None]
            per_token = acc["mass"] / acc["count"].clamp(min=1.0)
            for d in range(mass.shape[0]):
                row = {"doc": d, "layer": layer}
                for i, role in enumerate(self.ROLES):
                    row[f"{role}_mass"], row[f"{role}_share"] = float(mass[d, i]), float(share[d, i])
                row["sink_enrichment"] = row["sink_mass"] / row["sink_share"]
                row["separator_per_token"], row["ordinary_per_token"] = float(per_token[d, 1]), float(per_token[d, 2])
                row["separator_ratio"] = row["separator_per_token"] / row["ordinary_per_token"]
                records.append(row)
        return pd.DataFrame(records)


def run(model, docs: torch.Tensor, separators: torch.Tensor, params: Params) -> tuple[StreamRun, pd.DataFrame]:
    """Every stream of the notebook and the attention statistics of the uncompressed streams.

    Returns the :class:`~salience.experiments.kv_streaming_common.StreamRun` (its table gains ``separators_kept``,
    the share of the row's final cache, over layers, that is separator tokens) and :meth:`RoleAttention.table`.
    """
    sinks = torch.arange(docs.shape[1], device=docs.device)[None].expand_as(docs) < params.n_sink
    roles = RoleAttention(sinks, separators, params.min_query)
    out = run_streams(model, docs, stream_rows(docs, params), params, roles={"separator": separators},
                      observe=roles, desc="streaming: trunk + policies x cache sizes x documents")
    sep = separators.cpu()
    out.table["separators_kept"] = [float(sep[d][r.kept_positions.cpu()].float().mean())
                                    for d, r in zip(out.table.doc, out.results)]
    out.full["separators_kept"] = sep.float().mean(dim=1).numpy()  # the whole cache: the document's share
    return out, roles.table()


def per_document(table: pd.DataFrame, sweep: str = "policies") -> pd.DataFrame:
    """Documents × policies: log-perplexity averaged over the cache sizes."""
    sel = table[table.sweep == sweep]
    return sel.pivot_table(index="doc", columns="policy", values="log_ppl", aggfunc="mean")


def budget_table(out: StreamRun) -> pd.DataFrame:
    """Perplexity (exp of the mean log-perplexity over documents) per policy and cache size, the full cache first,
    and the mean share of separators in the final cache (for the full cache: in the documents)."""
    pol = out.table[out.table.sweep == "policies"]
    wide = pol.pivot_table(index="policy", columns="budget", values="log_ppl", aggfunc="mean", sort=False)
    wide = np.exp(wide)
    wide.columns = [f"ppl@{c}" for c in wide.columns]
    wide["separators_kept"] = pol.groupby("policy", sort=False).separators_kept.mean()
    full = {c: float(np.exp(out.full.log_ppl.mean())) for c in wide.columns if c.startswith("ppl@")}
    full["separators_kept"] = float(out.full.separators_kept.mean())
    return pd.concat([pd.DataFrame([full], index=[FULL]), wide]).rename_axis("policy").reset_index()


def sink_table(out: StreamRun) -> pd.DataFrame:
    """Sink sweep: per number of sinks, perplexity (exp of the mean log-perplexity over documents), the full cache's
    and their ratio."""
    sweep = out.table[out.table.sweep == "sinks"]
    g = sweep.groupby("n_sink").log_ppl.mean()
    full = float(out.full.log_ppl.mean())
    return pd.DataFrame({"n_sink": g.index, "perplexity": np.exp(g.values), "full_perplexity": np.exp(full),
                         "ratio_to_full": np.exp(g.values - full)})


def mass_summary(mass: pd.DataFrame) -> pd.DataFrame:
    """Per layer, means over documents of the role statistics."""
    return mass.drop(columns="doc").groupby("layer").mean().reset_index()


def separator_log_ratio(mass: pd.DataFrame) -> pd.Series:
    """Per document: the mean over layers of log(attention per separator ÷ attention per ordinary token)."""
    return np.log(mass.separator_ratio).groupby(mass.doc).mean()


def judge_claim(out: StreamRun, mass: pd.DataFrame, params: Params) -> Claim:
    """The four parts, paired over documents (see the module docstring)."""
    per_doc = per_document(out.table)
    arm = {a: per_doc[params.arms[a]] for a in ARMS}
    specs, rules = {s.id: s for s in PART_SPECS}, params.parts
    sizes = ", ".join(map(str, params.budgets))
    parts = [
        judge(specs["sinks_needed"], rules["sinks_needed"], arm["streamingllm"], arm["recent_only"], seed=params.seed,
              detail=f"{params.arms['streamingllm']} against {params.arms['recent_only']}, cache sizes {sizes}"),
        judge_one_sample(specs["separators_attended"], rules["separators_attended"], separator_log_ratio(mass),
                         seed=params.seed, detail=f"queries at positions >= {params.min_query} of the uncompressed "
                                                  f"stream, all heads; sinks (first {params.n_sink}) are neither"),
        judge(specs["sepllm_beats_streamingllm"], rules["sepllm_beats_streamingllm"], arm["sepllm"],
              arm["streamingllm"], seed=params.seed,
              detail=f"{params.arms['sepllm']} against {params.arms['streamingllm']}, cache sizes {sizes}"),
        judge(specs["sepllm_beats_random"], rules["sepllm_beats_random"], arm["sepllm"], arm["random_control"],
              seed=params.seed,
              detail=f"{params.arms['sepllm']} against {params.arms['random_control']}, cache sizes {sizes}"),
    ]
    ms = mass_summary(mass)
    kept = out.table[out.table.sweep == "policies"].groupby("policy").separators_kept.mean()
    notes = [
        f"Sinks (descriptive): the first {params.n_sink} tokens receive {ms.sink_mass.mean():.0%} of the attention, "
        f"averaged over layers, while being {ms.sink_share.mean():.1%} of the visible keys.",
        f"Separators are {float(ms.separator_share.mean()):.0%} of the visible keys; they fill "
        f"{kept[params.arms['sepllm']]:.0%} of {params.arms['sepllm']}'s final cache and "
        f"{kept[params.arms['streamingllm']]:.0%} of {params.arms['streamingllm']}'s.",
    ]
    setting = (f"{params.model} on {params.device} (the papers: 7B-class models streaming up to millions of tokens "
               f"through caches of thousands); {params.n_documents} {params.dataset} documents of "
               f"{params.context_tokens} tokens streamed in chunks of {params.chunk_size} with decode-time eviction "
               f"after each chunk, one kept set per layer, cache sizes {sizes} tokens. Policies with sinks keep the "
               f"first {params.n_sink} tokens; SepLLM and the controls protect a recent window of "
               f"{params.recent_share:g} × the cache; separators are the tokens made of `. , ? ! ; :` and newlines. "
               "Perplexity parts use each document's log-perplexity averaged over the cache sizes; the separator part "
               "reads the attention rows of the uncompressed stream.")
    return Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts, setting=setting,
                 notes=notes, seed=params.seed)
