"""Notebook ``kv-value-aware``: do value vectors make better eviction scores than attention alone?

Prefill compression of Wikipedia contexts (query-agnostic, one kept set per KV head). Per document **one**
uncompressed forward pass of context + continuation (:func:`salience.kv_tasks.continuation_runs`) captures every
layer's attention, keys and values; every scorer ranks the context keys from the context's own rows; and

1. **attention-output error, per layer**: the continuation's queries are attended over the kept context keys (plus
   the continuation's own keys) instead of all of them: the relative error ``‖o_kept − o_full‖ / ‖o_full‖`` of the
   attention output (all heads concatenated), averaged over the continuation's queries. Each layer is measured in
   isolation (its queries, keys and values are the full model's), from the same captured pass;
2. **KL to the full cache** of the continuation fed on the really compressed cache, where the errors of all layers
   compound (the compressed caches are gathered from the same pass's cache and fed in batches).

Value-aware scorers: VATP [@vatp] (accumulated attention × ‖v‖₁) and CAOTE [@caote] (the attention-output error of
evicting a key). Their attention-only counterparts: accumulated attention (H2O [@h2o]) for VATP, window attention
(SnapKV's score without pooling over the same last queries CAOTE reads [@snapkv]) for CAOTE. Normalized attention
(ZipCache [@zipcache]) and random are context; the uncompressed and oracle rows (the continuation's own attention)
frame every table. The window's own keys are protected for every scorer (``recent_window ≥ window``), so window
attention's window and CAOTE's are kept alike.

Claim parts (:func:`judge_claim`), each paired over documents, on the per-document mean over budgets (and, for the
output error, over layers): each value-aware scorer against its attention-only counterpart, output error and KL.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator

from ..evidence import Claim, PartRule, PartSpec, fmt_interval, judge
from ..harness.kv_prefill import SharedPrefill
from ..harness.kv_prefill_compression import context_protection, select_kept
from ..kv_tasks import BASELINE, ORACLE, continuation_runs, wikipedia_continuations
from ..scorers.spec import ScorerList, build_scorers
from ..validation import checked_budget
from .kv_params import BudgetRatios, KVParams, check_protection_fits, check_windows_protected, mean_interval
from .param_checks import check_labels

TITLE = "Value-aware eviction: VATP and CAOTE vs the attention-only scores they build on"
CLAIM = (
    "Attention weights alone miss what the values carry: scoring cached tokens by attention × value norm (VATP) or "
    "by the attention-output error of evicting them (CAOTE) keeps a cache whose attention output is closer to the "
    "full cache's, layer by layer, and whose continuation stays closer to the full model (lower KL), than the "
    "attention-only score each builds on, at the same budget."
)
PAPERS = ["vatp", "caote", "h2o", "snapkv", "zipcache"]
#: the claim's pairs: value-aware role → (the papers it tests, the attention-only role it builds on)
PAIR_PAPERS = {"vatp": ("vatp", "h2o"), "caote": ("caote", "snapkv")}
ERROR, KL = "output_error", "kl"
LOWER = {ERROR: "lower attention-output error", KL: "lower continuation KL"}

PART_SPECS = tuple(
    PartSpec(f"{role}_{what}", f"{role.upper()} keeps a {LOWER[what]} than the attention-only score it builds on",
             "relative attention-output error (mean over layers and budgets)" if what == ERROR
             else "KL(full ∥ compressed) of the continuation (nats, mean over budgets)",
             "document", higher_is_better=False, papers=PAIR_PAPERS[role])
    for role in PAIR_PAPERS for what in (ERROR, KL))


class Params(KVParams):
    """Parameters of ``kv-value-aware``; defaults in ``params/kv-value-aware.yaml``."""

    notebook = "kv-value-aware"

    scorers: ScorerList = Field(min_length=4, description="the scorers compared, one spec each")
    pairs: dict[str, list[str]] = Field(description="vatp / caote: [value-aware label, attention-only label]")
    n_documents: int = Field(ge=2, le=256, description="Wikipedia (context, continuation) pairs: the claim's units")
    context_tokens: int = Field(ge=32, le=32768, description="tokens compressed per document")
    continuation_tokens: int = Field(ge=2, le=4096, description="tokens fed after compression")
    budgets: BudgetRatios = Field(description="kept-cache ratios of the context, in (0, 1)")
    parts: dict[str, PartRule] = Field(description="direction and smallest effect of each claim part")

    judged = PART_SPECS

    @field_validator("pairs")
    @classmethod
    def _pair_roles(cls, pairs: dict[str, list[str]]) -> dict[str, list[str]]:
        if set(pairs) != set(PAIR_PAPERS) or any(len(p) != 2 for p in pairs.values()):
            raise ValueError(f"pairs must map exactly {sorted(PAIR_PAPERS)} to [value-aware label, attention-only "
                             f"label], got {pairs}")
        return pairs

    @model_validator(mode="after")
    def _fits(self) -> "Params":
        check_labels([label for pair in self.pairs.values() for label in pair], self.scorers, "pairs")
        check_windows_protected(self.scorers, self.recent_window)
        for spec in self.scorers:
            window = spec.options.get("window")
            if window is not None and window > self.context_tokens:
                raise ValueError(f"{spec.key}: window ({window}) is longer than the context ({self.context_tokens} "
                                 f"tokens): use window in [1, {self.context_tokens}]")
        check_protection_fits(self.budgets, self.context_tokens, self.n_sink, self.recent_window)
        return self


def documents(params: Params, tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_documents`` seeded Wikipedia ``(context (1, C), continuation (1, N))`` pairs."""
    return wikipedia_continuations(tokenizer, n=params.n_documents, context_tokens=params.context_tokens,
                                   continuation_tokens=params.continuation_tokens, seed=params.seed)


