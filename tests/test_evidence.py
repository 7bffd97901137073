"""The evidence layer: paired intervals, the part rules, the overall label, rendering at supported precision."""

import json

import numpy as np
import pandas as pd
import pytest

from salience.evidence import (
    N_RESAMPLES,
    Claim,
    PartRule,
    PartSpec,
    check,
    check_part_rules,
    decimals_for,
    fmt_interval,
    judge,
    judge_interval,
    judge_one_sample,
    overall_label,
    paired_interval,
)

SPEC = PartSpec("a_vs_b", "a beats b", "score", "image")


def _arms(effect, n=400, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.normal(0.5, 0.2, n)
    return pd.Series(b + effect + rng.normal(0, noise, n)), pd.Series(b)


@pytest.mark.parametrize("effect, direction, expected", [
    (0.05, "better", "supported"),
    (-0.05, "better", "contradicted"),
    (0.0, "better", "inconclusive"),
    (-0.05, "worse", "supported"),
    (0.05, "worse", "contradicted"),
    (0.0, "equivalent", "supported"),
    (0.2, "equivalent", "contradicted"),
    (-0.005, "no_worse", "supported"),
    (-0.2, "no_worse", "contradicted"),
])
def test_part_verdicts_follow_the_interval(effect, direction, expected):
    a, b = _arms(effect)
    part = judge(SPEC, PartRule(direction=direction, smallest_effect=0.03), a, b)
    assert part.verdict == expected
    assert part.ci_low <= part.effect <= part.ci_high
    assert part.n == 400 and part.effect == pytest.approx(float((a - b).mean()))


def test_equivalence_needs_a_narrow_interval_not_just_no_difference():
    a, b = _arms(0.0, n=12, noise=0.5)  # no difference, but too few and too noisy units to prove equivalence
    part = judge(SPEC, PartRule(direction="equivalent", smallest_effect=0.05), a, b)
    assert part.verdict == "inconclusive" and part.confidence == 0.90


def test_lower_is_better_orients_the_verdict():
    a, b = _arms(-0.05)  # a is lower: better when lower is better
    spec = PartSpec("kl", "a has lower KL", "KL", "document", higher_is_better=False)
    assert judge(spec, PartRule(direction="better", smallest_effect=0.01), a, b).verdict == "supported"
    assert judge(SPEC, PartRule(direction="better", smallest_effect=0.01), a, b).verdict == "contradicted"


def test_interval_is_seeded_and_matches_scipy_percentile_scale():
    a, b = _arms(0.02, n=200)
    p1 = judge(SPEC, PartRule(direction="better", smallest_effect=0.01), a, b, seed=3)
    p2 = judge(SPEC, PartRule(direction="better", smallest_effect=0.01), a, b, seed=3)
    assert (p1.ci_low, p1.ci_high) == (p2.ci_low, p2.ci_high)
    # the bootstrap interval has the width of a normal-theory interval of the mean difference (within 25%)
    d = (a - b).to_numpy()
    normal = 2 * 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert (p1.ci_high - p1.ci_low) == pytest.approx(normal, rel=0.25)


def test_units_are_aligned_by_index_and_mismatches_fail():
    a, b = _arms(0.05, n=50)
    shuffled = b.sample(frac=1.0, random_state=0)
    assert judge(SPEC, PartRule(direction="better", smallest_effect=0.01), a, shuffled).effect == pytest.approx(
        float((a - b).mean()))
    with pytest.raises(ValueError, match="same units"):
        judge(SPEC, PartRule(direction="better", smallest_effect=0.01), a, b.drop(index=3))
    with pytest.raises(ValueError, match="at least 2 units"):
        judge(SPEC, PartRule(direction="better", smallest_effect=0.01), a[:1], b[:1])
    with pytest.raises(ValueError, match="finite"):
        judge(SPEC, PartRule(direction="better", smallest_effect=0.01), a.where(a.index != 5), b)


def test_fewer_resamples_than_the_floor_is_refused():
    a, b = _arms(0.05, n=20)
    with pytest.raises(ValueError, match="2000"):
        judge(SPEC, PartRule(direction="better", smallest_effect=0.01), a, b, n_resamples=500)
    assert N_RESAMPLES >= 2000


def test_all_equal_differences_give_a_degenerate_interval():
    lo, hi, method = paired_interval(np.full(10, 0.25))
    assert (lo, hi) == (0.25, 0.25) and "equal" in method
    # a tie everywhere is no support for superiority
    zeros = pd.Series(np.zeros(10))
    assert judge(SPEC, PartRule(direction="better", smallest_effect=0.1), zeros, zeros).verdict == "inconclusive"


def test_one_sample_and_check_parts():
    growth = pd.Series(np.linspace(-0.05, 0.01, 8))
    spec = PartSpec("growth", "time per token does not grow", "log growth", "length", higher_is_better=False)
    assert judge_one_sample(spec, PartRule(direction="no_worse", smallest_effect=0.2), growth).verdict == "supported"
    grid = PartSpec("grid", "every case within the rule", "error / allowed", "case", higher_is_better=False)
    assert check(grid, [True] * 5, 0.4).verdict == "supported"
    failed = check(grid, [True, False, True], 1.7)
    assert failed.verdict == "contradicted" and failed.n == 3 and "2/3" in failed.method


@pytest.mark.parametrize("verdicts, label", [
    (["supported", "supported"], "supported"),
    (["supported", "inconclusive"], "partly supported"),
    (["supported", "contradicted"], "partly supported"),
    (["contradicted", "inconclusive"], "contradicted"),
    (["inconclusive", "inconclusive"], "inconclusive"),
])
def test_overall_label(verdicts, label):
    assert overall_label(verdicts) == label


def test_overall_label_rejects_nothing_and_unknown_verdicts():
    with pytest.raises(ValueError):
        overall_label([])
    with pytest.raises(ValueError):
        overall_label(["tie"])


def test_judge_interval_rejects_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        judge_interval(0.1, 0.2, "sideways", 0.1)


@pytest.mark.parametrize("width, decimals", [(0.0116, 3), (0.2, 2), (3.0, 1), (40.0, 0), (0.0, 3)])
def test_precision_follows_the_interval(width, decimals):
    assert decimals_for(width) == decimals


def test_fmt_interval_rounds_to_the_supported_precision():
    assert fmt_interval(0.0234, 0.0118, 0.0351) == "+0.023 [+0.012, +0.035]"
    assert fmt_interval(1.23456, 0.9, 1.6) == "+1.23 [+0.90, +1.60]"


def test_claim_renders_and_round_trips(tmp_path):
    a, b = _arms(0.05)
    parts = [judge(SPEC, PartRule(direction="better", smallest_effect=0.01), a, b),
             check(PartSpec("grid", "all pass", "ratio", "case"), [True, True], 0.5)]
    claim = Claim("nb", "Title", "a beats b", ["fastervlm"], parts, setting="a small model", notes=["one note"])
    text = claim.markdown()
    assert "**Verdict: supported.**" in text and "[@fastervlm]" in text and "a small model" in text
    assert "2/2 cases pass" in text and "0.5" not in text.split("2/2")[0].splitlines()[-1]
    d = json.loads(json.dumps(claim.to_dict()))
    again = Claim.from_dict(d)
    assert again.label == claim.label and again.parts[0].ci_low == parts[0].ci_low
    table = claim.table()
    assert list(table.verdict) == ["supported", "supported"] and list(table.n) == [400, 2]


def test_part_rules_must_name_exactly_the_parts():
    specs = [SPEC, PartSpec("other", "x", "m", "u")]
    rule = PartRule(direction="better", smallest_effect=0.1)
    assert check_part_rules({"a_vs_b": rule, "other": rule}, specs)
    with pytest.raises(ValueError, match="exactly"):
        check_part_rules({"a_vs_b": rule}, specs)
    with pytest.raises(ValueError):
        PartRule(direction="better", smallest_effect=0.0)


def test_a_bar_in_a_statement_does_not_break_the_findings_table():
    a, b = _arms(0.05)
    spec = PartSpec("abs_rho", "mean |rho| falls", "|rho|", "document")
    text = Claim("nb", "T", "s", ["h2o"], [judge(spec, PartRule(direction="better", smallest_effect=0.01), a, b)]
                 ).markdown()
    row = next(line for line in text.splitlines() if line.startswith("| abs_rho"))
    assert row.count("|") - row.count("\\|") == 9  # eight cells, nine unescaped separators
