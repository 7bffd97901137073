"""Every token's score from one captured prefill per document: the positional bias of accumulated (H2O [@h2o]) and
normalized (ZipCache [@zipcache]) attention, and how closely approximate scores track the exact ones they stand for.

One eager forward pass per batch of documents hands each layer's attention ``(B, H, T, T)`` to a callback that
reduces it on the spot (no logits, no cache kept):

* **Bias.** Accumulated attention ``Σ_q a_{q,k}`` and normalized attention (the same ÷ the number of queries that see
  ``k``), per layer and head, sinks excluded: Spearman's ρ of score with position (0 = no positional preference),
  the mean relative score by position bin, and the share of each layer's top ``top_fraction`` tokens (head-averaged,
  as a shared eviction ranks) that lie in the first ``top_fraction`` of the text.
* **Fidelity.** Each approximate scorer (ZipCache's probe score [@zipcache] from a share of the queries; Keyformer's
  Gumbel-regularised score [@keyformer]) is computed from the same attention and compared per layer and head with its
  reference (:data:`REFERENCE`) over the candidate keys (neither the sinks nor the recent window, which eviction keeps
  anyway): Spearman's ρ and the overlap of the kept sets at each budget. Cost of a probe score: the share of the
  queries and of the causal attention entries (``q·k`` products: ``QKᵀ`` and softmax FLOPs) its probe rows need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from tqdm import tqdm  # text bars: stored notebooks stay readable without widgets

from ..harness import capture_attention
from ..scorers import AttentionView, ProbeNormalizedAttention, Scorer, probe_rows
from .kv_streaming_common import stable_seed

#: the exact score each approximate scorer (by registered name) stands for
REFERENCE = {"normalized_attention_probe": "normalized_attention", "keyformer": "accumulated_attention"}
EXACT = ("accumulated_attention", "normalized_attention")


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman ρ of each row of ``a (R, K)`` with the same row of ``b`` (or with ``b (K,)``): Pearson correlation of
    ``scipy.stats.rankdata`` ranks (ties averaged), what ``scipy.stats.spearmanr`` computes for one pair, here for
    all rows at once. A constant row gives NaN."""
    ra = rankdata(a, axis=-1)
    rb = rankdata(np.broadcast_to(b, a.shape), axis=-1)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    denom = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(-1) / denom


def kept_overlap(reference: torch.Tensor, score: torch.Tensor, k: int) -> np.ndarray:
    """Per head, the share of ``reference``'s top ``k`` keys (``(H, K)`` scores) that ``score``'s top ``k`` keep too."""
    if k < 1:
        return np.full(reference.shape[0], np.nan)
    hits = torch.zeros_like(reference, dtype=torch.bool).scatter_(-1, reference.topk(k, dim=-1).indices, True)
    return (hits.gather(-1, score.topk(k, dim=-1).indices).sum(-1).float() / k).numpy()


@dataclass
class ScoreStatistics:
    """Tables of :func:`score_statistics`.

    Attributes:
        profile: scorer, doc, layer, bin_center, relative_score (mean score in the bin ÷ the mean over non-sink
            positions, averaged over heads; 1 = average).
        bias: scorer, doc, layer, rho (mean over heads of ρ(score, position)), abs_rho (mean over heads of |ρ|),
            early_share.
        fidelity: doc, layer, head, variant, reference, spearman, ``overlap@<budget>`` per budget.
        cost: doc, variant, probe_fraction, queries_used, query_share, entry_share (probe scorers only; one row per
            document and layer).
    """

    profile: pd.DataFrame
    bias: pd.DataFrame
    fidelity: pd.DataFrame
    cost: pd.DataFrame


