"""Notebook ``kernel-lightning-attention``: does Lightning Attention-2 [@lightning_attention2] keep the time per token
flat as N grows, and beat softmax attention at long N?

Three parts of one claim about :func:`salience.kernels.lightning_attention` (causal linear attention with per-head
decay, computed block by block as in Lightning Attention [@transnormerllm]):

1. ``correct`` (exhaustive check): over a grid (lengths off the block grid, decay rates including 0, i.e. plain causal
   linear attention; float32/bfloat16/float16) the blockwise and Triton paths (the latter through its CPU interpreter
   when there is no GPU) match two float64 references, the O(N²) masked form and the token-by-token recurrence,
   under FlashAttention's 2x rule [@flashattention] (:mod:`.kernel_common`).
2. ``flat_time_per_token`` (one-sided, judged over benchmark sweeps): per sweep of
   ``benchmarks/bench_lightning_attention.py``, log(time per token) is fitted against log N over N ≥ ``flat_from``
   and turned into the growth it implies from ``flat_from`` to the longest N (:func:`growth_per_sweep`). The part is
   ``no_worse`` with δ: supported when the 95% interval of that growth lies below δ; a time per token that *falls*
   with N passes (the old two-sided band failed it).
3. ``beats_softmax`` (judged over the same sweeps): SDPA's time ÷ LA-2's time at N ≥ ``long_from`` (the smallest
   ratio of a sweep, :func:`speedup_per_sweep`); ``better``: supported when the interval of (ratio − 1) lies above 0.

A sweep times every method at every N once, each in a fresh process, so the machine's load drift hits all lengths and
both methods alike; LA-2 and SDPA of one sweep are paired. ``clock`` picks the time judged: ``wall`` (a GPU) or
``cpu``, the process's CPU time, which on a shared CPU with one torch thread leaves out the time spent waiting for a
core (on an idle machine the two agree).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator

from .. import evidence
from ..params import NotebookParams
from .kernel_common import (
    check_device,
    correctness_part,
    correctness_summary,
    grid_text,
    length_ticks,
    load_kernel_benchmark,
    plot_correctness,
    provenance,
    resolve_csv,
    rule_row,
    run_cases,
    sig,
)

TITLE = "Lightning Attention-2: exact blockwise and Triton paths, and time per token vs N"
CLAIM = ("Lightning Attention-2 keeps the time per token flat as N grows and is faster than softmax attention at "
         "long N.")
PAPERS = ["lightning_attention2"]
DType = Literal["float32", "bfloat16", "float16"]
Length = Annotated[int, Field(ge=1, le=65536)]
BenchLength = Annotated[int, Field(ge=64, le=1_048_576)]
Decay = Annotated[float, Field(ge=0.0, le=50.0)]
METHOD_LABELS = {"la2": "Lightning Attention-2", "sdpa": "softmax SDPA (causal)", "naive": "naive O(N²) masked form"}
REFERENCES = ("masked", "recurrent")
#: clock -> (time of a call, time per token) columns of the benchmark CSV
CLOCK_COLUMNS = {"wall": ("time_ms", "us_per_token"), "cpu": ("cpu_ms", "cpu_us_per_token")}
CLOCK_NAMES = {"wall": "wall time", "cpu": "CPU time"}
CORRECT = evidence.PartSpec(
    id="correct", statement="every path matches the masked form and the recurrence within the 2x rule in every case",
    metric="error ÷ allowed error (≤ 1 passes)", unit="case", higher_is_better=False, papers=("flashattention",))
FLAT = evidence.PartSpec(
    id="flat_time_per_token",
    statement="LA-2's time per token grows by less than δ from N = {flat_from} to the longest N measured (falling "
              "is fine)",
    metric="growth of LA-2's {clock} per token over N ≥ {flat_from} (log-log fit)", unit="benchmark sweep",
    higher_is_better=False, papers=("lightning_attention2",))
BEATS = evidence.PartSpec(
    id="beats_softmax", statement="LA-2 is faster than causal softmax attention (SDPA) at every N ≥ {long_from}",
    metric="SDPA {clock} ÷ LA-2 {clock} at N ≥ {long_from} (smallest of a sweep)", unit="benchmark sweep",
    higher_is_better=True, papers=("lightning_attention2",))
JUDGED = (FLAT, BEATS)


class Params(NotebookParams):
    """Parameters of ``kernel-lightning-attention``; the defaults live in
    ``params/kernel-lightning-attention.yaml``."""

    notebook = "kernel-lightning-attention"

    lengths: list[Length] = Field(min_length=1, description="N of the blockwise cases (off the block grid)")
    decays: list[Decay] = Field(min_length=1, description="decay rates r, lambda is exp(-r); 0: plain linear attention")
    heads: int = Field(ge=1, le=128, description="heads of every case (one decay rate for all)")
    head_dim: int = Field(ge=1, le=256, description="D of q and k")
    value_dim: int = Field(ge=1, le=256, description="E of v (differs from D on purpose)")
    batch: int = Field(ge=1, le=64, description="batch size of every case")
    dtypes: list[DType] = Field(min_length=1, description="precisions under test")
    backends: list[Literal["blockwise", "triton"]] = Field(min_length=1, description="paths under test")
    block: int = Field(ge=1, le=1024, description="sequence block of both paths (Triton: a power of two, at least 16)")
    triton_lengths: list[Length] = Field(min_length=1, description="N of the Triton cases (CPU interpreter: tiny)")
    flat_from: BenchLength = Field(description="flatness is judged from this N to the longest N measured")
    long_from: BenchLength = Field(description="long N: LA-2 must beat softmax attention at every N from this one on")
    parts: dict[str, evidence.PartRule] = Field(description="direction and smallest effect δ of each judged part")
    clock: Literal["wall", "cpu"] = Field(description="time the timing parts judge: wall, or the process's CPU time "
                                                      "(a shared CPU)")
    benchmark_csv: str = Field(description="CSV written by benchmarks/bench_lightning_attention.py --sweeps K")
    rerun_benchmark: bool = Field(description="re-measure (minutes) instead of reading benchmark_csv")
    benchmark_lengths: list[BenchLength] = Field(min_length=1, description="N of a re-measurement")
    benchmark_sweeps: int = Field(ge=2, le=100, description="sweeps (units of the timing parts) of a re-measurement")

    @field_validator("device")
    @classmethod
    def _cpu_or_cuda(cls, value: str) -> str:
        return check_device(value)

    judged = JUDGED

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if self.clock == "cpu" and self.device != "cpu":
            raise ValueError("clock: cpu judges a CPU benchmark; use clock: wall with a CUDA device")
        if "triton" in self.backends and (self.block < 16 or self.block & (self.block - 1)):
            raise ValueError(f"block must be a power of two >= 16 when the triton backend runs; got {self.block}")
        if self.rerun_benchmark and sum(n >= self.flat_from for n in self.benchmark_lengths) < 2:
            raise ValueError(f"benchmark_lengths needs two N >= flat_from ({self.flat_from}) to judge flatness")
        if self.rerun_benchmark and max(self.benchmark_lengths) < self.long_from:
            raise ValueError(f"benchmark_lengths needs an N >= long_from ({self.long_from})")
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
    passed (see :func:`~.kernel_common.rule_row`), reference_gap (max |recurrent − masked| in float64, relative to
    max |masked|: how well the two references agree). The control is the masked form in the low precision; inputs
    are drawn in float64 (q scaled by D^-1/2) and rounded to the dtype.
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


def summary(correct: pd.DataFrame) -> pd.DataFrame:
    """Per backend, dtype and reference: cases, passed and the error magnitudes (see
    :func:`~.kernel_common.correctness_summary`)."""
    return correctness_summary(correct, ["backend", "dtype", "reference"])


def plot_decays(correct: pd.DataFrame):
    """Correctness figure: error / allowed error by decay rate, dtype and backend (masked-form reference)."""
    data = correct[correct.reference == "masked"].assign(decay=lambda d: d.decay.map(lambda x: f"{x:g}"))
    fig = plot_correctness(data, title="Lightning Attention-2 vs the float64 masked form", x="decay")
    for ax in fig.axes:
        ax.set_xlabel("decay rate (λ = exp(−rate))")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- benchmark
BENCH_COLUMNS = {"device", "threads", "dtype", "head_dim", "heads", "sweep", "n", "method", "status", "time_ms",
                 "us_per_token", "peak_mib", "load_avg_1m"}  # fmt: skip


def load_benchmark(params: Params, output_dir: Path) -> tuple[pd.DataFrame, Path]:
    """This kernel's benchmark rows and CSV (see :func:`~.kernel_common.load_kernel_benchmark`); one configuration
    (dtype, D, heads) only, since the timing parts pair LA-2 and SDPA within a sweep of one configuration."""
    bench, csv = load_kernel_benchmark(params, output_dir, "lightning_attention", BENCH_COLUMNS,
                                       extra=["--sweeps", str(params.benchmark_sweeps)])  # fmt: skip
    timed = bench[bench.method.isin(["la2", "sdpa"]) & (bench.status == "ok")]
    missing = [c for c in CLOCK_COLUMNS[params.clock] if c not in bench or timed[c].isna().any()]
    if missing:
        raise ValueError(f"{csv.name} has no {CLOCK_NAMES[params.clock]} ({', '.join(missing)}) for every LA-2 and "
                         "SDPA row: re-measure it, or set clock: wall")  # fmt: skip
    configs = sorted(set(_config(bench)))
    if len(configs) != 1:
        raise ValueError(f"{csv.name} holds {len(configs)} configurations ({configs}); the timing parts judge one: "
                         "measure with a single --dtype and --head-dim")  # fmt: skip
    return bench, csv


def _config(df: pd.DataFrame) -> pd.Series:
    return df.dtype.astype(str) + " D" + df.head_dim.astype(str) + " " + df.heads.astype(str) + " heads"


def sweep_times(bench: pd.DataFrame, method: str, column: str) -> pd.DataFrame:
    """``column`` of ``method``'s rows with status ok as a sweep × N table."""
    rows = bench[(bench.method == method) & (bench.status == "ok")]
    return rows.pivot_table(index="sweep", columns="n", values=column, aggfunc="first").sort_index(axis=1)