def output_errors(rows: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, context_len: int) -> torch.Tensor:
    """Relative error of the attention output of the queries after the context, for several kept sets at once.

    Args:
        rows: ``(1, H_q, N, T)`` attention of the ``N`` queries after the context over all ``T`` keys (context
            ``[0, C)`` then the queries' own).
        values: ``(1, H_kv, T, D)``.
        kept: ``(S, H_kv, C)`` bool, the context keys each of ``S`` kept sets keeps per KV head; the keys after the
            context always stay.
        context_len: ``C``.

    Returns ``(S,)``: per set, the mean over the queries of ``‖o_kept − o_full‖ / ‖o_full‖``, the norms taken over
    all heads concatenated (the vector the output projection reads). ``o_kept`` renormalizes each query's attention
    over the kept keys, which equals a softmax over the kept keys' logits.
    """
    _, h_q, _, t = rows.shape
    h_kv = values.shape[1]
    if h_q % h_kv:
        raise ValueError(f"{h_q} query heads are not a multiple of {h_kv} KV heads")
    if not 0 < context_len < t:
        raise ValueError(f"context_len must lie in [1, {t - 1}] so that some keys follow it, got {context_len}")
    if kept.dim() != 3 or kept.shape[1:] != (h_kv, context_len):
        raise ValueError(f"kept must be (sets, H_kv={h_kv}, C={context_len}) bool, got {tuple(kept.shape)}")
    groups = h_q // h_kv
    after = torch.ones(*kept.shape[:2], t - context_len, dtype=torch.float32, device=rows.device)
    keep = torch.cat([kept.to(rows.device, torch.float32), after], dim=-1).repeat_interleave(groups, dim=1)
    v = values[0].float().repeat_interleave(groups, dim=0)  # (H_q, T, D)
    a = rows[0].float()  # (H_q, N, T)
    full = (a @ v).transpose(0, 1).flatten(1)  # (N, H_q·D)
    kept_a = a[None] * keep[:, :, None, :]  # (S, H_q, N, T)
    compressed = ((kept_a / kept_a.sum(-1, keepdim=True)) @ v).transpose(1, 2).flatten(2)  # (S, N, H_q·D)
    return ((compressed - full).norm(dim=-1) / full.norm(dim=-1)).mean(dim=-1)