@torch.inference_mode()
def score_statistics(model, docs: torch.Tensor, *, n_sink: int, recent_window: int, budgets: list[float],
                     bins: int, top_fraction: float, approximations: dict[str, Scorer], seed: int,
                     batch_size: int = 8) -> ScoreStatistics:
    """Bias and fidelity statistics of ``docs`` ``(D, T)`` (see the module docstring); ``approximations``:
    ``{label: scorer}``, each scorer's registered name a key of :data:`REFERENCE`."""
    unknown = sorted({s.name for s in approximations.values()} - set(REFERENCE))
    if unknown:
        raise ValueError(f"no reference score for {unknown}; approximations must be among {sorted(REFERENCE)}")
    total = docs.shape[1]
    if not 0 <= n_sink < total - recent_window:
        raise ValueError(f"n_sink ({n_sink}) + recent_window ({recent_window}) leave no candidate key in {total}")
    positions = torch.arange(total, device=docs.device)
    visible = (total - positions).float()
    candidates = slice(n_sink, total - recent_window)
    keep = {b: math.ceil(b * total) - n_sink - recent_window for b in budgets}
    edges = np.linspace(0, total - n_sink, bins + 1).astype(int)
    non_sink_positions = np.arange(n_sink, total)
    records: dict[str, list[dict]] = {"profile": [], "bias": [], "fidelity": [], "cost": []}
    first = 0

    def on_attention(layer: int, probs: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        mass = probs.float().sum(dim=-2)  # (B, H, T)
        exact = {"accumulated_attention": mass, "normalized_attention": mass / visible}
        for b in range(probs.shape[0]):
            d = first + b
            for name, score in exact.items():
                _bias_rows(records, name, d, layer, score[b, :, n_sink:].cpu().numpy(), non_sink_positions, edges,
                           n_sink, top_fraction)
            for label, scorer in approximations.items():
                gen_seed = stable_seed(seed, d, layer, label)
                view = AttentionView(key_positions=positions, query_positions=positions, attention=probs[b : b + 1],
                                     generator=torch.Generator().manual_seed(gen_seed))
                approx = scorer(view)[0, :, candidates].float().cpu()
                reference = REFERENCE[scorer.name]
                ref = exact[reference][b, :, candidates].cpu()
                rho = rowwise_spearman(ref.numpy(), approx.numpy())
                overlaps = {f"overlap@{bud:g}": kept_overlap(ref, approx, k) for bud, k in keep.items()}
                for h in range(approx.shape[0]):
                    records["fidelity"].append({"doc": d, "layer": layer, "head": h, "variant": label,
                                                "reference": reference, "spearman": float(rho[h]),
                                                **{c: float(v[h]) for c, v in overlaps.items()}})
                if isinstance(scorer, ProbeNormalizedAttention):
                    rows = probe_rows(total, scorer.probe_fraction, torch.Generator().manual_seed(gen_seed),
                                      scorer.recent_share)
                    records["cost"].append({"doc": d, "layer": layer, "variant": label,
                                            "probe_fraction": scorer.probe_fraction, "queries_used": len(rows),
                                            "query_share": len(rows) / total,
                                            "entry_share": float((rows + 1).sum()) / (total * (total + 1) / 2)})

    with capture_attention(model, on_attention):
        for first in tqdm(range(0, docs.shape[0], batch_size), desc="prefill: scores of every token", leave=False):
            model(docs[first : first + batch_size], use_cache=False, logits_to_keep=1)
    return ScoreStatistics(**{name: pd.DataFrame(rows) for name, rows in records.items()})


def _bias_rows(records, name, doc, layer, s: np.ndarray, positions: np.ndarray, edges, n_sink, top_fraction) -> None:
    """Profile and bias rows of one scorer's ``(H, T')`` non-sink scores in one layer of one document."""
    rel = (s / s.mean(axis=-1, keepdims=True)).mean(axis=0)  # (T',) head-averaged relative score
    for lo, hi in zip(edges[:-1], edges[1:]):
        records["profile"].append({"scorer": name, "doc": doc, "layer": layer, "bin_center": n_sink + (lo + hi - 1) / 2,
                                   "relative_score": float(rel[lo:hi].mean())})
    rho = rowwise_spearman(s, positions.astype(float))
    t = s.shape[-1]
    k = max(1, int(round(top_fraction * t)))
    top = np.argsort(-s.mean(axis=0), kind="stable")[:k]
    records["bias"].append({"scorer": name, "doc": doc, "layer": layer, "rho": float(rho.mean()),
                            "abs_rho": float(np.abs(rho).mean()),
                            "early_share": float((top < top_fraction * t).mean())})


def bias_per_document(bias: pd.DataFrame) -> pd.DataFrame:
    """Per scorer and document: means over layers of rho, abs_rho and early_share."""
    return bias.groupby(["scorer", "doc"])[["rho", "abs_rho", "early_share"]].mean().reset_index()


def fidelity_per_document(fidelity: pd.DataFrame, cost: pd.DataFrame) -> pd.DataFrame:
    """Per variant and document: Spearman and overlaps averaged over layers × heads, and the probe cost shares (1
    for a variant that reads every query)."""
    cols = ["spearman"] + [c for c in fidelity.columns if c.startswith("overlap@")]
    out = fidelity.groupby(["variant", "reference", "doc"], sort=False)[cols].mean().reset_index()
    shares = (cost.groupby(["variant", "doc"])[["query_share", "entry_share"]].mean() if len(cost)
              else pd.DataFrame(columns=["query_share", "entry_share"]))
    out = out.join(shares, on=["variant", "doc"])
    return out.fillna({"query_share": 1.0, "entry_share": 1.0})


__all__ = ["EXACT", "REFERENCE", "ScoreStatistics", "bias_per_document", "fidelity_per_document", "kept_overlap",
           "rowwise_spearman", "score_statistics"]
