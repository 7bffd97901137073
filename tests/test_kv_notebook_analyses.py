"""Analysis functions of the KV notebooks kv-sinks-and-separators and kv-value-aware, on tiny hand-made inputs."""

import math

import pandas as pd
import pytest
import torch

from salience.experiments import kv_sinks_and_separators as sinks_exp
from salience.params import ParamsError, validate_params

# ---------------------------------------------------------------- kv-sinks-and-separators


def _probs() -> torch.Tensor:
    """(1, 1, 4, 4) causal attention rows, by hand."""
    return torch.tensor([[[[1.0, 0.0, 0.0, 0.0],
                           [0.5, 0.5, 0.0, 0.0],
                           [0.2, 0.3, 0.5, 0.0],
                           [0.1, 0.2, 0.3, 0.4]]]])


def test_role_attention_matches_hand_computation():
    sink = torch.tensor([True, False, False, False])
    sep = torch.tensor([False, False, True, False])
    out = sinks_exp.role_attention(_probs(), sink, sep, min_query=2)
    # queries 2 and 3 see 3 and 4 keys, one sink and one separator each
    assert out["sink_mass"] == pytest.approx((0.2 + 0.1) / 2)
    assert out["sink_share"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert out["separator_mass"] == pytest.approx((0.5 + 0.3) / 2)
    assert out["separator_share"] == pytest.approx((1 / 3 + 1 / 4) / 2)
    # separators' part of the attention not spent on sinks: (0.5 + 0.3) / (0.8 + 0.9); 1 of 2 and 1 of 3 non-sink keys
    assert out["separator_mass_nonsink"] == pytest.approx(0.8 / 1.7)
    assert out["separator_share_nonsink"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert out["sink_enrichment"] == pytest.approx(0.15 / (7 / 24))
    assert out["separator_enrichment_nonsink"] == pytest.approx((0.8 / 1.7) / (5 / 12))


def test_role_attention_counts_a_separator_in_the_sinks_as_a_sink_only():
    sink = torch.tensor([True, False, False, False])
    plain = sinks_exp.role_attention(_probs(), sink, torch.tensor([False, False, True, False]), min_query=2)
    overlap = sinks_exp.role_attention(_probs(), sink, torch.tensor([True, False, True, False]), min_query=2)
    assert overlap == pytest.approx(plain)


def test_role_attention_is_finite_when_a_row_gives_everything_to_the_sink():
    probs = torch.zeros(1, 1, 3, 3)
    probs[..., 0] = 1.0  # every query attends only to the sink
    out = sinks_exp.role_attention(probs, torch.tensor([True, False, False]), torch.tensor([False, True, False]), 1)
    assert out["separator_mass_nonsink"] == 0.0 and all(math.isfinite(v) for v in out.values())


def test_role_attention_rejects_a_min_query_outside_the_text():
    with pytest.raises(ValueError, match=r"min_query must lie in \[0, 3\]"):
        sinks_exp.role_attention(_probs(), torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool), 4)


def test_policy_settings_give_equal_sinks_and_windows_to_sepllm_and_controls():
    params = sinks_exp.Params()
    assert sinks_exp.policy_settings("recent_only", 64, params)[1:] == (0, 0)
    assert sinks_exp.policy_settings("streamingllm", 64, params)[1:] == (params.n_sink, 0)
    for policy in ("sepllm", "random_control", "h2o_control"):
        assert sinks_exp.policy_settings(policy, 64, params)[1:] == (params.n_sink, 32)
    with pytest.raises(ValueError, match="unknown policy"):
        sinks_exp.policy_settings("h2o", 64, params)


@pytest.mark.parametrize("values, match", [
    ({"budgets": [32, 384]}, "below context_tokens"),
    ({"budgets": [8], "n_sink": 4, "recent_share": 0.75}, "smallest budget"),
    ({"sink_counts": [1, 4]}, "include 0"),
    ({"sink_counts": [0, 64]}, "below sink_budget"),
    ({"policies": ["sepllm", "attention"]}, "policies"),
])
def test_sinks_params_reject_bad_values(values, match):
    with pytest.raises(ParamsError, match=match):
        validate_params(sinks_exp.Params, values)


def _sweep(ppl: dict[str, list[float]], budgets=(32, 64), docs=2, full=10.0) -> pd.DataFrame:
    """A budget_sweep-shaped frame: ppl[policy][i] is the perplexity at budgets[i] (same for every document)."""
    rows = [dict(doc=d, policy="full cache", budget=100, perplexity=full, evictions=0, max_cache_len=100,
                 separators_kept=0.1) for d in range(docs)]
    for policy, values in ppl.items():
        for d in range(docs):
            for b, v in zip(budgets, values):
                rows.append(dict(doc=d, policy=policy, budget=b, perplexity=v, evictions=3, max_cache_len=b,
                                 separators_kept=0.2))
    return pd.DataFrame(rows)


def _sinks(docs=2) -> pd.DataFrame:
    return pd.DataFrame([dict(doc=d, n_sink=n, budget=64, perplexity=p, full_perplexity=10.0)
                         for d in range(docs) for n, p in ((0, 30.0), (4, 12.0))])


def _mass(sink_enrichment: float, separator_enrichment: float, layers=4) -> pd.DataFrame:
    return pd.DataFrame([dict(doc=0, layer=i, sink_mass=0.1 * sink_enrichment, sink_share=0.1,
                              separator_mass=0.1 * separator_enrichment, separator_share=0.1,
                              separator_mass_nonsink=0.1 * separator_enrichment, separator_share_nonsink=0.1,
                              sink_enrichment=sink_enrichment, separator_enrichment=separator_enrichment,
                              separator_enrichment_nonsink=separator_enrichment) for i in range(layers)])


def test_sinks_verdict_supported_when_every_part_holds():
    sweep = _sweep({"streamingllm": [14, 12], "recent_only": [40, 30], "sepllm": [13, 11],
                    "random_control": [15, 13]})
    label, line, findings = sinks_exp.verdict(sweep, _sinks(), _mass(5.0, 2.0), sinks_exp.Params())
    assert label == "supported"
    assert "**Verdict: supported.**" in findings and "holds" in line


def test_sinks_verdict_partly_supported_when_separators_do_not_help():
    sweep = _sweep({"streamingllm": [14, 12], "recent_only": [40, 30], "sepllm": [16, 13],
                    "random_control": [15, 13]})
    label, line, _ = sinks_exp.verdict(sweep, _sinks(), _mass(5.0, 0.8), sinks_exp.Params())
    assert label == "partly supported"
    assert "fails (attention" in line and "fails (SepLLM" in line


def test_sinks_verdict_not_supported_when_nothing_holds():
    sweep = _sweep({"streamingllm": [14, 12], "recent_only": [14, 12], "sepllm": [16, 13]})
    sinks = _sinks().assign(perplexity=12.0)
    label, _, _ = sinks_exp.verdict(sweep, sinks, _mass(1.0, 0.8), sinks_exp.Params())
    assert label == "not supported"


def test_budget_table_puts_the_full_cache_first_and_averages_documents():
    sweep = _sweep({"streamingllm": [14, 12], "sepllm": [16, 13]})
    sweep.loc[(sweep.policy == "sepllm") & (sweep.doc == 1), "perplexity"] += 2.0
    table = sinks_exp.budget_table(sweep)
    assert list(table.policy) == ["full cache", "streamingllm", "sepllm"]
    assert table.set_index("policy").loc["sepllm", "ppl@32"] == pytest.approx(17.0)
    assert table.set_index("policy").loc["full cache", "ppl@64"] == pytest.approx(10.0)


# ---------------------------------------------------------------- kv-value-aware

from salience.experiments import kv_value_aware as va_exp  # noqa: E402


def _three_token_prompt():
    """Context of 2 tokens, one continuation query; (1, 1, 3, 3) attention and (1, 1, 3, 2) values by hand."""
    probs = torch.tensor([[[[1.0, 0.0, 0.0], [0.4, 0.6, 0.0], [0.2, 0.3, 0.5]]]])
    values = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])
    return probs, values


