"""Analysis functions of the streaming KV notebooks kv-sinks-and-separators and kv-normalized-attention, on tiny
hand-made inputs (kv-value-aware's are in test_kv_value_aware.py)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from salience.experiments import kv_normalized_attention as norm_exp
from salience.experiments import kv_sinks_and_separators as sinks_exp
from salience.experiments.kv_score_statistics import kept_overlap, rowwise_spearman, score_statistics
from salience.experiments.kv_streaming_common import StreamRun
from salience.metrics import area_under_curve
from salience.params import ParamsError
from salience.scorers import get_scorer

# ---------------------------------------------------------------- kv-sinks-and-separators


def _probs() -> torch.Tensor:
    """(1, 1, 4, 4) causal attention rows, by hand."""
    return torch.tensor([[[[1.0, 0.0, 0.0, 0.0],
                           [0.5, 0.5, 0.0, 0.0],
                           [0.2, 0.3, 0.5, 0.0],
                           [0.1, 0.2, 0.3, 0.4]]]])


def _roles(separator=(False, False, True, False)):
    sink = torch.tensor([[True, False, False, False]])
    return sinks_exp.RoleAttention(sink, torch.tensor([separator]), min_query=2)


@pytest.mark.parametrize("chunks", [[(0, 4)], [(0, 3), (3, 4)], [(0, 2), (2, 3), (3, 4)]])
def test_role_attention_matches_hand_computation_in_any_chunking(chunks):
    """Queries 2 and 3 see 3 and 4 keys: one sink, one separator, one or two ordinary tokens each. Fed whole or as
    the stream's chunks (rows of a chunk over the keys so far), the statistics are the same."""
    roles = _roles()
    for start, stop in chunks:
        roles(0, _probs()[:, :, start:stop, :stop], torch.arange(start, stop), range(0, 1))
    row = roles.table().iloc[0]
    assert row.sink_mass == pytest.approx((0.2 + 0.1) / 2)
    assert row.sink_share == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert row.separator_mass == pytest.approx((0.5 + 0.3) / 2)
    assert row.sink_enrichment == pytest.approx(0.15 / (7 / 24))
    assert row.separator_per_token == pytest.approx((0.5 + 0.3) / 2)  # one separator per query
    assert row.ordinary_per_token == pytest.approx((0.3 + 0.2 + 0.4) / 3)  # key 1 for query 2; keys 1, 3 for 3
    assert row.separator_ratio == pytest.approx(0.4 / 0.3)


def test_role_attention_keeps_documents_apart_across_slices():
    """Documents observed in slices (the trunk runs max_rows documents a pass) land in their own rows."""
    sink = torch.tensor([[True, False, False, False]] * 2)
    sep = torch.tensor([[False, False, True, False], [False, True, False, False]])
    both = sinks_exp.RoleAttention(sink, sep, min_query=2)
    both(0, torch.cat([_probs(), _probs()]), torch.arange(4))
    sliced = sinks_exp.RoleAttention(sink, sep, min_query=2)
    for d in (1, 0):
        sliced(0, _probs(), torch.arange(4), range(d, d + 1))
    pd.testing.assert_frame_equal(both.table(), sliced.table())
    assert both.table().separator_per_token.tolist() == pytest.approx([0.4, 0.25])  # key 2, then key 1


def test_role_attention_counts_a_separator_in_the_sinks_as_a_sink_only():
    plain, overlap = _roles(), _roles((True, False, True, False))
    for roles in (plain, overlap):
        roles(0, _probs(), torch.arange(4))
    pd.testing.assert_frame_equal(plain.table(), overlap.table())


def _sinks_params(**values):
    return sinks_exp.Params.defaults(**values)


