"""Notebook ``kernel-scored-attention``: can a fused attention return the softmax mass each key receives, exactly, at a
small fraction of eager attention's memory?

Two analyses of :func:`salience.kernels.scored_attention` (``out, lse, key_mass``):

1. **Correctness.** Over a small grid (lengths off the block grid, GQA 9/3 and 4/4, causal and not, key-mass modes
   all/window/row, ZipCache normalisation on and off, float32/bfloat16/float16), every path under test (blockwise;
   Triton, through its CPU interpreter when there is no GPU) is compared with the float64 naive reference on ``out``,
   ``lse`` and ``key_mass`` under flash-attention's rule: its error is at most twice the error of the naive path run
   in the same low precision (the *control*), plus a 1e-6 floor (:mod:`salience.kernels.testing`).
2. **Cost.** The benchmark CSV written by ``benchmarks/bench_scored_attention.py`` (time and peak memory vs N for
   scored attention, eager attention + column sum, and SDPA without scores) is read, tabulated and plotted; it can be
   re-measured with ``rerun_benchmark: true`` (minutes).

The helpers for benchmark CSVs (:func:`resolve_csv`, :func:`rerun`, :func:`provenance`) and for the 2x rule
(:func:`rule_row`) are shared with ``kernel-lightning-attention``.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from ..params import NotebookParams
from ..paths import REPO_ROOT

TITLE = "Scored attention: per-key softmax mass from a fused attention kernel (input of H2O, ZipCache s97, SnapKV s93)"
CLAIM = (
    "A fused attention can return the softmax mass each key receives, exactly (within the low-precision rule), at a "
    "small fraction of eager attention's memory."
)
MEMORY_TARGET = 0.10  # blockwise/fused peak memory as a share of eager's, at the largest N where eager ran
RATIO = 2.0  # flash-attention's rule: at most RATIO x the control's error (plus the floor of salience.kernels.testing)
OUTPUTS = ("out", "lse", "key_mass")
DType = Literal["float32", "bfloat16", "float16"]
Length = Annotated[int, Field(ge=1, le=65536)]
BenchLength = Annotated[int, Field(ge=64, le=1_048_576)]
METHOD_LABELS = {"scored": "scored attention", "eager": "eager + column sum", "sdpa": "SDPA (no scores)"}


class Params(NotebookParams):
    """Parameters of ``kernel-scored-attention`` (defaults: the CPU run, under a minute of kernels on 2 cores)."""

    notebook = "kernel-scored-attention"

    lengths: list[Length] = Field([37, 130], min_length=1, description="N (N_q = N_k) of the naive/blockwise cases")
    head_groups: list[list[int]] = Field([[9, 3], [4, 4]], min_length=1, description="[H_q, H_kv] pairs (GQA)")
    head_dim: int = Field(32, ge=1, le=256)
    batch: int = Field(1, ge=1, le=64)
    causal: list[bool] = Field([True, False], min_length=1)
    mass_modes: list[Literal["all", "window", "row"]] = Field(["all", "window", "row"], min_length=1)
    window: int = Field(8, ge=1, le=65536, description="observation window of mass='window' (SnapKV)")
    row: int = Field(-1, ge=-65536, le=65535, description="query row of mass='row' (-1: last, TOVA; 0: [CLS])")
    normalize: list[bool] = Field([False, True], min_length=1, description="ZipCache normalisation off/on")
    dtypes: list[DType] = Field(["float32", "bfloat16", "float16"], min_length=1)
    backends: list[Literal["blockwise", "triton"]] = Field(["blockwise", "triton"], min_length=1)
    block: int = Field(16, ge=1, le=4096, description="query rows per step of the blockwise path")
    triton_lengths: list[Length] = Field([21], min_length=1, description="N of the Triton cases (interpreter: tiny)")
    benchmark_csv: str = Field("benchmarks/results/scored_attention_cpu.csv", description="CSV of the benchmark script")
    rerun_benchmark: bool = Field(False, description="re-measure (minutes) instead of reading benchmark_csv")
    benchmark_lengths: list[BenchLength] = Field([512, 1024, 2048, 4096, 8192], min_length=1)

    @field_validator("device")
    @classmethod
    def _cpu_or_cuda(cls, value: str) -> str:
        return check_device(value)

    @field_validator("head_groups")
    @classmethod
    def _gqa(cls, groups: list[list[int]]) -> list[list[int]]:
        bad = [g for g in groups if len(g) != 2 or min(g) < 1 or g[0] % g[1] or g[0] > 128]
        if bad:
            raise ValueError("each head group is [H_q, H_kv] with 1 <= H_kv, H_q <= 128 and H_q a multiple of H_kv")
        return groups

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        shortest = min(self.lengths + (self.triton_lengths if "triton" in self.backends else []))
        if "row" in self.mass_modes and not -shortest <= self.row < shortest:
            raise ValueError(f"row must lie in [-{shortest}, {shortest}) (the shortest length); got {self.row}")
        resolve_csv(self.benchmark_csv, self.rerun_benchmark, "scored_attention")
        return self


# --------------------------------------------------------------------------------------------- shared helpers
def check_device(value: str) -> str:
    """The kernel notebooks run on ``cpu`` or ``cuda[:N]``; returns ``value`` or raises ``ValueError``."""
    if value != "cpu" and not value.startswith("cuda"):
        raise ValueError("device must be cpu, cuda or cuda:N for the kernel notebooks")
    return value


def resolve_csv(path: str, rerun_benchmark: bool, name: str) -> Path:
    """``path`` made absolute (relative paths are read from the repository root).

    Raises ``ValueError`` (one line: what to run) when the file is missing and ``rerun_benchmark`` is false.
    """
    csv = Path(path).expanduser()
    csv = csv if csv.is_absolute() else REPO_ROOT / csv
    if not rerun_benchmark and not csv.is_file():
        device = "cuda" if "cuda" in csv.name else "cpu"
        raise ValueError(
            f"benchmark_csv {path!r} does not exist: run `python benchmarks/bench_{name}.py --device {device}` first "
            f"(it writes benchmarks/results/{name}_{device}.csv), or set rerun_benchmark: true"
        )
    return csv


def rerun(name: str, device: str, lengths: list[int], out: Path) -> Path:
    """Run ``benchmarks/bench_<name>.py`` (one torch thread on CPU, as in benchmarks/README.md) writing ``out``.

    Returns ``out``. Raises ``RuntimeError`` with the script's last error line when it fails.
    """
    dev = "cuda" if device.startswith("cuda") else "cpu"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / f"bench_{name}.py"), "--device", dev, "--out", str(out),
           "--lengths", *map(str, lengths)] + (["--threads", "1"] if dev == "cpu" else [])  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark {' '.join(cmd[1:])} failed: {tail}")
    return out


def read_benchmark(csv: Path, required: set[str]) -> pd.DataFrame:
    """The benchmark CSV as a frame; raises ``ValueError`` naming the missing columns if it is not one."""
    df = pd.read_csv(csv)
    missing = required - set(df.columns)
    if missing:
        raise ValueError(f"{csv} is not a benchmark CSV of this kernel: missing columns {sorted(missing)}")
    return df


def provenance(df: pd.DataFrame, csv: Path, name: str, remeasured: bool = False) -> str:
    """Markdown on where the benchmark numbers come from: the file (or this run, when ``remeasured``), device,
    threads, load average, and whether GPU numbers exist (``benchmarks/results/<name>_cuda.csv``)."""
    if remeasured:
        source = f"this run's own measurement (`{csv.name}` in the run folder)"
    else:
        source = f"`{csv.relative_to(REPO_ROOT)}`" if csv.is_relative_to(REPO_ROOT) else f"`{csv}`"
    devices = ", ".join(sorted(df.device.astype(str).unique()))
    threads = ", ".join(str(t) for t in sorted(df.threads.dropna().unique()))
    load = df.load_avg_1m.dropna()
    text = (f"The benchmark numbers come from {source}: device **{devices}**, {threads} torch thread(s), 1-minute "
            f"load average {load.min():.2f}–{load.max():.2f} during the runs (a shared machine: timings are only as "
            "good as that).")  # fmt: skip
    if "cuda" not in devices:
        gpu = REPO_ROOT / "benchmarks" / "results" / f"{name}_cuda.csv"
        text += (f" **GPU numbers are absent** (`{gpu.relative_to(REPO_ROOT)}` does not exist): the GPU targets of "
                 "issue 4 are untested here." if not gpu.is_file() else
                 f" A GPU CSV exists (`{gpu.relative_to(REPO_ROOT)}`): run `--params gpu` to judge it.")  # fmt: skip
    return text


def rule_row(ref: torch.Tensor, control: torch.Tensor, result: torch.Tensor) -> dict:
    """The 2x rule for one output. Returns ``error``, ``control_error`` (both max-abs vs ``ref``), ``allowed``,
    ``ratio`` (error / control error; NaN when the control is exact) and ``passed``."""
    from ..kernels.testing import max_abs_error, tolerance

    result = result.cpu()
    error = max_abs_error(ref, result)
    control_error = max_abs_error(ref, control)
    allowed = tolerance(ref, control, ratio=RATIO)
    ratio = error / control_error if control_error > 0 else float("nan")
    return dict(error=error, control_error=control_error, allowed=allowed, ratio=ratio,
                passed=bool(error <= allowed and result.shape == ref.shape))  # fmt: skip


@contextmanager
def torch_threads(device: str, n: int = 1):
    """On CPU, run the block with ``n`` torch threads (restored afterwards). The correctness grid is many tiny ops:
    on a shared 2-core machine extra threads wait for busy cores and make them up to 100x slower (see "Machine" in
    benchmarks/README.md); one thread also makes the numbers independent of the core count."""
    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sig(x: float, digits: int = 2) -> float:
    """``x`` rounded to ``digits`` significant digits (stable printing for nbval)."""
    return float(f"{x:.{digits - 1}e}") if np.isfinite(x) and x != 0 else x


# --------------------------------------------------------------------------------------------- correctness
def cases(params: Params) -> list[dict]:
    """The grid: one dict per (N, heads, causal, mass, normalize, dtype) with the backends that run on it."""
    lengths = sorted(set(params.lengths) | (set(params.triton_lengths) if "triton" in params.backends else set()))
    out = []
    for n, (hq, hkv), causal, mass, norm, dt in itertools.product(
        lengths, params.head_groups, params.causal, params.mass_modes, params.normalize, params.dtypes
    ):
        backends = [b for b in params.backends if n in (params.triton_lengths if b == "triton" else params.lengths)]
        out.append(dict(n=n, h_q=hq, h_kv=hkv, causal=causal, mass=mass, normalize=norm, dtype=dt, backends=backends))
    return out


def _mass_kwargs(case: dict, params: Params) -> dict:
    extra = {"window": dict(window=params.window), "row": dict(row=params.row)}.get(case["mass"], {})
    return dict(causal=case["causal"], mass=case["mass"], normalize=case["normalize"], **extra)


def correctness(params: Params) -> pd.DataFrame:
    """Every case of :func:`cases` on every backend; one row per (case, backend, output).

    Columns: n, h_q, h_kv, causal, mass, normalize, dtype, backend, output, error, control_error, allowed, ratio,
    passed (see :func:`rule_row`). Inputs are drawn in float64 from ``seed`` + case index and rounded to the dtype;
    the reference is the naive path on them in float64, the control the naive path in the dtype (both on the CPU).
    """
    return run_cases(params, cases(params), _check_case)


def run_cases(params, case_list: list[dict], check_case) -> pd.DataFrame:
    """``check_case(i, case, params) -> rows`` over every case (on the run's device and thread count), backends in
    the order of ``params.backends``; shared by the kernel notebooks."""
    if params.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {params.device!r} was asked for but torch sees no CUDA device; use device: cpu")
    rows = []
    with torch_threads(params.device):
        for i, case in enumerate(tqdm(case_list, desc="correctness cases", leave=False, mininterval=10)):
            rows += check_case(i, case, params)
    order = {b: i for i, b in enumerate(params.backends)}
    return pd.DataFrame(rows).sort_values("backend", key=lambda s: s.map(order), kind="stable", ignore_index=True)


def _check_case(i: int, case: dict, params: Params) -> list[dict]:
    """The rows of :func:`correctness` for case number ``i``: one per backend and output."""
    from ..kernels import scored_attention
    from ..kernels.scored_attention import blockwise, naive

    gen = torch.Generator().manual_seed(params.seed * 100_003 + i)
    b, n, d = params.batch, case["n"], params.head_dim
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(getattr(torch, case["dtype"]))
               for h in (case["h_q"], case["h_kv"], case["h_kv"]))  # fmt: skip
    kw = _mass_kwargs(case, params)
    ref = naive.scored_attention(q.double(), k.double(), v.double(), **kw)
    control = naive.scored_attention(q, k, v, **kw)
    qd, kd, vd = (t.to(params.device) for t in (q, k, v))
    described = {key: value for key, value in case.items() if key != "backends"}
    rows = []
    for backend in case["backends"]:
        if backend == "blockwise":
            result = blockwise.scored_attention(qd, kd, vd, block=params.block, **kw)
        else:
            result = scored_attention(qd, kd, vd, backend="triton", **kw)
        for name, r, c, x in zip(OUTPUTS, ref, control, result):
            rows.append(dict(described, backend=backend, output=name, **rule_row(r, c, x)))
    return rows


def correctness_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per backend, dtype and output: cases, passed, worst error, worst control error, worst error / control error
    and worst error / allowed error (``<= 1`` passes). Two significant digits, so the table prints the same from run
    to run."""
    g = df.assign(margin=df.error / df.allowed).groupby(["backend", "dtype", "output"], sort=False)
    return pd.DataFrame({
        "cases": g.size(),
        "passed": g.passed.sum().astype(int),
        "max_error": g.error.max().map(sig),
        "max_control_error": g.control_error.max().map(sig),
        "worst_ratio_to_control": g.ratio.max().map(sig),
        "worst_error_over_allowed": g.margin.max().map(sig),
    }).reset_index()


def plot_correctness(df: pd.DataFrame, title: str = "Scored attention vs the float64 reference", x: str = "output"):
    """Each case's error / allowed error (allowed = 2 x the control's error + the 1e-6 floor; <= 1 passes), by
    ``x`` (a column of ``df``), dtype and backend. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    backends = list(dict.fromkeys(df.backend))
    fig, axes = plt.subplots(1, len(backends), figsize=(4.2 * len(backends) + 1, 3.6), sharey=True, squeeze=False)
    data = df.assign(margin=(df.error / df.allowed).clip(lower=1e-5))
    for ax, backend in zip(axes[0], backends):
        sns.stripplot(data=data[data.backend == backend], x=x, y="margin", hue="dtype", dodge=True, size=3,
                      alpha=0.6, jitter=0.25, ax=ax)  # fmt: skip
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set(yscale="log", title=backend, xlabel="", ylabel="error / allowed error")
        ax.legend(title=None, frameon=False, fontsize=8)
    fig.suptitle(f"{title}: allowed = 2 × the naive path's error in the same precision + 1e-6 floor; ≤ 1 passes",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- benchmark
BENCH_COLUMNS = {"device", "threads", "dtype", "head_dim", "heads", "kv_heads", "n", "method", "status", "time_ms",
                 "peak_mib", "load_avg_1m"}  # fmt: skip


def load_benchmark(params: Params, output_dir: Path) -> tuple[pd.DataFrame, Path]:
    """This kernel's benchmark rows and CSV (see :func:`load_kernel_benchmark`)."""
    return load_kernel_benchmark(params, output_dir, "scored_attention", BENCH_COLUMNS)


def load_kernel_benchmark(params, output_dir: Path, kernel: str, columns: set[str]) -> tuple[pd.DataFrame, Path]:
    """The benchmark rows and the CSV they came from: ``benchmark_csv``, or a fresh measurement written to
    ``output_dir/<kernel>_<device>.csv`` when ``rerun_benchmark`` is true. Shared by the kernel notebooks."""
    csv = resolve_csv(params.benchmark_csv, params.rerun_benchmark, kernel)
    if params.rerun_benchmark:
        dev = "cuda" if params.device.startswith("cuda") else "cpu"
        csv = rerun(kernel, params.device, params.benchmark_lengths, Path(output_dir) / f"{kernel}_{dev}.csv")
    return read_benchmark(csv, columns), csv


def _config(df: pd.DataFrame) -> pd.Series:
    return df.dtype.astype(str) + " D" + df.head_dim.astype(str) + " " + df.heads.astype(str) + "/" + \
        df.kv_heads.astype(str) + " heads"  # fmt: skip


def benchmark_table(bench: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration and N: time (ms) and peak memory (MiB) of each method, 3 significant digits, plus
    scored/eager memory and scored/SDPA time ratios; a method that did not run shows its status instead."""
    df = bench.assign(config=_config(bench))
    rows = []
    for (config, n), g in df.groupby(["config", "n"], sort=True):
        m = g.set_index("method")
        row = dict(config=config, n=int(n))
        ok = {x for x in m.index if m.loc[x, "status"] == "ok"}
        for method in ("scored", "eager", "sdpa"):
            status = m.loc[method, "status"] if method in m.index else "not measured"
            row[f"{method}_ms"] = sig(m.loc[method, "time_ms"], 3) if method in ok else status
            row[f"{method}_mib"] = sig(m.loc[method, "peak_mib"], 3) if method in ok else ""
        row["scored/eager memory"] = sig(m.loc["scored", "peak_mib"] / m.loc["eager", "peak_mib"], 2) \
            if {"scored", "eager"} <= ok else ""  # fmt: skip
        row["scored/sdpa time"] = sig(m.loc["scored", "time_ms"] / m.loc["sdpa", "time_ms"], 2) \
            if {"scored", "sdpa"} <= ok else ""  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def memory_at_largest_eager(bench: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: the largest N where both scored and eager ran, and there scored's peak memory / eager's,
    time / eager's and time / SDPA's. Empty when eager never ran."""
    df = bench.assign(config=_config(bench))
    ok = df[df.status == "ok"]
    rows = []
    for config, g in ok.groupby("config"):
        both = sorted(set(g[g.method == "scored"].n) & set(g[g.method == "eager"].n))
        if not both:
            continue
        n = both[-1]
        at = g[g.n == n].set_index("method")
        rows.append(dict(config=config, n=int(n), memory_ratio=at.peak_mib["scored"] / at.peak_mib["eager"],
                         scored_mib=at.peak_mib["scored"], eager_mib=at.peak_mib["eager"],
                         time_vs_eager=at.time_ms["scored"] / at.time_ms["eager"],
                         time_vs_sdpa=at.time_ms["scored"] / at.time_ms["sdpa"] if "sdpa" in at.index else np.nan))
    return pd.DataFrame(rows)


def plot_benchmark(bench: pd.DataFrame):
    """Time and peak memory vs N (log-log) for each method; a second line style per configuration if several."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    dev = ", ".join(sorted(bench.device.astype(str).unique()))
    scored = "scored (Triton)" if "cuda" in dev else "scored (blockwise)"
    labels = dict(METHOD_LABELS, scored=scored)
    df = bench[bench.status == "ok"].assign(config=_config(bench), method=lambda d: d.method.map(labels))
    style = "config" if df.config.nunique() > 1 else None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (col, ylabel) in zip(axes, (("time_ms", "time (ms)"), ("peak_mib", "peak memory (MiB)"))):
        sns.lineplot(data=df, x="n", y=col, hue="method", style=style, marker="o", ax=ax,
                     hue_order=[labels[m] for m in ("scored", "eager", "sdpa")])  # fmt: skip
        if col == "peak_mib":
            eager = df[df.method == labels["eager"]].groupby("n").peak_mib.mean() * MEMORY_TARGET
            ax.plot(eager.index, eager.values, color="0.5", ls="--", lw=1, label=f"{MEMORY_TARGET:.0%} of eager")
        ax.set(xscale="log", yscale="log", xlabel="N (causal self-attention)", ylabel=ylabel)
        ax.set_xticks(sorted(df.n.unique()), [f"{n // 1024}k" if n >= 1024 else str(n) for n in sorted(df.n.unique())])
        ax.minorticks_off()
        ax.legend(title=None, frameon=False, fontsize=8)
    skipped = bench[bench.status != "ok"]
    note = "; ".join(f"{r.method} at N={r.n}: {r.status}" for r in skipped.itertuples())
    fig.suptitle(f"Scored attention benchmark ({dev})" + (f" — not run: {note}" if note else ""), fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- verdict
def correctness_text(correct: pd.DataFrame, what: str) -> tuple[bool, str]:
    """``(all passed, one markdown sentence)``: how many checks passed, the worst error / control error in the half
    precisions and in float32 per backend, and the first failure if any."""
    failures = correct[~correct.passed]
    half = correct[correct.dtype != "float32"].groupby("backend").ratio.max()
    full = correct[correct.dtype == "float32"].groupby("backend").ratio.max()
    worst = "; ".join(
        f"{b}: {half.get(b, np.nan):#.2g}× in bf16/fp16, {full.get(b, np.nan):#.2g}× in fp32"
        for b in dict.fromkeys(correct.backend)
    )
    if failures.empty:
        text = f"holds: all {len(correct)} checks ({what}) pass. Worst error ÷ the control's error — {worst}."
        if (full > RATIO).any():
            text += (" (Float32 ratios above 2 pass through the rule's 1e-6 floor: there both errors are float32 "
                     "round-off.)")  # fmt: skip
    else:
        f = failures.iloc[0]
        where = ", ".join(f"{c}={f[c]}" for c in correct.columns if c not in
                          ("error", "control_error", "allowed", "ratio", "passed", "reference_gap"))  # fmt: skip
        text = (f"fails: {len(failures)} of {len(correct)} checks exceed the rule, e.g. {where}: error {f.error:.2e} "
                f"> allowed {f.allowed:.2e}.")  # fmt: skip
    return failures.empty, text


def grid_text(params) -> str:
    """Which path ran at which lengths, as markdown (e.g. "blockwise (block 16) at N ∈ [37, 130], Triton through its
    CPU interpreter at N ∈ [21]"). Shared with kernel-lightning-attention."""
    parts = []
    if "blockwise" in params.backends:
        parts.append(f"blockwise (block {params.block}) at N ∈ {sorted(set(params.lengths))}")
    if "triton" in params.backends:
        where = "through its CPU interpreter (`TRITON_INTERPRET=1`)" if params.device == "cpu" else "on the GPU"
        parts.append(f"Triton {where} at N ∈ {sorted(set(params.triton_lengths))}")
    return ", ".join(parts)


def _both(flags: list[bool], both: str, true: str, false: str) -> str:
    return both if len(set(flags)) > 1 else true if flags[0] else false


def verdict(correct: pd.DataFrame, bench: pd.DataFrame, csv: Path, params: Params) -> tuple[str, str, str]:
    """The claim's verdict, computed from this run's numbers. Returns ``(label, one-line summary, Findings markdown)``.

    Rule:

    1. **exact**: every (case, backend, output) of the correctness grid passes the 2x rule (error vs the float64
       reference at most 2x the naive low-precision control's, plus the 1e-6 floor);
    2. **small memory**: in the benchmark CSV, at the largest N where eager attention ran, scored attention's peak
       memory is at most 10% of eager's, in every configuration the CSV holds.

    Part 1 fails: not supported. Part 1 holds and part 2 holds: supported; part 2 fails: partly supported; no N where
    both ran (part 2 cannot be judged): inconclusive.
    """
    exact, part1 = correctness_text(correct, "`out`, `lse`, `key_mass` of every case and backend")
    mem = memory_at_largest_eager(bench)
    small = None if mem.empty else bool((mem.memory_ratio <= MEMORY_TARGET).all())
    if not exact:
        label = "not supported"
    elif small is None:
        label = "inconclusive"
    else:
        label = "supported" if small else "partly supported"

    if mem.empty:
        part2 = "cannot be judged: eager attention ran at no N in the CSV"
        summary_mem = "no eager baseline in the CSV"
    else:
        w = mem.loc[mem.memory_ratio.idxmax()]
        part2 = (f"{'holds' if small else 'fails'}: at N = {w.n} ({w.config}), the largest N where eager ran, scored "
                 f"attention peaks at {w.scored_mib:.1f} MiB against eager's {w.eager_mib:.1f} MiB: "
                 f"**{w.memory_ratio:.1%}** (target ≤ {MEMORY_TARGET:.0%}). There it takes {w.time_vs_eager:.2f}× "
                 f"eager's time and {w.time_vs_sdpa:.2f}× the time of SDPA, which computes no scores")  # fmt: skip
        at = bench[(bench.n == w.n) & (bench.method == "scored")]
        if "diff_mass_rel" in bench and at.diff_mass_rel.notna().any():
            part2 += f"; its key mass equals eager's column sums to {at.diff_mass_rel.max():.1e} (relative)"
        summary_mem = f"peak memory {w.memory_ratio:.1%} of eager's at N={w.n}"
    skipped = bench[(bench.method == "eager") & (bench.status != "ok")]
    ran = bench[(bench.method == "scored") & (bench.status == "ok")]
    if not skipped.empty and not ran.empty and ran.n.max() >= skipped.n.min():
        last = skipped[skipped.n == skipped.n.max()].iloc[0]
        part2 += f". Scored attention also ran at N = {int(ran.n.max())}, where eager did not run: {last.status}"
    n_fail = int((~correct.passed).sum())
    summary = f"{len(correct) - n_fail}/{len(correct)} correctness checks pass; {summary_mem}"
    findings = f"""### Findings

**Verdict: {label}.** Computed from this run (seed {params.seed}, device {params.device}) and the benchmark CSV.

1. **Exact per-key mass** — {part1}
   Grid: {grid_text(params)}; H_q/H_kv {", ".join(f"{a}/{b}" for a, b in params.head_groups)},
   D = {params.head_dim}, {_both(params.causal, "causal and not", "causal only", "non-causal only")}, mass
   {", ".join(params.mass_modes)}, ZipCache normalisation {_both(params.normalize, "on and off", "on", "off")},
   {", ".join(params.dtypes)}.
2. **A small fraction of eager attention's memory** — {part2}.

{provenance(bench, csv, "scored_attention", params.rerun_benchmark)}
"""
    return label, summary, findings
