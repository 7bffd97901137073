"""Sweeps (salience.sweep, salience.sweep_table, salience.cluster) on a tiny throwaway notebook: grid validation,
a local sweep gathered into one table and the report's Sweeps page, and runs on a real Dask LocalCluster (a
scheduler and two worker processes): the workers recorded, ``salience run --scheduler``, and a worker killed mid-run
failing that run only."""

from __future__ import annotations

import json
import sys
import time
import types
from typing import Literal

import nbformat
import pandas as pd
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_notebook
from pydantic import Field

from salience import experiments, runner
from salience.cli import main as cli_main
from salience.params import NotebookParams, ParamsError
from salience.report import build_report
from salience.sweep import Sweep, combination_names, parse_grid, plan_sweep, read_sweep, run_sweep

NB = "tiny-sweep"
PARAMS_CELL = "x = 1.0\nmode = 'ok'\nseed = 0\ndevice = 'cpu'\noutput_dir = None"
RECORD_CELL = """
from salience.params import NotebookParams
from salience.runs import start_run

class P(NotebookParams):
    notebook = "tiny-sweep"
    x: float
    mode: str

run = start_run(P(x=x, mode=mode, seed=seed, device=device), output_dir, title="Tiny sweep", claim="x is positive")
"""
# "kill-worker": SIGKILL the Dask worker process that runs this notebook (kernel → runner child → worker); refuses
# to kill anything that is not a multiprocessing-spawned worker, such as the test process itself
MODE_CELL = """
import os, signal, time
import psutil
if mode == "fail":
    raise RuntimeError("asked to fail")
if mode == "kill-worker":
    worker = psutil.Process(os.getppid()).parent()
    if "multiprocessing" not in " ".join(worker.cmdline()):
        raise RuntimeError(f"not under a Dask worker process: {worker.cmdline()}")
    os.kill(worker.pid, signal.SIGKILL)
    time.sleep(120)  # the runner child notices it lost its parent and stops this kernel
"""
FINISH_CELL = """
import pandas as pd
from salience.evidence import Claim, PartRule, PartSpec, judge_one_sample
rule = PartRule(direction="better", smallest_effect=0.1)
values = pd.Series([x, x + 0.5, x - 0.5, x + 0.25])
parts = [judge_one_sample(PartSpec("positive", "x is positive", "x", "draw"), rule, values),
         judge_one_sample(PartSpec("doubled", "2x is positive", "2x", "draw"), rule, 2 * values)]
run.conclude(Claim("tiny-sweep", "Tiny sweep", "x is positive", [], parts))
run.finish()
"""


