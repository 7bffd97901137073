"""Notebook ``kernel-lightning-attention``: does Lightning Attention-2 keep time per token flat as N grows and beat
softmax attention at long N?

Two analyses of :func:`salience.kernels.lightning_attention` (causal linear attention with per-head decay):

1. **Correctness.** Over a small grid (lengths off the block grid, several decay rates including 0, i.e. plain causal
   linear attention; float32/bfloat16/float16), the blockwise path and the Triton path (through its CPU interpreter
   when there is no GPU) are compared with two float64 references, the O(N^2) masked form and the token-by-token
   recurrence, under flash-attention's rule: error at most twice the error of the masked form run in the same low
   precision (the *control*), plus a 1e-6 floor (:mod:`salience.kernels.testing`).
2. **Cost.** The benchmark CSV written by ``benchmarks/bench_lightning_attention.py`` (time per token vs N for LA-2,
   causal softmax SDPA and the O(N^2) naive form) is read, tabulated and plotted; ``rerun_benchmark: true``
   re-measures it (minutes).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator

from ..params import NotebookParams
from .kernel_scored_attention import (
    check_device,
    correctness_text,
    grid_text,
    load_kernel_benchmark,
    plot_correctness,
    provenance,
    resolve_csv,
    rule_row,
    run_cases,
    sig,
)

TITLE = "Lightning Attention-2 (s43): exact blockwise and Triton paths, and time per token vs N"
CLAIM = "Lightning Attention-2 keeps time per token flat as N grows and beats softmax attention at long N."
FLAT_FROM = 2048  # per-token time is judged flat over N >= FLAT_FROM ...
FLAT_TOLERANCE = 0.20  # ... when every point lies within +-20% of their median
BEATS_ABOVE = 8192  # LA-2 must be faster than softmax SDPA at every measured N > BEATS_ABOVE
DType = Literal["float32", "bfloat16", "float16"]
Length = Annotated[int, Field(ge=1, le=65536)]
BenchLength = Annotated[int, Field(ge=64, le=1_048_576)]
Decay = Annotated[float, Field(ge=0.0, le=50.0)]
METHOD_LABELS = {"la2": "Lightning Attention-2", "sdpa": "softmax SDPA (causal)", "naive": "naive O(N²) masked form"}
REFERENCES = ("masked", "recurrent")


class Params(NotebookParams):
    """Parameters of ``kernel-lightning-attention`` (defaults: the CPU run, well under a minute of kernels)."""

    notebook = "kernel-lightning-attention"

    lengths: list[Length] = Field([1, 37, 130], min_length=1, description="N of the blockwise cases")
    decays: list[Decay] = Field([0.0, 0.05, 0.5, 2.0], min_length=1, description="decay rates (lambda = exp(-rate))")
    heads: int = Field(2, ge=1, le=128)
    head_dim: int = Field(32, ge=1, le=256, description="D of q and k")
    value_dim: int = Field(48, ge=1, le=256, description="E of v (differs from D on purpose)")
    batch: int = Field(1, ge=1, le=64)
    dtypes: list[DType] = Field(["float32", "bfloat16", "float16"], min_length=1)
    backends: list[Literal["blockwise", "triton"]] = Field(["blockwise", "triton"], min_length=1)
    block: int = Field(16, ge=1, le=1024, description="sequence block of the blockwise and Triton paths")
    triton_lengths: list[Length] = Field([37], min_length=1, description="N of the Triton cases (interpreter: tiny)")
    benchmark_csv: str = Field("benchmarks/results/lightning_attention_cpu.csv", description="CSV of the benchmark")
    rerun_benchmark: bool = Field(False, description="re-measure (minutes) instead of reading benchmark_csv")
    benchmark_lengths: list[BenchLength] = Field([512, 1024, 2048, 4096, 8192, 16384], min_length=1)

    @field_validator("device")
    @classmethod
    def _cpu_or_cuda(cls, value: str) -> str:
        return check_device(value)

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if "triton" in self.backends and (self.block < 16 or self.block & (self.block - 1)):
            raise ValueError(f"block must be a power of two >= 16 when the triton backend runs; got {self.block}")
        resolve_csv(self.benchmark_csv, self.rerun_benchmark, "lightning_attention")
        return self


# --------------------------------------------------------------------------------------------- correctness
def cases(params: Params) -> list[dict]:
    """The grid: one dict per (N, decay, dtype) with the backends that run on it."""
    lengths = sorted(set(params.lengths) | (set(params.triton_lengths) if "triton" in params.backends else set()))
    out = []
    for n, decay, dt in itertools.product(lengths, params.decays, params.dtypes):
        backends = [b for b in params.backends if n in (params.triton_lengths if b == "triton" else params.lengths)]
        out.append(dict(n=n, decay=decay, dtype=dt, backends=backends))
    return out


def correctness(params: Params) -> pd.DataFrame:
    """Every case of :func:`cases` on every backend, against both float64 references; one row per (case, backend,
    reference).

    Columns: n, decay, dtype, backend, reference (``masked`` or ``recurrent``), error, control_error, allowed, ratio,
    passed (see :func:`~salience.experiments.kernel_scored_attention.rule_row`), reference_gap (max |recurrent -
    masked| in float64, relative to max |masked|: how well the two references agree). The control is the masked form
    in the low precision; inputs are drawn in float64 (q scaled by D^-1/2) and rounded to the dtype.
    """
    return run_cases(params, cases(params), _check_case)


def _check_case(i: int, case: dict, params: Params) -> list[dict]:
    """The rows of :func:`correctness` for case number ``i``: one per backend and reference."""
    from ..kernels import lightning_attention
    from ..kernels.lightning_attention import naive

    gen = torch.Generator().manual_seed(params.seed * 100_003 + i)
    b, h, n, d, e = params.batch, params.heads, case["n"], params.head_dim, params.value_dim
    dtype = getattr(torch, case["dtype"])
    q = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) / d**0.5).to(dtype)  # keeps |o| in fp16 range
    k = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, n, e, generator=gen, dtype=torch.float64).to(dtype)
    decay = torch.full((h,), case["decay"], dtype=torch.float64)
    refs = {
        "masked": naive.lightning_attention_masked(q.double(), k.double(), v.double(), decay),
        "recurrent": naive.lightning_attention_recurrent(q.double(), k.double(), v.double(), decay),
    }
    gap = (refs["recurrent"] - refs["masked"]).abs().max().item() / max(refs["masked"].abs().max().item(), 1e-300)
    control = naive.lightning_attention_masked(q, k, v, decay)
    qd, kd, vd, dd = (t.to(params.device) for t in (q, k, v, decay))
    described = {key: value for key, value in case.items() if key != "backends"}
    rows = []
    for backend in case["backends"]:
        result = lightning_attention(qd, kd, vd, dd, backend=backend, block=params.block)
        for name in REFERENCES:
            rows.append(dict(described, backend=backend, reference=name, **rule_row(refs[name], control, result),
                             reference_gap=gap))  # fmt: skip
    return rows


def correctness_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per backend, dtype and reference: checks, passed, worst error, worst control error, worst error / control
    error and worst error / allowed error (``<= 1`` passes), two significant digits (stable for nbval)."""
    g = df.assign(margin=df.error / df.allowed).groupby(["backend", "dtype", "reference"], sort=False)
    return pd.DataFrame({
        "cases": g.size(),
        "passed": g.passed.sum().astype(int),
        "max_error": g.error.max().map(sig),
        "max_control_error": g.control_error.max().map(sig),
        "worst_ratio_to_control": g.ratio.max().map(sig),
        "worst_error_over_allowed": g.margin.max().map(sig),
    }).reset_index()


