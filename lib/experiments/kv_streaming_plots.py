"""Figures of the streaming-eviction notebooks (``kv-normalized-attention``, ``kv-sinks-and-separators``): seaborn /
matplotlib, one function per figure, each returning the figure for ``run.save_figure``."""

from __future__ import annotations

import pandas as pd

from ..kv_tasks import BASELINE
from .kv_streaming_common import FULL, StreamRun


def plot_bias(profile: pd.DataFrame):
    """Mean relative score by position (sinks excluded), accumulated vs normalized attention, log scale."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import FuncFormatter

    data = profile.groupby(["scorer", "doc", "bin_center"]).relative_score.mean().reset_index()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.lineplot(data=data, x="bin_center", y="relative_score", hue="scorer", marker="o", errorbar=("ci", 95),
                 ax=ax)
    ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set(xlabel="token position", ylabel="score / its mean (log scale)",
           title="Mean score by position (sinks excluded; band: 95% over documents)")
    ax.legend(title=None, frameon=False)
    fig.tight_layout()
    return fig


def plot_stream_sweep(run: StreamRun):
    """Perplexity (exp of the mean log-perplexity over documents) vs budget ratio per scorer; dashed: full cache."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 3.8))
    sns.lineplot(data=run.table, x="ratio", y="log_ppl", hue="scorer", marker="o", errorbar=None, ax=ax)
    ax.axhline(run.full.log_ppl.mean(), color="k", lw=1, ls="--", label=FULL)
    ax.set(xlabel="KV budget (share of the document kept)", ylabel="log-perplexity (mean over documents)",
           title="Streamed log-perplexity under decode-time eviction")
    ax.legend(title=None, frameon=False)
    fig.tight_layout()
    return fig


def plot_fidelity(summary: pd.DataFrame):
    """Kept-set overlap of each probe share with the exact normalized score vs the share of attention entries the
    probe rows need."""
    import matplotlib.pyplot as plt

    probes = summary[summary.entry_share < 1.0].sort_values("entry_share")
    overlaps = [c for c in probes.columns if c.startswith("overlap@")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for c in overlaps:
        ax.plot(probes.entry_share, probes[c], marker="s", ls="--", label=f"kept-set overlap, budget {c.split('@')[1]}")
    for _, r in probes.iterrows():
        ax.annotate(f"{r.query_share:.0%} of queries", (r.entry_share, r[overlaps[0]]), textcoords="offset points",
                    xytext=(4, -12), fontsize=7)
    ax.set_xscale("log")
    ax.set(xlabel="share of attention entries the probe rows need (log scale)",
           ylabel="overlap with the exact score's kept set", title="ZipCache probe score vs exact normalized score")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_prefill_quality(quality: pd.DataFrame):
    """Mean KL of the continuation vs budget under prefill compression, per scorer (oracle included)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = quality[quality.scorer != BASELINE]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.lineplot(data=data, x="budget", y="kl_mean", hue="scorer", marker="o", errorbar=None, ax=ax)
    ax.set_yscale("log")
    ax.set(xlabel="KV budget (share of the compressed head kept)", ylabel="mean KL(full ∥ compressed), nats",
           title="Prefill compression: KL of the continuation's next-token distributions")
    ax.legend(title=None, frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_policies(run: StreamRun, reference: str):
    """Left: log-perplexity vs cache size per policy. Right: each policy minus ``reference`` per document (mean and
    95% band over documents), where the small gaps between SepLLM and the controls are visible."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    pol = run.table[run.table.sweep == "policies"]
    budgets = sorted(pol.budget.unique())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(data=pol, x="budget", y="log_ppl", hue="policy", marker="o", errorbar=None, ax=axes[0])
    axes[0].axhline(run.full.log_ppl.mean(), color="k", ls=":", label=FULL)
    axes[0].set(xlabel="cache size (tokens)", ylabel="log-perplexity (mean over documents)",
                title="Log-perplexity vs cache size")
    axes[0].legend(frameon=False, fontsize=8)
    wide = pol.pivot_table(index=["doc", "budget"], columns="policy", values="log_ppl")
    gaps = wide.sub(wide[reference], axis=0).drop(columns=reference).stack().rename("gap").reset_index()
    sns.pointplot(data=gaps, x="budget", y="gap", hue="policy", errorbar=("ci", 95), dodge=0.3, ax=axes[1])
    axes[1].axhline(0.0, color="k", ls=":")
    axes[1].set(xlabel="cache size (tokens)", ylabel=f"log-perplexity − {reference}'s",
                title=f"Against {reference} (95% over documents)")
    axes[1].legend(frameon=False, fontsize=8)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xticks(budgets, [str(b) for b in budgets])
    fig.tight_layout()
    return fig


def plot_sink_sweep(sinks: pd.DataFrame, budget: int):
    """Perplexity vs the number of sinks kept (a ``sink_table``); dotted: the full cache."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(sinks.n_sink.astype(str), sinks.perplexity, marker="o", label="StreamingLLM")
    ax.axhline(float(sinks.full_perplexity.iloc[0]), color="k", ls=":", label=FULL)
    ax.set(xlabel="initial tokens kept (sinks)", ylabel="streaming perplexity", title=f"Cache of {budget} tokens")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_roles_by_layer(summary: pd.DataFrame):
    """Left: attention mass on sinks and separators vs their share of the keys, by layer. Right: attention one
    separator receives ÷ one ordinary token, by layer (log scale)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(summary.layer, summary.sink_mass, marker=".", label="attention on sinks")
    axes[0].plot(summary.layer, summary.sink_share, ls="--", label="sinks' share of keys")
    axes[0].plot(summary.layer, summary.separator_mass, marker=".", label="attention on separators")
    axes[0].plot(summary.layer, summary.separator_share, ls="--", label="separators' share of keys")
    axes[0].set(xlabel="layer", ylabel="share", title="Attention mass by token role")
    axes[0].legend(frameon=False, fontsize=8)
    axes[1].plot(summary.layer, summary.separator_ratio, marker=".")
    axes[1].axhline(1.0, color="k", ls=":")
    axes[1].set_yscale("log")
    axes[1].set(xlabel="layer", ylabel="per separator ÷ per ordinary token",
                title="Attention one separator receives (sinks excluded)")
    fig.tight_layout()
    return fig


__all__ = ["plot_bias", "plot_fidelity", "plot_policies", "plot_prefill_quality", "plot_roles_by_layer",
           "plot_sink_sweep", "plot_stream_sweep"]
