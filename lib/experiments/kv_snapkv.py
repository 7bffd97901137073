"""Notebook ``kv-snapkv``: does putting the question inside the compressed context favour SnapKV's window scoring?

Two analyses on a causal LM, prefill compression (:mod:`salience.harness.kv_prefill_compression`):

1. **Query-aware vs query-agnostic.** Passkey prompts built from Wikipedia haystacks. Query-agnostic: the context is
   compressed alone and the question comes afterwards; query-aware: context + question are prefilled together, so
   SnapKV's observation window *is* the question. Measured per budget: the share of the needle's cache entries kept
   (``needle_kept``), the KL(full ∥ compressed) of the answer tokens' distributions (teacher-forced after the answer
   prefix, against the uncompressed cache), and greedy passkey accuracy. The same two modes run for a scorer without
   a window (normalized or accumulated attention) as the control.
2. **Window and pooling sweeps** (query-agnostic, one budget): KL to the full cache of Wikipedia continuations for
   SnapKV windows and pooling kernels (1 = no pooling, max vs avg).
"""

from __future__ import annotations

import math
from typing import Literal

import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm  # text bars: stored notebooks stay readable without widgets

from ..params import ModelName, NotebookParams
from ..scorers import get_scorer

TITLE = "SnapKV: query-aware vs query-agnostic compression, window and pooling (s93)"
CLAIM = (
    "Putting the question inside the compressed context favours SnapKV (its observation window then is the "
    "question): query-aware SnapKV keeps more of what the answer needs than query-agnostic SnapKV, and the gain is "
    "larger than for a scorer without a window."
)
ControlName = Literal["normalized_attention", "accumulated_attention"]
MODES = {False: "query-agnostic", True: "query-aware"}


class Params(NotebookParams):
    """Parameters of ``kv-snapkv`` (defaults: the CPU run, about two minutes on 2 cores)."""

    notebook = "kv-snapkv"

    model: ModelName = Field("smollm2-135m", description="embedded model name, local folder or Hugging Face id")
    context_tokens: int = Field(128, ge=64, le=32768, description="haystack / continuation-context tokens")
    depths: list[float] = Field([0.2, 0.4, 0.6, 0.8], min_length=1, description="needle depths in [0, 1]")
    n_passkeys: int = Field(1, ge=1, le=64, description="passkeys (seeds) per depth")
    budgets: list[float] = Field([0.25, 0.5], min_length=1, description="kept-cache ratios of the context, in (0, 1]")
    window: int = Field(16, ge=1, le=4096, description="SnapKV observation window of part 1")
    kernel_size: int = Field(5, ge=1, le=63, description="SnapKV pooling kernel of part 1 (odd; 1 = no pooling)")
    pooling: Literal["max", "avg"] = "avg"
    control_scorer: ControlName = "normalized_attention"
    n_sink: int = Field(4, ge=0, le=1024, description="first context tokens every scorer keeps")
    recent_window: int = Field(8, ge=0, le=4096, description="last context tokens every scorer keeps")
    answer_prefix: str = Field("The secret passkey is", description="fed after compression in both modes")
    max_new_tokens: int = Field(7, ge=1, le=64, description="greedy answer length")
    sweep_budget: float = Field(0.25, gt=0.0, le=1.0, description="budget of the window and pooling sweeps")
    windows: list[int] = Field([4, 8, 16, 32], min_length=1, description="SnapKV windows swept")
    kernel_sizes: list[int] = Field([1, 3, 5, 7], min_length=1, description="pooling kernels swept (odd)")
    poolings: list[Literal["max", "avg"]] = Field(["max", "avg"], min_length=1)
    n_continuations: int = Field(1, ge=1, le=256, description="Wikipedia continuations of the sweeps")
    continuation_tokens: int = Field(32, ge=2, le=4096, description="tokens per continuation")

    @field_validator("budgets")
    @classmethod
    def _ratios(cls, budgets: list[float]) -> list[float]:
        bad = [b for b in budgets if not 0.0 < b <= 1.0]
        if bad:
            raise ValueError(f"every budget must be a ratio in (0, 1], got {bad}")
        return sorted(set(budgets))

    @field_validator("depths")
    @classmethod
    def _depths(cls, depths: list[float]) -> list[float]:
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"every depth must be in [0, 1], got {bad}")
        return depths

    @field_validator("kernel_sizes")
    @classmethod
    def _odd_kernels(cls, kernels: list[int]) -> list[int]:
        bad = [k for k in kernels if k < 1 or k % 2 == 0]
        if bad:
            raise ValueError(f"every kernel size must be an odd integer >= 1, got {bad}")
        return kernels

    @model_validator(mode="after")
    def _fits_the_context(self) -> "Params":
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (1 = no pooling), got {self.kernel_size}")
        longest = max([self.window, *self.windows])
        if longest > self.context_tokens:
            raise ValueError(f"SnapKV window {longest} is longer than the context ({self.context_tokens} tokens): "
                             f"use windows in [1, {self.context_tokens}]")
        # haystacks end at a sentence, so a needle context holds at least ~0.9 x context_tokens tokens
        smallest = int(math.ceil(min([*self.budgets, self.sweep_budget]) * 0.9 * self.context_tokens))
        if self.n_sink + self.recent_window > smallest:
            raise ValueError(f"the smallest budget ({smallest} tokens of ~0.9 x {self.context_tokens}) must hold "
                             f"n_sink + recent_window = {self.n_sink + self.recent_window} protected tokens")
        return self


