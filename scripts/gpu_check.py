#!/usr/bin/env python
"""``make gpu-check``: the kernels' GPU evidence in one command, within 9 minutes on one H100/H200.

    python scripts/gpu_check.py             run every step on CUDA (refuses without a CUDA device)
    python scripts/gpu_check.py --dry-run   any machine: print the plan, check every step's inputs, run nothing

The steps (:func:`plan_steps`) run in order, each in its own process within its own budget (SIGINT
``INTERRUPT_GRACE_S`` before the budget ends, SIGKILL at it); a failed step does not stop the next. Real mode writes
``benchmarks/results/*_cuda.csv``, ``outputs/<notebook>/gpu/``, a log per step in ``outputs/gpu_check/`` and the
summary ``benchmarks/results/gpu_check_summary.md``; it exits 1 if any step failed. The dry run checks the budgets,
the output folders, the tests' collection, the benchmark scripts' own argument parsers and the notebooks' ``gpu``
parameter sets (see :func:`check_inputs`) and exits 1 on any problem.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from salience.params import DEFAULT_SET, ParamsError, param_file, read_param_file
from salience.paths import REPO_ROOT, outputs_dir

#: the whole command must end within this many seconds (9 minutes)
LIMIT_S = 540
#: kept back from LIMIT_S for the start-up checks and the summary; the steps' budgets share the rest
RESERVED_S = 10
#: a step still running this many seconds before its budget ends gets SIGINT, then SIGKILL at the budget
INTERRUPT_GRACE_S = 10
#: ``salience run --timeout`` leaves this much of a notebook step's budget for the runner to stop the kernel
RUNNER_MARGIN_S = 30
#: seconds allowed for the dry run's ``pytest --collect-only``
COLLECT_TIMEOUT_S = 180
#: placeholder for the interpreter in a step's command (replaced by the running interpreter)
PYTHON = "python"
RESULTS = REPO_ROOT / "benchmarks" / "results"
SUMMARY_PATH = RESULTS / "gpu_check_summary.md"
#: one log per step
LOG_DIR = outputs_dir() / "gpu_check"


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the check: what it does, its command (run from the repository root), its budget and outputs."""

    name: str
    kind: str  # "pytest", "benchmark" or "notebook": decides how the dry run checks the inputs
    description: str
    argv: tuple[str, ...]
    budget_s: int
    outputs: tuple[Path, ...] = ()
    inputs: tuple[Path, ...] = ()  # files an earlier step writes and this one reads
    env: tuple[tuple[str, str], ...] = ()  # set on top of ours (TRITON_INTERPRET is always removed)


@dataclasses.dataclass
class StepResult:
    """What one step did: ``status`` is ok, failed or timeout; ``note`` is the reason or the log's last line."""

    step: Step
    status: str
    wall_s: float
    returncode: int | None
    log: Path
    note: str = ""


def _notebook_step(name: str, notebook: str, budget_s: int, csv: Path) -> Step:
    argv = (PYTHON, "-m", "salience.cli", "run", notebook, "--params", "gpu",
            "--timeout", str(budget_s - RUNNER_MARGIN_S), "--no-report")  # fmt: skip
    description = f"{notebook} on params/{notebook}.gpu.yaml: correctness grid on CUDA, verdict from {csv.name}"
    return Step(name, "notebook", description, argv, budget_s, (outputs_dir() / notebook / "gpu" / "run.json",),
                inputs=(csv,))


