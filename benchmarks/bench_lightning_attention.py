#!/usr/bin/env python
"""Benchmark Lightning Attention-2 against causal softmax SDPA and against its own O(N^2) naive form.

    python benchmarks/bench_lightning_attention.py --device cpu --threads 1 --sweeps 10   # 512 ... 16384
    python benchmarks/bench_lightning_attention.py --device cuda --lengths 2048 8192 32768 65536

Methods (B=1, H heads, D = E = head dim, forward only):
  la2    salience.kernels.lightning_attention: blockwise path on CPU (block 64), Triton path on CUDA.
  naive  the O(N^2) masked form ((Q K^T) * decay mask) V.
  sdpa   torch.nn.functional.scaled_dot_product_attention(is_causal=True): softmax attention, for scale.

A *sweep* runs every configuration (dtype, head dim, N, method) once, each in a fresh process; ``--sweeps K`` repeats
the whole grid K times, sweep after sweep, so that the machine's load drift hits every N and method alike and the
sweeps are the units over which kernel-lightning-attention judges its timing claims (the slow naive form runs in the
first sweep only, see --first-sweep-only).

Columns: sweep (1-based), time_ms (median wall time of --repeats after --warmup), us_per_token (time_ms * 1000 /
(B * N)), cpu_ms and cpu_us_per_token (CPU only: the same from the process's CPU time, robust to other jobs on a shared
machine, see bench_scored_attention.median_times_ms),
peak_mib (same measurement as bench_scored_attention.py: peak-RSS growth in a fresh subprocess on CPU,
max_memory_allocated on CUDA, after a 64-token warm-up call), diff_naive (max |out - naive out|, when naive ran),
load_avg_1m (the machine's load after the configuration: timings on a shared machine are only as good as this).
Decay rates: Lightning Attention's ALiBi-style slopes. CSV: benchmarks/results/lightning_attention_<device>.csv.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from pathlib import Path

from bench_scored_attention import (
    DTYPES,
    RESULTS,
    cpu_peak_mib,
    cuda_peak_mib,
    environment,
    median_times_ms,
    print_table,
    run_one,
    write_csv,
)


def make_method(name: str, q, k, v, decay):
    import torch.nn.functional as F

    from salience.kernels import lightning_attention

    if name == "la2":
        return lambda: lightning_attention(q, k, v, decay)
    if name == "naive":
        return lambda: lightning_attention(q, k, v, decay, backend="naive")
    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(f"unknown method {name!r}; choose from la2, naive, sdpa")


def measure(spec: dict) -> dict:
    import torch

    from salience.kernels.lightning_attention import slopes

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    b, h, n, d = spec["batch"], spec["heads"], spec["n"], spec["head_dim"]
    decay = slopes(h).to(device)
    with torch.no_grad():  # warm-up on 64 tokens: code pages, thread pools, Triton compilation are not counted
        make_method(spec["method"], *(torch.randn(b, h, 64, d, device=device, dtype=dtype) for _ in range(3)), decay)()
    q = torch.randn(b, h, n, d, device=device, dtype=dtype)
    q /= d**0.5  # keeps the un-normalised linear-attention output within float16 range
    k = torch.randn(b, h, n, d, device=device, dtype=dtype)
    v = torch.randn(b, h, n, d, device=device, dtype=dtype)
    fn = make_method(spec["method"], q, k, v, decay)
    peak = cuda_peak_mib if device == "cuda" else cpu_peak_mib
    with torch.no_grad():
        peak_mib, out = peak(fn)
        if spec.get("save"):
            torch.save(out.cpu(), spec["save"])
        del out
        times = median_times_ms(fn, device=device, warmup=spec["warmup"], repeats=spec["repeats"])
    cpu_ms = times["cpu_ms"]
    return {"status": "ok", **times, "us_per_token": times["time_ms"] * 1e3 / (b * n),
            "cpu_us_per_token": None if cpu_ms is None else cpu_ms * 1e3 / (b * n), "peak_mib": peak_mib,
            "load_avg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip


def naive_bytes(spec: dict) -> int:
    """The masked form holds about three [B, H, N, N] buffers (scores, decay mask broadcast, product)."""
    import torch

    elt = torch.finfo(getattr(torch, spec["dtype"])).bits // 8
    return 3 * spec["batch"] * spec["heads"] * spec["n"] ** 2 * elt + spec["heads"] * spec["n"] ** 2 * 8


COLUMNS = ["device", "threads", "dtype", "head_dim", "heads", "sweep", "n", "method", "status", "time_ms",
           "us_per_token", "cpu_ms", "cpu_us_per_token", "peak_mib", "diff_naive", "load_avg_1m"]  # fmt: skip


def parse_args(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--head-dim", type=int, nargs="+", help="default: 64 on CPU, 128 on CUDA")
    p.add_argument("--heads", type=int, help="default 4 on CPU, 32 on CUDA")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["la2", "naive", "sdpa"])
    p.add_argument("--threads", type=int, help="CPU: torch threads per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweeps", type=int, default=1, help="run the whole grid this many times (rows record the sweep)")
    p.add_argument("--first-sweep", type=int, default=1,
                   help="number of the first sweep (> 1 adds sweeps to an earlier run's CSV after concatenation)")
    p.add_argument("--first-sweep-only", nargs="*", default=["naive"], metavar="METHOD",
                   help="methods measured in the first sweep only (default: naive, the slow O(N^2) form)")
    p.add_argument("--max-naive-gib", type=float, default=6.0, help="skip the naive form above this estimated size")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.lengths = args.lengths or ([512, 1024, 2048, 4096, 8192, 16384] if cpu else
                                    [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])  # fmt: skip
    args.dtype = args.dtype or (["float32"] if cpu else ["bfloat16"])
    args.head_dim = args.head_dim or ([64] if cpu else [128])
    args.heads = args.heads or (4 if cpu else 32)
    args.out = args.out or RESULTS / f"lightning_attention_{args.device}.csv"
    if cpu and not args.threads:
        args.threads = torch.get_num_threads()
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return []
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    print(f"# lightning attention benchmark, {json.dumps(environment(args.threads))}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sweeps = range(args.first_sweep, args.first_sweep + args.sweeps)
        grid = itertools.product(sweeps, args.dtype, args.head_dim, args.lengths)
        for sweep, dtype, d, n in grid:
            base = dict(device=args.device, threads=args.threads, dtype=dtype, head_dim=d, heads=args.heads,
                        batch=args.batch, sweep=sweep, n=n)  # fmt: skip
            group, saved = [], {}
            methods = [m for m in args.methods if sweep == 1 or m not in args.first_sweep_only]
            compare = "naive" in methods and "la2" in methods  # outputs are saved only to be compared
            for method in methods:
                spec = dict(base, method=method, warmup=args.warmup, repeats=args.repeats,
                            save=os.path.join(tmp, f"{method}-{dtype}-{d}-{n}.pt") if compare else None)  # fmt: skip
                if method == "naive" and naive_bytes(spec) > args.max_naive_gib * 2**30:
                    result = {"status": f"skipped (~{naive_bytes(spec) / 2**30:.0f} GiB)"}
                else:
                    result = run_one(spec, __file__, args.timeout, measure)
                if result.get("status") == "ok" and spec["save"]:
                    saved[method] = spec["save"]
                group.append(dict(base, method=method, **result))
            if "naive" in saved and "la2" in saved:
                diff = (torch.load(saved["la2"]).float() - torch.load(saved["naive"]).float()).abs().max()
                next(r for r in group if r["method"] == "la2")["diff_naive"] = diff.item()
            for r in group:
                print(f"  sweep {sweep} {r['dtype']} D={d} N={n} {r['method']}: {r.get('status')} "
                      f"{r.get('time_ms', float('nan')):.1f} ms", flush=True)  # fmt: skip
            rows.extend(group)
            write_csv(rows, COLUMNS, args.out)
    print()
    print_table(rows, COLUMNS[2:])
    print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
