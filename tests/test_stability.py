"""Verdict stability across thread counts: the comparison logic, and the real check on the two cheapest notebooks."""

import json

import pytest

from salience import stability
from salience.runner import RunOutcome


def _claims(folder, label, parts):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "claims.json").write_text(json.dumps(
        {"label": label, "parts": [{"id": k, "verdict": v} for k, v in parts.items()]}))
    return folder


def test_labels_of_reads_the_claim_and_every_part(tmp_path):
    folder = _claims(tmp_path / "run", "partly supported", {"a": "supported", "b": "inconclusive"})
    assert stability.labels_of(folder) == {"claim": "partly supported", "a": "supported", "b": "inconclusive"}


def _fake_runs(monkeypatch, tmp_path, verdicts_by_threads):
    """Stand-in for the runner: the verdict of part 'p' depends on the thread count of the spec."""
    import salience.runner as runner

    def execute(spec, show_progress=False):
        v = verdicts_by_threads[spec.threads]
        if v == "crash":
            return RunOutcome(spec.notebook, "default", "failed", "", 1.0, {"ename": "RuntimeError", "evalue": "x"})
        folder = _claims(tmp_path / f"{spec.notebook}-{spec.threads}", "supported" if v == "supported" else
                         "inconclusive", {"p": v})
        return RunOutcome(spec.notebook, "default", "ok", str(folder), 1.0)

    monkeypatch.setattr(runner, "execute", execute)


@pytest.mark.parametrize("verdicts, stable", [
    ({1: "supported", 2: "supported"}, True),
    ({1: "supported", 2: "inconclusive"}, False),
    ({1: "crash", 2: "crash"}, False),  # the same failure twice is not a stable verdict
])
def test_table_flags_any_difference(monkeypatch, tmp_path, verdicts, stable):
    _fake_runs(monkeypatch, tmp_path, verdicts)
    table, ok = stability.verdict_stability(["kernel-lightning-attention"], threads=(1, 2))
    assert ok is stable
    assert list(table.columns) == ["notebook", "label", "threads=1", "threads=2", "same"]


def test_needs_two_thread_counts():
    with pytest.raises(ValueError, match="two thread counts"):
        stability.verdict_stability(["kernel-lightning-attention"], threads=(1,))


@pytest.mark.slow
def test_cheapest_notebooks_keep_their_verdicts_on_one_and_two_threads():
    table, ok = stability.verdict_stability(["kernel-lightning-attention", "kernel-scored-attention"],
                                            threads=(1, 2), timeout_s=900)
    assert len(table) >= 4, table
    assert ok, "\n" + table.to_string()
