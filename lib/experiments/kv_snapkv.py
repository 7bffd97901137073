"""Notebook ``kv-snapkv``: does putting the question inside the compressed context favour SnapKV's window scoring?

SnapKV [@snapkv] scores the context by the attention of an observation window of the newest queries, pooled along
the keys before the window. Two analyses on a causal LM, prefill compression (:mod:`salience.kv_passkey`,
:mod:`salience.kv_tasks`; one uncompressed prefill per prompt or document serves every scorer, mode and budget):

1. **Query-aware vs query-agnostic passkey retrieval.** Query-agnostic: the scorers read the context's own queries and
   the question comes after compression; query-aware: the question's rows are scored too, so SnapKV's observation
   window *is* the question (kept whole, outside the budget, in both SnapKV's and the control's caches). Per prompt
   and budget: the teacher-forced log-probability of the passkey's tokens (the claim's metric), greedy accuracy and
   the share of the needle's cache entries kept. The same two modes run for a control scorer without a window
   (normalized attention). Uncompressed and oracle rows (needle kept) in both modes; a cell whose oracle fails is
   unsolvable and left out of the claim.
2. **Window and pooling sweeps** (query-agnostic, one budget, descriptive): KL to the full cache of Wikipedia
   continuations for SnapKV windows and pooling kernels (1 = no pooling, max vs avg), means with 95% intervals over
   the continuations.

Claim parts (:func:`judge_claim`), each per prompt on the mean answer log-probability over the budgets solvable in
both modes: query-aware SnapKV beats query-agnostic SnapKV; SnapKV's gain (aware − agnostic) exceeds the control's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from .. import kv_tasks
from ..evidence import Claim, PartRule, PartSpec, judge
from ..kv_passkey import MODES
from ..kv_tasks import BASELINE, ORACLE
from ..scorers import get_scorer
from ..scorers.spec import ScorerList, ScorerSpec, build_scorers
from ..scorers.window_attention import WindowAttention
from .kv_params import (BudgetRatios, PasskeyParams, check_protection_fits, check_windows_protected, mean_interval,
                        not_judged, run_passkey)
from .param_checks import check_labels

TITLE = "SnapKV: query-aware vs query-agnostic compression, window and pooling"
CLAIM = (
    "Putting the question inside the compressed context favours SnapKV (its observation window then is the "
    "question): query-aware SnapKV keeps more of what the answer needs than query-agnostic SnapKV, and the gain is "
    "larger than for a scorer without a window."
)
PAPERS = ["snapkv", "zipcache", "kvpress"]
AGNOSTIC, AWARE = MODES

PART_SPECS = (
    PartSpec("aware_beats_agnostic", "query-aware SnapKV keeps the passkey answer more likely than query-agnostic "
             "SnapKV", "answer log-prob (nats/token, mean over solvable budgets)", "prompt", papers=("snapkv",)),
    PartSpec("gain_exceeds_control", "SnapKV's query-aware gain exceeds the control scorer's",
             "query-aware gain in answer log-prob (nats/token)", "prompt", papers=("snapkv",)),
)


class Params(PasskeyParams):
    """Parameters of ``kv-snapkv``; defaults in ``params/kv-snapkv.yaml``."""

    notebook = "kv-snapkv"

    scorers: ScorerList = Field(min_length=2, description="SnapKV and the control, one spec each")
    snapkv: str = Field(description="label of the SnapKV entry (its settings are the sweeps' centre)")
    control: str = Field(description="label of the control scorer without an observation window")
    context_tokens: int = Field(ge=64, le=32768, description="haystack / continuation-context tokens")
    budgets: BudgetRatios = Field(description="kept-cache ratios of the context for the passkey comparison")
    sweep_budget: float = Field(gt=0.0, lt=1.0, description="budget of the window and pooling sweeps")
    windows: list[int] = Field(min_length=1, description="SnapKV windows swept (at the entry's kernel and pooling)")
    kernel_sizes: list[int] = Field(min_length=1, description="pooling kernels swept (odd; at the entry's window)")
    poolings: list[str] = Field(min_length=1, description="pooling kinds swept: max, avg")
    n_continuations: int = Field(ge=2, le=256, description="Wikipedia continuations of the sweeps")
    continuation_tokens: int = Field(ge=2, le=4096, description="tokens per continuation")
    parts: dict[str, PartRule] = Field(description="direction and smallest effect of each claim part")

    judged = PART_SPECS

    @field_validator("kernel_sizes")
    @classmethod
    def _odd_kernels(cls, kernels: list[int]) -> list[int]:
        bad = [k for k in kernels if k < 1 or k % 2 == 0]
        if bad:
            raise ValueError(f"every kernel size must be an odd integer >= 1, got {bad}")
        return kernels

    @field_validator("poolings")
    @classmethod
    def _poolings(cls, poolings: list[str]) -> list[str]:
        bad = [p for p in poolings if p not in ("max", "avg")]
        if bad:
            raise ValueError(f"poolings must be max or avg, got {bad}")
        return poolings

    @model_validator(mode="after")
    def _fits_the_context(self) -> "Params":
        check_labels([self.snapkv, self.control], self.scorers, "snapkv and control")
        built = build_scorers(self.scorers)
        if not isinstance(built[self.snapkv], WindowAttention):
            raise ValueError(f"snapkv {self.snapkv!r} must be a snapkv entry")
        if isinstance(built[self.control], WindowAttention):
            raise ValueError(f"control {self.control!r} must be a scorer without an observation window")
        check_windows_protected(self.scorers, self.recent_window)
        longest = max([built[self.snapkv].window, *self.windows])
        if longest > self.context_tokens // 2:
            raise ValueError(f"SnapKV window {longest} must be at most half the context ({self.context_tokens // 2})")
        check_protection_fits([*self.budgets, self.sweep_budget], self.context_tokens, self.n_sink,
                              self.recent_window, passkey=True)
        return self


def snapkv_spec(params: Params) -> ScorerSpec:
    return next(s for s in params.scorers if s.key == params.snapkv)


def passkey_runs(model, tokenizer, params: Params) -> pd.DataFrame:
    """Every prompt × mode × (uncompressed, oracle, entry × budget): :func:`salience.kv_passkey.passkey_runs` on the
    parameters (the notebook calls this one by this name)."""
    return run_passkey(model, tokenizer, params, build_scorers(params.scorers), params.budgets,
                       params.context_tokens)


def mode_table(runs: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Per entry (uncompressed and oracle first), budget and mode: mean answer log-prob, answer KL, greedy
    accuracy and needle kept over the prompts with numbers (``prompts``: an oracle that does not fit a prompt's
    budget has none), and whether the cell is solvable."""
    solvable = cells.set_index(["mode", "budget"]).solvable
    g = runs.groupby(["scorer", "budget", "mode"], sort=False)
    table = g.agg(answer_logprob=("answer_logprob", "mean"), answer_kl=("answer_kl", "mean"),
                  accuracy=("greedy_correct", lambda x: x.astype(float).mean()),
                  needle_kept=("needle_kept", "mean"), prompts=("answer_logprob", "count")).reset_index()
    table["solvable"] = [True if s == BASELINE else bool(solvable.get((m, b), False))
                         for s, m, b in zip(table.scorer, table["mode"], table.budget)]
    return table