def output_error(rows: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, context_len: int) -> float:
    """:func:`output_errors` of one kept set given as ``(H_kv, b)`` kept context indices per KV head."""
    mask = torch.zeros(kept.shape[0], context_len, dtype=torch.bool, device=kept.device)
    mask.scatter_(1, kept, True)
    return float(output_errors(rows, values, mask[None], context_len)[0])


def prefill_errors(prefill: SharedPrefill, params: Params) -> list[dict]:
    """Every entry's (and the oracle's) output error per budget and layer, from one shared prefill (with the
    continuation's attention rows kept): rows of scorer, budget, budget_tokens, layer, output_error. All kept sets
    of a layer are measured in one batched product."""
    c = prefill.context_len
    values = [layer.values for layer in prefill.cache.layers]
    num_kv_heads = values[0].shape[1]
    protect = context_protection(c, n_sink=params.n_sink, recent_window=params.recent_window,
                                 device=values[0].device)
    sets, masks = [], []
    for key, scores in prefill.scores.items():
        label = key[1]
        for budget in params.budgets:
            tokens = checked_budget(budget, c, n_sink=params.n_sink, recent_window=params.recent_window)
            kept, _ = select_kept(scores, tokens, protect, num_kv_heads, params.head_mode,
                                  layout=prefill.layouts[key])  # (layers, H_kv, b)
            mask = torch.zeros(*kept.shape[:2], c, dtype=torch.bool, device=kept.device)
            sets.append((label, budget, tokens))
            masks.append(mask.scatter_(-1, kept, True))
    masks = torch.stack(masks, dim=1)  # (layers, S, H_kv, C)
    rows = []
    for layer, attention in enumerate(prefill.rows_attention):
        errors = output_errors(attention, values[layer], masks[layer], c).tolist()
        rows += [dict(scorer=label, budget=budget, budget_tokens=tokens, layer=layer, output_error=error)
                 for (label, budget, tokens), error in zip(sets, errors)]
    return rows


