"""What nbval checks: n, verdicts, and effects within a quarter of the stored interval's half-width."""

import json

import pytest

from salience import reproduction
from salience.evidence import Claim, Part


def _part(pid="p", effect=0.10, low=0.06, high=0.14, verdict="supported", n=16):
    return Part(id=pid, statement="s", metric="m", unit="document", higher_is_better=True, direction="better",
                smallest_effect=0.01, n=n, effect=effect, ci_low=low, ci_high=high, confidence=0.95, method="x",
                verdict=verdict)


def _claim(*parts):
    return Claim(notebook="nb", title="t", statement="c", papers=[], parts=list(parts))


def _reference(claim, params):
    return {"params": params, "claim": claim.to_dict()}


PARAMS = {"seed": 0, "budgets": [0.25, 0.5]}


def test_identical_run_reproduces():
    claim = _claim(_part(), _part("q", effect=-0.2, low=-0.3, high=-0.1, verdict="contradicted"))
    table = reproduction.reproduction_table(claim, PARAMS, _reference(claim, PARAMS))
    assert list(table.reproduces) == ["yes", "yes", "yes"]
    assert list(table.part) == ["(claim)", "p", "q"]


@pytest.mark.parametrize("shift, ok", [(0.0099, True), (-0.0099, True), (0.0101, False)])
def test_numbers_may_move_a_quarter_of_the_half_width(shift, ok):
    stored = _claim(_part())  # half-width 0.04: tolerance 0.01
    now = _claim(_part(effect=0.10 + shift, low=0.06 + shift, high=0.14 + shift))
    row = reproduction.reproduction_table(now, PARAMS, _reference(stored, PARAMS)).iloc[1]
    assert (row.reproduces == "yes") is ok
    if not ok:
        assert "vs stored" in row.reproduces


def test_a_changed_verdict_or_count_does_not_reproduce():
    stored = _claim(_part())
    table = reproduction.reproduction_table(_claim(_part(verdict="inconclusive")), PARAMS, _reference(stored, PARAMS))
    assert table.reproduces.iloc[1].startswith("no: verdict")
    table = reproduction.reproduction_table(_claim(_part(n=15)), PARAMS, _reference(stored, PARAMS))
    assert "n 15 vs stored 16" in table.reproduces.iloc[1]


def test_exhaustive_checks_must_match_exactly():
    stored = _claim(_part(effect=648, low=648, high=648))
    same = reproduction.reproduction_table(_claim(_part(effect=648, low=648, high=648)), PARAMS,
                                           _reference(stored, PARAMS))
    assert same.reproduces.iloc[1] == "yes"
    off = reproduction.reproduction_table(_claim(_part(effect=647, low=647, high=647)), PARAMS,
                                          _reference(stored, PARAMS))
    assert off.reproduces.iloc[1].startswith("no")


def test_other_parameters_or_no_reference_are_not_compared():
    claim = _claim(_part())
    table = reproduction.reproduction_table(claim, {**PARAMS, "seed": 1}, _reference(claim, PARAMS))
    assert all(r.startswith("not compared: parameters differ from the stored run (seed)") for r in table.reproduces)
    table = reproduction.reproduction_table(claim, PARAMS, None)
    assert all(r.startswith("not compared: no stored run") for r in table.reproduces)


def test_store_mode_writes_the_reference_and_a_later_run_reads_it(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduction, "notebooks_dir", lambda: tmp_path)
    claim = _claim(_part())
    monkeypatch.setenv(reproduction.WRITE_ENV, "1")
    assert list(reproduction.check_reproduction(claim, PARAMS).reproduces) == ["yes", "yes"]
    stored = json.loads((tmp_path / "nb.claims.json").read_text())
    assert stored["params"] == PARAMS and stored["claim"]["parts"][0]["effect"] == 0.10
    monkeypatch.delenv(reproduction.WRITE_ENV)
    moved = _claim(_part(effect=0.2, low=0.16, high=0.24))
    assert reproduction.check_reproduction(moved, PARAMS).reproduces.iloc[1].startswith("no")
