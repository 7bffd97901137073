"""Runs on an existing Dask cluster: ``salience run --scheduler ADDRESS`` and ``salience sweep --scheduler ADDRESS``.

Dask does the scheduling; this module only maps runs onto it. Each run becomes one task that calls
:func:`salience.runner.execute` on a worker, the same isolated, atomic path a local run takes (a child process per
notebook, a temporary folder swapped into place). Every worker therefore needs this project's environment and the
same file system paths as the client (a shared file system), since the notebook file and the output folder are
given as the client sees them.

A worker that dies while running a notebook (killed, out of memory) makes Dask retry the task on another worker up
to the scheduler's ``distributed.scheduler.allowed-failures`` times (default 3, 0: never); then the run is filed as
failed (``<set>.failed/run.json`` naming the worker) and the other runs go on.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from urllib.parse import urlparse

from distributed import Client, as_completed
from distributed.scheduler import KilledWorker
from tqdm.auto import tqdm

from .paths import outputs_dir
from .runner import RunOutcome, RunSpec, outcome_line, execute, record_lost_run

#: seconds to wait for the scheduler before giving up
CONNECT_TIMEOUT_S = 30


def connect(address: str):
    """A ``distributed.Client`` for the scheduler at ``address`` (``tcp://host:8786``); one-line ValueError if none
    answers."""
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as err:
        raise ValueError(f"no Dask scheduler answered at {address!r} within {CONNECT_TIMEOUT_S} s ({err})") from None


def lost_worker_error(spec: RunSpec, err) -> tuple[dict, dict]:
    """The error and worker records of a run whose worker died (from distributed's ``KilledWorker``)."""
    address = getattr(getattr(err, "last_worker", None), "address", None) or "(unknown)"
    tries = getattr(err, "allowed_failures", 0) + 1
    evalue = (f"worker {address} died while running {spec.notebook} [{spec.param_set}]"
              f"{f' (tried on {tries} workers, each died)' if tries > 1 else ''}; the run was lost, see the worker's "
              "log (a kill or running out of memory are the usual causes)")
    host = urlparse(address).hostname if "://" in address else None
    pid = getattr(getattr(err, "last_worker", None), "pid", None)
    return {"cell": None, "ename": "WorkerDied", "evalue": evalue}, {"host": host, "pid": pid, "address": address}


def run_on_cluster(specs: list[RunSpec], address: str) -> list[RunOutcome]:
    """Submit one task per run to the cluster at ``address``; collect outcomes in ``specs`` order with a progress
    bar. A run whose worker died or whose task raised is filed as failed; the others are unaffected. Ctrl-C cancels
    the runs not yet started (runs already executing on workers finish and are filed as usual)."""
    # outputs land where this machine's runner expects them, whatever the workers' own settings
    specs = [replace(s, output_base=s.output_base or str(outputs_dir() / s.notebook)) for s in specs]
    client = connect(address)
    try:
        submitted = time.time()
        futures = {client.submit(execute, spec, show_progress=False, pure=False,
                                 key=f"salience-{spec.notebook}-{spec.param_set}-{uuid.uuid4().hex[:8]}"): i
                   for i, spec in enumerate(specs)}
        outcomes: list[RunOutcome | None] = [None] * len(specs)
        try:
            with tqdm(total=len(specs), desc=f"runs on {address}", unit="run") as bar:
                for future in as_completed(futures):
                    i = futures[future]
                    spec = specs[i]
                    try:
                        outcomes[i] = future.result()
                    except KilledWorker as err:
                        error, worker = lost_worker_error(spec, err)
                        outcomes[i] = record_lost_run(spec, error, time.time() - submitted, worker)
                    except Exception as err:  # noqa: BLE001 - e.g. the worker lacks this project: filed, not fatal
                        error = {"cell": None, "ename": type(err).__name__,
                                 "evalue": f"the Dask task failed before the notebook could run: {err}"[:2000]}
                        outcomes[i] = record_lost_run(spec, error, time.time() - submitted,
                                                      {"host": None, "pid": None, "address": None})
                    bar.update(1)
                    bar.write(outcome_line(outcomes[i]))
        except KeyboardInterrupt:
            client.cancel(list(futures))
            raise
        return [o for o in outcomes if o is not None]
    finally:
        client.close()

