"""kv-leaderboard's pieces (and kv-normalized-attention's probe-fidelity helpers) on tiny hand-made inputs."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from salience.experiments import kv_leaderboard as lb
from salience.experiments import kv_normalized_attention as kvn
from salience.params import ParamsError, validate_params
from salience.scorers import AttentionView, available_scorers, get_scorer


def test_every_family_a_scorer_is_registered_and_built_with_the_notebook_settings():
    params = lb.Params()
    assert set(lb.KV_SCORERS) <= set(available_scorers())
    assert lb.make_scorer("snapkv", params).window == params.observation_window
    assert lb.make_scorer("caote", params).window == params.observation_window
    assert lb.make_scorer("attention_pagerank", params).damping == params.pagerank_damping
    assert lb.make_scorer("normalized_attention_probe", params).probe_fraction == params.probe_fraction
    # the claim's rule: attention-based = reads attention or its mass
    assert not lb.attention_based(get_scorer("random")) and not lb.attention_based(get_scorer("sepllm"))
    assert lb.attention_based(get_scorer("vatp")) and lb.attention_based(get_scorer("attention_pagerank"))


def test_every_family_a_scorer_runs_on_the_causal_kv_view():
    cov = lb.registry_coverage(lb.Params()).set_index("scorer")
    assert cov.loc[list(lb.KV_SCORERS), "runs_on_kv_view"].all()
    assert cov.loc[list(lb.KV_SCORERS), "in_leaderboard"].all()
    if "cls_attention" in cov.index:  # a vision scorer: no [CLS] in a decoder's view
        assert not cov.loc["cls_attention", "runs_on_kv_view"] and "cls" in cov.loc["cls_attention", "error"]


@pytest.mark.parametrize("task", ["continuation", "needle"])
def test_kv_tasks_hand_the_tokenizer_to_the_harness(monkeypatch, task):
    """SepLLM's separator role is built by compress_prefill from the tokenizer; the task helpers must pass it on."""
    import salience.kv_tasks as kv_tasks

    seen = {}

    class Stop(Exception):
        pass

    def fake_compress(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(kv_tasks, "compress_prefill", fake_compress)
    ids = torch.arange(12)[None]

    class Model(torch.nn.Module):  # logits of zeros: the uncompressed reference row needs a forward pass
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, **kwargs):
            return type("Out", (), {"logits": torch.zeros(1, x.shape[1], 5)})()

    class Tokenizer:
        eos_token_id = 0

        def decode(self, tokens, **kwargs):
            return ""

    tokenizer = Tokenizer()
    with pytest.raises(Stop):
        if task == "continuation":
            kv_tasks.continuation_metrics(Model(), ids, torch.arange(3)[None], "sepllm", [0.5], tokenizer=tokenizer)
        else:
            monkeypatch.setattr(kv_tasks, "needle_inputs", lambda *a, **k: kv_tasks.NeedleInputs(
                context_ids=ids, question_ids=ids[:, :2], answer_prefix_ids=None, needle_span=(2, 4)))
            full = type("Full", (), {"span_kept": lambda self, a, b: torch.ones(1), "budget_tokens": 12,
                                     "budget_ratio": 1.0})()
            monkeypatch.setattr(kv_tasks, "full_prefill", lambda *a, **k: full)
            monkeypatch.setattr(kv_tasks, "greedy_tokens", lambda *a, **k: [])
            monkeypatch.setattr(kv_tasks, "_eos_ids", lambda *a, **k: set())
            prompt = type("Prompt", (), {"depth": 0.5, "answer": "1"})()
            kv_tasks.needle_accuracy(Model(), tokenizer, [prompt], "sepllm", [0.5])
    assert seen["tokenizer"] is tokenizer


@pytest.mark.parametrize("values,needle", [
    ({"budgets": [0.25, 1.0]}, "every budget must be a ratio in (0, 1)"),
    ({"scorers": ["random", "cls_attention"]}, "'random', 'recency'"),
    ({"scorers": ["random", "random"]}, "scorers must be unique"),
    ({"n_sink": 20, "recent_window": 8}, "must hold n_sink + recent_window = 28"),
    ({"observation_window": 100}, "observation_window must lie in [1, 64]"),
    ({"snapkv_kernel": 4}, "snapkv_kernel must be odd"),
])
def test_bad_parameters_fail_in_one_line(values, needle):
    with pytest.raises(ParamsError) as err:
        validate_params(lb.Params, values, "params/x.yaml")
    assert needle in str(err.value) and "\n" not in str(err.value)