def snapkv(params: Params, window: int | None = None, kernel_size: int | None = None, pooling: str | None = None):
    return get_scorer("snapkv", window=params.window if window is None else window,
                      kernel_size=params.kernel_size if kernel_size is None else kernel_size,
                      pooling=params.pooling if pooling is None else pooling)


def needle_prompts(params: Params, tokenizer):
    """``n_passkeys`` seeded passkeys at every depth, planted in Wikipedia prose of ``context_tokens`` tokens."""
    from ..data import build_needle_prompt, random_passkey, wikipedia_haystack

    hay = wikipedia_haystack(min_chars=max(20_000, 16 * params.context_tokens), seed=params.seed)
    return [build_needle_prompt(tokenizer, hay, *random_passkey(seed=params.seed * 1000 + s), depth=d,
                                context_tokens=params.context_tokens)
            for s in range(params.n_passkeys) for d in params.depths]


def _answer_kl(logits: torch.Tensor, ref_logp: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0.0).mean())


@torch.inference_mode()
def query_mode_comparison(model, tokenizer, prompts, params: Params) -> pd.DataFrame:
    """Every prompt × mode × scorer × budget, one compression each; plus one uncompressed row per prompt.

    Columns: prompt, depth, context_len, question_len, mode, scorer, budget, budget_tokens, needle_kept (share of
    (layer, KV head, needle token) entries kept), answer_kl (mean KL(full ∥ compressed) over the answer's tokens,
    teacher-forced after the answer prefix; nats), correct (greedy answer contains the passkey), generated.
    """
    from ..harness.kv_prefill_compression import (_eos_ids, compress_prefill, continuation_logits, full_prefill,
                                                  greedy_tokens)
    from ..kv_tasks import needle_inputs

    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    scorers = {"snapkv": snapkv(params), params.control_scorer: get_scorer(params.control_scorer)}
    rows, jobs = [], []
    for k, p in enumerate(prompts):
        x = needle_inputs(tokenizer, p, answer_prefix=params.answer_prefix)
        answer = torch.tensor(tokenizer(" " + p.answer, add_special_tokens=False)["input_ids"])[None]
        jobs.append((k, p, x, answer.to(device)))
    total = len(jobs) * len(MODES) * len(scorers) * len(params.budgets)
    bar = tqdm(total=total, desc="needle: prompts x modes x scorers x budgets")
    for k, p, x, answer in jobs:
        ctx, question = x.context_ids.to(device), x.question_ids.to(device)
        prefix = x.answer_prefix_ids.to(device) if x.answer_prefix_ids is not None else question[:, :0]
        n_ans = answer.shape[1]
        teacher = torch.cat([prefix, answer[:, :-1]], dim=1)  # rows predicting the answer tokens: the last n_ans
        base = dict(prompt=k, depth=round(p.depth, 3), context_len=ctx.shape[1], question_len=question.shape[1],
                    answer=p.answer)
        full = full_prefill(model, ctx, question)
        ref_logp = torch.log_softmax(continuation_logits(model, full, teacher)[0, -n_ans:], dim=-1)
        text = tokenizer.decode(greedy_tokens(model, full, prefix, params.max_new_tokens, eos),
                                skip_special_tokens=True)
        rows.append(dict(base, mode="uncompressed", scorer="uncompressed", budget=1.0, budget_tokens=ctx.shape[1],
                         needle_kept=1.0, answer_kl=0.0, correct=p.answer in text, generated=text))
        for aware, mode in MODES.items():
            feed = prefix if aware else torch.cat([question, prefix], dim=1)
            fed = teacher if aware else torch.cat([question, teacher], dim=1)
            for name, scorer in scorers.items():
                for b in params.budgets:
                    c = compress_prefill(model, ctx, scorer, b, question_ids=question if aware else None,
                                         query_aware=aware, n_sink=params.n_sink, recent_window=params.recent_window)
                    kl = _answer_kl(continuation_logits(model, c, fed)[0, -n_ans:], ref_logp)
                    text = tokenizer.decode(greedy_tokens(model, c, feed, params.max_new_tokens, eos),
                                            skip_special_tokens=True)
                    rows.append(dict(base, mode=mode, scorer=name, budget=b, budget_tokens=c.budget_tokens,
                                     needle_kept=float(c.span_kept(*x.needle_span).mean()), answer_kl=kl,
                                     correct=p.answer in text, generated=text))
                    bar.update()
    bar.close()
    return pd.DataFrame(rows)


