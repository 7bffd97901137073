"""What the streaming-eviction notebooks (``kv-normalized-attention``, ``kv-sinks-and-separators``) share: their
common parameters, documents of one length, batched streams as a tidy table, and the harness's proof of eviction.

Every stream of a notebook runs through :func:`salience.harness.kv_streaming.stream_batch`: one uncompressed trunk
per document (batched over documents; it is also the full-cache baseline), every (scorer, budget, protection) row
forked from it at its first eviction and streamed in batches of ``max_rows`` rows.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from tqdm import tqdm  # text bars: stored notebooks stay readable without widgets

from ..harness.kv_streaming import Stream, StreamResult, TrunkObserver, stream_batch
from ..params import ModelName, NotebookParams
from ..scorers.spec import ScorerSpec

FULL = "full cache"


class StreamingParams(NotebookParams):
    """Parameters both streaming notebooks have (no defaults here: they live in ``params/<notebook>.yaml``)."""

    model: ModelName = Field(description="embedded model name, local folder or Hugging Face id")
    dataset: Literal["wikipedia", "news"] = Field(description="text data set the documents come from")
    n_documents: int = Field(ge=2, le=1000, description="documents: the units every claim part is paired over")
    context_tokens: int = Field(ge=64, le=131072, description="tokens per document (longer ones are cut, shorter "
                                                              "ones skipped)")
    chunk_size: int = Field(ge=1, le=4096, description="tokens per forward pass between evictions")
    max_rows: int = Field(ge=1, le=4096, description="streams per batched forward pass")


def load_documents(params: StreamingParams, tokenizer) -> torch.Tensor:
    """``(n_documents, context_tokens)`` ids: seeded texts of at least ``context_tokens`` tokens, each cut to it."""
    from ..data import load_text_dataset

    texts = load_text_dataset(params.dataset)["text"]
    order = np.random.default_rng(params.seed).permutation(len(texts))
    docs = []
    for i in order:
        ids = tokenizer(texts[int(i)], return_tensors="pt").input_ids
        if ids.shape[1] >= params.context_tokens:
            docs.append(ids[0, : params.context_tokens])
        if len(docs) == params.n_documents:
            return torch.stack(docs).to(params.device)
    raise ValueError(f"only {len(docs)} {params.dataset} documents have >= {params.context_tokens} tokens; lower "
                     "n_documents or context_tokens")


def stable_seed(seed: int, *parts: object) -> int:
    """A generator seed per (run seed, parts...), identical on every machine and independent of the other rows."""
    return (int(seed) * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % (2**63)


@dataclass(frozen=True)
class Row:
    """One stream of a notebook: what it is called in the tables (``key``) and how it runs."""

    key: dict[str, Any]
    doc: int
    scorer: ScorerSpec
    budget: int
    n_sink: int
    recent_window: int
    seed: int = 0

    @property
    def identity(self) -> tuple:
        """Rows with the same identity stream the same tokens the same way: run once."""
        return (self.doc, self.scorer.model_dump_json(exclude={"label"}), self.budget, self.n_sink, self.recent_window,
                self.seed)


@dataclass
class StreamRun:
    """Outcome of :func:`run_streams`: one table row per :class:`Row` (in order), the full-cache rows, and each
    row's :class:`StreamResult`."""

    table: pd.DataFrame
    full: pd.DataFrame
    results: list[StreamResult] = field(default_factory=list)


def run_streams(model, docs: torch.Tensor, rows: list[Row], params: StreamingParams, *, head_mode: str = "shared",
                roles=None, tokenizer=None, observe: TrunkObserver | None = None, desc: str = "streams") -> StreamRun:
    """Stream every row (identical rows once) through :func:`~salience.harness.kv_streaming.stream_batch`.

    ``table`` columns: the row's key columns, doc, budget, n_sink, recent_window, log_ppl (mean NLL per predicted
    token, nats), perplexity, evictions, cache_len_min / cache_len_max (the smallest and largest cache length any
    layer of this row held after an eviction, as recorded and asserted by the harness), peak_cache_len. ``full``:
    doc, log_ppl, perplexity of each document with the whole cache (the trunk).
    """
    first: dict[tuple, Row] = {}
    for r in rows:
        first.setdefault(r.identity, r)
    unique = {identity: i for i, identity in enumerate(first)}
    streams = [Stream(doc=r.doc, scorer=r.scorer.build(), budget=r.budget, n_sink=r.n_sink,
                      recent_window=r.recent_window, generator=torch.Generator().manual_seed(r.seed))
               for r in first.values()]
    total = _work(streams, docs.shape[0], docs.shape[1], params.chunk_size)
    with tqdm(total=total, desc=desc, unit="tok", mininterval=10) as bar:
        batch = stream_batch(model, docs, streams, chunk_size=params.chunk_size, roles=roles, tokenizer=tokenizer,
                             head_mode=head_mode, max_rows=params.max_rows, observe=observe, progress=bar.update)
    results = [batch.results[unique[r.identity]] for r in rows]
    records = []
    for r, res in zip(rows, results):
        lengths = [n for step in res.cache_lengths for n in step]
        records.append({**r.key, "doc": r.doc, "budget": r.budget, "n_sink": r.n_sink, "recent_window": r.recent_window,
                        "log_ppl": res.nll_sum / res.n_predicted, "perplexity": res.perplexity,
                        "evictions": res.evictions, "cache_len_min": min(lengths, default=np.nan),
                        "cache_len_max": max(lengths, default=np.nan), "peak_cache_len": res.peak_cache_len})
    full = pd.DataFrame([{"doc": d, "log_ppl": f.nll_sum / f.n_predicted, "perplexity": f.perplexity}
                         for d, f in enumerate(batch.full)])
    return StreamRun(table=pd.DataFrame(records), full=full, results=results)


def _work(streams: list[Stream], docs: int, total: int, chunk_size: int) -> int:
    """Tokens × rows the batch will process: the trunk plus every row from its first eviction on."""
    stops = [min(s + chunk_size, total) for s in range(0, total, chunk_size)]
    work = docs * total
    for s in streams:
        fork = next((stop for stop in stops if stop >= s.budget + 1), total)
        work += total - fork
    return work


def eviction_proof(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group (e.g. budget): the runs, the range of cache lengths every layer held after an eviction (recorded
    and asserted by the harness: always the budget) and the range of eviction steps; counts only."""
    g = table.groupby(by)
    return pd.DataFrame({"runs": g.size(), "cache_len_min": g.cache_len_min.min().astype(int),
                         "cache_len_max": g.cache_len_max.max().astype(int), "evictions_min": g.evictions.min(),
                         "evictions_max": g.evictions.max()}).reset_index()


__all__ = ["FULL", "Row", "StreamRun", "StreamingParams", "eviction_proof", "load_documents", "run_streams",
           "stable_seed"]