def growth_per_sweep(bench: pd.DataFrame, flat_from: int, clock: str = "wall") -> pd.Series:
    """Per sweep: the growth of LA-2's time per token from ``flat_from`` to the longest N, ``(N_max / flat_from) **
    slope − 1``, where ``slope`` is the least-squares slope of log(time per token) against log N over the sweep's
    N ≥ ``flat_from`` (0 = flat, 0.2 = 20% slower per token at N_max, negative = faster), on ``clock``. Raises
    ``ValueError`` with fewer than two such N."""
    times = sweep_times(bench, "la2", CLOCK_COLUMNS[clock][1])
    times = times.loc[:, times.columns >= flat_from].dropna()
    if times.shape[1] < 2:
        raise ValueError(f"the benchmark CSV has LA-2 timings at fewer than two N >= flat_from ({flat_from})")
    logn = np.log(times.columns.to_numpy(dtype=float))
    slopes = np.polyfit(logn, np.log(times.to_numpy().T), 1)[0]
    return pd.Series((times.columns.max() / flat_from) ** slopes - 1.0, index=times.index, name="growth")


def speedup_per_sweep(bench: pd.DataFrame, long_from: int, clock: str = "wall") -> pd.Series:
    """Per sweep: SDPA's time ÷ LA-2's time on ``clock``, the smallest over the N ≥ ``long_from`` where both ran in
    that sweep. Raises ``ValueError`` when no such N exists."""
    column = CLOCK_COLUMNS[clock][0]
    la2, sdpa = sweep_times(bench, "la2", column), sweep_times(bench, "sdpa", column)
    ns = [n for n in la2.columns if n >= long_from and n in sdpa.columns]
    if not ns:
        raise ValueError(f"the benchmark CSV has no N >= long_from ({long_from}) where LA-2 and SDPA both ran")
    ratio = (sdpa[ns] / la2[ns]).dropna()
    return ratio.min(axis=1).rename("speedup")


