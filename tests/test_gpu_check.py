"""``make gpu-check`` (scripts/gpu_check.py): its dry run passes on this machine, each input check catches a broken
input, and the runner records ok, failed, timed-out and output-less steps and goes on past them.

Nothing here needs a GPU: the real steps are only checked, and the runner is exercised with small stand-in steps.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys

import pytest
import torch

from salience.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    """scripts/gpu_check.py imported as a module."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


@pytest.fixture(scope="module")
def steps(gc):
    return {s.name: s for s in gc.plan_steps()}


def replace_arg(step, old: str, new: str):
    assert old in step.argv, f"{old!r} is not an argument of {step.name}"
    return dataclasses.replace(step, argv=tuple(new if a == old else a for a in step.argv))


def test_dry_run_passes_and_writes_nothing(gc):
    summary_existed = gc.SUMMARY_PATH.exists()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every step's inputs check out (5 steps" in proc.stdout
    for name in ("kernel-tests", "bench-scored-attention", "bench-lightning-attention", "notebook-scored-attention",
                 "notebook-lightning-attention"):  # fmt: skip
        assert f". {name} (" in proc.stdout
    assert "131072" in proc.stdout and "65536" in proc.stdout  # the paper sizes are in the plan
    assert gc.SUMMARY_PATH.exists() == summary_existed


def test_plan_fits_nine_minutes_and_writes_the_cuda_csvs(gc, steps):
    assert sum(s.budget_s for s in steps.values()) <= gc.LIMIT_S - gc.RESERVED_S <= 540
    assert gc.check_budgets(list(steps.values())) == []
    outputs = {p.name for s in steps.values() for p in s.outputs}
    assert {"scored_attention_cuda.csv", "lightning_attention_cuda.csv"} <= outputs
    assert dict(steps["kernel-tests"].env) == {"SALIENCE_TEST_DEVICE": "cuda"}


def test_budgets_over_nine_minutes_are_refused(gc, steps):
    plan = list(steps.values())
    plan[1] = dataclasses.replace(plan[1], budget_s=plan[1].budget_s + 60)
    problems = gc.check_budgets(plan)
    assert len(problems) == 1 and "over the 530 s" in problems[0]
    plan = [dataclasses.replace(plan[0], budget_s=gc.INTERRUPT_GRACE_S), plan[0]]
    problems = gc.check_budgets(plan)
    assert any("not above the 10 s interrupt grace" in p for p in problems)
    assert any("used twice" in p for p in problems)


@pytest.mark.parametrize("name, old, new, message", [
    ("bench-scored-attention", "--lengths", "--lenghts", "unrecognized arguments"),
    ("bench-lightning-attention", "bfloat16", "float8", "invalid choice: 'float8'"),
    ("bench-lightning-attention", "65536", "64k", "invalid int value: '64k'"),
    ("bench-scored-attention", "cuda", "cpu", "not cuda"),
])  # fmt: skip
def test_a_benchmark_argument_its_script_would_reject_is_refused(gc, steps, name, old, new, message):
    assert gc.check_benchmark_step(steps[name]) == []
    problems = gc.check_benchmark_step(replace_arg(steps[name], old, new))
    assert len(problems) == 1 and problems[0].startswith(name) and message in problems[0], problems


def test_a_benchmark_that_writes_elsewhere_or_is_missing_is_refused(gc, steps, tmp_path):
    step = steps["bench-scored-attention"]
    moved = replace_arg(step, str(step.outputs[0]), str(tmp_path / "other.csv"))
    assert "not a declared output" in gc.check_benchmark_step(moved)[0]
    missing = replace_arg(step, "benchmarks/bench_scored_attention.py", "benchmarks/bench_missing.py")
    assert gc.check_benchmark_step(missing) == [f"{step.name}: script benchmarks/bench_missing.py not found"]


def test_test_step_must_collect_tests(gc, steps):
    step = steps["kernel-tests"]
    missing = replace_arg(step, "tests/kernels/test_lightning_attention.py", "tests/kernels/test_missing.py")
    assert "test file(s) not found: tests/kernels/test_missing.py" in gc.check_pytest_step(missing)[0]
    nothing = replace_arg(step, "triton", "no_such_test_name")
    problems = gc.check_pytest_step(nothing)
    assert len(problems) == 1 and "collected 0 tests" in problems[0]


