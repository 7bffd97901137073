"""Wall time of every notebook on its embedded defaults, the way `make run` runs them: one after another, then the
report. Prints a table and writes ``benchmarks/results/notebooks_<machine>.csv``.

    .venv/bin/python benchmarks/bench_notebooks.py                  # all notebooks, fresh activation cache
    .venv/bin/python benchmarks/bench_notebooks.py kv-snapkv --threads 1

Targets (the verdicts issue): the whole default batch <= 20 minutes on 2 idle cores; each row's ``load_avg_1m`` says
how idle the machine really was. The vision notebooks share an on-disk activation cache: the first one builds it,
so the run starts from an empty cache (``--warm-cache`` keeps the user's cache) and the order is `make run`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", help="default: all, in `make run` order")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per notebook (default: torch's choice)")
    ap.add_argument("--warm-cache", action="store_true", help="reuse the user's activation cache instead of a new one")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default: results/notebooks_<machine>.csv)")
    args = ap.parse_args(argv)

    from salience.report import build_report
    from salience.runner import execute, plan

    machine = f"{os.cpu_count()}cpu-{platform.machine()}"
    out = args.out or RESULTS / f"notebooks_{machine}.csv"
    with tempfile.TemporaryDirectory(prefix="salience-bench-") as tmp:
        os.environ["SALIENCE_OUTPUTS"] = str(Path(tmp) / "outputs")
        if not args.warm_cache:
            os.environ["SALIENCE_ACTIVATION_CACHE"] = str(Path(tmp) / "cache")
        rows = []
        total_start = time.perf_counter()
        for spec in plan(args.notebooks or None, threads=args.threads, timeout_s=3600):
            outcome = execute(spec, show_progress=False)
            record = json.loads((Path(outcome.folder) / "run.json").read_text())
            rows.append({"notebook": spec.notebook, "status": outcome.status, "wall_s": outcome.wall_time_s,
                         "verdict": (record.get("verdict") or {}).get("label", ""),
                         "threads": record.get("threads"), "load_avg_1m": round(os.getloadavg()[0], 2)})
            print(f"{spec.notebook:30s} {outcome.status:7s} {outcome.wall_time_s:7.1f} s  "
                  f"{rows[-1]['verdict']}  (load {rows[-1]['load_avg_1m']})", flush=True)
        start = time.perf_counter()
        build_report()
        rows.append({"notebook": "(report)", "status": "ok", "wall_s": round(time.perf_counter() - start, 1),
                     "verdict": "", "threads": args.threads, "load_avg_1m": round(os.getloadavg()[0], 2)})
        total = time.perf_counter() - total_start
    rows.append({"notebook": "TOTAL", "status": "", "wall_s": round(total, 1), "verdict": "", "threads": args.threads,
                 "load_avg_1m": round(os.getloadavg()[0], 2)})
    df = pd.DataFrame(rows)
    df.insert(0, "machine", machine)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(df.to_string(index=False))
    print(f"wrote {out}")
    return 0 if all(r["status"] in ("ok", "") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