def plan_steps() -> list[Step]:
    """The steps of ``make gpu-check``, in order. Budgets are estimates until a GPU run records the wall times."""
    scored_csv, lightning_csv = RESULTS / "scored_attention_cuda.csv", RESULTS / "lightning_attention_cuda.csv"
    return [
        Step("kernel-tests", "pytest",
             "correctness grid on CUDA: compiled Triton vs the float64 reference (fp16/bf16/fp32, GQA, odd lengths)",
             (PYTHON, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/kernels/test_scored_attention.py",
              "tests/kernels/test_lightning_attention.py", "-k", "triton"),
             70, env=(("SALIENCE_TEST_DEVICE", "cuda"),)),
        Step("bench-scored-attention", "benchmark",
             "scored attention vs eager vs SDPA flash, N = 1k to 32k and 128k, fp16 + bf16, D 128, 32/8 heads",
             (PYTHON, "benchmarks/bench_scored_attention.py", "--device", "cuda",
              "--lengths", "1024", "4096", "8192", "16384", "32768", "131072", "--dtype", "float16", "bfloat16",
              "--head-dim", "128", "--heads", "32", "--kv-heads", "8", "--out", str(scored_csv)),
             140, (scored_csv,)),
        Step("bench-lightning-attention", "benchmark",
             "Lightning Attention-2 vs causal SDPA (and the naive form where it fits), N = 2k to 64k, bf16, D 128, "
             "32 heads, 10 sweeps",
             (PYTHON, "benchmarks/bench_lightning_attention.py", "--device", "cuda",
              "--lengths", "2048", "4096", "8192", "16384", "32768", "65536", "--dtype", "bfloat16",
              "--head-dim", "128", "--heads", "32", "--sweeps", "10", "--out", str(lightning_csv)),
             70, (lightning_csv,)),
        _notebook_step("notebook-scored-attention", "kernel-scored-attention", 150, scored_csv),
        _notebook_step("notebook-lightning-attention", "kernel-lightning-attention", 100, lightning_csv),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------- helpers
def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    path = Path(path)
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def resolved(path: str | Path) -> Path:
    """``path`` made absolute, relative paths read from the repository root (as the steps run there)."""
    path = Path(path).expanduser()
    return (path if path.is_absolute() else REPO_ROOT / path).resolve()


def command_line(step: Step) -> str:
    env = " ".join(f"{k}={v}" for k, v in step.env)
    args = " ".join(shown(Path(a)) if a.startswith(str(REPO_ROOT)) else a for a in step.argv)
    return f"{env} {args}".strip()


def step_env(step: Step) -> dict[str, str]:
    """Our environment without TRITON_INTERPRET (compiled kernels only), unbuffered output, plus ``step.env``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(step.env)
    return env


def executable_argv(step: Step) -> list[str]:
    return [sys.executable if a == PYTHON else a for a in step.argv]


def load_script(path: Path):
    """Import a benchmark script as a module (its folder on ``sys.path`` for its sibling imports)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"gpu_check_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


def parse_quietly(parse, argv: list[str]):
    """``parse(argv)`` with argparse's complaint captured: returns (namespace, None) or (None, its last line)."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parse(argv), None
    except SystemExit:
        return None, (errors.getvalue().strip().splitlines() or ["no message"])[-1]


def writable(path: Path) -> bool:
    """``path`` can be written: it is a writable file, or its nearest existing folder is writable."""
    path = Path(path)
    if path.exists():
        return os.access(path, os.W_OK) and (path.is_dir() or os.access(path.parent, os.W_OK))
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


# --------------------------------------------------------------------------------------------- input checks
def check_budgets(steps: list[Step]) -> list[str]:
    """Problems with the budgets: over the limit, too short to interrupt cleanly, or duplicate step names."""
    problems = []
    total, allowed = sum(s.budget_s for s in steps), LIMIT_S - RESERVED_S
    if total > allowed:
        problems.append(f"budgets: the steps' budgets sum to {total} s, over the {allowed} s they may use "
                        f"({LIMIT_S} s limit minus {RESERVED_S} s for the checks and the summary)")  # fmt: skip
    problems += [f"{s.name}: budget {s.budget_s} s is not above the {INTERRUPT_GRACE_S} s interrupt grace"
                 for s in steps if s.budget_s <= INTERRUPT_GRACE_S]  # fmt: skip
    names = [s.name for s in steps]
    problems += [f"step name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    return problems


def check_writable(steps: list[Step], extra: tuple[Path, ...] = ()) -> list[str]:
    paths = [(s.name, p) for s in steps for p in s.outputs] + [("summary and logs", p) for p in extra]
    return [f"{name}: cannot write {shown(p)} (folder not writable)" for name, p in paths if not writable(p)]


def check_pytest_step(step: Step) -> list[str]:
    """The test files exist and ``pytest --collect-only`` with the step's environment collects at least one test."""
    missing = [a for a in step.argv if a.endswith(".py") and not resolved(a).is_file()]
    if missing:
        return [f"{step.name}: test file(s) not found: {', '.join(missing)}"]
    try:
        proc = subprocess.run([*executable_argv(step), "--collect-only"], cwd=REPO_ROOT, env=step_env(step),
                              capture_output=True, text=True, timeout=COLLECT_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        return [f"{step.name}: pytest --collect-only took over {COLLECT_TIMEOUT_S} s"]
    found = re.search(r"(\d+)(?:/\d+)? tests? collected", proc.stdout)
    collected = int(found.group(1)) if found else 0
    if proc.returncode != 0 or collected == 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return [f"{step.name}: pytest collected {collected} tests (exit {proc.returncode}): {' | '.join(tail)}"]
    return []


def check_benchmark_step(step: Step) -> list[str]:
    """The script exists, its own ``parse_args`` accepts the exact arguments, asks for CUDA and writes the outputs."""
    script = resolved(step.argv[1])
    if not script.is_file():
        return [f"{step.name}: script {step.argv[1]} not found"]
    args, complaint = parse_quietly(load_script(script).parse_args, list(step.argv[2:]))
    if complaint:
        return [f"{step.name}: {script.name} rejects its arguments: {complaint}"]
    problems = []
    if args.device != "cuda":
        problems.append(f"{step.name}: --device is {args.device!r}, not cuda")
    if resolved(args.out) not in {resolved(p) for p in step.outputs}:
        problems.append(f"{step.name}: the script writes {shown(args.out)}, not a declared output of the step")
    return problems


def check_notebook_step(step: Step, written_before: dict[Path, str]) -> tuple[list[str], list[str]]:
    """The ``salience run`` command parses; the parameter set runs on CUDA, reads (does not re-measure) the benchmark
    CSV the step declares as its input, and validates through ``salience.params``. A CSV that does not exist yet (an
    earlier step writes it) is replaced by an empty placeholder for the validation, which checks only that the file
    exists. Returns (problems, what was skipped and why)."""
    from salience.cli import build_parser
    from salience.runner import plan

    args, complaint = parse_quietly(build_parser().parse_args, list(step.argv[3:]))
    if complaint:
        return [f"{step.name}: salience rejects the command: {complaint}"], []
    if args.command != "run" or len(args.notebooks) != 1 or args.p:
        return [f"{step.name}: expected `salience run NOTEBOOK --params SET` without -p overrides"], []
    problems, skipped = [], []
    if args.timeout > step.budget_s - RUNNER_MARGIN_S:
        problems.append(f"{step.name}: --timeout {args.timeout:g} leaves under {RUNNER_MARGIN_S} s of the step's "
                        f"{step.budget_s} s budget for the runner to stop the notebook")  # fmt: skip
    notebook, param_set = args.notebooks[0], args.params
    try:
        values = read_param_file(param_file(notebook, DEFAULT_SET))
        values.update(read_param_file(param_file(notebook, param_set)))
    except (ParamsError, OSError) as err:
        return problems + [f"{step.name}: {err}"], []
    where = f"{notebook} set {param_set!r}"
    if not str(values.get("device", "")).startswith("cuda"):
        problems.append(f"{step.name}: {where} runs on {values.get('device')!r}, not cuda")
    if values.get("rerun_benchmark"):
        problems.append(f"{step.name}: {where} sets rerun_benchmark: true, but the benchmark steps measure")
    csv = resolved(values.get("benchmark_csv", ""))
    if csv not in {resolved(p) for p in step.inputs}:
        problems.append(f"{step.name}: {where} reads {shown(csv)}, not the step's declared input "
                        f"({', '.join(shown(p) for p in step.inputs) or 'none'})")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        overrides = {}
        if not csv.is_file() and csv in written_before:
            placeholder = Path(tmp) / csv.name
            placeholder.touch()
            overrides["benchmark_csv"] = str(placeholder)
            skipped.append(f"{step.name}: {shown(csv)} does not exist yet (step {written_before[csv]} writes it), "
                           "so the set was validated with an empty placeholder in its place, every other value as "
                           "written")  # fmt: skip
        try:
            plan([notebook], param_set, overrides, args.timeout)
        except (ParamsError, ValueError) as err:
            problems.append(f"{step.name}: {err}")
    return problems, skipped


def check_inputs(steps: list[Step], *, collect_tests: bool = True) -> tuple[list[str], list[str]]:
    """Every check of the dry run over ``steps``; returns (problems, skipped). ``collect_tests=False`` leaves out the
    pytest collection (real mode: the test step collects anyway)."""
    problems = check_budgets(steps) + check_writable(steps, (SUMMARY_PATH, LOG_DIR))
    skipped, written_before = [], {}
    for step in steps:
        problems += [f"{step.name}: reads {shown(p)}, which no earlier step writes and which does not exist"
                     for p in step.inputs if resolved(p) not in written_before and not resolved(p).is_file()]
        if step.kind == "pytest":
            if collect_tests:
                problems += check_pytest_step(step)
        elif step.kind == "benchmark":
            problems += check_benchmark_step(step)
        elif step.kind == "notebook":
            found, notes = check_notebook_step(step, written_before)
            problems, skipped = problems + found, skipped + notes
        else:
            problems.append(f"{step.name}: unknown kind {step.kind!r} (pytest, benchmark or notebook)")
        written_before.update({resolved(p): step.name for p in step.outputs})
    return problems, skipped


# --------------------------------------------------------------------------------------------- running
def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT the step's process group (pytest, the benchmarks and ``salience run`` stop cleanly on it), then SIGKILL
    whatever is left after ``INTERRUPT_GRACE_S``."""
    for sig, wait_s in ((signal.SIGINT, INTERRUPT_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_within(proc: subprocess.Popen, budget_s: int) -> bool:
    """Wait for ``proc``; stop it when it is still running ``INTERRUPT_GRACE_S`` before ``budget_s`` ends, so that it
    is gone by then. True when it had to be stopped. A Ctrl-C here stops it too (it runs in its own session)."""
    try:
        proc.wait(timeout=budget_s - INTERRUPT_GRACE_S)
        return False
    except subprocess.TimeoutExpired:
        stop_group(proc)
        return True
    except BaseException:
        stop_group(proc)
        raise


def run_step(step: Step, log_path: Path) -> StepResult:
    """Run one step, its output copied to the terminal (prefixed with the step's name) and to ``log_path``. The step
    fails when it exits non-zero, runs past its budget, or exits 0 without writing each of its outputs."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(executable_argv(step), cwd=REPO_ROOT, env=step_env(step), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip

        def copy_output():
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(f"[{step.name}] {line}")
                sys.stdout.flush()

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        timed_out = wait_within(proc, step.budget_s)
        reader.join(timeout=5)
    wall = time.time() - started
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else "no output"
    if timed_out:
        return StepResult(step, "timeout", wall, proc.returncode, log_path, f"stopped at its {step.budget_s} s budget")
    if proc.returncode != 0:
        return StepResult(step, "failed", wall, proc.returncode, log_path, last)
    stale = [shown(p) for p in step.outputs if not p.is_file() or p.stat().st_mtime < started - 1]
    if stale:
        return StepResult(step, "failed", wall, 0, log_path, f"exited 0 but did not write {', '.join(stale)}")
    return StepResult(step, "ok", wall, 0, log_path, last)


def summary_markdown(results: list[StepResult], device: str) -> str:
    """The summary file: when, where, and one row per step (status, wall time, budget, outputs, last log line)."""
    from salience.runs import git_commit

    total = sum(r.wall_s for r in results)
    lines = [
        "# gpu-check summary",
        "",
        f"Written by `make gpu-check` (scripts/gpu_check.py) on {time.strftime('%Y-%m-%d %H:%M:%S %z')}; device: "
        f"{device}; commit {git_commit()}. Total wall time {total:.0f} s (limit {LIMIT_S} s). "
        f"{sum(r.status == 'ok' for r in results)}/{len(results)} steps ok. Logs: {shown(LOG_DIR)}/.",
        "",
        "| step | status | wall s | budget s | outputs | last line / reason |",
        "|---|---|--:|--:|---|---|",
    ]
    for r in results:
        outputs = ", ".join(f"`{shown(p)}`" + ("" if p.is_file() else " (missing)") for p in r.step.outputs) or "log"
        note = r.note.replace("|", "\\|")[:200]
        lines.append(f"| {r.step.name} | {r.status} | {r.wall_s:.0f} | {r.step.budget_s} | {outputs} | {note} |")
    return "\n".join(lines) + "\n"


def run_all(steps: list[Step], device: str, summary_path: Path = SUMMARY_PATH) -> list[StepResult]:
    """Run ``steps`` in order (a failure does not stop the rest) and rewrite the summary after each step. A step whose
    input came from a step that did not end ok still runs; its note says so (the file may be partial or old)."""
    results, written_by = [], {}
    for i, step in enumerate(steps, 1):
        print(f"== [{i}/{len(steps)}] {step.name} (budget {step.budget_s} s): {command_line(step)}", flush=True)
        result = run_step(step, LOG_DIR / f"{step.name}.log")
        doubtful = [shown(p) for p in step.inputs if written_by.get(resolved(p), "ok") != "ok"]
        if doubtful:
            result.note = f"input {', '.join(doubtful)} from a step that did not end ok; " + result.note
        written_by.update({resolved(p): result.status for p in step.outputs})
        results.append(result)
        print(f"== {step.name}: {result.status} in {result.wall_s:.0f} s: {result.note}", flush=True)
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(summary_markdown(results, device))
    return results


def print_plan(steps: list[Step]) -> None:
    total = sum(s.budget_s for s in steps)
    print(f"gpu-check: {len(steps)} steps, budgets {total} s of the {LIMIT_S} s limit ({RESERVED_S} s kept for the "
          f"checks and the summary)")  # fmt: skip
    for i, s in enumerate(steps, 1):
        print(f"{i}. {s.name} ({s.budget_s} s): {s.description}\n   $ {command_line(s)}")
        print(f"   writes: {', '.join(shown(p) for p in s.outputs) or 'nothing but its log'}")
    print(f"   and: {shown(SUMMARY_PATH)}, logs in {shown(LOG_DIR)}/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check every input; run nothing")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"gpu-check: torch {torch.__version__} sees no CUDA device (CUDA build: "
                             f"{torch.version.cuda or 'no, a CPU build'}); on a machine without a GPU run "
                             "`make gpu-check DRY_RUN=1` to check the plan")  # fmt: skip
    steps = plan_steps()
    print_plan(steps)
    problems, skipped = check_inputs(steps, collect_tests=args.dry_run)
    for note in skipped:
        print(f"skipped: {note}")
    if problems:
        print(f"gpu-check: {len(problems)} problem(s) with the inputs, nothing was run:", file=sys.stderr)
        print("\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 1
    if args.dry_run:
        print("skipped: CUDA itself, compiling the Triton kernels, the timings: only the GPU run does those")
        print(f"gpu-check dry run: every step's inputs check out ({len(steps)} steps, nothing was run)")
        return 0
    import torch

    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    results = run_all(steps, device)
    print(f"\nwrote {shown(SUMMARY_PATH)}\n")
    print(summary_markdown(results, device))
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