def written_before(gc, steps) -> dict:
    return {gc.resolved(p): s.name for s in steps.values() if s.kind == "benchmark" for p in s.outputs}


def test_the_gpu_parameter_sets_validate_with_the_csvs_the_benchmarks_write(gc, steps):
    for name in ("notebook-scored-attention", "notebook-lightning-attention"):
        problems, skipped = gc.check_notebook_step(steps[name], written_before(gc, steps))
        assert problems == []
        if not steps[name].inputs[0].exists():
            assert len(skipped) == 1 and "placeholder" in skipped[0]


def test_an_invalid_parameter_set_is_refused(gc, steps, tmp_path):
    step = steps["notebook-scored-attention"]
    bad = tmp_path / "broken.yaml"
    bad.write_text(f"device: cuda\nhead_dim: 999\nbenchmark_csv: {step.inputs[0]}\n")
    problems, _ = gc.check_notebook_step(replace_arg(step, "gpu", str(bad)), written_before(gc, steps))
    assert len(problems) == 1 and "head_dim" in problems[0], problems
    problems, _ = gc.check_notebook_step(replace_arg(step, "gpu", "no-such-set"), written_before(gc, steps))
    assert len(problems) == 1 and "no-such-set" in problems[0], problems


def test_a_notebook_step_must_read_what_an_earlier_step_writes(gc, steps, tmp_path):
    step = steps["notebook-lightning-attention"]
    other = dataclasses.replace(step, inputs=(tmp_path / "lightning_attention_cuda.csv",))
    problems, _ = gc.check_notebook_step(other, written_before(gc, steps))
    assert any("not the step's declared input" in p for p in problems), problems
    notebooks_first = [s for s in steps.values() if s.kind == "notebook"]
    if not any(p.exists() for s in notebooks_first for p in s.inputs):
        problems, _ = gc.check_inputs(notebooks_first, collect_tests=False)
        assert sum("which no earlier step writes" in p for p in problems) == 2, problems
    short = replace_arg(step, str(step.budget_s - gc.RUNNER_MARGIN_S), str(step.budget_s))
    problems, _ = gc.check_notebook_step(short, written_before(gc, steps))
    assert any("for the runner to stop the notebook" in p for p in problems), problems


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_real_mode_refuses_without_cuda(gc):
    with pytest.raises(SystemExit, match="sees no CUDA device.*DRY_RUN=1"):
        gc.main([])


def test_runner_records_every_step_and_goes_on(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "LOG_DIR", tmp_path / "logs")
    monkeypatch.setattr(gc, "INTERRUPT_GRACE_S", 1)
    made, never = tmp_path / "made.csv", tmp_path / "never.csv"
    py = gc.PYTHON

    def step(name, code, budget_s=20, outputs=(), inputs=()):
        return gc.Step(name, "benchmark", name, (py, "-c", code), budget_s, tuple(outputs), tuple(inputs))

    plan = [
        step("writes", f"open({str(made)!r}, 'w').write('n\\n1\\n'); print('wrote it')", outputs=[made]),
        step("fails", "import sys; print('broken'); sys.exit(3)", outputs=[never]),
        step("sleeps", "import time; time.sleep(60)", budget_s=3),
        step("ignores-sigint", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)",
             budget_s=3),
        step("writes-nothing", "print('done')", outputs=[tmp_path / "missing.csv"]),
        step("reads-failed", "print('read it')", inputs=[never]),
    ]
    summary = tmp_path / "summary.md"
    results = gc.run_all(plan, "a test machine", summary)
    status = {r.step.name: (r.status, r.note) for r in results}
    assert status["writes"] == ("ok", "wrote it")
    assert status["fails"] == ("failed", "broken") and results[1].returncode == 3
    assert status["sleeps"][0] == status["ignores-sigint"][0] == "timeout"
    assert max(r.wall_s for r in results[2:4]) < 6  # SIGINT at 2 s, SIGKILL at the 3 s budget
    assert status["writes-nothing"] == ("failed", f"exited 0 but did not write {gc.shown(tmp_path / 'missing.csv')}")
    assert status["reads-failed"][0] == "ok" and "from a step that did not end ok" in status["reads-failed"][1]
    assert (tmp_path / "logs" / "fails.log").read_text() == "broken\n"
    text = summary.read_text()
    assert "a test machine" in text and "2/6 steps ok" in text
    assert "| fails | failed |" in text and "| sleeps | timeout |" in text

