"""The vision leaderboard's analysis on hand-made tables: areas, propagated errors, ranking and the verdict."""

import numpy as np
import pandas as pd
import pytest

from salience.experiments import vit_leaderboard as exp
from salience.metrics import area_under_curve
from salience.scorers import get_scorer


def _table(curves: dict[str, dict[int, list[float]]], keeps=(0.5, 0.1), ref=0.9, n=100) -> pd.DataFrame:
    rows = [dict(entry="unpruned", method="none", layer=0, keep=1.0, kept_patches=64, accuracy=ref,
                 cls_cosine=1.0, flops_ratio=1.0)]
    for entry, by_layer in curves.items():
        for layer, accs in by_layer.items():
            for keep, acc in zip(keeps, accs):
                rows.append(dict(entry=entry, method=exp.ENTRIES[entry][0], layer=layer, keep=keep,
                                 kept_patches=int(64 * keep), accuracy=acc, cls_cosine=0.5, flops_ratio=keep))
    t = pd.DataFrame(rows)
    t["accuracy_se"] = np.sqrt(t.accuracy * (1 - t.accuracy) / n)
    t["n_test"] = n
    return t


def test_trapezoid_weights_reproduce_the_area():
    xs = np.array([0.05, 0.1, 0.25, 0.5, 1.0])
    ys = np.array([0.2, 0.4, 0.7, 0.8, 0.9])
    assert exp._trapezoid_weights(xs) @ ys == pytest.approx(area_under_curve(xs, ys))


def test_areas_close_at_the_unpruned_accuracy_and_rank_per_layer():
    t = _table({"random": {4: [0.5, 0.3], 8: [0.6, 0.4]}, "cls_attention": {4: [0.8, 0.6], 8: [0.5, 0.2]}})
    areas = exp.entry_areas(t).set_index(["entry", "layer"])
    # keep 0.1 → 0.6, 0.5 → 0.8, 1.0 → 0.9 (unpruned): trapezoid mean height over [0.1, 1]
    expected = ((0.6 + 0.8) / 2 * 0.4 + (0.8 + 0.9) / 2 * 0.5) / 0.9
    assert areas.loc[("cls_attention", 4), "accuracy_auc"] == pytest.approx(expected)
    assert areas.loc[("cls_attention", 4), "rank"] == 1 and areas.loc[("cls_attention", 8), "rank"] == 2
    assert (areas.auc_se > 0).all()


def test_leaderboard_sorts_best_first_with_the_unpruned_ceiling_on_top():
    t = _table({"random": {4: [0.5, 0.3]}, "divprune": {4: [0.7, 0.5]}, "cls_attention": {4: [0.8, 0.6]}})
    board = exp.leaderboard(exp.entry_areas(t), t)
    assert list(board.entry) == ["unpruned", "cls_attention", "divprune", "random"]
    assert board.set_index("entry").loc["cls_attention", "attention_based"]
    assert not board.set_index("entry").loc["divprune", "attention_based"]


@pytest.mark.parametrize("attention, rand, label", [
    ([0.85, 0.8], [0.3, 0.1], "partly supported"),    # beats random by far; random is not strong
    ([0.81, 0.75], [0.8, 0.74], "partly supported"),  # random strong; no clear win
    ([0.5, 0.3], [0.5, 0.3], "partly supported"),     # tie: random within the margin, no win
    ([0.2, 0.1], [0.85, 0.8], "partly supported"),    # random best: strong baseline holds, attention loses
])
def test_verdict_follows_the_numbers(attention, rand, label):
    t = _table({"random": {4: rand}, "cls_attention": {4: attention}}, n=1000)
    areas = exp.entry_areas(t)
    got, summary, findings = exp.verdict(areas, exp.leaderboard(areas, t), exp.Params())
    assert got == label
    assert "Verdict: " + label in findings


def test_not_supported_when_attention_neither_wins_nor_random_is_close():
    t = _table({"random": {4: [0.3, 0.1]}, "divprune": {4: [0.85, 0.8]}, "cls_attention": {4: [0.32, 0.1]}}, n=1000)
    areas = exp.entry_areas(t)
    label, _, findings = exp.verdict(areas, exp.leaderboard(areas, t), exp.Params())
    assert label == "not supported"
    assert "beats random at every layer** — does not hold" in findings


def test_supported_needs_a_clear_win_and_a_strong_random():
    t = _table({"random": {4: [0.83, 0.80]}, "cls_attention": {4: [0.89, 0.88]}}, n=20000)
    areas = exp.entry_areas(t)
    assert exp.verdict(areas, exp.leaderboard(areas, t), exp.Params())[0] == "supported"


def test_every_entry_names_a_registered_scorer_and_kv_only_rules_are_excluded():
    for name, (method, scorer, kwargs) in exp.ENTRIES.items():
        assert method in ("drop", "tome", "visionzip")
        if scorer is not None:
            get_scorer(scorer, **kwargs)
        assert scorer not in exp.KV_ONLY
    assert set(exp.ATTENTION_BASED) <= set(exp.ENTRIES)


@pytest.mark.parametrize("values, needle", [
    ({"keeps": [0.5, 1.0]}, "(0, 1)"),
    ({"keeps": [0.5]}, "at least 2"),
    ({"entries": ["cls_attention"]}, "random"),
    ({"entries": ["random", "snapkv"]}, "unknown entries"),
    ({"layers": [1]}, ">= 2"),
    ({"image_size": 100}, "multiple of the patch size"),
])
def test_bad_parameters_name_the_valid_choice(values, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        exp.Params(**values)


def test_layers_past_the_depth_are_refused():
    with pytest.raises(ValueError, match=r"outside \[2, 11\]"):
        exp.check_depth(exp.Params(layers=[4, 12]), 12)


def test_cls_probe_area_is_reported_when_the_runs_have_it():
    t = _table({"random": {4: [0.5, 0.3]}, "cls_attention": {4: [0.8, 0.6]}})
    t["accuracy_cls"] = t.accuracy / 2
    areas = exp.entry_areas(t).set_index("entry")
    assert areas.loc["cls_attention", "cls_probe_auc"] == pytest.approx(areas.loc["cls_attention", "accuracy_auc"] / 2)
    board = exp.leaderboard(exp.entry_areas(t), t).set_index("entry")
    assert board.loc["unpruned", "cls_probe_auc"] == pytest.approx(0.45)
    assert "[CLS]-only probe" in exp.verdict(exp.entry_areas(t), board.reset_index(), exp.Params())[2]


def test_merging_entries_are_reported_but_not_judged():
    """VisionZip merges what it does not keep; the claim is about dropping rules, so it must not carry part 1 or 2."""
    t = _table({"random": {4: [0.5, 0.3]}, "cls_attention": {4: [0.5, 0.3]}, "visionzip": {4: [0.89, 0.88]}},
               n=1000)
    areas = exp.entry_areas(t)
    label, summary, findings = exp.verdict(areas, exp.leaderboard(areas, t), exp.Params())
    assert label == "partly supported"  # random ties the attention rule (strong baseline); no attention win
    assert "does not hold" in findings and "Merging entries (not judged): visionzip" in findings