def mode_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per scorer and budget: mean needle_kept, answer KL and accuracy in each mode, and the query-aware gains
    (``kept_gain`` = aware − agnostic, ``kl_gain`` = agnostic − aware; positive favours query-aware)."""
    r = runs[runs.scorer != "uncompressed"]
    wide = r.pivot_table(index=["scorer", "budget"], columns="mode",
                         values=["needle_kept", "answer_kl", "correct"], aggfunc="mean")
    out = pd.DataFrame(index=wide.index)
    for metric, short in (("needle_kept", "kept"), ("answer_kl", "kl"), ("correct", "acc")):
        out[f"{short}_agnostic"] = wide[(metric, "query-agnostic")]
        out[f"{short}_aware"] = wide[(metric, "query-aware")]
    out["kept_gain"] = out.kept_aware - out.kept_agnostic
    out["kl_gain"] = out.kl_agnostic - out.kl_aware
    return out.reset_index()


def sweep_configs(params: Params) -> dict[str, object]:
    """Window sweep (at the part-1 kernel and pooling) and pooling sweep (at the part-1 window), deduplicated."""
    configs = {}
    for w in params.windows:
        configs[f"w{w} k{params.kernel_size} {params.pooling}"] = (w, params.kernel_size, params.pooling)
    for k in params.kernel_sizes:
        for pool in (["none"] if k == 1 else params.poolings):
            configs[f"w{params.window} k{k} {pool}"] = (params.window, k, "avg" if pool == "none" else pool)
    return configs


def window_pooling_sweep(model, tokenizer, params: Params) -> pd.DataFrame:
    """KL to the full cache of Wikipedia continuations (query-agnostic) for every sweep configuration at
    ``sweep_budget``. Columns: sample, config, window, kernel_size, pooling, kl_mean, nll, top1_agreement."""
    from ..kv_tasks import continuation_metrics, wikipedia_continuations

    device = next(model.parameters()).device
    pairs = wikipedia_continuations(tokenizer, n=params.n_continuations, context_tokens=params.context_tokens,
                                    continuation_tokens=params.continuation_tokens, seed=params.seed)
    configs = sweep_configs(params)
    scorers = {label: snapkv(params, w, k, pool) for label, (w, k, pool) in configs.items()}
    frames = []
    for i, (ctx, cont) in enumerate(tqdm(pairs, desc="sweep: continuations")):
        df = continuation_metrics(model, ctx.to(device), cont.to(device), scorers, params.sweep_budget,
                                  n_sink=params.n_sink, recent_window=params.recent_window)
        frames.append(df.assign(sample=i))
    df = pd.concat(frames, ignore_index=True)
    df = df[df.scorer != "uncompressed"].rename(columns={"scorer": "config"})
    df["window"] = df.config.map(lambda c: configs[c][0])
    df["kernel_size"] = df.config.map(lambda c: configs[c][1])
    df["pooling"] = df.config.map(lambda c: "none" if configs[c][1] == 1 else configs[c][2])
    return df[["sample", "config", "window", "kernel_size", "pooling", "budget_tokens", "kl_mean", "nll",
               "top1_agreement"]].reset_index(drop=True)


def sweep_summary(sweep: pd.DataFrame) -> pd.DataFrame:
    """Mean over continuations per configuration, lowest KL first."""
    g = sweep.groupby(["config", "window", "kernel_size", "pooling"], sort=False)[["kl_mean", "top1_agreement"]]
    return g.mean().reset_index().sort_values("kl_mean", kind="stable").reset_index(drop=True)


def verdict(summary: pd.DataFrame, sweep: pd.DataFrame, params: Params) -> tuple[str, str, str]:
    """The claim's verdict, computed from this run's numbers. Returns ``(label, one-line summary, Findings markdown)``.

    Per budget, means over prompts. "Query-aware SnapKV is better at a budget" means: its mean ``needle_kept`` is
    higher **and** its mean answer KL to the full cache is lower than query-agnostic SnapKV's.

    1. Part 1 (query-aware helps SnapKV): query-aware SnapKV is better at **every** budget.
    2. Part 2 (the gain is specific to window scoring): SnapKV's needle_kept gain (aware − agnostic, averaged over
       budgets) exceeds the control scorer's **and** SnapKV's KL gain (agnostic − aware, averaged over budgets)
       exceeds the control's.

    Both parts hold: supported. Part 1 holds, part 2 not: partly supported. Query-aware SnapKV is better at no
    budget: not supported. Better at some budgets only: inconclusive.
    """
    snap = summary[summary.scorer == "snapkv"].set_index("budget")
    ctrl = summary[summary.scorer == params.control_scorer].set_index("budget")
    better = (snap.kept_gain > 0) & (snap.kl_gain > 0)
    part1 = bool(better.all())
    kept_margin = float(snap.kept_gain.mean() - ctrl.kept_gain.mean())
    kl_margin = float(snap.kl_gain.mean() - ctrl.kl_gain.mean())
    part2 = kept_margin > 0 and kl_margin > 0
    if part1 and part2:
        label = "supported"
    elif part1:
        label = "partly supported"
    elif not better.any():
        label = "not supported"
    else:
        label = "inconclusive"

    n_prompts = params.n_passkeys * len(params.depths)
    summary_line = (f"query-aware SnapKV better (needle kept and answer KL) at {int(better.sum())}/{len(better)} "
                    f"budgets; mean needle-kept gain {snap.kept_gain.mean():+.3f} (SnapKV) vs "
                    f"{ctrl.kept_gain.mean():+.3f} ({params.control_scorer})")
    per_budget = "\n".join(
        f"| {b:g} | {s.kept_agnostic:.3f} → {s.kept_aware:.3f} | {s.kl_agnostic:.3f} → {s.kl_aware:.3f} | "
        f"{s.acc_agnostic:.0%} → {s.acc_aware:.0%} | {c.kept_agnostic:.3f} → {c.kept_aware:.3f} | "
        f"{c.kl_agnostic:.3f} → {c.kl_aware:.3f} | {c.acc_agnostic:.0%} → {c.acc_aware:.0%} |"
        for (b, s), (_, c) in zip(snap.iterrows(), ctrl.iterrows()))
    sw = sweep_summary(sweep)
    win = sw[sw.config.str.endswith(f"k{params.kernel_size} {params.pooling}")].sort_values("window")
    win_text = ", ".join(f"w={int(r.window)}: {r.kl_mean:.3f}" for r in win.itertuples())
    pool = sw[sw.window == params.window].sort_values(["kernel_size", "pooling"])
    pool_text = ", ".join(f"k={int(r.kernel_size)} {r.pooling}: {r.kl_mean:.3f}" for r in pool.itertuples())
    best = sw.iloc[0]
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run ({params.model}, {n_prompts} passkey prompt(s) in Wikipedia haystacks of
~{params.context_tokens} tokens, budgets {", ".join(f"{b:g}" for b in params.budgets)} of the context, SnapKV window
{params.window}, kernel {params.kernel_size} {params.pooling}; every scorer keeps {params.n_sink} sinks and the last
{params.recent_window} context tokens; seed {params.seed}). In query-aware mode the question is prefilled with the
context and kept outside the budget, so both modes keep the same number of context entries.

Per budget, query-agnostic → query-aware (means over prompts; answer KL in nats, lower is better):

| budget | SnapKV needle kept | SnapKV answer KL | SnapKV accuracy | control needle kept | control answer KL | control accuracy |
|---|---|---|---|---|---|---|
{per_budget}

1. **Query-aware helps SnapKV** (higher needle kept and lower answer KL at every budget) — {"holds" if part1 else "does not hold"}
   ({int(better.sum())}/{len(better)} budgets).
2. **The gain is larger than for {params.control_scorer}** (both mean gains larger) — {"holds" if part2 else "does not hold"}:
   needle-kept gain {snap.kept_gain.mean():+.3f} vs {ctrl.kept_gain.mean():+.3f}; answer-KL gain
   {snap.kl_gain.mean():+.3f} vs {ctrl.kl_gain.mean():+.3f} nats.

**Window and pooling sweeps** (query-agnostic, budget {params.sweep_budget:g}, {params.n_continuations} Wikipedia
continuation(s) of {params.continuation_tokens} tokens; mean KL to the full cache, nats): windows ({params.kernel_size}
{params.pooling}) {win_text}; pooling (window {params.window}) {pool_text}. Lowest KL: {best.config} ({best.kl_mean:.3f}).
The sweeps describe SnapKV's settings and do not enter the verdict.
"""
    if n_prompts < 8:
        findings += (f"\nWith {n_prompts} prompt(s) these means carry no confidence interval worth the name and "
                     "accuracy moves in steps of a whole prompt; the GPU parameter set runs 40 prompts of 1024 "
                     "tokens.\n")
    return label, summary_line, findings


