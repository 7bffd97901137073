"""Run notebooks headlessly with papermill: validated parameters, one process per run, atomic results.

Each run executes in a child process (``python -m salience.runner --child SPEC``) so a per-notebook timeout can stop
it, a crashed kernel cannot hang the batch, and ``-j N`` runs notebooks side by side. The child writes into a hidden
temporary folder; only a finished run replaces ``outputs/<notebook>/<set>/``. A failed run lands in
``<set>.failed/`` and leaves the previous good results in place.

``RunSpec.output_base`` files a run elsewhere (a sweep gives each combination its own folder: :mod:`salience.sweep`);
``run_many(..., scheduler=ADDRESS)`` maps the same :func:`execute` onto a Dask cluster (:mod:`salience.cluster`), and
each run.json records the process that executed it (``worker``: host, pid, Dask worker address).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .params import DEFAULT_SET, load_params, param_set_name
from .paths import REPO_ROOT, notebooks_dir, outputs_dir
from .runs import atomic_write_text, git_commit, package_versions

DEFAULT_TIMEOUT_S = 900.0
#: child processes running now; each is in its own session, so Ctrl-C must stop them explicitly
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()
_INTERRUPTED = threading.Event()


@dataclass
class RunSpec:
    """One validated run: which notebook file, which parameter set, the parameters, the time limit."""

    notebook: str
    param_set: str
    params: dict[str, Any]
    path: str
    title: str = ""
    claim: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S
    threads: int | None = None  # torch / OpenMP threads of the notebook's kernel (None: torch's default)
    #: folder holding this run's ``<param_set>[.failed]/`` folder; empty: ``outputs/<notebook>/`` of the process that
    #: executes it (a sweep files each combination under its own folder; a cluster run fixes the client's path)
    output_base: str = ""


@dataclass
class RunOutcome:
    notebook: str
    param_set: str
    status: str  # ok | failed | timeout
    folder: str
    wall_time_s: float
    error: dict[str, Any] | None = None
    verdict: dict[str, str] | None = field(default=None)


def available_notebooks() -> list[str]:
    """Notebooks that have both a file under notebooks/ and an experiment module."""
    from .experiments import NOTEBOOKS

    return sorted(n for n in NOTEBOOKS if (notebooks_dir() / f"{n}.ipynb").is_file())


def plan(
    notebooks: list[str] | None,
    param_set: str = DEFAULT_SET,
    overrides: dict[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int | None = None,
) -> list[RunSpec]:
    """Validate every requested run before any runs (raises ParamsError / ValueError with one line)."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    known = available_notebooks()
    names = notebooks or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown notebook(s) {', '.join(unknown)}; available: {', '.join(known)}")
    from .experiments import experiment_module

    specs = []
    for name in names:
        params = load_params(name, param_set, overrides)
        module = experiment_module(name)
        specs.append(RunSpec(name, param_set_name(param_set), params.model_dump(mode="json"),
                             str(notebooks_dir() / f"{name}.ipynb"),
                             module.TITLE, module.CLAIM, timeout_s, threads))
    return specs


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with renames only, so a reader never sees a half-written folder."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def run_base(spec: RunSpec) -> Path:
    """The folder that holds ``spec``'s run folder (``<param_set>/`` or ``<param_set>.failed/``)."""
    return Path(spec.output_base) if spec.output_base else outputs_dir() / spec.notebook


def worker_identity() -> dict[str, Any]:
    """Who executes a run: host name, process id and, inside a Dask worker, the worker's address (else None)."""
    address = None
    if "distributed" in sys.modules:  # only a Dask worker has imported it; never import it just to ask
        from distributed import get_worker

        try:
            address = get_worker().address
        except ValueError:  # not inside a worker task
            pass
    return {"host": socket.gethostname(), "pid": os.getpid(), "address": address}


def _failure_record(spec: RunSpec, error: dict[str, Any], started: float, wall: float,
                    worker: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "notebook": spec.notebook,
        "param_set": spec.param_set,
        "title": spec.title or spec.notebook,
        "claim": spec.claim,
        "status": "failed",
        "error": error,
        "params": spec.params,
        "seed": spec.params.get("seed"),
        "device": spec.params.get("device", "cpu"),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_time_s": round(wall, 2),
        "figures": [],
        "tables": [],
        "verdict": None,
        "worker": worker or worker_identity(),
    }