@pytest.mark.parametrize("values, match", [
    ({"budgets": [32, 256]}, "below context_tokens"),
    ({"budgets": [8], "n_sink": 4, "recent_share": 0.75}, "smallest budget"),
    ({"sink_counts": [1, 4]}, "include 0"),
    ({"sink_counts": [0, 64]}, "below sink_budget"),
    ({"arms": {"streamingllm": "StreamingLLM", "recent_only": "recent only", "sepllm": "SepLLM"}}, "arms must map"),
    ({"arms": {"streamingllm": "StreamingLLM", "recent_only": "recent only", "sepllm": "SepLLM",
               "random_control": "H2O"}}, "arms must map"),
    ({"policies": [{"label": "a", "scorer": "recency", "sinks": True, "recent": False}] * 2}, "unique"),
    ({"policies": [{"label": "a", "scorer": "sepllm_v2", "sinks": True, "recent": False}]}, "unknown scorer"),
])
def test_sinks_params_reject_bad_values(values, match):
    with pytest.raises(ParamsError, match=match):
        _sinks_params(**values)


def test_policies_get_their_protections_and_identical_rows_run_once():
    params = _sinks_params(n_documents=2, budgets=[32, 64], sink_budget=64, sink_counts=[0, 1, 4])
    rows = sinks_exp.stream_rows(torch.zeros(2, 256, dtype=torch.long), params)
    at64 = {r.key["policy"]: (r.n_sink, r.recent_window) for r in rows
            if r.key["sweep"] == "policies" and r.budget == 64 and r.doc == 0}
    assert at64 == {"StreamingLLM": (4, 0), "recent only": (0, 0), "SepLLM": (4, 32), "random control": (4, 32)}
    sweep = [r for r in rows if r.key["sweep"] == "sinks" and r.doc == 0]
    assert [(r.n_sink, r.budget) for r in sweep] == [(0, 64), (1, 64), (4, 64)]
    policy_rows = {(r.key["policy"], r.budget): r for r in rows if r.key["sweep"] == "policies" and r.doc == 0}
    assert sweep[0].identity == policy_rows["recent only", 64].identity  # 0 sinks = the recent-only window
    assert sweep[2].identity == policy_rows["StreamingLLM", 64].identity
    assert len({r.identity for r in rows}) == len(rows) - 2 * 2  # two duplicates per document


def _stream_run(log_ppl: dict[str, list[float]], docs=8, seed=0) -> StreamRun:
    """A StreamRun whose policy rows have log_ppl[policy][budget index] + per-document noise."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 0.02, docs)
    records = []
    for d in range(docs):
        for policy, values in log_ppl.items():
            for b, v in zip((32, 64), values):
                records.append({"sweep": "policies", "policy": policy, "doc": d, "budget": b,
                                "log_ppl": v + noise[d] + rng.normal(0, 0.002), "separators_kept": 0.1})
    full = pd.DataFrame({"doc": range(docs), "log_ppl": 2.0 + noise, "separators_kept": 0.1})
    return StreamRun(table=pd.DataFrame(records), full=full)


def _mass(ratio: float, docs=8, layers=3) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame([{"doc": d, "layer": i, "sink_mass": 0.3, "sink_share": 0.05, "separator_mass": 0.1,
                          "separator_share": 0.1, "separator_ratio": ratio * math.exp(rng.normal(0, 0.05))}
                         for d in range(docs) for i in range(layers)])


@pytest.mark.parametrize("sepllm, ratio, label, verdicts", [
    ((2.40, 2.20), 2.0, "supported", ["supported"] * 4),
    ((2.60, 2.40), 2.0, "partly supported", ["supported", "supported", "contradicted", "contradicted"]),
    ((2.60, 2.40), 0.5, "partly supported", ["supported", "contradicted", "contradicted", "contradicted"]),
])
def test_sinks_claim_follows_the_numbers(sepllm, ratio, label, verdicts):
    run = _stream_run({"StreamingLLM": [2.5, 2.3], "recent only": [3.5, 3.0], "SepLLM": list(sepllm),
                       "random control": [2.5, 2.3]})
    claim = sinks_exp.judge_claim(run, _mass(ratio), _sinks_params())
    assert [p.verdict for p in claim.parts] == verdicts
    assert claim.label == label and all(p.n == 8 for p in claim.parts)


def test_sinks_claim_reads_the_arms_it_is_given():
    """Swapping which policy plays StreamingLLM and which the recent-only window flips the sinks part."""
    run = _stream_run({"StreamingLLM": [2.5, 2.3], "recent only": [3.5, 3.0], "SepLLM": [2.4, 2.2],
                       "random control": [2.5, 2.3]})
    swapped = dict(_sinks_params().arms, streamingllm="recent only", recent_only="StreamingLLM")
    claim = sinks_exp.judge_claim(run, _mass(2.0), _sinks_params(arms=swapped))
    assert claim.parts[0].verdict == "contradicted"


def test_budget_table_puts_the_full_cache_first_as_geometric_means():
    run = _stream_run({"StreamingLLM": [2.5, 2.3], "SepLLM": [2.4, 2.2]}, docs=2)
    table = sinks_exp.budget_table(run).set_index("policy")
    assert list(table.index) == ["full cache", "StreamingLLM", "SepLLM"]
    want = math.exp(run.table.query("policy == 'SepLLM' and budget == 32").log_ppl.mean())
    assert table.loc["SepLLM", "ppl@32"] == pytest.approx(want)


def test_separator_log_ratio_averages_layers_in_log_space():
    mass = pd.DataFrame({"doc": [0, 0, 1, 1], "layer": [0, 1, 0, 1], "separator_ratio": [2.0, 0.5, 4.0, 4.0]})
    assert sinks_exp.separator_log_ratio(mass).tolist() == pytest.approx([0.0, math.log(4.0)])


# ---------------------------------------------------------------- kv-normalized-attention


def test_rowwise_spearman_equals_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    b[0] = a[0] ** 3  # a monotone relation: rho = 1
    got = rowwise_spearman(a, b)
    assert got == pytest.approx([spearmanr(x, y).statistic for x, y in zip(a, b)])
    assert got[0] == pytest.approx(1.0)


def test_kept_overlap_counts_the_shared_top_k():
    ref = torch.tensor([[5.0, 4, 3, 2, 1], [1.0, 2, 3, 4, 5]])
    score = torch.tensor([[5.0, 1, 4, 2, 3], [1.0, 2, 3, 4, 5]])
    assert kept_overlap(ref, score, 2).tolist() == [0.5, 1.0]
    assert kept_overlap(ref, score, 3).tolist() == pytest.approx([2 / 3, 1.0])


def test_score_statistics_bias_and_fidelity_by_hand(tiny_llama):
    docs = torch.randint(0, 32, (3, 40), generator=torch.Generator().manual_seed(2))
    approximations = {"exact probe": get_scorer("normalized_attention_probe", probe_fraction=1.0),
                      "probe 25%": get_scorer("normalized_attention_probe", probe_fraction=0.25)}
    out = score_statistics(tiny_llama, docs, n_sink=2, recent_window=4, budgets=[0.5], bins=4, top_fraction=0.2,
                         approximations=approximations, seed=0, batch_size=2)
    with torch.inference_mode():
        attentions = tiny_llama(docs, output_attentions=True).attentions
    for d in range(3):
        for layer, probs in enumerate(attentions):
            mass = probs[d].float().sum(dim=-2)[:, 2:]  # (H, T') without the sinks
            normalized = mass / torch.arange(38, 0, -1)  # key k is seen by 40 - k queries
            for name, score in (("accumulated_attention", mass), ("normalized_attention", normalized)):
                rho = [spearmanr(h, np.arange(2, 40)).statistic for h in score.numpy()]
                row = out.bias.query("scorer == @name and doc == @d and layer == @layer").iloc[0]
                assert row.rho == pytest.approx(np.mean(rho), abs=1e-6)
                assert row.abs_rho == pytest.approx(np.mean(np.abs(rho)), abs=1e-6)
    exact = out.fidelity[out.fidelity.variant == "exact probe"]
    assert len(exact) == 3 * 2 * 6 and (exact.spearman > 1 - 1e-6).all() and (exact["overlap@0.5"] == 1.0).all()
    assert (out.fidelity[out.fidelity.variant == "probe 25%"].spearman < 1 - 1e-3).any()
    cost = out.cost.groupby("variant").query_share.mean()
    assert cost["exact probe"] == 1.0 and cost["probe 25%"] == pytest.approx(10 / 40)


def _norm_params(**values):
    return norm_exp.Params.defaults(**values)


@pytest.mark.parametrize("values, match", [
    ({"arms": {"accumulated": "ZipCache", "normalized": "H2O"}}, "arms must map"),
    ({"arms": {"accumulated": "H2O"}}, "arms must map"),
    ({"approximations": [{"name": "random"}]}, "reference score"),
    ({"budgets": [0.05, 0.5]}, "must hold n_sink"),
    ({"budgets": [0.5, 1.0]}, r"ratio in \(0, 1\)"),
    ({"continuation_tokens": 120}, "continuation_tokens must lie"),
])
def test_normalized_params_reject_bad_values(values, match):
    with pytest.raises(ParamsError, match=match):
        _norm_params(**values)


def test_stream_auc_closes_every_curve_with_the_full_cache():
    table = pd.DataFrame([{"scorer": s, "doc": d, "ratio": r, "log_ppl": 3.0 - r + 0.1 * d + (s == "b") * 0.2}
                          for s in ("a", "b") for d in range(2) for r in (0.1, 0.5)])
    run = StreamRun(table=table, full=pd.DataFrame({"doc": [0, 1], "log_ppl": [2.0, 2.1]}))
    auc = norm_exp.stream_auc(run, _norm_params())
    assert auc.loc[1, "b"] == pytest.approx(area_under_curve([0.1, 0.5, 1.0], [3.2, 2.8, 2.1]))
    assert list(auc.columns) == ["a", "b", "full cache"]


def _bias(acc_rho: float, norm_rho: float, docs=8) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for d in range(docs):
        for scorer, rho in (("accumulated_attention", acc_rho), ("normalized_attention", norm_rho)):
            for layer in range(3):
                r = rho + rng.normal(0, 0.02)
                rows.append({"scorer": scorer, "doc": d, "layer": layer, "rho": r, "abs_rho": abs(r),
                             "early_share": 0.2})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("acc_rho, norm_rho, zip_gap, verdicts", [
    (-0.3, 0.05, -0.01, ["supported", "supported", "supported"]),
    (-0.3, 0.4, 0.01, ["supported", "contradicted", "contradicted"]),
    (0.2, 0.05, 0.0, ["contradicted", "supported", "inconclusive"]),
])
def test_normalized_claim_follows_the_numbers(acc_rho, norm_rho, zip_gap, verdicts):
    rng = np.random.default_rng(4)
    base = 2.5 + rng.normal(0, 0.05, 8)
    jitter = rng.normal(0, 0.001, 8) if zip_gap else rng.normal(0, 0.01, 8)
    auc = pd.DataFrame({"H2O": base, "ZipCache": base + zip_gap + jitter})
    claim = norm_exp.judge_claim(_bias(acc_rho, norm_rho), auc, _norm_params())
    assert [p.verdict for p in claim.parts] == verdicts
    assert all(p.n == 8 for p in claim.parts)


def test_compared_pairs_follow_the_references_and_the_control():
    labels = {"Z": "normalized_attention", "Z probe": "normalized_attention_probe", "K": "keyformer",
              "H": "accumulated_attention", "R": "random"}
    assert norm_exp.compared_pairs(labels) == [("Z probe", "Z"), ("K", "H"), ("Z", "R"), ("Z probe", "R"),
                                               ("K", "R"), ("H", "R")]
    assert norm_exp.compared_pairs({"Z probe": "normalized_attention_probe"}) == []


def test_paired_summary_intervals_cover_the_mean_difference():
    values = pd.DataFrame({"a": [1.0, 1.2, 0.9, 1.1], "b": [0.5, 0.6, 0.4, 0.7]})
    row = norm_exp.paired_summary(values, [("a", "b")], "m", seed=0).iloc[0]
    assert row.effect == pytest.approx(0.5) and row.ci_low < 0.5 < row.ci_high and row.n == 4