def plot_modes(summary: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for scorer, g in summary.groupby("scorer", sort=False):
        for mode, ls in (("agnostic", "--"), ("aware", "-")):
            axes[0].plot(g.budget, g[f"kept_{mode}"], ls, marker="o", label=f"{scorer}, query-{mode}")
            axes[1].plot(g.budget, g[f"kl_{mode}"], ls, marker="o", label=f"{scorer}, query-{mode}")
    axes[0].set(xlabel="KV budget (share of the context)", ylabel="needle entries kept (share)",
                title="Needle kept")
    axes[1].set(xlabel="KV budget (share of the context)", ylabel="answer KL to full cache (nats)",
                title="Answer-token KL")
    axes[1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep(sweep: pd.DataFrame, params: Params):
    import matplotlib.pyplot as plt

    sw = sweep_summary(sweep)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    win = sw[sw.config.str.endswith(f"k{params.kernel_size} {params.pooling}")].sort_values("window")
    axes[0].plot(win.window, win.kl_mean, marker="o")
    axes[0].set_xscale("log", base=2)
    axes[0].set(xlabel="observation window", ylabel="KL to full cache (nats)",
                title=f"Window (kernel {params.kernel_size} {params.pooling})")
    pool = sw[sw.window == params.window]
    for name in ["none", *params.poolings]:
        g = pool[(pool.pooling == name) | ((pool.kernel_size == 1) & (name != "none"))].sort_values("kernel_size")
        if len(g):
            axes[1].plot(g.kernel_size, g.kl_mean, marker="o", label=name if name != "none" else "no pooling")
    axes[1].set(xlabel="pooling kernel", ylabel="KL to full cache (nats)", title=f"Pooling (window {params.window})")
    axes[1].legend(frameon=False)
    fig.tight_layout()
    return fig
