"""Notebook ``kv-value-aware``: do value vectors make better eviction scores than attention alone?

Two analyses on a causal LM, prefill compression of Wikipedia contexts (query-agnostic, one kept set per KV head):

1. **Attention-output reconstruction, per layer.** One prefill of context + continuation with every layer's attention,
   keys and values captured. Each scorer ranks the context keys from the context's own attention (what
   :func:`~salience.harness.compress_prefill` sees), the budget is selected exactly as the harness selects it, and the
   continuation's queries are attended over the kept context keys (plus the continuation's own keys) instead of all
   of them. Reported: the relative error ``‖o_kept − o_full‖ / ‖o_full‖`` of the attention output (all heads
   concatenated), per layer and budget, averaged over the continuation's queries. Each layer is measured in
   isolation: its queries, keys and values are the full model's.
2. **Perplexity and KL to the full cache** of the continuation fed on the really compressed cache
   (:func:`salience.kv_tasks.continuation_metrics`), where the errors of all layers compound.

Value-aware scorers: VATP (accumulated attention × ‖v‖₁, s184) and CAOTE (attention-output error of evicting a
key, s223). Their attention-only counterparts: accumulated attention (H2O) for VATP, window attention (SnapKV's score
without pooling, the same last queries CAOTE reads) for CAOTE; normalized attention (ZipCache) and random as context.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm  # text bars: stored notebooks stay readable without widgets

from ..harness import capture_attention
from ..params import ModelName, NotebookParams
from ..scorers import AttentionView, Scorer, get_scorer
from ..selection import protected_mask, reduce_to_kv_heads, resolve_budget, select_topk

TITLE = "Value-aware eviction: VATP (s184) and CAOTE (s223) vs attention-only scores"
CLAIM = (
    "Attention weights alone miss what the values carry: scoring cached tokens by attention × value norm (VATP) or "
    "by the attention-output error of evicting them (CAOTE) keeps a cache whose attention output is closer to the "
    "full cache's, layer by layer, and whose continuation stays closer to the full model (lower KL and perplexity), "
    "than the attention-only score each builds on, at the same budget."
)
ScorerName = Literal["accumulated_attention", "vatp", "window_attention", "caote", "normalized_attention", "random"]
SCORERS = ("accumulated_attention", "vatp", "window_attention", "caote", "normalized_attention", "random")
#: value-aware scorer → the attention-only score it builds on
PAIRS = {"vatp": "accumulated_attention", "caote": "window_attention"}
LABELS = {
    "uncompressed": "full cache",
    "accumulated_attention": "accumulated attention (H2O)",
    "vatp": "VATP (attention × ‖v‖₁)",
    "window_attention": "window attention (last queries)",
    "caote": "CAOTE (output error, last queries)",
    "normalized_attention": "normalized attention (ZipCache)",
    "random": "random",
}


class Params(NotebookParams):
    """Parameters of ``kv-value-aware`` (defaults: the CPU run, about two minutes on 2 cores)."""

    notebook = "kv-value-aware"

    model: ModelName = Field("smollm2-135m", description="embedded model name, local folder or Hugging Face id")
    n_documents: int = Field(2, ge=1, le=256, description="Wikipedia (context, continuation) pairs")
    context_tokens: int = Field(256, ge=32, le=32768, description="tokens compressed per document")
    continuation_tokens: int = Field(32, ge=2, le=4096, description="tokens fed after compression")
    budgets: list[float] = Field([0.1, 0.25, 0.5], min_length=1, description="kept-cache ratios of the context")
    scorers: list[ScorerName] = Field(list(SCORERS), min_length=4, description="scorers compared")
    window: int = Field(16, ge=1, le=4096, description="last context queries read by CAOTE and window attention")
    n_sink: int = Field(4, ge=0, le=1024, description="first context tokens every scorer keeps")
    recent_window: int = Field(8, ge=0, le=4096, description="last context tokens every scorer keeps")

    @field_validator("budgets")
    @classmethod
    def _ratios(cls, budgets: list[float]) -> list[float]:
        bad = [b for b in budgets if not 0.0 < b < 1.0]
        if bad:
            raise ValueError(f"every budget must be a ratio in (0, 1) (1 keeps everything), got {bad}")
        return sorted(set(budgets))

    @field_validator("scorers")
    @classmethod
    def _pairs_present(cls, scorers: list[str]) -> list[str]:
        missing = [s for pair in PAIRS.items() for s in pair if s not in scorers]
        if missing:
            raise ValueError(f"scorers must include both members of each pair {PAIRS}; missing {missing}")
        return list(dict.fromkeys(scorers))

    @model_validator(mode="after")
    def _fits(self) -> "Params":
        if self.window > self.context_tokens:
            raise ValueError(f"window ({self.window}) is longer than the context ({self.context_tokens} tokens): use "
                             f"window in [1, {self.context_tokens}]")
        smallest = resolve_budget(min(self.budgets), self.context_tokens)
        if self.n_sink + self.recent_window > smallest:
            raise ValueError(f"the smallest budget ({smallest} tokens) must hold n_sink + recent_window = "
                             f"{self.n_sink + self.recent_window} protected tokens")
        return self


def make_scorers(params: Params) -> dict[str, Scorer]:
    """``{label: scorer}``; window attention is SnapKV's score without pooling, over CAOTE's window."""
    made = {}
    for name in params.scorers:
        if name == "window_attention":
            made[name] = get_scorer("snapkv", window=params.window, kernel_size=1)
        elif name == "caote":
            made[name] = get_scorer("caote", window=params.window)
        else:
            made[name] = get_scorer(name)
    return made


def documents(params: Params, tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_documents`` seeded Wikipedia ``(context (1, C), continuation (1, N))`` pairs on ``params.device``."""
    from ..kv_tasks import wikipedia_continuations

    pairs = wikipedia_continuations(tokenizer, n=params.n_documents, context_tokens=params.context_tokens,
                                    continuation_tokens=params.continuation_tokens, seed=params.seed)
    return [(c.to(params.device), n.to(params.device)) for c, n in pairs]