def _clean_stale(base: Path, spec: RunSpec) -> None:
    """Remove temporary folders left by runs of this set that were killed before they could clean up."""
    for stale in base.glob(f".{spec.param_set}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _file_failure(spec: RunSpec, tmp: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``tmp/run.json`` and move ``tmp`` to ``<param_set>.failed/`` (the good run stays)."""
    (tmp / "run.json").unlink(missing_ok=True)
    atomic_write_text(tmp / "run.json", json.dumps(record, indent=2))
    final = tmp.parent / f"{spec.param_set}.failed"
    _swap_in(tmp, final)
    return final


def record_lost_run(spec: RunSpec, error: dict[str, Any], wall: float, worker: dict[str, Any]) -> RunOutcome:
    """File a run whose executing process is gone (a Dask worker that died) as failed, like :func:`execute` files
    its own failures: ``<param_set>.failed/run.json`` with ``error`` and the worker; previous good results stay."""
    base = run_base(spec)
    base.mkdir(parents=True, exist_ok=True)
    _clean_stale(base, spec)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.param_set}.tmp-", dir=base))
    started = time.time() - wall
    final = _file_failure(spec, tmp, _failure_record(spec, error, started, wall, worker))
    return RunOutcome(spec.notebook, spec.param_set, "failed", str(final), round(wall, 1), error)