class TinyParams(NotebookParams):
    notebook = NB
    x: float = Field(ge=0, description="the quantity under test")
    mode: Literal["ok", "fail", "kill-worker"] = Field(description="what the notebook does besides judging x")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A registered notebook ``tiny-sweep`` (file, parameter files, experiment module) and an empty outputs folder."""
    notebooks, params, outputs = tmp_path / "notebooks", tmp_path / "params", tmp_path / "outputs"
    notebooks.mkdir()
    params.mkdir()
    cells = [new_code_cell(PARAMS_CELL), new_code_cell(RECORD_CELL), new_code_cell(MODE_CELL),
             new_code_cell(FINISH_CELL)]
    cells[0].metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebooks / f"{NB}.ipynb")
    (params / f"{NB}.yaml").write_text("x: 1.0\nmode: ok\nseed: 0\ndevice: cpu\n")
    (params / f"{NB}.sweep.yaml").write_text("name: x-and-mode\ngrid:\n  x: [1.0, 3.0]\n  mode: [ok, fail]\n")
    module = types.ModuleType("tiny_sweep_experiment")
    module.Params, module.TITLE, module.CLAIM = TinyParams, "Tiny sweep", "x is positive"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(experiments.NOTEBOOKS, NB, module.__name__)
    monkeypatch.setattr(runner, "notebooks_dir", lambda: notebooks)
    monkeypatch.setenv("SALIENCE_PARAMS", str(params))
    monkeypatch.setenv("SALIENCE_OUTPUTS", str(outputs))
    return outputs


# -- validation: nothing runs, nothing is written -------------------------------------------------------------------


@pytest.mark.parametrize("grid, needles", [
    ({"x": [1.0, -2.0]}, ["x=-2.0 is invalid", "x:", "greater than or equal to 0", "-2.0"]),
    ({"mode": ["ok", "explode"]}, ["mode='explode' is invalid", "mode:", "'explode'"]),
    ({"y": [1]}, ["has no parameter 'y'", "parameters: seed, device, x, mode"]),
    ({"x.inner": [1]}, ["key 'x.inner': x is not a mapping"]),
    ({"x": []}, ["x needs a non-empty list of values"]),
])
def test_every_value_is_validated_before_anything_runs(tiny, grid, needles):
    with pytest.raises(ParamsError) as err:
        run_sweep(Sweep(NB, "bad", grid))
    msg = str(err.value)
    assert all(n in msg for n in needles), msg
    assert "\n" not in msg and msg.startswith("sweep 'bad': ")
    assert not tiny.exists()  # nothing written


def test_sweep_files_and_command_line_grids(tiny, capsys):
    sweep = read_sweep(NB)
    assert (sweep.name, sweep.base, sweep.grid) == ("x-and-mode", "default", {"x": [1.0, 3.0], "mode": ["ok", "fail"]})
    assert [c for c in sweep.combinations()][:2] == [{"x": 1.0, "mode": "ok"}, {"x": 1.0, "mode": "fail"}]
    assert parse_grid(["x=1,2.5", "mode=ok", "lengths=[1,37],[130]"]) == \
        {"x": [1, 2.5], "mode": ["ok"], "lengths": [[1, 37], [130]]}
    with pytest.raises(ParamsError, match="--grid expects key=value1,value2"):
        parse_grid(["x"])
    (tiny.parent / "params" / f"{NB}.typo.sweep.yaml").write_text("grid: {x: [1]}\nfixd: {mode: ok}\n")
    with pytest.raises(ParamsError, match=r"unknown key\(s\) 'fixd'"):
        read_sweep(NB, "typo")
    with pytest.raises(ParamsError, match="no sweep file"):
        read_sweep(NB, "absent")
    # the CLI refuses a bad value with one line and exit code 2, before running anything
    assert cli_main(["sweep", NB, "--grid", "x=1,-1", "--no-report"]) == 2
    assert "x=-1 is invalid" in capsys.readouterr().err and not tiny.exists()


def test_combination_names_are_readable_and_unique():
    combos = [{"x": 1.0, "mode": "ok"}, {"x": [1, 37], "mode": "a b"}]
    assert combination_names(combos) == ["x=1.0,mode=ok", "x=1-37,mode=a-b"]
    clash = [{"m": "a b"}, {"m": "a-b"}]  # the same folder name once made safe: numbered hashes instead
    names = combination_names(clash)
    assert len(set(names)) == 2 and names[0].startswith("001-") and names == combination_names(clash)
    assert combination_names([{"s": "z" * 200}])[0].startswith("001-")


def test_a_sweep_gives_each_combination_its_own_folder(tiny):
    specs = plan_sweep(read_sweep(NB))
    assert [s.param_set for s in specs] == ["x=1.0,mode=ok", "x=1.0,mode=fail", "x=3.0,mode=ok", "x=3.0,mode=fail"]
    assert {s.output_base for s in specs} == {str(tiny / NB / "sweeps" / "x-and-mode" / "runs")}
    assert [s.params["x"] for s in specs] == [1.0, 1.0, 3.0, 3.0]


def test_dotted_keys_reach_into_mapping_parameters():
    """On a shipped notebook's parameters (validation only, nothing runs): the rest of the mapping is kept."""
    sweep = Sweep("kernel-lightning-attention", "delta", {"parts.beats_softmax.smallest_effect": [0.05, 0.2]},
                  fixed={"heads": 1})
    specs = plan_sweep(sweep)
    assert [s.param_set for s in specs] == ["parts.beats_softmax.smallest_effect=0.05",
                                            "parts.beats_softmax.smallest_effect=0.2"]
    parts = [s.params["parts"] for s in specs]
    assert [p["beats_softmax"]["smallest_effect"] for p in parts] == [0.05, 0.2]
    assert all(p["beats_softmax"]["direction"] == "better" and "flat_time_per_token" in p for p in parts)
    assert all(s.params["heads"] == 1 for s in specs)
    with pytest.raises(ParamsError, match="parts.nope is missing or not a mapping"):
        plan_sweep(Sweep("kernel-lightning-attention", "bad", {"parts.nope.smallest_effect": [0.1]}))


# -- a local sweep, gathered and reported ---------------------------------------------------------------------------