def kept_context(scores: torch.Tensor, num_kv_heads: int, budget_tokens: int, n_sink: int,
                 recent_window: int) -> torch.Tensor:
    """``(H_kv, budget_tokens)`` kept context indices from ``(1, H_q, C)`` scores, selected as
    :func:`~salience.harness.compress_prefill` does in ``per_kv_head`` mode (GQA-group mean, protected sinks and
    recent window, top-k)."""
    context_len = scores.shape[-1]
    if scores.shape[1] == num_kv_heads:
        per_head = scores
    elif scores.shape[1] == 1:
        per_head = scores.expand(-1, num_kv_heads, -1)
    else:
        per_head = reduce_to_kv_heads(scores, num_kv_heads, "mean")
    protect = protected_mask(torch.arange(context_len, device=scores.device), n_sink=n_sink, recent=recent_window,
                             newest_position=context_len - 1)
    return select_topk(per_head[0].float(), budget_tokens, protect)


def output_error(probs: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, context_len: int) -> float:
    """Relative error of the attention output of the queries after the context when only ``kept`` context keys stay.

    Args:
        probs: ``(1, H_q, T, T)`` attention of the whole prompt (context ``[0, C)`` then continuation).
        values: ``(1, H_kv, T, D)``.
        kept: ``(H_kv, b)`` kept context indices per KV head; continuation keys always stay.
        context_len: ``C``; the queries at positions ``≥ C`` are evaluated.

    Returns the mean over those queries of ``‖o_kept − o_full‖ / ‖o_full‖``, the norms taken over all heads
    concatenated (the vector the output projection reads). ``o_kept`` renormalizes each query's attention over the
    kept keys, which equals a softmax over the kept keys' logits.
    """
    _, h_q, t, _ = probs.shape
    h_kv = values.shape[1]
    if h_q % h_kv:
        raise ValueError(f"{h_q} query heads are not a multiple of {h_kv} KV heads")
    if not 0 < context_len < t:
        raise ValueError(f"context_len must lie in [1, {t - 1}] so that some queries follow it, got {context_len}")
    keep = torch.zeros(h_kv, t, dtype=probs.dtype, device=probs.device)
    keep[:, context_len:] = 1.0
    keep.scatter_(1, kept.to(probs.device), 1.0)
    groups = h_q // h_kv
    keep = keep.repeat_interleave(groups, dim=0)  # (H_q, T)
    v = values[0].float().repeat_interleave(groups, dim=0)  # (H_q, T, D)
    a = probs[0, :, context_len:].float()  # (H_q, N, T)
    full = a @ v
    kept_a = a * keep[:, None, :]
    compressed = (kept_a / kept_a.sum(-1, keepdim=True)) @ v
    diff = (compressed - full).transpose(0, 1).flatten(1)  # (N, H_q·D)
    return float((diff.norm(dim=-1) / full.transpose(0, 1).flatten(1).norm(dim=-1)).mean())


