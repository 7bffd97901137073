"""The runner on tiny throwaway notebooks: success, failure, timeout; atomic folders; previous results kept."""

import json
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from salience import runner
from salience.runner import RunSpec, execute, run_many, summary

PARAMS_CELL = "x = 1\noutput_dir = None"
RECORD_CELL = """
from salience.params import NotebookParams
from salience.runs import start_run

class P(NotebookParams):
    notebook = "tiny"
    x: int

run = start_run(P(x=x, seed=0, device="cpu"), output_dir, title="Tiny", claim="x is positive")
"""
FINISH_CELL = """
import pandas as pd
run.save_table(pd.DataFrame({"x": [x]}), "x", "the parameter", key=True)
from salience.evidence import Claim, PartRule, PartSpec, judge_one_sample
part = judge_one_sample(PartSpec("positive", "x is positive", "x", "draw"), PartRule(direction="better",
                        smallest_effect=0.1), pd.Series([x, x + 0.5, x - 0.5, x + 0.25]))
run.conclude(Claim("tiny", "Tiny", "x is positive", ["h2o"], [part]))
run.finish()
"""


def make_notebook(path, middle: str = "") -> str:
    cells = [new_code_cell(PARAMS_CELL), new_code_cell(RECORD_CELL)]
    cells[0].metadata["tags"] = ["parameters"]
    if middle:
        cells.append(new_code_cell(middle))
    cells.append(new_code_cell(FINISH_CELL))
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return str(path)


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    monkeypatch.setenv("SALIENCE_OUTPUTS", str(out))
    return out


def spec(path, x=1, timeout=120.0):
    return RunSpec("tiny", "default", {"x": x}, path, "Tiny", "x is positive", timeout)


def test_success_then_failure_keeps_previous_results(tmp_path, outputs):
    good = make_notebook(tmp_path / "good.ipynb")
    first = execute(spec(good, x=3), show_progress=False)
    assert first.status == "ok", first.error
    record = json.loads((outputs / "tiny/default/run.json").read_text())
    assert record["status"] == "ok" and record["params"] == {"seed": 0, "device": "cpu", "x": 3}
    assert record["param_set"] == "default" and record["verdict"]["label"] == "supported"
    assert (outputs / "tiny/default/executed.ipynb").is_file()
    assert (outputs / "tiny/default/tables/01-x.csv").read_text().splitlines() == ["x", "3"]

    bad = make_notebook(tmp_path / "bad.ipynb", middle="raise RuntimeError('boom in the middle')")
    second = execute(spec(bad, x=5), show_progress=False)
    assert second.status == "failed"
    assert second.error["ename"] == "RuntimeError" and "boom" in second.error["evalue"]
    # [4] in the executed notebook: papermill's injected-parameters cell comes before it
    assert second.error["cell"] == 4 and second.error["source"] == "raise RuntimeError('boom in the middle')"
    failed = json.loads((outputs / "tiny/default.failed/run.json").read_text())
    assert failed["status"] == "failed" and failed["error"]["ename"] == "RuntimeError"
    # the last good run is untouched
    assert json.loads((outputs / "tiny/default/run.json").read_text())["params"]["x"] == 3
    assert not [p for p in (outputs / "tiny").iterdir() if p.name.startswith(".")]  # no temp folders left

    third = execute(spec(good, x=4), show_progress=False)
    assert third.status == "ok"
    assert not (outputs / "tiny/default.failed").exists()  # a good run clears the failure


def test_a_killed_runs_temporary_folder_is_cleaned_by_the_next_run(tmp_path, outputs):
    stale = outputs / "tiny" / ".default.tmp-killed"
    stale.mkdir(parents=True)
    (stale / "partial.png").write_bytes(b"half")
    other_set = outputs / "tiny" / ".gpu.tmp-running"  # another parameter set's run: not ours to remove
    other_set.mkdir()
    assert execute(spec(make_notebook(tmp_path / "good.ipynb")), show_progress=False).status == "ok"
    assert not stale.exists() and other_set.exists()


def test_timeout_stops_the_run(tmp_path, outputs):
    slow = make_notebook(tmp_path / "slow.ipynb", middle="import time\ntime.sleep(120)")
    start = time.time()
    outcome = execute(spec(slow, timeout=15.0), show_progress=False)
    assert outcome.status == "timeout"
    assert time.time() - start < 60
    assert not (outputs / "tiny/default").exists()
    assert json.loads((outputs / "tiny/default.failed/run.json").read_text())["error"]["ename"] == "Timeout"


def test_notebook_without_record_is_a_failure(tmp_path, outputs):
    nb = new_notebook(cells=[new_code_cell("output_dir = None\nx = 1")])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "silent.ipynb")
    outcome = execute(spec(str(tmp_path / "silent.ipynb")), show_progress=False)
    assert outcome.status == "failed" and outcome.error["ename"] == "NoRecord"