def _areas(kl: dict[str, list[float]]) -> pd.DataFrame:
    """Areas where every metric orders scorers like ``kl`` (lower KL, lower log-ppl, higher passkey accuracy)."""
    rows = []
    for scorer, values in kl.items():
        for unit, v in enumerate(values):
            rows += [dict(scorer=scorer, task="continuation", unit=unit, metric="kl_auc", auc=v),
                     dict(scorer=scorer, task="continuation", unit=unit, metric="log_ppl_auc", auc=3 + v),
                     dict(scorer=scorer, task="passkey", unit=unit, metric="needle_auc", auc=1 - v),
                     dict(scorer=scorer, task="passkey", unit=unit, metric="needle_kept_auc", auc=1 - v)]
    return pd.DataFrame(rows)


def test_leaderboard_means_spread_and_ranks_by_hand():
    areas = _areas({"uncompressed": [0.0, 0.0], "random": [0.4, 0.6], "recency": [0.3, 0.3],
                    "snapkv": [0.1, 0.3], "attention_pagerank": [0.2, 0.2]})
    board = lb.leaderboard(areas, lb.Params()).set_index("scorer")
    assert list(board.index) == ["uncompressed", "attention_pagerank", "snapkv", "recency", "random"]
    assert board.loc["random", "kl_auc"] == pytest.approx(0.5)
    assert board.loc["random", "kl_auc_std"] == pytest.approx(np.std([0.4, 0.6], ddof=1))
    # pagerank and snapkv tie on every mean (0.2): rank 1.5 each; recency 3, random 4; uncompressed is not ranked
    assert board.loc["snapkv", "mean_rank"] == pytest.approx(1.5)
    assert board.loc["random", "mean_rank"] == pytest.approx(4.0)
    assert np.isnan(board.loc["uncompressed", "mean_rank"])
    label, summary, findings = lb.verdict(board.reset_index(), areas, lb.Params())
    assert label == "supported" and "2/2 attention-based" in summary and "Verdict: supported" in findings


def test_verdict_fails_when_the_controls_win():
    areas = _areas({"uncompressed": [0.0], "random": [0.1], "recency": [0.05], "snapkv": [0.3],
                    "tova": [0.2], "attention_pagerank": [0.4]})
    board = lb.leaderboard(areas, lb.Params())
    label, summary, findings = lb.verdict(board, areas, lb.Params())
    assert label == "not supported" and "0/3 attention-based" in summary
    assert "rank 3 of 3" in findings


def test_rowwise_spearman_equals_scipy():
    rng = np.random.default_rng(0)
    a = rng.random((4, 30))
    b = a + rng.random((4, 30))
    b[1, :5] = b[1, 5]  # ties get average ranks, as in scipy
    expected = [spearmanr(a[i], b[i]).statistic for i in range(4)]
    assert np.allclose(kvn.rowwise_spearman(a, b), expected)


def test_topk_overlap_by_hand():
    ref = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    other = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    # head 0: ref keeps {0, 1}, other keeps {0, 2} → 1/2; head 1 identical → 1
    assert np.allclose(kvn._overlap(ref, other, 2), [0.5, 1.0])
    assert np.isnan(kvn._overlap(ref, other, 0)).all()


def test_fidelity_summary_joins_cost_and_agreement():
    fidelity = pd.DataFrame([
        dict(doc=0, layer=0, head=h, variant="probe@0.5", reference="normalized_attention", probe_fraction=0.5,
             spearman=s, **{"overlap@0.25": o}) for h, (s, o) in enumerate([(0.8, 0.5), (0.6, 1.0)])
    ] + [dict(doc=0, layer=0, head=0, variant="keyformer", reference="accumulated_attention", probe_fraction=np.nan,
              spearman=0.9, **{"overlap@0.25": 0.75})])
    cost = pd.DataFrame([dict(doc=0, layer=0, probe_fraction=0.5, queries_used=5, queries_total=10, query_share=0.5,
                              entry_share=0.7)])
    out = kvn.fidelity_summary(fidelity, cost).set_index("variant")
    assert out.loc["probe@0.5", "spearman"] == pytest.approx(0.7)
    assert out.loc["probe@0.5", "overlap@0.25"] == pytest.approx(0.75)
    assert out.loc["probe@0.5", "entry_share"] == pytest.approx(0.7)
    assert out.loc["keyformer", "query_share"] == 1.0


def test_normalized_attention_params_check_the_continuation_split():
    with pytest.raises(ParamsError, match="continuation_tokens must lie in"):
        validate_params(kvn.Params, {"context_tokens": 256, "continuation_tokens": 200}, "params/x.yaml")
    with pytest.raises(ParamsError, match="every probe fraction must lie in"):
        validate_params(kvn.Params, {"probe_fractions": [0.0]}, "params/x.yaml")
    params = validate_params(kvn.Params, {"keyformer_tau": 2.0, "probe_fraction": 0.3})
    assert kvn.make_scorer("keyformer", params).tau == 2.0
    assert kvn.make_scorer("normalized_attention_probe", params, 0.05).probe_fraction == 0.05
