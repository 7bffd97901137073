"""KV eviction scores read as attributions (salience.eviction_attribution): the aggregation by hand, the
continuation readout against the model's own log-probabilities, what is protected, the per-document rank
correlation, and explain-eviction-scores' parameters and verdict on synthetic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from salience import faithfulness
from salience.eviction_attribution import (continuation_readout, continuation_target, faithfulness_rows,
                                           protected_positions, rank_correlation_per_unit, token_attribution)
from salience.experiments import explain_eviction_scores as exp
from salience.params import ParamsError


def test_rank_mean_is_scale_free_and_averages_layer_head_ranks():
    # layer 0 ranks tokens 0 < 1 < 2, layer 1 ranks 2 < 1 < 0 at a 1000x larger scale; token 1 ties in the middle
    scores = torch.tensor([[[1.0, 2.0, 3.0]], [[3000.0, 2000.0, 1000.0]]])
    torch.testing.assert_close(token_attribution(scores), torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(token_attribution(scores[:1]), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    # raw means let the large layer decide
    assert token_attribution(scores, "score_mean").argmax() == 0
    ties = torch.tensor([[1.0, 1.0, 2.0]])  # average ranks: 0.5, 0.5, 2 over (C - 1) = 2
    torch.testing.assert_close(token_attribution(ties), torch.tensor([0.25, 0.25, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="aggregate must be one of"):
        token_attribution(scores, "median")
    with pytest.raises(ValueError, match="finite"):
        token_attribution(torch.tensor([1.0, float("nan")]))


def test_continuation_readout_is_the_mean_log_probability_and_survives_removal(tiny_llama):
    context, continuation = torch.tensor([[3, 5, 7, 9, 11, 13]]), torch.tensor([[4, 6, 8]])
    ids = torch.cat([context, continuation], 1)
    with torch.no_grad():
        logp = tiny_llama(ids).logits.log_softmax(-1)[0]
    expected = float(np.mean([logp[5 + i, continuation[0, i]] for i in range(3)]))
    target = continuation_target(tiny_llama, None, context, continuation, baseline_token=0)
    predict = target.predictor(0)
    assert abs(float(predict(ids, torch.ones_like(ids))) - expected) < 1e-5
    # a context token removed: the continuation is still read at the end
    shorter = torch.cat([context[:, 1:], continuation], 1)
    with torch.no_grad():
        logp = tiny_llama(shorter).logits.log_softmax(-1)[0]
    expected = float(np.mean([logp[4 + i, continuation[0, i]] for i in range(3)]))
    assert abs(float(predict(shorter, torch.ones_like(shorter))) - expected) < 1e-5
    with pytest.raises(ValueError, match="empty"):
        continuation_readout(torch.tensor([], dtype=torch.long))


def test_protected_are_the_windows_and_the_continuation():
    mask = protected_positions(10, 3, n_sink=2, recent_window=3)
    assert mask[0].tolist() == [True, True, False, False, False, False, False, True, True, True, True, True, True]
    with pytest.raises(ValueError, match="leave no context token"):
        protected_positions(5, 3, n_sink=2, recent_window=3)


def test_faithfulness_rows_never_perturb_what_is_protected(tiny_llama):
    context, continuation = torch.tensor([[3, 5, 7, 9, 11, 13, 15, 17]]), torch.tensor([[4, 6]])
    target = continuation_target(tiny_llama, None, context, continuation, baseline_token=0)
    protected = protected_positions(8, 2, n_sink=1, recent_window=2)
    seen = []
    original = target.predictor

    def spy(example):
        predict = original(example)

        def wrapped(ids, mask):
            seen.extend(ids.tolist())
            return predict(ids, mask)
        return wrapped

    target.predictor = spy  # type: ignore[method-assign]
    how = {"mask": faithfulness.replacement("mask", 0), "remove": faithfulness.replacement("remove")}
    rows = faithfulness_rows(target, {"up": torch.arange(8.0), "down": -torch.arange(8.0)}, protected, how,
                             [0.2, 0.6], doc=7)
    assert len(rows) == 4 and {r["doc"] for r in rows} == {7}
    for ids in seen:  # the first token, the last two context tokens and the continuation are always there
        assert ids[0] == 3 and ids[-4:] == [15, 17, 4, 6]
    up, down = (next(r for r in rows if r["method"] == m and r["replacement"] == "mask") for m in ("up", "down"))
    assert up["f_full"] == down["f_full"] and up["comprehensiveness"] != down["comprehensiveness"]


def test_rank_correlation_per_unit():
    x = pd.DataFrame([[1, 2, 3], [1, 2, 3], [1, 1, 1]], columns=list("abc"))
    y = pd.DataFrame([[10, 20, 30], [30, 20, 10], [1, 2, 3]], columns=list("abc"))
    rho = rank_correlation_per_unit(x, y)
    assert rho.iloc[0] == pytest.approx(1.0) and rho.iloc[1] == pytest.approx(-1.0) and np.isnan(rho.iloc[2])
    with pytest.raises(ValueError, match="at least 3 methods"):
        rank_correlation_per_unit(x[["a", "b"]], y[["a", "b"]])
    with pytest.raises(ValueError, match="same units"):
        rank_correlation_per_unit(x, y[["c", "b", "a"]])


# ------------------------------------------------------------------------------ the notebook's verdict
def synthetic(params, n=16, seed=0, predictive=True):
    """Per-document tables: each scorer's faithfulness and eviction area follow one hidden quality (plus noise)."""
    rng = np.random.default_rng(seed)
    labels = [s.key for s in params.scorers]
    quality = {label: (0.0 if label == params.random_label else rng.uniform(0.2, 1.0)) for label in labels}
    rows, areas = [], []
    for doc in range(n):
        area = {"uncompressed": 0.0, "oracle": 0.01}
        for method in [*labels, "oracle", exp.GRADIENT]:
            q = quality.get(method, 1.2)
            rows.append(dict(doc=doc, method=method, replacement="mask",
                             comprehensiveness=0.3 + q + 0.05 * rng.standard_normal(),
                             sufficiency=1.5 - q + 0.05 * rng.standard_normal(), f_full=-3.0))
            if method in labels:
                signal = q if predictive else rng.uniform(0.2, 1.0)
                area[method] = 0.1 - 0.05 * signal + 0.002 * rng.standard_normal()
        areas.append(pd.Series(area, name=doc))
    return pd.DataFrame(rows), pd.DataFrame(areas).rename_axis("doc")