@torch.inference_mode()
def reconstruction_errors(model, docs, params: Params) -> pd.DataFrame:
    """Per document, scorer, budget and layer: the relative attention-output error of :func:`output_error`.

    One captured prefill of context + continuation per document; each scorer reads the context block of the
    attention (context queries × context keys), keys and values, as in query-agnostic compression. Columns: doc,
    scorer, budget, budget_tokens, layer, output_error.
    """
    scorers = make_scorers(params)
    num_kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    rows = []
    for d, (context, continuation) in enumerate(tqdm(docs, desc="reconstruction: documents")):
        c = context.shape[1]
        budgets = {b: resolve_budget(b, c) for b in params.budgets}
        positions = torch.arange(c, device=context.device)

        def on_attention(layer, probs, key, value, d=d, c=c, budgets=budgets, positions=positions):
            for name, scorer in scorers.items():
                view = AttentionView(key_positions=positions, query_positions=positions, visible_queries=c - positions,
                                     attention=probs[:, :, :c, :c], keys=key[:, :, :c], values=value[:, :, :c],
                                     generator=torch.Generator().manual_seed(params.seed * 1000 + layer))
                scores = scorer(view).float()
                for b, tokens in budgets.items():
                    kept = kept_context(scores, num_kv_heads, tokens, params.n_sink, params.recent_window)
                    rows.append(dict(doc=d, scorer=name, budget=b, budget_tokens=tokens, layer=layer,
                                     output_error=output_error(probs, value, kept, c)))

        with capture_attention(model, on_attention):
            model(torch.cat([context, continuation], dim=1), use_cache=False)
    return pd.DataFrame(rows)


def error_summary(errors: pd.DataFrame) -> pd.DataFrame:
    """Mean relative output error over layers and documents per scorer (rows) and budget (columns ``err@b``)."""
    wide = errors.pivot_table(index="scorer", columns="budget", values="output_error", aggfunc="mean")
    wide.columns = [f"err@{c:g}" for c in wide.columns]
    wide["mean"] = wide.mean(axis=1)
    wide = wide.sort_values("mean", kind="stable").reset_index()
    wide.insert(1, "label", wide.scorer.map(LABELS))
    return wide


def layer_wins(errors: pd.DataFrame) -> pd.DataFrame:
    """For each value-aware scorer and budget: the share of (document, layer) cells where its output error is below
    its attention-only counterpart's, and the mean error ratio (value-aware ÷ attention-only)."""
    wide = errors.pivot_table(index=["budget", "doc", "layer"], columns="scorer", values="output_error")
    rows = []
    for aware, base in PAIRS.items():
        ratio = wide[aware] / wide[base]
        for b, r in ratio.groupby("budget"):
            rows.append(dict(scorer=aware, baseline=base, budget=b, layers_better=float((r < 1).mean()),
                             error_ratio=float(r.mean())))
    return pd.DataFrame(rows)


def continuation_sweep(model, docs, params: Params) -> pd.DataFrame:
    """NLL, perplexity and KL to the full cache of each continuation after compressing its context, for every scorer
    and budget (:func:`salience.kv_tasks.continuation_metrics`; uncompressed row first). Adds a ``doc`` column."""
    from ..kv_tasks import continuation_metrics

    scorers = make_scorers(params)
    frames = []
    for d, (context, continuation) in enumerate(tqdm(docs, desc="continuations: documents")):
        df = continuation_metrics(model, context, continuation, scorers, params.budgets, n_sink=params.n_sink,
                                  recent_window=params.recent_window,
                                  generator=torch.Generator().manual_seed(params.seed * 1000 + d))
        frames.append(df.assign(doc=d))
    return pd.concat(frames, ignore_index=True)


