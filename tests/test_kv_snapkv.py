"""kv-snapkv's analysis on hand-made passkey runs and cells: which budgets count, the per-prompt means, the mode
table and a claim whose verdict follows the numbers of the solvable budgets only, paired by prompt (each case can
fail)."""

import numpy as np
import pandas as pd
import pytest

from salience.experiments import kv_snapkv as sk
from salience.kv_tasks import BASELINE, ORACLE

AGNOSTIC, AWARE = sk.AGNOSTIC, sk.AWARE
PROMPTS = 12
BUDGETS = (0.125, 0.25, 0.5)


@pytest.fixture(scope="module")
def params():
    return sk.Params.defaults()


def _cells(solvable: dict[tuple[str, float], bool]) -> pd.DataFrame:
    """Cells of every mode × budget; ``solvable`` lists the exceptions (default: solvable)."""
    return pd.DataFrame([dict(mode=m, budget=b, oracle_fits=True, oracle_accuracy=1.0, oracle_logprob=-0.1,
                              uncompressed_accuracy=1.0, n_prompts=PROMPTS, solvable=solvable.get((m, b), True))
                         for m in sk.MODES for b in BUDGETS])


def _runs(logprob, prompts=range(PROMPTS), labels=("SnapKV", "ZipCache")) -> pd.DataFrame:
    """Runs of every prompt × mode × (uncompressed, oracle, entry × budget); ``logprob(label, mode, budget, k)``
    gives the entries' answer log-probs (the oracle: -0.1, the uncompressed model: -0.05)."""
    rows = []
    for k in prompts:
        for mode in sk.MODES:
            rows.append(dict(prompt=k, mode=mode, scorer=BASELINE, budget=1.0, answer_logprob=-0.05, answer_kl=0.0,
                             greedy_correct=True, needle_kept=1.0))
            for b in BUDGETS:
                rows.append(dict(prompt=k, mode=mode, scorer=ORACLE, budget=b, answer_logprob=-0.1, answer_kl=0.01,
                                 greedy_correct=True, needle_kept=1.0))
            for label in labels:
                for b in BUDGETS:
                    value = logprob(label, mode, b, k)
                    rows.append(dict(prompt=k, mode=mode, scorer=label, budget=b, answer_logprob=value,
                                     answer_kl=-value, greedy_correct=value > -1.5, needle_kept=0.5))
    return pd.DataFrame(rows)


def _noise(k: int, scale: float = 0.01) -> float:
    return scale * float(np.sin(7.0 * k + 1.0))


def test_solvable_budgets_need_both_modes():
    cells = _cells({(AWARE, 0.125): False, (AGNOSTIC, 0.5): False})
    assert sk.solvable_budgets(cells) == [0.25]
    assert sk.solvable_budgets(_cells({})) == list(BUDGETS)
    assert sk.solvable_budgets(_cells({(m, b): False for m in sk.MODES for b in BUDGETS})) == []


def test_per_prompt_averages_the_solvable_budgets_only():
    values = {0.125: -9.0, 0.25: -1.0, 0.5: -3.0}
    runs = _runs(lambda label, mode, b, k: values[b] - k - (0.5 if mode == AWARE else 0.0))
    wide = sk.per_prompt(runs, _cells({(AGNOSTIC, 0.125): False}), "SnapKV")
    assert list(wide.index) == list(range(PROMPTS)) and set(wide.columns) == set(sk.MODES)
    # budgets 0.25 and 0.5 only: (-1 - 3) / 2 - k
    assert wide[AGNOSTIC].tolist() == pytest.approx([-2.0 - k for k in range(PROMPTS)])
    assert wide[AWARE].tolist() == pytest.approx([-2.5 - k for k in range(PROMPTS)])


def _verdicts(claim) -> dict[str, str]:
    return {p.id: p.verdict for p in claim.parts}


def test_claim_supported_when_the_question_helps_snapkv_more_than_the_control(params):
    def logprob(label, mode, b, k):
        gain = (0.6 if label == "SnapKV" else 0.05) if mode == AWARE else 0.0
        return -2.0 - 0.3 * k + gain + _noise(k + 3 * (mode == AWARE))

    claim = sk.judge_claim(_runs(logprob), _cells({}), params)
    assert _verdicts(claim) == {"aware_beats_agnostic": "supported", "gain_exceeds_control": "supported"}
    assert claim.parts[0].n == PROMPTS and claim.parts[0].effect == pytest.approx(0.6, abs=0.03)
    assert "budgets 0.125, 0.25, 0.5" in claim.parts[0].detail
    assert claim.notes[0] == "Every passkey cell is solvable."