def test_output_error_matches_hand_computation():
    probs, values = _three_token_prompt()
    # keep context key 1 only: o_full = (0.7, 0.8); o_kept = (0.3 v1 + 0.5 v2) / 0.8 = (0.625, 1.0)
    err = va_exp.output_error(probs, values, torch.tensor([[1]]), context_len=2)
    assert err == pytest.approx(math.sqrt(0.075**2 + 0.2**2) / math.sqrt(0.7**2 + 0.8**2))
    assert va_exp.output_error(probs, values, torch.tensor([[0, 1]]), context_len=2) == pytest.approx(0.0)


def test_output_error_broadcasts_a_kv_head_to_its_query_heads():
    probs, values = _three_token_prompt()
    two_heads = probs.expand(1, 2, 3, 3)  # 2 query heads reading 1 KV head: the same error
    assert va_exp.output_error(two_heads, values, torch.tensor([[1]]), 2) == pytest.approx(
        va_exp.output_error(probs, values, torch.tensor([[1]]), 2))
    with pytest.raises(ValueError, match=r"context_len must lie in \[1, 2\]"):
        va_exp.output_error(probs, values, torch.tensor([[1]]), 3)


def test_kept_context_averages_gqa_groups_and_keeps_protected_tokens():
    # 4 query heads, 2 KV heads, 6 context keys; group means favour key 3 (KV head 0) and key 2 (KV head 1)
    scores = torch.zeros(1, 4, 6)
    scores[0, 0, 3] = scores[0, 1, 3] = 1.0
    scores[0, 2, 2] = 2.0
    kept = va_exp.kept_context(scores, num_kv_heads=2, budget_tokens=3, n_sink=1, recent_window=1)
    assert kept.tolist() == [[0, 3, 5], [0, 2, 5]]


def _errors_and_sweep(aware_factor: dict[str, float]):
    """Output errors and continuation rows where each value-aware scorer is its baseline × factor."""
    base_err = {"accumulated_attention": 0.4, "window_attention": 0.3}
    rows, sweep = [], [dict(doc=0, scorer="uncompressed", budget=1.0, kl_mean=0.0, perplexity=10.0)]
    for b in (0.25, 0.5):
        for name, e in base_err.items():
            aware = next(a for a, s in va_exp.PAIRS.items() if s == name)
            for scorer, value in ((name, e), (aware, e * aware_factor[aware])):
                rows += [dict(doc=0, scorer=scorer, budget=b, budget_tokens=8, layer=i, output_error=value * b)
                         for i in range(3)]
                sweep.append(dict(doc=0, scorer=scorer, budget=b, kl_mean=value * b, perplexity=10 + value))
    return pd.DataFrame(rows), pd.DataFrame(sweep)


@pytest.mark.parametrize("factors, label", [
    ({"vatp": 0.5, "caote": 0.5}, "supported"),
    ({"vatp": 0.5, "caote": 2.0}, "partly supported"),
    ({"vatp": 2.0, "caote": 2.0}, "not supported"),
])
def test_value_aware_verdict_follows_the_pairs(factors, label):
    errors, sweep = _errors_and_sweep(factors)
    params = va_exp.Params(budgets=[0.25, 0.5])
    got, line, findings = va_exp.verdict(errors, sweep, params)
    assert got == label
    assert f"**Verdict: {label}.**" in findings


def test_layer_wins_counts_cells_below_the_baseline():
    errors, _ = _errors_and_sweep({"vatp": 0.5, "caote": 2.0})
    wins = va_exp.layer_wins(errors).set_index(["scorer", "budget"])
    assert wins.loc[("vatp", 0.25), "layers_better"] == 1.0
    assert wins.loc[("caote", 0.5), "layers_better"] == 0.0
    assert wins.loc[("caote", 0.5), "error_ratio"] == pytest.approx(2.0)


@pytest.mark.parametrize("values, match", [
    ({"budgets": [1.0]}, r"ratio in \(0, 1\)"),
    ({"scorers": ["vatp", "caote", "random", "window_attention"]}, "missing"),
    ({"window": 512}, "longer than the context"),
    ({"budgets": [0.02]}, "smallest budget"),
])
def test_value_aware_params_reject_bad_values(values, match):
    with pytest.raises(ParamsError, match=match):
        validate_params(va_exp.Params, values)


@pytest.mark.slow
def test_layer0_output_error_equals_the_real_compressed_cache():
    """Layer 0's inputs do not depend on the cache, so the error measured from one captured prefill must equal the
    error of the attention output the model really computes on the harness's compressed cache."""
    from salience.harness import capture_attention, compress_prefill, continuation_logits, full_prefill
    from salience.kv_tasks import wikipedia_continuations
    from salience.models import load_model

    bundle = load_model("smollm2-135m", attn_implementation="eager")
    model = bundle.model
    params = va_exp.Params(n_documents=1, context_tokens=32, continuation_tokens=4, budgets=[0.5], window=4,
                           n_sink=2, recent_window=2)
    context, continuation = wikipedia_continuations(bundle.processor, n=1, context_tokens=32,
                                                    continuation_tokens=4)[0]
    errors = va_exp.reconstruction_errors(model, [(context, continuation)], params)

    def layer0_output(compressed) -> torch.Tensor:
        seen = {}

        def grab(layer, probs, key, value):
            if layer == 0:
                groups = probs.shape[1] // value.shape[1]
                seen["o"] = (probs.float() @ value.float().repeat_interleave(groups, dim=1))[0].transpose(0, 1)

        with capture_attention(model, grab):
            continuation_logits(model, compressed, continuation)
        return seen["o"].flatten(1)  # (N, H_q·D)

    full = layer0_output(full_prefill(model, context))
    for name, scorer in va_exp.make_scorers(params).items():
        compressed = compress_prefill(model, context, scorer, 0.5, n_sink=2, recent_window=2,
                                      generator=torch.Generator().manual_seed(0))
        real = float(((layer0_output(compressed) - full).norm(dim=-1) / full.norm(dim=-1)).mean())
        row = errors[(errors.scorer == name) & (errors.layer == 0)]
        if name != "random":  # random draws its own numbers in each path
            assert float(row.output_error.iloc[0]) == pytest.approx(real, rel=1e-3, abs=1e-5), name