def test_verdict_follows_the_synthetic_truth():
    params = exp.Params.defaults()
    table, areas = synthetic(params)
    parts = {p.id: p for p in exp.judge_claim(table, areas, params).parts}
    assert parts["attention_more_comprehensive_than_random"].verdict == "supported"
    assert parts["attention_more_sufficient_than_random"].verdict == "supported"
    assert parts["gradient_more_comprehensive_than_attention"].verdict == "supported"
    assert parts["comprehensiveness_predicts_eviction"].verdict == "supported"
    assert all(p.n == 16 for p in parts.values())
    table, areas = synthetic(params, predictive=False)
    parts = {p.id: p for p in exp.judge_claim(table, areas, params).parts}
    assert parts["comprehensiveness_predicts_eviction"].verdict != "supported"


def test_method_table_has_the_uncompressed_and_oracle_rows_and_every_scorer():
    params = exp.Params.defaults()
    table, areas = synthetic(params)
    methods = exp.method_table(table, areas, params)
    assert methods.method.iloc[0] == "uncompressed"
    assert {"oracle", exp.GRADIENT, exp.ATTENTION_FAMILY, *[s.key for s in params.scorers]} <= set(methods.method)


@pytest.mark.parametrize("overrides, message", [
    (dict(random_label="H2O"), "random_label"),
    (dict(controls=["StreamingLLM"]), "random_label"),
    (dict(replacements=["mask"], judged_replacement="remove"), "judged_replacement"),
    (dict(recent_window=4), "recent_window"),
    (dict(fractions=[0.0]), "fractions"),
    (dict(controls=["random", "StreamingLLM", "H2O", "ZipCache", "TOVA", "SnapKV", "VATP", "CAOTE"]),
     "two attention-based"),
])
def test_bad_params(overrides, message):
    with pytest.raises(ParamsError, match=message):
        exp.Params.defaults(**overrides)