def per_prompt(runs: pd.DataFrame, cells: pd.DataFrame, label: str) -> pd.DataFrame:
    """Prompts × modes: ``label``'s answer log-prob averaged over the budgets solvable in both modes."""
    sel = runs[(runs.scorer == label) & runs.budget.isin(solvable_budgets(cells))]
    return sel.pivot_table(index="prompt", columns="mode", values="answer_logprob", aggfunc="mean")


def solvable_budgets(cells: pd.DataFrame) -> list[float]:
    """The budgets whose cells are solvable in both modes."""
    ok = cells[cells.solvable].groupby("budget")["mode"].nunique()
    return [float(b) for b in ok[ok == len(MODES)].index]


def judge_claim(runs: pd.DataFrame, cells: pd.DataFrame, params: Params) -> Claim:
    """Both parts per prompt on the mean answer log-prob over the budgets solvable in both modes."""
    budgets = solvable_budgets(cells)
    specs = dict((s.id, s) for s in PART_SPECS)
    rules = params.parts
    if not budgets:
        reason = "no budget is solvable in both modes (the oracle failed)"
        parts = [not_judged(s, rules[s.id], reason) for s in PART_SPECS]
    else:
        snap, ctrl = per_prompt(runs, cells, params.snapkv), per_prompt(runs, cells, params.control)
        on = f"budgets {', '.join(f'{b:g}' for b in budgets)}"
        parts = [judge(specs["aware_beats_agnostic"], rules["aware_beats_agnostic"], snap[AWARE], snap[AGNOSTIC],
                       seed=params.seed, detail=f"{params.snapkv}, query-aware against query-agnostic, {on}"),
                 judge(specs["gain_exceeds_control"], rules["gain_exceeds_control"], snap[AWARE] - snap[AGNOSTIC],
                       ctrl[AWARE] - ctrl[AGNOSTIC], seed=params.seed,
                       detail=f"gain of {params.snapkv} against the gain of {params.control}, {on}")]
    spec = snapkv_spec(params).build()
    unsolvable = cells[~cells.solvable]
    notes = [("Unsolvable passkey cells (left out): " + "; ".join(f"{r.mode} @ {r.budget:g}"
                                                                  for r in unsolvable.itertuples()) + "."
              if len(unsolvable) else "Every passkey cell is solvable."),
             "The window and pooling sweeps describe SnapKV's settings and do not enter the verdict."]
    setting = (f"{params.model} on {params.device} (the paper: 7B-class models, LongBench); {params.n_prompts} "
               f"passkey prompts of ~{params.context_tokens} tokens, each in its own Wikipedia haystack; SnapKV window "
               f"{spec.window}, kernel {spec.kernel_size} {spec.pooling}, pooling only the keys before the window as "
               f"the reference code does; every scorer keeps {params.n_sink} sinks and the last "
               f"{params.recent_window} context tokens; in query-aware mode the question is prefilled with the "
               "context and kept outside the budget, so both modes keep the same number of context entries. "
               "The metric is the teacher-forced log-probability of the passkey tokens after the answer prefix.")
    return Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                 setting=setting, notes=notes, seed=params.seed)


