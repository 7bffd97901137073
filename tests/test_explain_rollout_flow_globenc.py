"""explain-rollout-flow-globenc's parts, parameters and verdict, on synthetic per-text tables (the scorers
themselves are tested by hand computation in test_attribution.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from salience.experiments import explain_rollout_flow_globenc as exp
from salience.params import ParamsError

METHODS = ("raw_attention", "attention_rollout", "attention_flow", "globenc", "occlusion", "random")


def synthetic(n=20, better=0.3, seed=0):
    """Per-text tables where every aggregate method beats raw attention by ``better`` (agreement, comprehensiveness)
    and by ``better / 3`` in sufficiency (lower), with noise."""
    rng = np.random.default_rng(seed)
    rows, agreement = [], []
    for task in ("classifier", "lm"):
        for text in range(n):
            for method in METHODS:
                gain = 0.0 if method in ("raw_attention", "random", "occlusion") else better
                for how in ("mask", "remove"):
                    rows.append(dict(task=task, text=text, method=method, replacement=how,
                                     comprehensiveness=0.2 + gain + 0.02 * rng.standard_normal(),
                                     sufficiency=0.3 - gain / 3 + 0.02 * rng.standard_normal()))
            for method in METHODS[:4]:
                gain = 0.0 if method == "raw_attention" else better
                agreement.append(dict(task=task, text=text, method_a=method, method_b="occlusion",
                                      agreement=0.1 + gain + 0.05 * rng.standard_normal()))
    return pd.DataFrame(rows), pd.DataFrame(agreement)


def test_every_part_supported_when_the_aggregates_win_and_contradicted_when_they_lose():
    params = exp.Params.defaults()
    table, agreement = synthetic()
    claim = exp.judge_claim(table, agreement, params, accuracy=0.8)
    assert len(claim.parts) == 18 and {p.verdict for p in claim.parts} == {"supported"}
    assert all(p.n == 20 for p in claim.parts)
    worse_table, worse_agreement = synthetic(better=-0.3)
    claim = exp.judge_claim(worse_table, worse_agreement, params, accuracy=0.8)
    assert {p.verdict for p in claim.parts} == {"contradicted"}


def test_undefined_agreement_leaves_only_that_text():
    params = exp.Params.defaults()
    table, agreement = synthetic()
    agreement.loc[(agreement.task == "lm") & (agreement.text == 3) & (agreement.method_a == "raw_attention"),
                  "agreement"] = np.nan
    parts = {p.id: p for p in exp.judge_claim(table, agreement, params, accuracy=0.8).parts}
    assert parts["lm_rollout_agrees"].n == 19 and parts["lm_rollout_more_comprehensive"].n == 20


def test_flow_on_a_subset_of_texts_is_refused():
    params = exp.Params.defaults()
    table, agreement = synthetic()
    table = table[~((table.method == "attention_flow") & (table.task == "lm") & (table.text == 5))]
    with pytest.raises(ValueError, match="attention flow ran on 19 of the 20 lm texts"):
        exp.judge_claim(table, agreement, params, accuracy=0.8)


def test_scorer_config_explains_the_output_row_everywhere():
    params = exp.Params.defaults()
    for task in ("classifier", "lm"):
        config = exp.scorer_config(params, task)
        assert set(config) == set(METHODS) - {"random"}
        assert config["attention_rollout"]["query"] == "auto"  # the last token on the LM, not the mean of rows
        assert config["attention_rollout"]["residual"] == config["attention_flow"]["residual"] == 0.5


@pytest.mark.parametrize("overrides, message", [
    (dict(flow_tasks=["classifier"]), "flow_tasks"),
    (dict(rollout_residual=1.5), "rollout_residual"),
    (dict(parts={"classifier_rollout_agrees": {"direction": "better", "smallest_effect": 0.1}}), "parts"),
])
def test_bad_params(overrides, message):
    with pytest.raises(ParamsError, match=message):
        exp.Params.defaults(**overrides)


def test_occlusion_agreement_table_has_every_method_and_the_difference():
    params = exp.Params.defaults()
    _, agreement = synthetic()
    table = exp.occlusion_agreement_table(agreement, params)
    assert list(table.method[table.task == "lm"]) == ["raw_attention", "attention_rollout", "attention_flow", "globenc"]
    assert (table.texts == 20).all() and table["− raw attention's"].iloc[0] == ""
