"""What the two kernel notebooks share: the device check, the correctness grid under FlashAttention's 2x rule
[@flashattention] and its exhaustive check part, and reading (or re-measuring) a benchmark CSV with its provenance.

The 2x rule (:mod:`salience.kernels.testing`): a path passes an output when its largest error against a float64
reference is at most twice the error of a plain PyTorch *control* run in the same low precision, plus a floor of
1e-6 x max|reference|. Every case of a grid is run, so correctness is an exhaustive check (:func:`evidence.check`):
supported when every case passes, contradicted by a single failure; no interval, there is no sampling.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import evidence
from ..paths import REPO_ROOT

#: the rule's ratio: at most RATIO x the control's error (plus the floor of salience.kernels.testing)
RATIO = 2.0
#: columns of a correctness table that describe the result of a case rather than the case
RESULT_COLUMNS = ("error", "control_error", "allowed", "ratio", "passed", "reference_gap")


def check_device(value: str) -> str:
    """The kernel notebooks run on ``cpu`` or ``cuda[:N]``; returns ``value`` or raises ``ValueError``."""
    if value != "cpu" and not value.startswith("cuda"):
        raise ValueError("device must be cpu, cuda or cuda:N for the kernel notebooks")
    return value


# --------------------------------------------------------------------------------------------- correctness grid
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
    on a shared 2-core machine extra threads wait for busy cores and make them far slower; one thread also makes the
    numbers independent of the core count."""
    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cases(params, case_list: list[dict], check_case: Callable[[int, dict, object], list[dict]]) -> pd.DataFrame:
    """``check_case(i, case, params) -> rows`` over every case (on the run's device, one CPU thread), rows sorted by
    the order of ``params.backends``."""
    if params.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {params.device!r} was asked for but torch sees no CUDA device; use device: cpu")
    rows = []
    with torch_threads(params.device):
        for i, case in enumerate(tqdm(case_list, desc="correctness cases", leave=False, mininterval=10)):
            rows += check_case(i, case, params)
    order = {b: i for i, b in enumerate(params.backends)}
    return pd.DataFrame(rows).sort_values("backend", key=lambda s: s.map(order), kind="stable", ignore_index=True)


def sig(x: float, digits: int = 2) -> float:
    """``x`` rounded to ``digits`` significant digits (for tables a reader scans; never what nbval checks)."""
    return float(f"{x:.{digits - 1}e}") if np.isfinite(x) and x != 0 else x


def correctness_summary(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per group of ``by``: cases, passed, and the magnitudes behind them (worst error, worst control error, worst
    error / control error, worst error / allowed error where <= 1 passes) at two significant digits. The magnitudes
    are float round-off and vary with the CPU's instruction set: shown for the reader, not checked by nbval."""
    g = df.assign(margin=df.error / df.allowed).groupby(list(by), sort=False)
    return pd.DataFrame({
        "cases": g.size(),
        "passed": g.passed.sum().astype(int),
        "max_error": g.error.max().map(sig),
        "max_control_error": g.control_error.max().map(sig),
        "worst_ratio_to_control": g.ratio.max().map(sig),
        "worst_error_over_allowed": g.margin.max().map(sig),
    }).reset_index()


def correctness_part(spec: evidence.PartSpec, correct: pd.DataFrame, what: str) -> evidence.Part:
    """The exhaustive check: every row of ``correct`` (one per case, path and output or reference) must pass. The
    detail names the checks (``what``) and, if any fails, the first failing case; never a round-off magnitude."""
    failures = correct[~correct.passed]
    detail = f"every case of the grid, {what}"
    if not failures.empty:
        f = failures.iloc[0]
        where = ", ".join(f"{c}={f[c]}" for c in correct.columns if c not in RESULT_COLUMNS)
        detail += f"; {len(failures)} fail, the first at {where}"
    worst = float((correct.error / correct.allowed).max())
    return evidence.check(spec, correct.passed.tolist(), worst, detail=detail)


def grid_text(params) -> str:
    """Which path ran at which lengths, e.g. "blockwise (block 16) at N ∈ [37, 130], Triton through its CPU
    interpreter (`TRITON_INTERPRET=1`) at N ∈ [21]"."""
    parts = []
    if "blockwise" in params.backends:
        parts.append(f"blockwise (block {params.block}) at N ∈ {sorted(set(params.lengths))}")
    if "triton" in params.backends:
        where = "through its CPU interpreter (`TRITON_INTERPRET=1`)" if params.device == "cpu" else "on the GPU"
        parts.append(f"Triton {where} at N ∈ {sorted(set(params.triton_lengths))}")
    return ", ".join(parts)


def plot_correctness(df: pd.DataFrame, title: str, x: str):
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
    fig.suptitle(f"{title}: allowed = 2 × the control's error in the same precision + 1e-6 floor; ≤ 1 passes",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- benchmark CSVs
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


def rerun(name: str, device: str, lengths: list[int], out: Path, extra: Sequence[str] = ()) -> Path:
    """Run ``benchmarks/bench_<name>.py`` (one torch thread on CPU, as in benchmarks/README.md) writing ``out``.

    Returns ``out``. Raises ``RuntimeError`` with the script's last error line when it fails.
    """
    dev = "cuda" if device.startswith("cuda") else "cpu"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / f"bench_{name}.py"), "--device", dev, "--out", str(out),
           "--lengths", *map(str, lengths), *extra] + (["--threads", "1"] if dev == "cpu" else [])  # fmt: skip
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


def load_kernel_benchmark(params, output_dir: Path, kernel: str, columns: set[str],
                          extra: Sequence[str] = ()) -> tuple[pd.DataFrame, Path]:  # fmt: skip
    """The benchmark rows and the CSV they came from: ``benchmark_csv``, or a fresh measurement written to
    ``output_dir/<kernel>_<device>.csv`` when ``rerun_benchmark`` is true (``extra``: more script options)."""
    csv = resolve_csv(params.benchmark_csv, params.rerun_benchmark, kernel)
    if params.rerun_benchmark:
        dev = "cuda" if params.device.startswith("cuda") else "cpu"
        csv = rerun(kernel, params.device, params.benchmark_lengths, Path(output_dir) / f"{kernel}_{dev}.csv", extra)
    return read_benchmark(csv, columns), csv


def provenance(df: pd.DataFrame, csv: Path, name: str, remeasured: bool = False) -> str:
    """One paragraph on where the benchmark numbers come from: the file (or this run, when ``remeasured``), device,
    threads, load average, and whether GPU numbers exist (``benchmarks/results/<name>_cuda.csv``)."""
    if remeasured:
        source = f"this run's own measurement (`{csv.name}` in the run folder)"
    else:
        source = f"`{csv.relative_to(REPO_ROOT)}`" if csv.is_relative_to(REPO_ROOT) else f"`{csv}`"
    devices = ", ".join(sorted(df.device.astype(str).unique()))
    threads = ", ".join(str(int(t)) for t in sorted(df.threads.dropna().unique()))
    load = df.load_avg_1m.dropna()
    text = (f"The benchmark numbers come from {source}: device **{devices}**, {threads} torch thread(s), 1-minute "
            f"load average {load.min():.2f}–{load.max():.2f} while it ran (a shared machine: timings are only as "
            "good as that).")  # fmt: skip
    if "cuda" not in devices:
        gpu = REPO_ROOT / "benchmarks" / "results" / f"{name}_cuda.csv"
        text += (f" **GPU numbers are absent** (`{gpu.relative_to(REPO_ROOT)}` does not exist): the papers' GPU "
                 "setting is untested here." if not gpu.is_file() else
                 f" A GPU CSV exists (`{gpu.relative_to(REPO_ROOT)}`): run `--params gpu` to judge it.")  # fmt: skip
    return text


def length_ticks(ax, ns: Sequence[int]) -> None:
    """Log-scaled N axis labelled 512, 1k, 2k, ..."""
    ns = sorted(int(n) for n in ns)
    ax.set_xscale("log")
    ax.set_xticks(ns, [f"{n // 1024}k" if n >= 1024 else str(n) for n in ns])
    ax.minorticks_off()


__all__ = [
    "RATIO",
    "check_device",
    "correctness_part",
    "correctness_summary",
    "grid_text",
    "length_ticks",
    "load_kernel_benchmark",
    "plot_correctness",
    "provenance",
    "read_benchmark",
    "rerun",
    "resolve_csv",
    "rule_row",
    "run_cases",
    "sig",
    "torch_threads",
]