def plot_decays(df: pd.DataFrame):
    """Correctness figure: error / allowed error by decay rate, dtype and backend (masked-form reference)."""
    data = df[df.reference == "masked"].assign(decay=lambda d: d.decay.map(lambda x: f"{x:g}"))
    fig = plot_correctness(data, title="Lightning Attention-2 vs the float64 masked form", x="decay")
    for ax in fig.axes:
        ax.set_xlabel("decay rate (λ = exp(−rate))")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- benchmark
BENCH_COLUMNS = {"device", "threads", "dtype", "head_dim", "heads", "n", "method", "status", "time_ms",
                 "us_per_token", "peak_mib", "load_avg_1m"}  # fmt: skip


def load_benchmark(params: Params, output_dir: Path) -> tuple[pd.DataFrame, Path]:
    """This kernel's benchmark rows and CSV (see :func:`~.kernel_scored_attention.load_kernel_benchmark`)."""
    return load_kernel_benchmark(params, output_dir, "lightning_attention", BENCH_COLUMNS)


def _config(df: pd.DataFrame) -> pd.Series:
    return df.dtype.astype(str) + " D" + df.head_dim.astype(str) + " " + df.heads.astype(str) + " heads"


def benchmark_table(bench: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration and N: µs per token of each method (3 significant digits; the status where a method
    did not run) and SDPA's time / LA-2's."""
    df = bench.assign(config=_config(bench))
    rows = []
    for (config, n), g in df.groupby(["config", "n"], sort=True):
        m = g.set_index("method")
        ok = {x for x in m.index if m.loc[x, "status"] == "ok"}
        row = dict(config=config, n=int(n))
        for method in ("la2", "sdpa", "naive"):
            status = m.loc[method, "status"] if method in m.index else "not measured"
            row[f"{method}_us_per_token"] = sig(m.loc[method, "us_per_token"], 3) if method in ok else status
        row["sdpa/la2 time"] = sig(m.loc["sdpa", "time_ms"] / m.loc["la2", "time_ms"], 2) \
            if {"la2", "sdpa"} <= ok else ""  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def flat_from(times: pd.Series) -> int | None:
    """Smallest N0 among ``times``' index (N -> per-token time) such that every point with N >= N0 (at least two)
    lies within +-FLAT_TOLERANCE of their median; None if there is none."""
    ns = sorted(times.index)
    for n0 in ns[:-1]:
        t = times[times.index >= n0]
        if ((t / t.median() - 1).abs() <= FLAT_TOLERANCE).all():
            return int(n0)
    return None


def shape_tests(bench: pd.DataFrame) -> pd.DataFrame:
    """Per configuration, the two parts of the claim judged on LA-2's rows with status ok.

    Columns: config; ``flat_points`` (N >= FLAT_FROM measured), ``flat_median_us``, ``flat_max_dev`` (largest
    |t / median - 1|), ``flat_max_over_min``, ``flat`` (True/False, None with < 2 points), ``flat_from`` (see
    :func:`flat_from`); ``beat_ns`` (N > BEATS_ABOVE with both LA-2 and SDPA), ``min_speedup`` (SDPA time / LA-2
    time, smallest over those N), ``beats`` (True/False, None without such N), ``faster_everywhere`` (LA-2 below SDPA
    at every N where both ran).
    """
    df = bench[bench.status == "ok"].assign(config=_config(bench))
    rows = []
    for config, g in df.groupby("config"):
        la2 = g[g.method == "la2"].set_index("n").us_per_token.sort_index()
        sdpa = g[g.method == "sdpa"].set_index("n").time_ms
        long = la2[la2.index >= FLAT_FROM]
        dev = (long / long.median() - 1).abs() if len(long) else long
        both = sorted(set(la2.index) & set(sdpa.index))
        speed = pd.Series({n: sdpa[n] / g[(g.method == "la2") & (g.n == n)].time_ms.iloc[0] for n in both}, dtype=float)
        beat = speed[speed.index > BEATS_ABOVE]
        rows.append(dict(
            config=config, flat_points=len(long), flat_median_us=long.median() if len(long) else np.nan,
            flat_max_dev=dev.max() if len(long) else np.nan,
            flat_max_over_min=long.max() / long.min() if len(long) else np.nan,
            flat=bool((dev <= FLAT_TOLERANCE).all()) if len(long) >= 2 else None, flat_from=flat_from(la2),
            beat_ns=list(map(int, beat.index)), min_speedup=beat.min() if len(beat) else np.nan,
            beats=bool((beat > 1).all()) if len(beat) else None,
            faster_everywhere=bool((speed > 1).all()) if len(speed) else None,
        ))  # fmt: skip
    return pd.DataFrame(rows)


def plot_benchmark(bench: pd.DataFrame):
    """Time per token vs N (log-log) for LA-2, softmax SDPA and the naive form; shaded: +-20% around LA-2's median
    over N >= 2k (the flatness band). Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    dev = ", ".join(sorted(bench.device.astype(str).unique()))
    la2 = "LA-2 (Triton)" if "cuda" in dev else "LA-2 (blockwise)"
    labels = dict(METHOD_LABELS, la2=la2)
    df = bench[bench.status == "ok"].assign(config=_config(bench), method=lambda d: d.method.map(labels))
    style = "config" if df.config.nunique() > 1 else None
    fig, ax = plt.subplots(figsize=(7.5, 4))
    sns.lineplot(data=df, x="n", y="us_per_token", hue="method", style=style, marker="o", ax=ax,
                 hue_order=[labels[m] for m in ("la2", "sdpa", "naive")])  # fmt: skip
    long = df[(df.method == la2) & (df.n >= FLAT_FROM)]
    if len(long) >= 2:
        med = long.us_per_token.median()
        ax.fill_between([long.n.min(), long.n.max()], med * (1 - FLAT_TOLERANCE), med * (1 + FLAT_TOLERANCE),
                        color="C0", alpha=0.15, lw=0, label=f"LA-2 median ±{FLAT_TOLERANCE:.0%} (N ≥ {FLAT_FROM})")
    ax.axvline(BEATS_ABOVE, color="0.6", ls=":", lw=1)
    ns = sorted(df.n.unique())
    ax.set(xscale="log", yscale="log", xlabel="N", ylabel="time per token (µs)")
    ax.set_xticks(ns, [f"{n // 1024}k" if n >= 1024 else str(n) for n in ns])
    ax.minorticks_off()
    ax.legend(title=None, frameon=False, fontsize=8)
    skipped = bench[bench.status != "ok"]
    note = "; ".join(f"{r.method} at N={r.n}: {r.status}" for r in skipped.itertuples())
    ax.set_title(f"Lightning Attention-2 benchmark ({dev})" + (f"\nnot run: {note}" if note else ""), fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- verdict
def verdict(correct: pd.DataFrame, bench: pd.DataFrame, csv: Path, params: Params) -> tuple[str, str, str]:
    """The claim's verdict, computed from this run's numbers. Returns ``(label, one-line summary, Findings markdown)``.

    Rule:

    0. **correct**: every (case, backend, reference) of the correctness grid passes the 2x rule (error vs the float64
       masked form and vs the float64 recurrence at most 2x the low-precision masked form's, plus the 1e-6 floor);
    1. **flat**: LA-2's time per token at every measured N >= 2048 lies within +-20% of its median over those N
       (needs two such N);
    2. **beats softmax**: LA-2 is faster than causal softmax SDPA at every measured N > 8192 (needs one such N).

    Parts 1 and 2 must hold in every configuration of the benchmark CSV. Part 0 fails: not supported. Otherwise:
    1 and 2 hold: supported; one holds: partly supported; neither: not supported; either cannot be judged:
    inconclusive.
    """
    exact, part0 = correctness_text(correct, "vs the masked form and the recurrence, every case and backend")
    shape = shape_tests(bench)
    flat = None if shape.empty or shape.flat.isna().any() else bool(shape.flat.all())
    beats = None if shape.empty or shape.beats.isna().any() else bool(shape.beats.all())
    if not exact:
        label = "not supported"
    elif flat is None or beats is None:
        label = "inconclusive"
    else:
        label = {2: "supported", 1: "partly supported", 0: "not supported"}[int(flat) + int(beats)]

    gap = correct.reference_gap.max()
    part1, part2 = [], []
    for r in shape.itertuples():
        if r.flat is None:
            part1.append(f"cannot be judged ({r.config}: {r.flat_points} length(s) ≥ {FLAT_FROM})")
        else:
            start = f"from N = {r.flat_from}" if r.flat_from else "at no starting length"
            part1.append(f"{'holds' if r.flat else 'fails'} ({r.config}): over N ≥ {FLAT_FROM} the per-token time "
                         f"spans {r.flat_max_over_min:.2f}× (max ÷ min), its largest deviation from the median "
                         f"{r.flat_median_us:.2f} µs is **{r.flat_max_dev:.0%}** (limit {FLAT_TOLERANCE:.0%}); "
                         f"within ±{FLAT_TOLERANCE:.0%} {start}")  # fmt: skip
        if r.beats is None:
            part2.append(f"cannot be judged ({r.config}: no N > {BEATS_ABOVE} where LA-2 and SDPA both ran)")
        else:
            part2.append(f"{'holds' if r.beats else 'fails'} ({r.config}): at N ∈ {r.beat_ns} SDPA takes at least "
                         f"**{r.min_speedup:.1f}×** LA-2's time; LA-2 is faster at "
                         f"{'every' if r.faster_everywhere else 'not every'} N measured")  # fmt: skip
    summary = (f"{int(correct.passed.sum())}/{len(correct)} correctness checks pass; flat from {FLAT_FROM}: "
               f"{'n/a' if flat is None else 'yes' if flat else 'no'}; beats SDPA above {BEATS_ABOVE}: "
               f"{'n/a' if beats is None else 'yes' if beats else 'no'}")  # fmt: skip
    on_cpu = "cuda" not in set(bench.device.astype(str))
    cpu_note = (" On a CPU, LA-2 is the blockwise PyTorch path and softmax SDPA is PyTorch's CPU kernel; the claim and"
                " the issue's targets (flat from 2k to 64k, faster than SDPA beyond 8k) are about a GPU, so this is"
                " the shape on a CPU only.") if on_cpu else ""  # fmt: skip
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run (seed {params.seed}, device {params.device}) and the benchmark CSV.

0. **Correct** — {part0} The two float64 references agree to {gap:.0e} (relative).
   Grid: {grid_text(params)}; decay rates [{", ".join(f"{x:g}" for x in params.decays)}], {params.heads} heads,
   D = {params.head_dim}, E = {params.value_dim}, {", ".join(params.dtypes)}.
1. **Time per token flat as N grows** — {"; ".join(part1)}.
2. **Beats softmax attention at long N** — {"; ".join(part2)}.

{provenance(bench, csv, "lightning_attention", params.rerun_benchmark)}{cpu_note}
"""
    return label, summary, findings