def continuation_summary(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per scorer (full cache first) and budget: mean KL to the full cache, perplexity and top-1 agreement."""
    g = sweep.groupby(["scorer", "budget"], sort=False)[["kl_mean", "perplexity", "top1_agreement"]].mean()
    g = g.reset_index()
    g.insert(1, "label", g.scorer.map(LABELS))
    return g


def _pair_state(aware: pd.Series, base: pd.Series) -> str:
    """``aware``/``base``: a lower-is-better metric indexed by budget."""
    if bool((aware < base).all()):
        return "lower"
    if bool((aware > base).all()):
        return "higher"
    return "mixed"


def verdict(errors: pd.DataFrame, sweep: pd.DataFrame, params: Params) -> tuple[str, str, str]:
    """The claim's verdict, computed from this run's numbers. Returns ``(label, one-line summary, Findings markdown)``.

    For each pair (VATP vs accumulated attention, CAOTE vs window attention), two lower-is-better measures per
    budget: the attention-output error (mean over layers and documents) and the KL to the full cache (mean over
    documents). The value-aware scorer **wins** the pair if it is lower in both measures at every budget, **loses**
    it if it is higher in both at every budget; otherwise the pair is mixed.

    Both pairs won: supported. One won: partly supported. None won and at least one lost: not supported.
    Both mixed: inconclusive.
    """
    err = errors.groupby(["scorer", "budget"]).output_error.mean()
    kl = sweep[sweep.scorer != "uncompressed"].groupby(["scorer", "budget"]).kl_mean.mean()
    ppl = sweep[sweep.scorer != "uncompressed"].groupby(["scorer", "budget"]).perplexity.mean()
    outcome, lines = {}, []
    for aware, base in PAIRS.items():
        e_state = _pair_state(err[aware], err[base])
        k_state = _pair_state(kl[aware], kl[base])
        if e_state == k_state == "lower":
            outcome[aware] = "wins"
        elif e_state == k_state == "higher":
            outcome[aware] = "loses"
        else:
            outcome[aware] = "mixed"
        per_budget = ", ".join(
            f"{b:g}: error {err[aware][b]:.3f} vs {err[base][b]:.3f}, KL {kl[aware][b]:.3f} vs {kl[base][b]:.3f}, "
            f"ppl {ppl[aware][b]:.2f} vs {ppl[base][b]:.2f}" for b in params.budgets)
        lines.append(f"- **{LABELS[aware]} vs {LABELS[base]}** — **{outcome[aware]}**: output error {e_state}, KL "
                     f"{k_state} (lower / higher: at every budget). Per budget: {per_budget}.")
    states = list(outcome.values())
    if all(s == "wins" for s in states):
        label = "supported"
    elif "wins" in states:
        label = "partly supported"
    elif "loses" in states:
        label = "not supported"
    else:
        label = "inconclusive"

    es, wins = error_summary(errors), layer_wins(errors)
    board = "\n".join(f"| {r.label} | " + " | ".join(f"{r[f'err@{b:g}']:.3f}" for b in params.budgets)
                      + " | " + " | ".join(f"{kl[r.scorer][b]:.3f}" for b in params.budgets) + " |"
                      for _, r in es.iterrows())
    heads = " | ".join(f"error @{b:g}" for b in params.budgets) + " | " + " | ".join(f"KL @{b:g}"
                                                                                       for b in params.budgets)
    win_text = "; ".join(f"{LABELS[r.scorer].split(' (')[0]} @{r.budget:g}: {r.layers_better:.0%}"
                         for r in wins.itertuples())
    best_err = es.iloc[0]
    full_ppl = float(sweep[sweep.scorer == "uncompressed"].perplexity.mean())
    summary_line = "; ".join(f"{aware} {outcome[aware]} vs {base}" for aware, base in PAIRS.items()) + (
        f"; lowest output error: {best_err.scorer}")
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run ({params.model}, {params.n_documents} Wikipedia context(s) of
{params.context_tokens} tokens compressed query-agnostically per KV head, {params.continuation_tokens}-token
continuations; budgets {", ".join(f"{b:g}" for b in params.budgets)} of the context; every scorer keeps
{params.n_sink} sinks and the last {params.recent_window} context tokens; CAOTE and window attention read the last
{params.window} context queries; seed {params.seed}).

Mean relative attention-output error (over layers and documents; each layer in isolation) and mean KL(full ∥
compressed) of the continuation's next-token distributions (nats), lowest error first:

| scorer | {heads} |
|---|{"---|" * (2 * len(params.budgets))}
{board}

{chr(10).join(lines)}

Share of (document, layer) cells where the value-aware scorer's output error is below its attention-only
counterpart's: {win_text}. Full-cache continuation perplexity: {full_ppl:.2f}.
"""
    if params.n_documents < 8:
        findings += (f"\nWith {params.n_documents} document(s) the KL and perplexity comparisons carry no confidence "
                     "interval; the output errors average 30 layers each, so they are steadier. The GPU parameter set "
                     "runs 32 contexts of 1024 tokens.\n")
    return label, summary_line, findings


def plot_errors_by_layer(errors: pd.DataFrame, budget: float):
    import matplotlib.pyplot as plt
    import seaborn as sns

    sel = errors[errors.budget == budget].assign(label=lambda d: d.scorer.map(LABELS))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    sns.lineplot(data=sel, x="layer", y="output_error", hue="label", marker=".", errorbar=None, ax=ax)
    ax.set(yscale="log", xlabel="layer", ylabel="relative attention-output error",
           title=f"Attention-output error per layer at budget {budget:g}")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_budget_curves(errors: pd.DataFrame, sweep: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    err = errors.groupby(["scorer", "budget"]).output_error.mean().reset_index()
    kl = sweep[sweep.scorer != "uncompressed"].groupby(["scorer", "budget"]).kl_mean.mean().reset_index()
    for name, g in err.groupby("scorer", sort=False):
        style = "-" if name in PAIRS else "--"
        axes[0].plot(g.budget, g.output_error, style, marker="o", label=LABELS.get(name, name))
    for name, g in kl.groupby("scorer", sort=False):
        style = "-" if name in PAIRS else "--"
        axes[1].plot(g.budget, g.kl_mean, style, marker="o", label=LABELS.get(name, name))
    axes[0].set(xlabel="KV budget (share of the context)", ylabel="relative output error (mean over layers)",
                yscale="log", title="Attention-output error")
    axes[1].set(xlabel="KV budget (share of the context)", ylabel="KL to the full cache (nats)", yscale="log",
                title="Continuation KL")
    axes[1].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig
