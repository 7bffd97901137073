"""kv-leaderboard's pieces on tiny hand-made inputs: parameters and roles, areas over solvable cells only, the board,
and a claim whose verdict follows the numbers (each case can fail)."""

import numpy as np
import pandas as pd
import pytest
import torch

from salience import kv_tasks
from salience.kv_passkey import solvability_table
from salience.experiments import kv_leaderboard as lb
from salience.params import ParamsError, validate_params
from salience.scorers import get_scorer

ATTENTION = ["H2O", "ZipCache", "ZipCache probes", "A2SF", "TOVA", "SnapKV", "Keyformer", "VATP", "CAOTE",
             "attention PageRank"]


@pytest.fixture(scope="module")
def params():
    return lb.Params.defaults()


def test_roles_follow_the_scorers_needs(params):
    assert lb.attention_based_labels(params) == ATTENTION
    roles = lb.scorer_table(params).set_index("label").role
    assert roles["random"] == roles["StreamingLLM"] == "control"
    assert roles["KnormPress"] == roles["SepLLM"] == "other (attention-free)"
    assert roles["attention PageRank"] == "centrality"
    # the rule lives in Scorer.attention_free: attention or key mass read → attention-based
    assert get_scorer("random").attention_free and get_scorer("sepllm").attention_free
    assert not get_scorer("vatp").attention_free and not get_scorer("attention_pagerank").attention_free
    settings = lb.scorer_table(params).set_index("label").settings
    assert settings["SnapKV"] == "window=8, kernel_size=5" and settings["TOVA"] == "—"


def test_every_entry_runs_on_the_causal_kv_view(params):
    cov = lb.registry_coverage(params).set_index("scorer")
    names = [s.name for s in params.scorers]
    assert cov.loc[names, "runs_on_kv_view"].all() and cov.loc[names, "in_leaderboard"].all()
    if "cls_attention" in cov.index:  # a vision scorer: no [CLS] in a decoder's view
        assert not cov.loc["cls_attention", "runs_on_kv_view"] and "cls" in cov.loc["cls_attention", "error"]


def _values(**overrides):
    values = dict(lb.Params.defaults().model_dump(mode="json"))
    values.update(overrides)
    return values


@pytest.mark.parametrize("overrides,needle", [
    ({"budgets": [0.25, 1.0]}, "every budget must be a ratio in (0, 1)"),
    ({"controls": ["random", "recency"]}, "controls ['recency'] must be labels in `scorers`"),
    ({"centrality": "random"}, "centrality must not be a control"),
    ({"centrality": "KnormPress"}, "must be an attention-based scorer"),
    ({"recent_window": 4}, "recent_window (4) must be >= the window of ['SnapKV', 'CAOTE']"),
    ({"n_sink": 24}, "must hold n_sink + recent_window = 32"),
    ({"parts": {"pagerank_competitive": {"direction": "no_worse", "smallest_effect": 0.01}}},
     "claim parts in the parameters must be exactly"),
    ({"scorers": ["random", {"name": "snapkv", "widow": 8}]}, "has no field(s) ['widow']"),
])
def test_bad_parameters_fail_in_one_line(overrides, needle):
    with pytest.raises(ParamsError) as err:
        validate_params(lb.Params, _values(**overrides), "params/x.yaml")
    assert needle in str(err.value) and "\n" not in str(err.value)


class SeparatorTokenizer:
    """Decodes id 5 as '.', everything else as a word: enough for SepLLM's separator role."""

    def decode(self, ids, **kwargs):
        return "".join("." if i == 5 else f" w{i}" for i in ids)


def test_tasks_build_sepllm_roles_from_the_tokenizer(tiny_llama):
    ids = torch.randint(0, 32, (1, 30), generator=torch.Generator().manual_seed(2))
    pair = [(ids[:, :24], ids[:, 24:])]
    with pytest.raises(ValueError, match="pass tokenizer= to build"):
        kv_tasks.continuation_runs(tiny_llama, pair, "sepllm", [0.5], progress=False)
    df = kv_tasks.continuation_runs(tiny_llama, pair, "sepllm", [0.5], tokenizer=SeparatorTokenizer(),
                                    progress=False)
    assert list(df.scorer) == ["uncompressed", "oracle", "sepllm"]


# ---------------------------------------------------------------- areas, board and claim on hand-made numbers

UNITS = 16


def _areas(kl: dict[str, np.ndarray], logprob: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Per-unit areas: continuation KL (and, if given, passkey log-prob in both modes)."""
    rows = []
    for scorer, values in kl.items():
        for unit, v in enumerate(values):
            rows += [dict(scorer=scorer, task=lb.CONTINUATION, unit=unit, metric="kl_auc", auc=v),
                     dict(scorer=scorer, task=lb.CONTINUATION, unit=unit, metric="log_ppl_auc", auc=3 + v)]
    for scorer, values in (logprob or {}).items():
        for task in lb.PASSKEY.values():
            rows += [dict(scorer=scorer, task=task, unit=u, metric="logprob_auc", auc=v) for u, v in enumerate(values)]
    return pd.DataFrame(rows)


def _kl(attention: float, random: float, recency: float, pagerank: float, noise: float = 0.002, seed: int = 0):
    """KL areas per unit: each attention-based entry around ``attention``, PageRank around ``pagerank``."""
    rng = np.random.default_rng(seed)
    draw = lambda mean: mean + noise * rng.standard_normal(UNITS)  # noqa: E731
    kl = {"uncompressed": np.zeros(UNITS), "oracle": draw(0.005), "random": draw(random),
          "StreamingLLM": draw(recency), "KnormPress": draw(0.08), "SepLLM": draw(0.05)}
    kl.update({label: draw(attention) for label in ATTENTION if label != "attention PageRank"})
    kl["attention PageRank"] = draw(pagerank)
    return kl


def _cells(solvable: bool) -> pd.DataFrame:
    return pd.DataFrame([dict(mode=m, budget=0.25, oracle_fits=True, oracle_accuracy=1.0 if solvable else 0.5,
                              oracle_logprob=-0.1, uncompressed_accuracy=1.0, n_prompts=UNITS, solvable=solvable)
                         for m in lb.PASSKEY])


def _verdicts(claim) -> dict[str, str]:
    return {p.id: p.verdict for p in claim.parts}


def test_claim_supported_when_attention_wins_everywhere(params):
    logprob = {label: np.full(UNITS, -0.5) + 0.01 * np.arange(UNITS) for label in ATTENTION}
    logprob.update({"random": np.full(UNITS, -2.0), "StreamingLLM": np.full(UNITS, -1.5) + 0.02 * np.arange(UNITS)})
    areas = _areas(_kl(attention=0.02, random=0.06, recency=0.04, pagerank=0.021), logprob)
    claim = lb.judge_claim(areas, _cells(True), params)
    assert set(_verdicts(claim).values()) == {"supported"} and claim.label == "supported"
    part = claim.parts[0]
    assert part.n == UNITS and "random: supported" in part.detail and "StreamingLLM: supported" in part.detail
    # the numbers shown are those of the closer control (StreamingLLM, 0.02 better than the family, vs random's 0.04)
    assert part.detail.endswith("against StreamingLLM") and part.effect == pytest.approx(-0.02, abs=0.002)


def test_claim_contradicted_when_the_controls_win(params):
    areas = _areas(_kl(attention=0.05, random=0.06, recency=0.02, pagerank=0.08))
    claim = lb.judge_claim(areas, _cells(False), params)
    verdicts = _verdicts(claim)
    assert verdicts["attention_beats_controls_continuation"] == "contradicted"
    assert verdicts["pagerank_competitive"] == "contradicted"  # 0.03 worse than the median, δ is 0.005
    # no solvable passkey cell: those parts cannot be judged
    assert verdicts["attention_beats_controls_passkey_agnostic"] == "inconclusive"
    assert claim.parts[1].n == 0 and "no solvable" in claim.parts[1].detail
    assert claim.label == "contradicted"


def test_claim_inconclusive_on_a_tie_and_pagerank_within_delta(params):
    kl = _kl(attention=0.03, random=0.06, recency=0.03, pagerank=0.033, noise=0.004)
    family = np.mean([kl[label] for label in ATTENTION], axis=0)
    kl["StreamingLLM"] = family + 0.004 * np.resize([1.0, -1.0], UNITS)  # the same mean, unit by unit noise
    areas = _areas(kl)
    verdicts = _verdicts(lb.judge_claim(areas, _cells(False), params))
    assert verdicts["attention_beats_controls_continuation"] == "inconclusive"  # a tie is no support
    assert verdicts["pagerank_competitive"] == "supported"  # 0.003 worse, inside δ = 0.005


def test_losing_to_either_control_contradicts_and_beating_one_is_not_enough(params):
    kl = _kl(attention=0.04, random=0.06, recency=0.04, pagerank=0.04, noise=0.004)
    family = np.mean([kl[label] for label in ATTENTION], axis=0)
    kl["StreamingLLM"] = family - 0.01  # recency better than the family on every document
    verdicts = _verdicts(lb.judge_claim(_areas(kl), _cells(False), params))
    assert verdicts["attention_beats_controls_continuation"] == "contradicted"  # beats random, loses to recency
    kl["StreamingLLM"] = family + 0.004 * np.resize([1.0, -1.0], UNITS)  # a tie with recency, random beaten
    claim = lb.judge_claim(_areas(kl), _cells(False), params)
    part = claim.parts[0]
    assert part.verdict == "inconclusive" and "random: supported" in part.detail
    assert part.detail.endswith("against StreamingLLM")