def sweep_configs(params: Params) -> dict[str, dict]:
    """Window sweep (at the entry's kernel and pooling) and pooling sweep (at its window): ``{label: settings}``."""
    base = snapkv_spec(params).options
    entry = snapkv_spec(params).build()  # the entry's settings, its scorer's defaults where the YAML gives none
    window, kernel, pooling = entry.window, entry.kernel_size, entry.pooling
    configs = {}
    for w in params.windows:
        configs[f"w{w} k{kernel} {pooling}"] = {**base, "window": w}
    for k in params.kernel_sizes:
        for pool in (["none"] if k == 1 else params.poolings):
            configs[f"w{window} k{k} {pool}"] = {**base, "kernel_size": k, "pooling": "avg" if pool == "none" else pool}
    return configs


def window_pooling_sweep(model, tokenizer, params: Params) -> pd.DataFrame:
    """KL to the full cache of Wikipedia continuations (query-agnostic) for every sweep configuration at
    ``sweep_budget``, with the uncompressed and oracle rows (:func:`salience.kv_tasks.continuation_runs`)."""
    pairs = kv_tasks.wikipedia_continuations(tokenizer, n=params.n_continuations, context_tokens=params.context_tokens,
                                             continuation_tokens=params.continuation_tokens, seed=params.seed)
    configs = sweep_configs(params)
    scorers = {label: get_scorer("snapkv", **settings) for label, settings in configs.items()}
    df = kv_tasks.continuation_runs(model, pairs, scorers, params.sweep_budget, head_mode=params.head_mode,
                                    n_sink=params.n_sink, recent_window=params.recent_window, seed=params.seed,
                                    batch_size=params.batch_size)
    df = df.rename(columns={"scorer": "config"})
    df["window"] = df.config.map(lambda c: configs[c]["window"] if c in configs else np.nan)
    df["kernel_size"] = df.config.map(lambda c: configs[c]["kernel_size"] if c in configs else np.nan)
    df["pooling"] = df.config.map(lambda c: ("none" if configs[c]["kernel_size"] == 1 else configs[c]["pooling"])
                                  if c in configs else "")
    return df


def sweep_summary(sweep: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per configuration (uncompressed and oracle first): mean KL over continuations with its 95% bootstrap
    interval, and mean top-1 agreement; configurations by mean KL."""
    rows = []
    for config, g in sweep.groupby("config", sort=False):
        kl, low, high = mean_interval(g.kl_mean, seed)
        rows.append({"config": config, "window": g.window.iloc[0], "kernel_size": g.kernel_size.iloc[0],
                     "pooling": g.pooling.iloc[0], "kl_mean": kl, "kl_lo": low, "kl_hi": high,
                     "top1_agreement": float(g.top1_agreement.mean()), "n": len(g)})
    out = pd.DataFrame(rows)
    refs = out[out.config.isin([BASELINE, ORACLE])]
    return pd.concat([refs, out[~out.config.isin([BASELINE, ORACLE])].sort_values("kl_mean", kind="stable")],
                     ignore_index=True)


def plot_modes(table: pd.DataFrame, params: Params):
    """Answer log-prob and needle kept vs budget, per entry and mode (solvable cells filled, others hollow)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = table[table.scorer != BASELINE]
    for (label, mode), g in rows.groupby(["scorer", "mode"], sort=False):
        style = "-" if mode == AWARE else "--"
        for ax, col in zip(axes, ("answer_logprob", "needle_kept")):
            line, = ax.plot(g.budget, g[col], style, label=f"{label}, {mode}")
            ax.scatter(g.budget, g[col], color=line.get_color(),
                       facecolors=[line.get_color() if s else "none" for s in g.solvable])
    base = float(table[table.scorer == BASELINE].answer_logprob.mean())
    axes[0].axhline(base, color="k", lw=0.8, ls=":", label="uncompressed")
    axes[0].set(xlabel="KV budget (share of the context)", ylabel="answer log-prob (nats/token)",
                title="Passkey answer log-probability")
    axes[1].set(xlabel="KV budget (share of the context)", ylabel="needle entries kept (share)", title="Needle kept")
    axes[0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig


def plot_sweep(summary: pd.DataFrame, params: Params):
    """Mean KL with 95% intervals: the window sweep and the pooling sweep."""
    import matplotlib.pyplot as plt

    spec = snapkv_spec(params).build()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    configs = summary[~summary.config.isin([BASELINE, ORACLE])]
    win = configs[configs.config.str.endswith(f"k{spec.kernel_size} {spec.pooling}")].sort_values("window")
    axes[0].errorbar(win.window, win.kl_mean, yerr=[win.kl_mean - win.kl_lo, win.kl_hi - win.kl_mean], marker="o",
                     capsize=3)
    axes[0].set_xscale("log", base=2)
    axes[0].set(xlabel="observation window", ylabel="KL to full cache (nats)",
                title=f"Window (kernel {spec.kernel_size} {spec.pooling})")
    pool = configs[configs.window == spec.window].sort_values(["pooling", "kernel_size"])
    axes[1].errorbar(range(len(pool)), pool.kl_mean, yerr=[pool.kl_mean - pool.kl_lo, pool.kl_hi - pool.kl_mean],
                     fmt="o", capsize=3)
    axes[1].set_xticks(range(len(pool)), pool.config, rotation=45, ha="right")
    axes[1].set(ylabel="KL to full cache (nats)", title=f"Pooling (window {spec.window})")
    oracle = summary[summary.config == ORACLE].kl_mean
    for ax in axes:
        if len(oracle):
            ax.axhline(float(oracle.iloc[0]), color="C2", lw=0.8, ls=":", label="oracle")
    axes[0].legend(frameon=False)
    fig.tight_layout()
    return fig