def sweep_units(bench: pd.DataFrame, params: Params) -> pd.DataFrame:
    """The units of the timing parts, one row per sweep: ``growth`` (:func:`growth_per_sweep`) and ``speedup``
    (:func:`speedup_per_sweep`)."""
    growth = growth_per_sweep(bench, params.flat_from, params.clock)
    speedup = speedup_per_sweep(bench, params.long_from, params.clock)
    return pd.concat([growth, speedup], axis=1).rename_axis("sweep").reset_index()


def benchmark_table(bench: pd.DataFrame, clock: str = "wall") -> pd.DataFrame:
    """One row per N: sweeps, the median over sweeps of each method's µs per token on ``clock`` (3 significant
    digits; the status where a method did not run) and the median of SDPA's time ÷ LA-2's within a sweep."""
    call, per_token = CLOCK_COLUMNS[clock]
    rows = []
    for n, g in bench.groupby("n", sort=True):
        row = dict(n=int(n), sweeps=int(g[g.method == "la2"].sweep.nunique()))
        for method in ("la2", "sdpa", "naive"):
            m = g[g.method == method]
            ok = m[m.status == "ok"]
            row[f"{method}_us_per_token"] = sig(ok[per_token].median(), 3) if len(ok) else \
                (m.status.iloc[0] if len(m) else "not measured")  # fmt: skip
        times = g[g.status == "ok"].pivot_table(index="sweep", columns="method", values=call, aggfunc="first")
        row["sdpa/la2 time"] = sig((times.sdpa / times.la2).median(), 2) if {"la2", "sdpa"} <= set(times) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def plot_benchmark(bench: pd.DataFrame, flat_from: int, long_from: int, delta: float, clock: str = "wall"):
    """Time per token vs N (log-log): each sweep's LA-2, SDPA and naive point, the median line of each; the dashed
    line is LA-2's median at ``flat_from`` × (1 + δ), the growth limit of the flatness part; the dotted line marks
    ``long_from``; times on ``clock``. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    dev = ", ".join(sorted(bench.device.astype(str).unique()))
    labels = dict(METHOD_LABELS, la2="LA-2 (Triton)" if "cuda" in dev else "LA-2 (blockwise)")
    y = CLOCK_COLUMNS[clock][1]
    df = bench[bench.status == "ok"].assign(method=lambda d: d.method.map(labels))
    order = [labels[m] for m in ("la2", "sdpa", "naive")]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    sns.stripplot(data=df, x="n", y=y, hue="method", hue_order=order, native_scale=True, size=3,
                  alpha=0.45, jitter=False, legend=False, ax=ax)  # fmt: skip
    sns.lineplot(data=df, x="n", y=y, hue="method", hue_order=order, estimator="median",
                 errorbar=None, marker="o", ax=ax)  # fmt: skip
    la2 = df[(df.method == labels["la2"]) & (df.n >= flat_from)].groupby("n")[y].median()
    if len(la2):
        ax.hlines(la2.iloc[0] * (1 + delta), la2.index.min(), la2.index.max(), colors="C0", linestyles="--", lw=1,
                  label=f"LA-2 at N = {flat_from} × (1 + δ), δ = {delta:g}")  # fmt: skip
    ax.axvline(long_from, color="0.6", ls=":", lw=1)
    ax.set(yscale="log", xlabel="N", ylabel=f"{CLOCK_NAMES[clock]} per token (µs)")
    length_ticks(ax, df.n.unique())
    ax.legend(title=None, frameon=False, fontsize=8)
    skipped = bench[bench.status != "ok"].drop_duplicates(["method", "n"])
    note = "; ".join(f"{r.method} at N={r.n}: {r.status}" for r in skipped.itertuples())
    ax.set_title(f"Lightning Attention-2 benchmark ({dev}, {bench.sweep.nunique()} sweeps)"
                 + (f"\nnot run: {note}" if note else ""), fontsize=9)  # fmt: skip
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- the claim
def _spec(spec: evidence.PartSpec, params: Params) -> evidence.PartSpec:
    fill = dict(flat_from=params.flat_from, long_from=params.long_from, clock=CLOCK_NAMES[params.clock])
    return dataclasses.replace(spec, statement=spec.statement.format(**fill), metric=spec.metric.format(**fill))


def judge_claim(correct: pd.DataFrame, bench: pd.DataFrame, csv: Path, params: Params) -> evidence.Claim:
    """The claim judged from this run's correctness grid and the benchmark CSV's sweeps: ``correct`` (exhaustive
    check), ``flat_time_per_token`` (one-sample, growth vs 0) and ``beats_softmax`` (SDPA ÷ LA-2 time vs 1), the
    last two with seeded paired-bootstrap intervals over sweeps; the label follows
    :func:`salience.evidence.overall_label`."""
    growth = growth_per_sweep(bench, params.flat_from, params.clock)
    speedup = speedup_per_sweep(bench, params.long_from, params.clock)
    n_cases = len(cases(params))
    flat_ns = sorted(int(n) for n in bench[bench.method == "la2"].n.unique() if n >= params.flat_from)
    parts = [
        correctness_part(CORRECT, correct, f"{n_cases} cases × the paths that run them × 2 references "
                                             "(masked form, recurrence)"),
        evidence.judge_one_sample(_spec(FLAT, params), params.parts[FLAT.id], growth, seed=params.seed,
                                  detail=f"fitted over N ∈ {flat_ns}, per sweep"),
        evidence.judge(_spec(BEATS, params), params.parts[BEATS.id], speedup, pd.Series(1.0, index=speedup.index),
                       seed=params.seed, detail="b is 1 (equal time); a sweep's value is its smallest ratio over those N"),
    ]  # fmt: skip
    config = _config(bench).iloc[0]
    setting = (
        "Lightning Attention-2 is a GPU kernel (Triton) compared with FlashAttention. Here the timed path is the "
        f"blockwise PyTorch one on the benchmark's device ({', '.join(sorted(set(bench.device.astype(str))))}), "
        f"against PyTorch's causal softmax SDPA, {config}, batch 1, forward only; the Triton kernel is checked for "
        f"correctness only ({grid_text(params)}). The timing parts are paired over {growth.size} benchmark sweeps: "
        "a sweep times each method at each N once, in a fresh process (median of the script's repeated calls), so "
        f"the machine's load drift hits every N and both methods alike. Times are {CLOCK_NAMES[params.clock]}"
        + (" (the process's, with one torch thread: the time spent waiting for a core on this shared machine is left "
           "out)." if params.clock == "cpu" else "."))
    notes = [provenance(bench, csv, "lightning_attention", params.rerun_benchmark),
             f"Correctness grid: decay rates [{', '.join(f'{x:g}' for x in params.decays)}], {params.heads} heads, "
             f"D = {params.head_dim}, E = {params.value_dim}, {', '.join(params.dtypes)}."]  # fmt: skip
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS, parts=parts,
                          setting=setting, notes=notes, seed=params.seed)  # fmt: skip