def test_batch_goes_on_after_a_failure_in_parallel(tmp_path, outputs):
    good = make_notebook(tmp_path / "good.ipynb")
    bad = make_notebook(tmp_path / "bad.ipynb", middle="1/0")
    specs = [spec(bad), RunSpec("tiny2", "default", {"x": 1}, good, "Tiny", "", 120.0)]
    outcomes = run_many(specs, jobs=2)
    assert [o.status for o in outcomes] == ["failed", "ok"]
    text = summary(outcomes)
    assert "1/2 notebook runs succeeded" in text and "ZeroDivisionError" in text and "cell [4]" in text


def test_plan_rejects_unknown_notebooks():
    with pytest.raises(ValueError, match="available: .*kv-normalized-attention"):
        runner.plan(["no-such-notebook"])


def test_a_run_asked_after_an_interrupt_starts_nothing(tmp_path, outputs, monkeypatch):
    """An interrupt that lands while runs are still being handed to the pool: the later ones start no child."""
    good = make_notebook(tmp_path / "good.ipynb")

    def no_child(*args, **kwargs):
        raise AssertionError("a child was started after the interrupt")

    monkeypatch.setattr(runner.subprocess, "Popen", no_child)
    runner._INTERRUPTED.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(spec(good, x=7), show_progress=False)
    finally:
        runner._INTERRUPTED.clear()
    assert not list(outputs.glob("**/.default.tmp-*"))


def test_a_child_started_as_the_interrupt_lands_is_stopped_by_its_own_thread(tmp_path, outputs, monkeypatch):
    """The interrupt comes after the run's first check but before the handler lists the running children: the run
    sees the flag once its child is registered and stops it, instead of waiting out the notebook."""
    slow = make_notebook(tmp_path / "slow.ipynb", middle="import time\ntime.sleep(300)")

    class LandsAfterTheFirstCheck:
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 1

    monkeypatch.setattr(runner, "_INTERRUPTED", LandsAfterTheFirstCheck())
    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        execute(RunSpec("tiny", "default", {"x": 1}, str(slow), "Tiny", "", 120.0), show_progress=False)
    assert time.time() - started < 60  # stopped at once, not after the 120 s timeout
    assert not list(outputs.glob("**/.default.tmp-*"))


def test_interrupting_a_parallel_batch_stops_children_and_keeps_results(tmp_path, outputs):
    """Ctrl-C during `-j 2`: both children stop, temp folders go, earlier results stay."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    good = make_notebook(tmp_path / "good.ipynb")
    assert execute(spec(good, x=7), show_progress=False).status == "ok"
    slow = make_notebook(tmp_path / "slow.ipynb", middle="import time\ntime.sleep(300)")
    # SIGUSR1 makes the batch print every thread's stack: if it ever hangs, the failure says where
    script = textwrap.dedent(f"""
        import faulthandler, signal, sys
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        from salience.runner import RunSpec, run_many
        specs = [RunSpec(n, "default", {{"x": 1}}, {slow!r}, "Tiny", "", 600.0) for n in ("tiny", "tiny2")]
        run_many(specs, jobs=2)
    """)
    stderr_path = tmp_path / "batch.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "SALIENCE_OUTPUTS": str(outputs)},
                                stderr=stderr)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and len(list(outputs.glob("tiny*/.default.tmp-*"))) < 2:
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        pytest.fail(f"the batch did not stop within 60 s of Ctrl-C; its threads:\n{stderr_path.read_text()[-6000:]}")
    assert code != 0
    assert not list(outputs.glob("tiny*/.default.tmp-*"))
    assert json.loads((outputs / "tiny/default/run.json").read_text())["params"]["x"] == 7
    # children carry their spec path (inside this test's outputs folder) on the command line
    leftover = subprocess.run(["pgrep", "-f", "--", f"--child {outputs}"], capture_output=True, text=True).stdout
    assert not leftover.strip(), f"runner children still alive: {leftover}"


def test_threads_reach_the_kernel_and_the_claim_is_recorded(tmp_path, outputs):
    good = make_notebook(tmp_path / "good.ipynb")
    one = RunSpec("tiny", "default", {"x": 2}, good, "Tiny", "x is positive", 120.0, threads=1)
    assert execute(one, show_progress=False).status == "ok"
    record = json.loads((outputs / "tiny/default/run.json").read_text())
    assert record["threads"] == 1
    claim = json.loads((outputs / "tiny/default/claims.json").read_text())
    assert claim["label"] == record["verdict"]["label"] == "supported" and claim["parts"][0]["n"] == 4
    assert "**Verdict: supported.**" in (outputs / "tiny/default/findings.md").read_text()
    two = RunSpec("tiny", "default", {"x": 2}, good, "Tiny", "x is positive", 120.0, threads=2)
    assert execute(two, show_progress=False).status == "ok"
    assert json.loads((outputs / "tiny/default/run.json").read_text())["threads"] == 2


def test_bad_thread_count_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        runner.plan(["kernel-lightning-attention"], threads=0)