def execute(spec: RunSpec, *, show_progress: bool = True) -> RunOutcome:
    """Run one notebook in a child process and move its results into place."""
    if _INTERRUPTED.is_set():  # the batch was interrupted before this run started: start nothing
        raise KeyboardInterrupt
    base = run_base(spec)
    base.mkdir(parents=True, exist_ok=True)
    _clean_stale(base, spec)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.param_set}.tmp-", dir=base))
    spec_file = tmp / ".spec.json"
    spec_file.write_text(json.dumps({**asdict(spec), "output_dir": str(tmp), "progress": show_progress}))
    log = open(tmp / ".log.txt", "w")
    started = time.time()
    cmd = [sys.executable, "-m", "salience.runner", "--child", str(spec_file)]
    # a new session: on timeout the whole group (child and its kernel) is stopped together
    out = None if show_progress else log
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=out, start_new_session=True, env=child_env(spec))
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
        # the interrupt handler sets the flag before it lists the running children: a child started after that
        # list was taken sees the flag here and is stopped by its own thread
        interrupted = _INTERRUPTED.is_set()
    error: dict[str, Any] | None = None
    try:
        if interrupted:
            _stop(proc, grace_s=5.0)
        proc.wait(timeout=spec.timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        error = {"cell": None, "ename": "Timeout", "evalue": f"notebook exceeded {spec.timeout_s:.0f} s"}
    except BaseException:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        log.close()
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    wall = time.time() - started
    if _INTERRUPTED.is_set():  # the batch was cancelled: discard this run, keep what was there
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeyboardInterrupt
    result_file = tmp / ".result.json"
    if error is None:
        if result_file.is_file():
            error = json.loads(result_file.read_text()).get("error")
        else:
            error = {"cell": None, "ename": "ChildFailed", "evalue": f"runner child exited with code {proc.returncode}"}
    if error is None and not (tmp / "run.json").is_file():
        error = {"cell": None, "ename": "NoRecord", "evalue": "the notebook finished without writing run.json"}

    for hidden in (spec_file, result_file):
        hidden.unlink(missing_ok=True)
    if error is None:
        record = json.loads((tmp / "run.json").read_text())
        record.update(param_set=spec.param_set, wall_time_s=round(wall, 2), worker=worker_identity())
        atomic_write_text(tmp / "run.json", json.dumps(record, indent=2))
        final = base / spec.param_set
        _swap_in(tmp, final)
        shutil.rmtree(base / f"{spec.param_set}.failed", ignore_errors=True)
        return RunOutcome(spec.notebook, spec.param_set, "ok", str(final), round(wall, 1), None, record.get("verdict"))
    final = _file_failure(spec, tmp, _failure_record(spec, error, started, wall))
    status = "timeout" if error.get("ename") == "Timeout" else "failed"
    return RunOutcome(spec.notebook, spec.param_set, status, str(final), round(wall, 1), error)


def child_env(spec: RunSpec) -> dict[str, str]:
    """The child's environment: ours, plus the thread count when the spec sets one (OpenMP and MKL read theirs at
    start-up; the kernel's ``start_run`` calls ``torch.set_num_threads`` from ``SALIENCE_THREADS``)."""
    from .runs import THREADS_ENV

    env = dict(os.environ)
    if spec.threads is not None:
        n = str(spec.threads)
        env.update({"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, THREADS_ENV: n})
    return env


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_many(specs: list[RunSpec], jobs: int = 1, scheduler: str | None = None) -> list[RunOutcome]:
    """Run ``specs`` (in parallel processes when ``jobs > 1``, on the Dask cluster whose scheduler listens at
    ``scheduler`` when given: :mod:`salience.cluster`); a failure never stops the others."""
    from tqdm.auto import tqdm

    if scheduler:
        # imported here, not at the top: dask.distributed costs ~0.6 s to import (measured), which every runner child
        # process would otherwise pay; only --scheduler needs it
        from .cluster import run_on_cluster

        return run_on_cluster(specs, scheduler)
    if jobs <= 1:
        outcomes = []
        for i, spec in enumerate(specs, 1):
            print(f"[{i}/{len(specs)}] {spec.notebook} ({spec.param_set})", file=sys.stderr, flush=True)
            outcomes.append(execute(spec, show_progress=True))
            print(f"    -> {outcome_line(outcomes[-1])}", file=sys.stderr, flush=True)
        return outcomes
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures: list = []  # an interrupt may come before every run is submitted
    try:
        with tqdm(total=len(specs), desc="notebooks", unit="nb") as bar:
            futures = [pool.submit(execute, spec, show_progress=False) for spec in specs]
            outcomes = []
            for future in futures:
                outcomes.append(future.result())
                bar.update(1)
                bar.write(outcome_line(outcomes[-1]))
        return outcomes
    except KeyboardInterrupt:
        _INTERRUPTED.set()
        for future in futures:
            future.cancel()
        with _RUNNING_LOCK:
            running = list(_RUNNING)
        for proc in running:
            _stop(proc, grace_s=5.0)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _INTERRUPTED.clear()


def outcome_line(o: RunOutcome) -> str:
    """One line on a finished run: status, notebook, parameter set, wall time, then its verdict or its error."""
    head = f"{o.status.upper():8s} {o.notebook} [{o.param_set}] {o.wall_time_s:.0f}s"
    if o.error:
        cell = f"cell [{o.error['cell']}] of executed.ipynb: " if o.error.get("cell") is not None else ""
        return f"{head}  {cell}{o.error['ename']}: {o.error['evalue']}  (see {o.folder})"
    verdict = f"  verdict: {o.verdict['label']}" if o.verdict else ""
    return f"{head}{verdict}  -> {o.folder}"


def summary(outcomes: list[RunOutcome]) -> str:
    ok = sum(o.status == "ok" for o in outcomes)
    lines = [f"{ok}/{len(outcomes)} notebook runs succeeded"] + ["  " + outcome_line(o) for o in outcomes]
    return "\n".join(lines)


def _stop_when_orphaned(poll_s: float = 1.0) -> None:
    """Stop this child (SIGTERM to itself, the timeout's path) once the process that started it is gone, e.g. a
    Dask worker killed mid-run: nobody would collect the result, and the notebook must not run on unwatched."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _child(spec_file: str) -> int:
    """Inside the child process: execute one notebook with papermill and write ``.result.json``."""
    import papermill as pm

    spec = json.loads(Path(spec_file).read_text())
    out_dir = Path(spec["output_dir"])
    os.environ["SALIENCE_PARAM_SET"] = spec["param_set"]  # the kernel inherits it; run.json records it
    # SIGTERM from the parent's timeout → KeyboardInterrupt, so papermill shuts the kernel down on the way out
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    _stop_when_orphaned()
    error = None
    try:
        pm.execute_notebook(
            spec["path"],
            str(out_dir / "executed.ipynb"),
            parameters={**spec["params"], "output_dir": str(out_dir)},
            kernel_name="python3",
            progress_bar=spec.get("progress", True),
            cwd=str(Path(spec["path"]).parent),
        )
    except pm.PapermillExecutionError as err:
        # exec_count numbers cells as the executed notebook shows them ([N]), papermill's injected cell included
        first_line = next((ln for ln in (err.source or "").splitlines() if ln.strip()), "")
        error = {"cell": err.exec_count, "ename": err.ename, "evalue": str(err.evalue).strip()[:2000],
                 "source": first_line[:200]}
    except KeyboardInterrupt:
        error = {"cell": None, "ename": "Interrupted", "evalue": "stopped by the runner"}
    except Exception as err:  # noqa: BLE001 - any failure becomes a recorded, reported outcome
        error = {"cell": None, "ename": type(err).__name__, "evalue": str(err)[:2000]}
    (out_dir / ".result.json").write_text(json.dumps({"error": error}))
    return 0 if error is None else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2]))
    sys.exit("usage: python -m salience.runner --child SPEC (use the `salience` command instead)")