def test_local_sweep_gathers_one_tidy_table_and_a_report_section(tiny):
    assert cli_main(["sweep", NB, "-j", "2", "--no-report"]) == 1  # two combinations fail on purpose
    folder = tiny / NB / "sweeps" / "x-and-mode"
    runs = folder / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["x=1.0,mode=fail.failed", "x=1.0,mode=ok",
                                                      "x=3.0,mode=fail.failed", "x=3.0,mode=ok"]
    ok = json.loads((runs / "x=3.0,mode=ok" / "run.json").read_text())
    assert ok["params"]["x"] == 3.0 and ok["param_set"] == "x=3.0,mode=ok" and ok["worker"]["address"] is None
    assert not (tiny / NB / "default").exists()  # not filed under the default set's folder

    table = pd.read_csv(folder / "table.csv")
    assert list(table.columns[:5]) == ["x", "mode", "combination", "status", "label"]
    good = table[table.status == "ok"]
    assert len(good) == 4 and sorted(good.part.unique()) == ["doubled", "positive"]
    for x in (1.0, 3.0):
        row = good[(good.x == x) & (good.part == "positive")].iloc[0]
        assert row.effect == pytest.approx(x + 0.0625) and row.ci_low <= row.effect <= row.ci_high
        assert row.label == "supported" and row.verdict == "supported"
        doubled = good[(good.x == x) & (good.part == "doubled")].iloc[0]
        assert doubled.effect == pytest.approx(2 * (x + 0.0625))
    failed = table[table.status == "failed"]
    assert len(failed) == 2 and failed.part.isna().all()
    assert failed.error.str.contains("RuntimeError: asked to fail").all()
    assert (folder / "effects.png").stat().st_size > 5_000

    index = build_report(tiny)
    page = (index.parent / "sweeps.html").read_text(encoding="utf-8")
    assert "x-and-mode" in page and "2 ok" in page and "2 failed" in page and "asked to fail" in page
    assert 'src="assets/sweeps/tiny-sweep/x-and-mode/effects.png"' in page
    assert (index.parent / "assets/sweeps/tiny-sweep/x-and-mode/table.csv").is_file()
    assert 'href="sweeps.html"' in index.read_text(encoding="utf-8")
    assert "tiny-sweep" not in index.read_text(encoding="utf-8")  # sweep runs stay off the runs page


# -- a real Dask cluster: one scheduler, two worker processes -------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster whose scheduler fails a task at its first dead worker (allowed_failures=0: no retries)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  scheduler_kwargs={"allowed_failures": 0}, silence_logs=50) as local:
        with distributed.Client(local) as client:
            client.wait_for_workers(2, timeout=120)
        yield local


def _worker_addresses(cluster) -> set[str]:
    return set(cluster.scheduler.workers)


def test_sweep_on_a_cluster_records_each_runs_worker(tiny, cluster):
    workers = _worker_addresses(cluster)
    result = run_sweep(Sweep(NB, "on-dask", {"x": [1.0, 2.0]}), scheduler=cluster.scheduler_address)
    assert [o.status for o in result.outcomes] == ["ok", "ok"], [o.error for o in result.outcomes]
    records = [json.loads((result.folder / "runs" / f"x={x}" / "run.json").read_text()) for x in (1.0, 2.0)]
    addresses = {r["worker"]["address"] for r in records}
    assert addresses <= workers and len(addresses) == 2  # one run on each idle worker
    assert all(r["worker"]["pid"] and r["worker"]["host"] for r in records)
    table = pd.read_csv(result.table)
    assert set(table.worker) == addresses and (table.status == "ok").all()
    assert json.loads((result.folder / "sweep.json").read_text())["scheduler"] == cluster.scheduler_address


def test_run_command_on_a_cluster(tiny, cluster):
    assert cli_main(["run", NB, "--scheduler", cluster.scheduler_address, "-p", "x=5", "--no-report"]) == 0
    record = json.loads((tiny / NB / "default" / "run.json").read_text())
    assert record["params"]["x"] == 5 and record["worker"]["address"] in _worker_addresses(cluster)


def test_unreachable_scheduler_is_one_clear_error(tiny, monkeypatch, capsys):
    from salience import cluster as cluster_module

    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT_S", 2)
    assert cli_main(["run", NB, "--scheduler", "tcp://127.0.0.1:9", "--no-report"]) == 2
    assert "no Dask scheduler answered at 'tcp://127.0.0.1:9'" in capsys.readouterr().err
    assert not (tiny / NB).exists()


def test_a_worker_killed_mid_run_fails_that_run_only(tiny, cluster):
    workers = _worker_addresses(cluster)
    result = run_sweep(Sweep(NB, "killed", {"mode": ["kill-worker", "ok"]}), scheduler=cluster.scheduler_address)
    killed, ok = result.outcomes
    assert ok.status == "ok", ok.error
    assert killed.status == "failed" and killed.error["ename"] == "WorkerDied"
    assert "died while running tiny-sweep [mode=kill-worker]" in killed.error["evalue"]
    record = json.loads((result.folder / "runs" / "mode=kill-worker.failed" / "run.json").read_text())
    assert record["status"] == "failed" and record["worker"]["address"] in workers
    assert "died while running" in record["error"]["evalue"]
    table = pd.read_csv(result.table)
    assert table.groupby("combination").status.first().to_dict() == {"mode=kill-worker": "failed", "mode=ok": "ok"}
    assert table[table.status == "failed"].error.str.startswith("WorkerDied: worker tcp://").all()
    # the orphaned runner child (its spec lies under this test's outputs) stops its kernel and exits on its own
    deadline = time.time() + 60
    while (leftover := _runner_children(tiny)) and time.time() < deadline:
        time.sleep(1)
    assert not leftover, f"runner children still alive: {leftover}"


def _runner_children(outputs) -> list[str]:
    """Command lines of live ``python -m salience.runner --child SPEC`` processes whose SPEC is under ``outputs``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "salience.runner --child" in cmd and str(outputs) in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmd)
    return found
