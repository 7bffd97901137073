"""Notebook ``kernel-scored-attention``: can a fused attention return the softmax mass each key receives, exactly, at a
small fraction of eager attention's memory?

The key mass is the input of H2O [@h2o], ZipCache [@zipcache], SnapKV [@snapkv], TOVA [@tova] and [CLS]-attention
pruning [@fastervlm]; :func:`salience.kernels.scored_attention` returns it beside ``out`` and ``lse`` without the
N×N matrix. Two parts, both exhaustive checks (:func:`salience.evidence.check`, no sampling):

1. ``exact``: over a grid (lengths off the block grid, GQA 9/3 and 4/4, causal and not, key-mass modes
   all/window/row, ZipCache normalisation on and off, float32/bfloat16/float16), every path under test (blockwise;
   sdpa_rows on the cases it supports; Triton, through its CPU interpreter when there is no GPU) matches the float64
   naive reference on ``out``, ``lse`` and ``key_mass`` under FlashAttention's 2x rule [@flashattention]
   (:mod:`.kernel_common`).
2. ``small_memory``: in the benchmark CSV of ``benchmarks/bench_scored_attention.py``, at the largest N where eager
   attention ran, scored attention's peak memory is at most ``memory_target`` of eager's, in every configuration.
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

TITLE = "Scored attention: per-key softmax mass from a fused attention kernel"
CLAIM = (
    "A fused attention can return the softmax mass each key receives, exactly (within FlashAttention's "
    "low-precision rule), at a small fraction of eager attention's memory."
)
PAPERS = ["flashattention"]
OUTPUTS = ("out", "lse", "key_mass")
DType = Literal["float32", "bfloat16", "float16"]
Length = Annotated[int, Field(ge=1, le=65536)]
BenchLength = Annotated[int, Field(ge=64, le=1_048_576)]
METHOD_LABELS = {"scored": "scored attention", "scored_window": "scored, last-64 window",
                 "scored_row": "scored, last row", "eager": "eager + column sum", "sdpa": "SDPA (no scores)"}
SCORED_METHODS = ("scored", "scored_window", "scored_row")  # the benchmark's key-mass modes: all, window 64, row
EXACT = evidence.PartSpec(
    id="exact",
    statement="every path returns out, lse and key_mass within the 2x rule in every case of the grid",
    metric="error ÷ allowed error (≤ 1 passes)", unit="case", higher_is_better=False, papers=("flashattention",))
SMALL_MEMORY = evidence.PartSpec(
    id="small_memory",
    statement="at the largest N where eager attention ran, scored attention's peak memory is at most {target:.0%} of "
              "eager's (eager + column sums)",
    metric="peak memory, scored ÷ eager", unit="configuration", higher_is_better=False)


class Params(NotebookParams):
    """Parameters of ``kernel-scored-attention``; the defaults live in ``params/kernel-scored-attention.yaml``."""

    notebook = "kernel-scored-attention"

    lengths: list[Length] = Field(min_length=1,
                                  description="N (as many queries as keys) of the CPU-path cases (blockwise, sdpa_rows)")
    head_groups: list[list[int]] = Field(min_length=1, description="[H_q, H_kv] pairs (GQA)")
    head_dim: int = Field(ge=1, le=256, description="D of q, k and v")
    batch: int = Field(ge=1, le=64, description="batch size of every case")
    causal: list[bool] = Field(min_length=1, description="end-aligned causal mask (true) and none (false)")
    mass_modes: list[Literal["all", "window", "row"]] = Field(
        min_length=1, description="queries summed: all (H2O), window (SnapKV), row (TOVA / [CLS])")
    window: int = Field(ge=1, le=65536, description="observation window of the window mass mode (SnapKV)")
    row: int = Field(ge=-65536, le=65535, description="query row of the row mass mode (-1: the last, TOVA; 0: [CLS])")
    normalize: list[bool] = Field(min_length=1, description="ZipCache normalisation off (false) / on (true)")
    dtypes: list[DType] = Field(min_length=1, description="precisions under test")
    backends: list[Literal["blockwise", "sdpa_rows", "triton"]] = Field(
        min_length=1, description="paths under test (sdpa_rows runs only the cases it supports: CPU float32, window "
                                  "or row mass over at most a quarter of the rows)")
    block: int = Field(ge=1, le=4096, description="query rows per step of the blockwise path")
    triton_lengths: list[Length] = Field(min_length=1, description="N of the Triton cases (CPU interpreter: tiny)")
    memory_target: float = Field(gt=0.0, le=1.0, description="largest share of eager's peak memory that passes")
    benchmark_csv: str = Field(description="CSV written by benchmarks/bench_scored_attention.py")
    rerun_benchmark: bool = Field(description="re-measure (minutes) instead of reading benchmark_csv")
    benchmark_lengths: list[BenchLength] = Field(min_length=1, description="N of a re-measurement")

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


# --------------------------------------------------------------------------------------------- correctness
def cases(params: Params) -> list[dict]:
    """The grid: one dict per (N, heads, causal, mass, normalize, dtype) with the backends that run on it."""
    lengths = sorted(set(params.lengths) | (set(params.triton_lengths) if "triton" in params.backends else set()))
    out = []
    for n, (hq, hkv), causal, mass, norm, dt in itertools.product(
        lengths, params.head_groups, params.causal, params.mass_modes, params.normalize, params.dtypes
    ):
        case = dict(n=n, h_q=hq, h_kv=hkv, causal=causal, mass=mass, normalize=norm, dtype=dt)
        backends = [b for b in params.backends if n in (params.triton_lengths if b == "triton" else params.lengths)
                    and (b != "sdpa_rows" or _sdpa_rows_supports(case, params))]  # fmt: skip
        out.append(dict(case, backends=backends))
    return out


def _sdpa_rows_supports(case: dict, params: Params) -> bool:
    """Whether the sdpa_rows path takes ``case`` (it refuses the others with a ValueError, see its module)."""
    from ..kernels.scored_attention import sdpa_rows

    q, k = (torch.empty(params.batch, h, case["n"], params.head_dim, dtype=getattr(torch, case["dtype"]),
                        device=params.device) for h in (case["h_q"], case["h_kv"]))  # fmt: skip
    options = {key: value for key, value in _mass_kwargs(case, params).items() if key != "normalize"}
    return sdpa_rows.supports(q, k, **options) is None


def _mass_kwargs(case: dict, params: Params) -> dict:
    extra = {"window": dict(window=params.window), "row": dict(row=params.row)}.get(case["mass"], {})
    return dict(causal=case["causal"], mass=case["mass"], normalize=case["normalize"], **extra)


def correctness(params: Params) -> pd.DataFrame:
    """Every case of :func:`cases` on every backend; one row per (case, backend, output).

    Columns: n, h_q, h_kv, causal, mass, normalize, dtype, backend, output, error, control_error, allowed, ratio,
    passed (see :func:`~.kernel_common.rule_row`). Inputs are drawn in float64 from ``seed`` + case index and rounded
    to the dtype; the reference is the naive path on them in float64, the control the naive path in the dtype.
    """
    return run_cases(params, cases(params), _check_case)


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
            result = scored_attention(qd, kd, vd, backend=backend, **kw)
        for name, r, c, x in zip(OUTPUTS, ref, control, result):
            rows.append(dict(described, backend=backend, output=name, **rule_row(r, c, x)))
    return rows


def summary(correct: pd.DataFrame) -> pd.DataFrame:
    """Per backend, dtype and output: cases, passed and the error magnitudes (see
    :func:`~.kernel_common.correctness_summary`)."""
    return correctness_summary(correct, ["backend", "dtype", "output"])


def plot_outputs(correct: pd.DataFrame):
    """Error / allowed error of each case by output, dtype and backend."""
    return plot_correctness(correct, title="Scored attention vs the float64 reference", x="output")


# --------------------------------------------------------------------------------------------- benchmark
BENCH_COLUMNS = {"device", "threads", "dtype", "head_dim", "heads", "kv_heads", "n", "method", "status", "time_ms",
                 "peak_mib", "load_avg_1m"}  # fmt: skip


def load_benchmark(params: Params, output_dir: Path) -> tuple[pd.DataFrame, Path]:
    """This kernel's benchmark rows and CSV (see :func:`~.kernel_common.load_kernel_benchmark`)."""
    return load_kernel_benchmark(params, output_dir, "scored_attention", BENCH_COLUMNS)


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
        for method in [x for x in METHOD_LABELS if x in m.index or x in ("scored", "eager", "sdpa")]:
            status = m.loc[method, "status"] if method in m.index else "not measured"
            row[f"{method}_ms"] = sig(m.loc[method, "time_ms"], 3) if method in ok else status
            row[f"{method}_mib"] = sig(m.loc[method, "peak_mib"], 3) if method in ok else ""
        row["scored/eager memory"] = sig(m.loc["scored", "peak_mib"] / m.loc["eager", "peak_mib"], 2) \
            if {"scored", "eager"} <= ok else ""  # fmt: skip
        for method in [x for x in SCORED_METHODS if x in m.index]:
            row[f"{method}/sdpa time"] = sig(m.loc[method, "time_ms"] / m.loc["sdpa", "time_ms"], 2) \
                if {method, "sdpa"} <= ok else ""  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def memory_at_largest_eager(bench: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: the largest N where both scored and eager ran, and there scored's peak memory / eager's,
    time / eager's, time / SDPA's and (if measured) the key mass's largest difference from eager's column sums
    relative to their maximum. Empty when eager never ran."""
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
                         time_vs_sdpa=at.time_ms["scored"] / at.time_ms["sdpa"] if "sdpa" in at.index else np.nan,
                         key_mass_diff_rel=at.get("diff_mass_rel", pd.Series(dtype=float)).get("scored", np.nan)))
    return pd.DataFrame(rows)


def plot_benchmark(bench: pd.DataFrame, memory_target: float):
    """Time and peak memory vs N (log-log) for each method, with ``memory_target`` × eager's peak dashed; a second
    line style per configuration if several."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    dev = ", ".join(sorted(bench.device.astype(str).unique()))
    labels = dict(METHOD_LABELS, scored="scored (Triton)" if "cuda" in dev else "scored (blockwise)")
    df = bench[bench.status == "ok"].assign(config=_config(bench), method=lambda d: d.method.map(labels))
    style = "config" if df.config.nunique() > 1 else None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (col, ylabel) in zip(axes, (("time_ms", "time (ms)"), ("peak_mib", "peak memory (MiB)"))):
        sns.lineplot(data=df, x="n", y=col, hue="method", style=style, marker="o", ax=ax,
                     hue_order=[labels[m] for m in METHOD_LABELS if labels[m] in set(df.method)])  # fmt: skip
        if col == "peak_mib":
            eager = df[df.method == labels["eager"]].groupby("n").peak_mib.mean() * memory_target
            ax.plot(eager.index, eager.values, color="0.5", ls="--", lw=1, label=f"{memory_target:.0%} of eager")
        ax.set(yscale="log", xlabel="N (causal self-attention)", ylabel=ylabel)
        length_ticks(ax, df.n.unique())
        ax.legend(title=None, frameon=False, fontsize=8)
    skipped = bench[bench.status != "ok"]
    note = "; ".join(f"{r.method} at N={r.n}: {r.status}" for r in skipped.itertuples())
    fig.suptitle(f"Scored attention benchmark ({dev})" + (f" — not run: {note}" if note else ""), fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- the claim
def memory_part(bench: pd.DataFrame, memory_target: float) -> evidence.Part:
    """``small_memory``: one case per configuration of the CSV, at the largest N where eager ran. Raises
    ``ValueError`` when eager ran at no N (the part cannot be judged from that CSV)."""
    mem = memory_at_largest_eager(bench)
    if mem.empty:
        raise ValueError("the benchmark CSV has no N where both scored and eager attention ran: re-measure it")
    passed = (mem.memory_ratio <= memory_target).tolist()
    detail = "; ".join(f"at N = {r.n} ({r.config}) scored attention peaks at {r.scored_mib:.1f} MiB, eager at "
                       f"{r.eager_mib:.1f} MiB: {r.memory_ratio:.1%}" for r in mem.itertuples())
    spec = dataclasses.replace(SMALL_MEMORY, statement=SMALL_MEMORY.statement.format(target=memory_target))
    return evidence.check(spec, passed, float(mem.memory_ratio.max()),
                          detail=f"{detail} (target ≤ {memory_target:.0%})")


def judge_claim(correct: pd.DataFrame, bench: pd.DataFrame, csv: Path, params: Params) -> evidence.Claim:
    """The claim judged from this run's correctness grid and the benchmark CSV: parts ``exact`` and
    ``small_memory`` (both exhaustive checks); the label follows :func:`salience.evidence.overall_label`."""
    n_cases = len(cases(params))
    exact = correctness_part(EXACT, correct, f"{n_cases} cases × the paths that run them × 3 outputs "
                                          "(out, lse, key_mass)")
    setting = (
        f"Our own kernel, judged by FlashAttention's acceptance rule [@flashattention]. Grid: {grid_text(params)}; "
        f"H_q/H_kv {', '.join(f'{a}/{b}' for a, b in params.head_groups)}, D = {params.head_dim}, key-mass modes "
        f"{', '.join(params.mass_modes)}, {', '.join(params.dtypes)}. Memory is the peak resident memory one call "
        "adds, read from the benchmark CSV (a fresh process per configuration); on a CPU the path measured is the "
        "blockwise one, so the GPU setting of a fused kernel is not what this verdict is about. Both parts are "
        "exhaustive checks: every case is run, so there is no sampling and no interval.")
    return evidence.Claim(notebook=params.notebook, title=TITLE, statement=CLAIM, papers=PAPERS,
                          parts=[exact, memory_part(bench, params.memory_target)], setting=setting,
                          notes=[provenance(bench, csv, "scored_attention", params.rerun_benchmark)],
                          seed=params.seed)  # fmt: skip