def run_documents(model, tokenizer, params: Params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(errors, continuation)``: per document the output errors (:func:`prefill_errors`) and the continuation
    rows (:func:`salience.kv_tasks.continuation_runs`, uncompressed and oracle first), from one prefill each."""
    errors: list[dict] = []

    def measure(doc: int, prefill: SharedPrefill) -> None:
        errors.extend(dict(doc=doc, **row) for row in prefill_errors(prefill, params))

    continuation = continuation_runs(model, documents(params, tokenizer), build_scorers(params.scorers),
                                     params.budgets, head_mode=params.head_mode, n_sink=params.n_sink,
                                     recent_window=params.recent_window, seed=params.seed, tokenizer=tokenizer,
                                     batch_size=params.batch_size, on_prefill=measure)
    return pd.DataFrame(errors), continuation


def summary(errors: pd.DataFrame, continuation: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per entry (uncompressed and oracle first) and budget: mean output error (over layers, then documents) and
    mean KL over documents, each with its 95% bootstrap interval over documents (the uncompressed row: 0)."""
    err = errors.groupby(["scorer", "budget", "doc"]).output_error.mean()
    rows = []
    for (label, budget), g in continuation.groupby(["scorer", "budget"], sort=False):
        e = (err.loc[(label, budget)].to_numpy() if label != BASELINE else np.zeros(len(g)))
        row = {"scorer": label, "budget": budget, "documents": len(g)}
        for name, values in ((ERROR, e), (KL, g.kl_mean.to_numpy(dtype=float))):
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = mean_interval(values, params.seed)
        rows.append(row)
    return pd.DataFrame(rows)


def per_document(errors: pd.DataFrame, continuation: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Documents × entries: the mean output error over layers and budgets, and the mean KL over budgets."""
    rows = continuation[continuation.scorer != BASELINE]
    return {ERROR: errors.groupby(["doc", "scorer"]).output_error.mean().unstack("scorer"),
            KL: rows.groupby(["doc", "scorer"]).kl_mean.mean().unstack("scorer")}


def judge_claim(errors: pd.DataFrame, continuation: pd.DataFrame, params: Params) -> Claim:
    """Each value-aware scorer against its attention-only counterpart, per document (module docstring)."""
    wide = per_document(errors, continuation)
    parts = []
    for spec in PART_SPECS:
        role, what = spec.id.split("_", 1)
        aware, base = params.pairs[role]
        parts.append(judge(spec, params.parts[spec.id], wide[what][aware], wide[what][base], seed=params.seed,
                           detail=f"{aware} against {base}, budgets {', '.join(f'{b:g}' for b in params.budgets)}"))
    setting = (f"{params.model} on {params.device} (the papers: 7B-class models, LongBench); {params.n_documents} "
               f"Wikipedia contexts of {params.context_tokens} tokens compressed query-agnostically "
               f"{'per KV head' if params.head_mode == 'per_kv_head' else 'with one set for all heads'}, "
               f"{params.continuation_tokens}-token continuations; every scorer keeps {params.n_sink} sinks and the "
               f"last {params.recent_window} context tokens. The output error measures each layer in isolation from "
               "one captured pass; the KL feeds the continuation on the really compressed cache.")
    notes = []
    if all(ORACLE in wide[what] for what in (ERROR, KL)):
        shown = {what: fmt_interval(*mean_interval(wide[what][ORACLE], params.seed), sign=False)
                 for what in (ERROR, KL)}
        notes.append(f"Oracle (the continuation's own attention, same budgets), mean over documents [95% CI]: output "
                     f"error {shown[ERROR]}, KL {shown[KL]} nats: what a kept set can reach at these budgets.")
    return Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                 setting=setting, notes=notes, seed=params.seed)


def layer_wins(errors: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Descriptive: per pair and budget, the share of (document, layer) cells where the value-aware scorer's output
    error is below its counterpart's, and the mean error ratio (value-aware ÷ attention-only)."""
    wide = errors.pivot_table(index=["budget", "doc", "layer"], columns="scorer", values="output_error")
    rows = []
    for aware, base in params.pairs.values():
        ratio = wide[aware] / wide[base]
        for b, r in ratio.groupby("budget"):
            rows.append(dict(scorer=aware, baseline=base, budget=b, layers_better=float((r < 1).mean()),
                             error_ratio=float(r.mean())))
    return pd.DataFrame(rows)


def plot_errors_by_layer(errors: pd.DataFrame, budget: float):
    import matplotlib.pyplot as plt
    import seaborn as sns

    sel = errors[errors.budget == budget]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    sns.lineplot(data=sel, x="layer", y="output_error", hue="scorer", marker=".", errorbar=None, ax=ax)
    ax.set(yscale="log", xlabel="layer", ylabel="relative attention-output error",
           title=f"Attention-output error per layer at budget {budget:g} (mean over documents)")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_budget_curves(table: pd.DataFrame, params: Params):
    """Output error and KL vs budget with 95% intervals over documents; value-aware pairs solid, others dashed."""
    import matplotlib.pyplot as plt

    paired = {label for pair in params.pairs.values() for label in pair}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, g in table[table.scorer != BASELINE].groupby("scorer", sort=False):
        style = "-" if label in paired else "--"
        for ax, col in zip(axes, (ERROR, KL)):
            ax.errorbar(g.budget, g[col], yerr=[g[col] - g[f"{col}_lo"], g[f"{col}_hi"] - g[col]], fmt=style,
                        marker="o", capsize=2, label=label)
    axes[0].set(xlabel="KV budget (share of the context)", ylabel="relative output error (mean over layers)",
                yscale="log", title="Attention-output error")
    axes[1].set(xlabel="KV budget (share of the context)", ylabel="KL to the full cache (nats)", yscale="log",
                title="Continuation KL")
    axes[1].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig
