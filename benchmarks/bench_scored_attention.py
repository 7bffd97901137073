#!/usr/bin/env python
"""Benchmark scored attention against eager attention + column sum and against SDPA without scores.

    python benchmarks/bench_scored_attention.py --device cpu                       # 512 ... 8192
    python benchmarks/bench_scored_attention.py --device cuda --lengths 1024 8192 32768 131072

Methods (causal self-attention, B=1, GQA heads):
  scored  salience.kernels.scored_attention, key mass summed over all queries (H2O): the blockwise path on CPU, the
          Triton path on CUDA.
  scored_window, scored_row  the same with the mass of the last 64 queries (SnapKV) or of the last one (TOVA): on
          CPU the sdpa_rows path (torch's fused attention plus those rows). CPU default only.
  eager   what transformers' eager attention does: repeat K/V, full score matrix plus additive causal mask, float32
          softmax, P @ V; then the key mass as P's column sums.
  sdpa    torch.nn.functional.scaled_dot_product_attention(is_causal=True): output only, no scores. K/V are
          repeated to H_q heads before timing so that the flash kernel is eligible (not counted).

What is measured:
  time_ms   median wall time of ``--repeats`` calls after ``--warmup`` calls (CUDA: synchronised).
  cpu_ms    (CPU) median CPU time of the process per call, the same calls: robust to other jobs on the machine.
  peak_mib  CPU: growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) during the
            first full-size call of a fresh subprocess per configuration, i.e. all memory the call touched beyond the
            inputs, torch allocations included (tracemalloc would not see them). One call on 64-token inputs runs
            before it so that library code pages and thread pools are not counted.
            CUDA: torch.cuda.max_memory_allocated() during one call minus the memory allocated before it.
  load_avg_1m  the machine's 1-minute load average after the configuration ran (timings on a shared machine
            are only as good as this number).
  diff_out / diff_mass  max |out - out_eager| and max |key_mass - column sums of eager P| (empty when eager did not
            run, and for the window / row modes, whose mass is not the column sums); diff_mass_rel divides by max
            |column sums|.

Results go to a printed table and a CSV (default benchmarks/results/scored_attention_<device>.csv). The shared
measurement helpers here are also used by bench_lightning_attention.py.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = ("float32", "float16", "bfloat16")


# --------------------------------------------------------------------------------------------- measurement helpers
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def cpu_peak_mib(fn) -> tuple[float, object]:
    """Peak RSS growth (MiB) while ``fn()`` runs; returns it with ``fn``'s result. Call it before any warm-up, in a
    fresh process, so that allocator caches do not hide the memory the call needs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS so the baseline is honest
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _proc_status_kib("VmRSS")
    result = fn()
    return (_proc_status_kib("VmHWM") - before) / 1024, result


def cuda_peak_mib(fn) -> tuple[float, object]:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20, result


def median_times_ms(fn, *, device: str, warmup: int, repeats: int) -> dict:
    """``time_ms``: the median wall time of ``repeats`` calls after ``warmup`` calls (CUDA: synchronised before and
    after); on CPU also ``cpu_ms``, the median of this process's CPU time per call (``time.process_time``). With one
    torch thread on a shared machine the CPU time leaves out the time the process waited for a core, so it is the
    robust one; on an idle machine the two agree."""
    import torch

    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return {"time_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu) if device == "cpu" else None}


def run_worker_subprocess(script: str, spec: dict, timeout: float) -> dict:
    """Run one configuration in a fresh interpreter (CPU memory numbers need a clean process)."""
    try:
        proc = subprocess.run(
            [sys.executable, script, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout>{timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "killed (out of memory?)" if proc.returncode < 0 else f"error: {tail[:80]}"}
    return json.loads(lines[-1])


def print_table(rows: list[dict], columns: list[str]) -> None:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.2f}"
        return "" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a CSV


def environment(threads: int | None = None) -> dict:
    import platform

    import torch

    info = {"torch": torch.__version__, "threads": threads or torch.get_num_threads(), "cores": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "machine": platform.machine()}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --------------------------------------------------------------------------------------------- the three methods
def eager_attention_with_column_sum(q, k, v):
    """transformers' eager attention (LlamaAttention + eager_attention_forward, causal) plus P's column sums."""
    import torch

    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    n_q, n_k = q.shape[2], k.shape[2]
    causal = torch.full((n_q, n_k), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(1 + n_k - n_q)
    weights = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + causal
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return weights @ v, weights.sum(dim=-2, dtype=torch.float32)


# The scored-attention variants: which queries' probabilities make the key mass (H2O: all; SnapKV: the last 64, its
# observation window in kvpress; TOVA: the last one). On CPU "auto" runs the first on the blockwise path and the other
# two on sdpa_rows (torch's fused attention plus the chosen rows); on CUDA all three run the Triton kernels.
SCORED_MASS = {
    "scored": dict(mass="all"),
    "scored_window": dict(mass="window", window=64),
    "scored_row": dict(mass="row"),
}
METHODS = (*SCORED_MASS, "eager", "sdpa")


def make_method(name: str, q, k, v):
    import torch.nn.functional as F

    from salience.kernels import scored_attention

    if name in SCORED_MASS:
        options = SCORED_MASS[name]
        return lambda: scored_attention(q, k, v, causal=True, **options)[::2]  # (out, key_mass)
    if name == "eager":
        return lambda: eager_attention_with_column_sum(q, k, v)
    if name == "sdpa":
        group = q.shape[1] // k.shape[1]
        k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return lambda: (F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True), None)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def measure(spec: dict) -> dict:
    """One configuration: memory of the first call, then the median time; saves outputs for the equality check."""
    import torch

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    b, h, h_kv, n, d = spec["batch"], spec["heads"], spec["kv_heads"], spec["n"], spec["head_dim"]
    # A call on tiny inputs first: pages in the library code, starts thread pools and compiles Triton kernels, so
    # that the measured peak is the memory this size needs, not one-off start-up costs.
    make_method(spec["method"], *(torch.randn(b, hh, 64, d, device=device, dtype=dtype) for hh in (h, h_kv, h_kv)))()
    # Inputs created directly in their dtype: no freed temporaries the measured call could silently reuse.
    q = torch.randn(b, h, n, d, device=device, dtype=dtype)
    k = torch.randn(b, h_kv, n, d, device=device, dtype=dtype)
    v = torch.randn(b, h_kv, n, d, device=device, dtype=dtype)
    fn = make_method(spec["method"], q, k, v)
    peak = cuda_peak_mib if device == "cuda" else cpu_peak_mib
    peak_mib, (out, mass) = peak(fn)
    if spec.get("save"):
        torch.save({"out": out.cpu(), "mass": None if mass is None else mass.cpu()}, spec["save"])
    del out, mass
    times = median_times_ms(fn, device=device, warmup=spec["warmup"], repeats=spec["repeats"])
    return {"status": "ok", **times, "peak_mib": peak_mib, "load_avg_1m": round(os.getloadavg()[0], 2)}


def run_one(spec: dict, script: str, timeout: float, measure_fn=None) -> dict:
    """One configuration: on CPU in a fresh subprocess of ``script`` (so peak RSS is this call's alone), on CUDA in
    process with ``measure_fn`` (default: this script's :func:`measure`), recording an out-of-memory as ``OOM``."""
    if spec["device"] == "cpu":
        return run_worker_subprocess(script, spec, timeout)
    import torch

    try:
        return (measure_fn or measure)(spec)
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    finally:
        torch.cuda.empty_cache()


def eager_bytes(spec: dict) -> int:
    """Eager's live score-sized buffers at its peak (scores, masked scores, float32 softmax, cast copy) + mask."""
    import torch

    elt = torch.finfo(getattr(torch, spec["dtype"])).bits // 8
    n2 = spec["n"] ** 2
    return spec["batch"] * spec["heads"] * n2 * (2 * elt + 4 + elt) + n2 * elt


def compare(saved: dict[str, str]) -> dict:
    """max |out - eager| and max |key_mass - eager column sums| for every method that saved its outputs."""
    import torch

    if "eager" not in saved:
        return {}
    ref = torch.load(saved["eager"])
    diffs = {}
    for method, path in saved.items():
        if method == "eager":
            continue
        res = torch.load(path)
        d = {"diff_out": (res["out"].float() - ref["out"].float()).abs().max().item()}
        # eager saves the column sums over every query: only the mass="all" method is comparable with them (the
        # window and row modes are checked against the float64 reference in tests/kernels)
        if res["mass"] is not None and SCORED_MASS.get(method, {}).get("mass") == "all":
            d["diff_mass"] = (res["mass"] - ref["mass"]).abs().max().item()
            d["diff_mass_rel"] = d["diff_mass"] / ref["mass"].abs().max().item()
        diffs[method] = d
    return diffs


def paired_ratios(args) -> list[dict]:
    """``--paired``: every method's time over SDPA's, measured side by side in this one process. For each N the
    methods run in turn, ``--repeats`` rounds in an order rotated from round to round; a round's ratio is a method's
    CPU time over SDPA's in that round, so load drift hits numerator and denominator alike. Eager is left out (its
    N x N matrix is what the other table measures)."""
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods if m != "eager"]
    if "sdpa" not in methods:
        raise SystemExit("--paired needs sdpa among --methods: it is the denominator")
    rows = []
    for dtype in args.dtype:
        for d in args.head_dim:
            for n in args.lengths:
                q, k, v = (torch.randn(args.batch, h, n, d, device=args.device, dtype=getattr(torch, dtype))
                           for h in (args.heads, args.kv_heads, args.kv_heads))  # fmt: skip
                fns = {m: make_method(m, q, k, v) for m in methods}
                for fn in fns.values():
                    for _ in range(args.warmup):
                        fn()
                times = {m: [] for m in methods}
                for r in range(args.repeats):
                    order = methods[r % len(methods):] + methods[:r % len(methods)]
                    for m in order:
                        times[m].append(median_times_ms(fns[m], device=args.device, warmup=0, repeats=1))
                key = "cpu_ms" if args.device == "cpu" else "time_ms"
                for m in methods:
                    ratios = [a[key] / b[key] for a, b in zip(times[m], times["sdpa"])]
                    rows.append(dict(device=args.device, threads=args.threads, dtype=dtype, head_dim=d,
                                     heads=args.heads, kv_heads=args.kv_heads, n=n, method=m, repeats=args.repeats,
                                     ms=statistics.median(t[key] for t in times[m]),
                                     ratio_vs_sdpa=statistics.median(ratios), ratio_low=min(ratios),
                                     ratio_high=max(ratios), load_avg_1m=round(os.getloadavg()[0], 2)))  # fmt: skip
                print(f"  {dtype} D={d} N={n}: " + ", ".join(f"{r['method']} {r['ratio_vs_sdpa']:.2f}x"
                                                               for r in rows[-len(methods):]), flush=True)
                write_csv(rows, PAIRED_COLUMNS, args.out)
    return rows


PAIRED_COLUMNS = ["device", "threads", "dtype", "head_dim", "heads", "kv_heads", "n", "method", "repeats", "ms",
                  "ratio_vs_sdpa", "ratio_low", "ratio_high", "load_avg_1m"]

COLUMNS = [
    "device", "threads", "dtype", "head_dim", "heads", "kv_heads", "n", "method", "status", "time_ms", "cpu_ms",
    "peak_mib", "time_vs_sdpa", "cpu_vs_sdpa", "peak_vs_eager", "diff_out", "diff_mass", "diff_mass_rel", "load_avg_1m",
]  # fmt: skip


def parse_args(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths N (N_q = N_k)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, help="default: float32 on CPU, float16 bfloat16 on CUDA")
    p.add_argument("--head-dim", type=int, nargs="+", help="default: 64 on CPU, 64 128 on CUDA")
    p.add_argument("--heads", type=int, help="query heads (default 4 on CPU, 32 on CUDA)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default heads / 2 on CPU, 8 on CUDA)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", nargs="+", choices=METHODS,
                   help="default: every method on CPU; scored, eager, sdpa on CUDA")  # fmt: skip
    p.add_argument("--threads", type=int, help="CPU: torch threads per configuration (default: torch's default)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-eager-gib", type=float, default=8.0, help="CPU: skip eager above this estimated size")
    p.add_argument("--timeout", type=float, default=600.0, help="CPU: seconds per configuration")
    p.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/scored_attention_<device>.csv)")
    p.add_argument("--paired", action="store_true",
                   help="ratios to SDPA measured side by side in one process (rotated rounds), no memory column; "
                        "default CSV benchmarks/results/scored_attention_<device>_paired.csv")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.lengths = args.lengths or ([512, 1024, 2048, 4096, 8192] if cpu else [1024, 4096, 8192, 16384, 32768, 131072])
    args.dtype = args.dtype or (["float32"] if cpu else ["float16", "bfloat16"])
    args.head_dim = args.head_dim or ([64] if cpu else [64, 128])
    args.heads = args.heads or (4 if cpu else 32)
    args.kv_heads = args.kv_heads or (max(1, args.heads // 2) if cpu else 8)
    args.methods = args.methods or (list(METHODS) if cpu else ["scored", "eager", "sdpa"])
    args.out = args.out or RESULTS / f"scored_attention_{args.device}{'_paired' if args.paired else ''}.csv"
    if args.device == "cpu" and not args.threads:
        args.threads = torch.get_num_threads()
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return []
    if args.device == "cuda" and not __import__("torch").cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    print(f"# scored attention benchmark, {json.dumps(environment(args.threads))}", flush=True)
    if args.paired:
        rows = paired_ratios(args)
        print()
        print_table(rows, PAIRED_COLUMNS[6:])
        print(f"\nwrote {args.out}")
        return rows
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtype:
            for d in args.head_dim:
                for n in args.lengths:
                    base = dict(device=args.device, threads=args.threads, dtype=dtype, head_dim=d, heads=args.heads,
                                kv_heads=args.kv_heads, batch=args.batch, n=n)  # fmt: skip
                    group, saved = [], {}
                    for method in args.methods:
                        spec = dict(base, method=method, warmup=args.warmup, repeats=args.repeats)
                        spec["save"] = os.path.join(tmp, f"{method}-{dtype}-{d}-{n}.pt")
                        too_big = eager_bytes(spec) > args.max_eager_gib * 2**30
                        if method == "eager" and args.device == "cpu" and too_big:
                            result = {"status": f"skipped (~{eager_bytes(spec) / 2**30:.0f} GiB)"}
                        else:
                            result = run_one(spec, __file__, args.timeout)
                        if result.get("status") == "ok":
                            saved[method] = spec["save"]
                        group.append(dict(base, method=method, **result))
                    diffs = compare(saved)
                    by_method = {r["method"]: r for r in group}
                    for r in group:
                        r.update(diffs.get(r["method"], {}))
                        sdpa, eager = by_method.get("sdpa", {}), by_method.get("eager", {})
                        if r.get("time_ms") and sdpa.get("time_ms"):
                            r["time_vs_sdpa"] = r["time_ms"] / sdpa["time_ms"]
                        if r.get("cpu_ms") and sdpa.get("cpu_ms"):
                            r["cpu_vs_sdpa"] = r["cpu_ms"] / sdpa["cpu_ms"]
                        if r.get("peak_mib") is not None and eager.get("peak_mib"):
                            r["peak_vs_eager"] = r["peak_mib"] / eager["peak_mib"]
                    rows.extend(group)
                    for r in group:
                        print(f"  {r['dtype']} D={d} N={n} {r['method']}: {r.get('status')} "
                              f"{r.get('time_ms', float('nan')):.1f} ms {r.get('peak_mib', float('nan')):.0f} MiB",
                              flush=True)  # fmt: skip
                    write_csv(rows, COLUMNS, args.out)  # after every length: a long run keeps what it measured
    print()
    print_table(rows, COLUMNS[2:])
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