def test_an_unsolvable_budget_does_not_leak_into_the_verdict(params):
    """Query-aware SnapKV is worse at every budget solvable in both modes and far better only where the query-aware
    cell is unsolvable: mixing that budget in would flip the first part to supported."""
    def logprob(label, mode, b, k):
        if label == "SnapKV" and mode == AWARE:
            return -2.0 + (5.0 if b == 0.125 else -0.5) + _noise(k)
        return -2.0 + _noise(k + 5)

    runs, cells = _runs(logprob), _cells({(AWARE, 0.125): False})
    claim = sk.judge_claim(runs, cells, params)
    part = claim.parts[0]
    assert part.verdict == "contradicted" and part.effect == pytest.approx(-0.5, abs=0.03)
    assert "budgets 0.25, 0.5" in part.detail and "0.125" not in part.detail
    assert "query-aware @ 0.125" in claim.notes[0]
    # the same runs with every cell solvable: the unsolvable budget's numbers would have decided it
    assert sk.judge_claim(runs, _cells({}), params).parts[0].verdict == "supported"


def test_the_gain_is_paired_by_prompt(params):
    """The control's gain swings from prompt to prompt and SnapKV's follows it plus 0.3: paired by prompt the
    difference is 0.3 everywhere (supported); paired by row order it would be noise around 0.3. The rows come
    shuffled, and the control's prompts in another order, so only the prompt ids pair them."""
    def logprob(label, mode, b, k):
        if mode == AGNOSTIC:
            return -2.0 + _noise(k)
        swing = 3.0 * float(np.sin(2.0 * k))
        return -2.0 + swing + (0.3 if label == "SnapKV" else 0.0) + _noise(k)

    prompts = [3 * k + 1 for k in range(PROMPTS)]  # not 0..n-1
    snap = _runs(logprob, prompts=prompts, labels=("SnapKV",))
    ctrl = _runs(logprob, prompts=prompts[::-1], labels=("ZipCache",))
    ctrl = ctrl[ctrl.scorer == "ZipCache"]
    runs = pd.concat([snap, ctrl]).sample(frac=1.0, random_state=0).reset_index(drop=True)
    part = sk.judge_claim(runs, _cells({}), params).parts[1]
    assert part.n == PROMPTS and part.verdict == "supported"
    assert part.effect == pytest.approx(0.3, abs=1e-9) and part.ci_high - part.ci_low < 1e-6


def test_claim_not_judged_without_a_budget_solvable_in_both_modes(params):
    runs = _runs(lambda label, mode, b, k: -1.0 + (1.0 if mode == AWARE else 0.0) + _noise(k))
    cells = _cells({**{(AWARE, b): False for b in BUDGETS[:2]}, (AGNOSTIC, 0.5): False})
    claim = sk.judge_claim(runs, cells, params)
    assert set(_verdicts(claim).values()) == {"inconclusive"}
    assert all(p.n == 0 and "no budget is solvable" in p.detail for p in claim.parts)


def test_mode_table_counts_prompts_with_numbers_and_marks_solvable_cells():
    runs = _runs(lambda label, mode, b, k: -1.0 - b - (0.5 if mode == AWARE else 0.0))
    unfit = (runs.scorer == ORACLE) & (runs.budget == 0.125) & (runs["mode"] == AWARE) & (runs.prompt < 3)
    runs["greedy_correct"] = runs.greedy_correct.astype(object)  # as passkey_runs writes it: an unfit oracle's None
    runs.loc[unfit, ["answer_logprob", "answer_kl", "needle_kept"]] = np.nan
    runs.loc[unfit, "greedy_correct"] = None
    table = sk.mode_table(runs, _cells({(AWARE, 0.125): False})).set_index(["scorer", "budget", "mode"])
    assert list(table.index.get_level_values("scorer").unique()) == [BASELINE, ORACLE, "SnapKV", "ZipCache"]
    assert len(table) == 2 + 3 * len(BUDGETS) * 2  # uncompressed in both modes, then oracle and 2 entries
    oracle = table.loc[(ORACLE, 0.125, AWARE)]
    assert oracle.prompts == PROMPTS - 3 and not oracle.solvable and oracle.accuracy == 1.0
    assert table.loc[(ORACLE, 0.125, AGNOSTIC)].prompts == PROMPTS
    snap = table.loc[("SnapKV", 0.25, AWARE)]
    assert snap.answer_logprob == pytest.approx(-1.75) and snap.answer_kl == pytest.approx(1.75)
    assert snap.accuracy == 0.0 and snap.solvable
    assert table.loc[("SnapKV", 0.25, AGNOSTIC)].accuracy == 1.0
    assert table.loc[(BASELINE, 1.0, AWARE)].solvable and table.loc[(BASELINE, 1.0, AGNOSTIC)].prompts == PROMPTS
    assert not table.loc[("ZipCache", 0.125, AWARE)].solvable and table.loc[("ZipCache", 0.125, AGNOSTIC)].solvable
