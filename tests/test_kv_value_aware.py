"""kv-value-aware's pieces: the attention-output error by hand, the harness's selection, a claim whose verdict follows
the numbers, and (slow) layer 0's error from one captured prefill equals the real compressed cache's."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from salience.experiments import kv_value_aware as va
from salience.harness.kv_prefill_compression import context_protection, select_kept
from salience.params import ParamsError, validate_params


def _three_token_prompt():
    """Context of 2 tokens, one continuation query: its (1, 1, 1, 3) attention row and (1, 1, 3, 2) values by hand."""
    rows = torch.tensor([[[[0.2, 0.3, 0.5]]]])
    values = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])
    return rows, values


def test_output_error_matches_hand_computation():
    rows, values = _three_token_prompt()
    # keep context key 1 only: o_full = (0.7, 0.8); o_kept = (0.3 v1 + 0.5 v2) / 0.8 = (0.625, 1.0)
    err = va.output_error(rows, values, torch.tensor([[1]]), context_len=2)
    assert err == pytest.approx(math.sqrt(0.075**2 + 0.2**2) / math.sqrt(0.7**2 + 0.8**2))
    assert va.output_error(rows, values, torch.tensor([[0, 1]]), context_len=2) == pytest.approx(0.0)


def test_output_error_broadcasts_a_kv_head_to_its_query_heads():
    rows, values = _three_token_prompt()
    two_heads = rows.expand(1, 2, 1, 3)  # 2 query heads reading 1 KV head: the same error
    assert va.output_error(two_heads, values, torch.tensor([[1]]), 2) == pytest.approx(
        va.output_error(rows, values, torch.tensor([[1]]), 2))
    with pytest.raises(ValueError, match=r"context_len must lie in \[1, 2\]"):
        va.output_error(rows, values, torch.tensor([[1]]), 3)


def test_output_errors_of_several_sets_equal_one_set_at_a_time():
    g = torch.Generator().manual_seed(0)
    rows = torch.softmax(torch.randn(1, 6, 4, 12, generator=g), dim=-1)  # 6 query heads, 3 KV heads, C = 8
    values = torch.randn(1, 3, 12, 5, generator=g)
    sets = [torch.randperm(8, generator=g)[:3].expand(3, -1).sort().values for _ in range(3)]
    sets.append(torch.tensor([[0, 1, 2], [3, 4, 5], [5, 6, 7]]))  # each KV head its own set
    masks = torch.zeros(len(sets), 3, 8, dtype=torch.bool)
    for i, kept in enumerate(sets):
        masks[i].scatter_(1, kept, True)
    batched = va.output_errors(rows, values, masks, 8)
    alone = [va.output_error(rows, values, kept, 8) for kept in sets]
    torch.testing.assert_close(batched, torch.tensor(alone), atol=1e-6, rtol=1e-5)
    assert len(set(alone)) == len(alone)  # the sets really differ


def test_selection_averages_gqa_groups_and_keeps_protected_tokens():
    # 4 query heads, 2 KV heads, 6 context keys; group means favour key 3 (KV head 0) and key 2 (KV head 1)
    scores = torch.zeros(1, 4, 6)
    scores[0, 0, 3] = scores[0, 1, 3] = 1.0
    scores[0, 2, 2] = 2.4  # all four heads together favour key 2
    protect = context_protection(6, n_sink=1, recent_window=1)
    kept, _ = select_kept(scores, 3, protect, num_kv_heads=2, layout="query")
    assert kept[0].tolist() == [[0, 3, 5], [0, 2, 5]]
    shared, ranked = select_kept(scores, 3, protect, num_kv_heads=2, head_mode="shared", layout="query")
    assert shared[0].tolist() == [[0, 2, 5], [0, 2, 5]] and ranked.shape == (1, 1, 6)


DOCS = 16


def _runs(factor: dict[str, float], jitter: float = 0.0, seed: int = 0):
    """Errors and continuation rows where each value-aware scorer is its counterpart × factor (± ``jitter``,
    alternating by document), with noise across documents."""
    rng = np.random.default_rng(seed)
    base = {"H2O": 0.2, "window attention": 0.15}
    aware = {"H2O": "VATP", "window attention": "CAOTE"}
    errors, cont = [], []
    for d in range(DOCS):
        cont.append(dict(doc=d, scorer="uncompressed", budget=1.0, kl_mean=0.0))
        for b in (0.25, 0.5):
            for name, value in base.items():
                v = value * b * (1 + 0.2 * rng.standard_normal())
                w = v * factor[aware[name]] + jitter * (-1) ** d
                for scorer, x in ((name, v), (aware[name], w)):
                    errors += [dict(doc=d, scorer=scorer, budget=b, layer=i, output_error=x) for i in range(3)]
                    cont.append(dict(doc=d, scorer=scorer, budget=b, kl_mean=x / 3))
    return pd.DataFrame(errors), pd.DataFrame(cont)


@pytest.mark.parametrize("factors, jitter, label", [
    ({"VATP": 0.9, "CAOTE": 0.9}, 0.0, "supported"),
    ({"VATP": 0.9, "CAOTE": 1.1}, 0.0, "partly supported"),
    ({"VATP": 1.1, "CAOTE": 1.1}, 0.0, "contradicted"),
    ({"VATP": 1.0, "CAOTE": 1.0}, 1e-4, "inconclusive"),  # equal arms up to noise around zero
])
def test_value_aware_claim_follows_the_numbers(factors, jitter, label):
    errors, cont = _runs(factors, jitter)
    claim = va.judge_claim(errors, cont, va.Params.defaults())
    assert claim.label == label, claim.summary
    assert all(p.n == DOCS for p in claim.parts) and not claim.notes  # no oracle rows here, no oracle note


def test_layer_wins_counts_cells_below_the_counterpart():
    errors, _ = _runs({"VATP": 0.5, "CAOTE": 2.0})
    wins = va.layer_wins(errors, va.Params.defaults()).set_index(["scorer", "budget"])
    assert wins.loc[("VATP", 0.25), "layers_better"] == 1.0
    assert wins.loc[("CAOTE", 0.5), "layers_better"] == 0.0
    assert wins.loc[("CAOTE", 0.5), "error_ratio"] == pytest.approx(2.0)


def _values(**overrides):
    values = dict(va.Params.defaults().model_dump(mode="json"))
    values.update(overrides)
    return values


@pytest.mark.parametrize("overrides, match", [
    ({"budgets": [1.0]}, r"ratio in \(0, 1\)"),
    ({"pairs": {"vatp": ["VATP", "H2O"]}}, "pairs must map exactly"),
    ({"pairs": {"vatp": ["VATP", "h2o"], "caote": ["CAOTE", "window attention"]}}, r"labels in `scorers`"),
    ({"recent_window": 4}, r"must be >= the window of \['window attention', 'CAOTE'\]"),
    # CAOTE reads its window's rows too: a wider CAOTE window alone must fail
    ({"scorers": [{"name": "snapkv", "window": 8, "kernel_size": 1, "label": "window attention"},
                  {"name": "caote", "window": 16, "label": "CAOTE"}, {"name": "vatp", "label": "VATP"},
                  {"name": "accumulated_attention", "label": "H2O"}]},
     r"recent_window \(8\) must be >= the window of \['CAOTE'\]"),
    ({"budgets": [0.02]}, "smallest budget"),
])
def test_value_aware_params_reject_bad_values(overrides, match):
    with pytest.raises(ParamsError, match=match):
        validate_params(va.Params, _values(**overrides))


@pytest.mark.slow
def test_layer0_output_error_equals_the_real_compressed_cache():
    """Layer 0's inputs do not depend on the cache, so the error measured from one captured prefill must equal the
    error of the attention output the model really computes on the harness's compressed cache."""
    from salience.harness import capture_attention, compress_prefill, continuation_logits, full_prefill
    from salience.kv_tasks import continuation_runs, wikipedia_continuations
    from salience.models import load_model
    from salience.scorers.spec import build_scorers

    bundle = load_model("smollm2-135m", attn_implementation="eager")
    model = bundle.model
    params = va.Params.defaults(n_documents=2, context_tokens=32, continuation_tokens=4, budgets=[0.5], n_sink=2,
                                recent_window=8)
    context, continuation = wikipedia_continuations(bundle.processor, n=1, context_tokens=32,
                                                    continuation_tokens=4)[0]
    errors = []
    continuation_runs(model, [(context, continuation)], build_scorers(params.scorers), [0.5], n_sink=2,
                      recent_window=8, progress=False,
                      on_prefill=lambda doc, prefill: errors.extend(va.prefill_errors(prefill, params)))
    errors = pd.DataFrame(errors)
    assert set(errors.scorer) == {s.key for s in params.scorers} | {"oracle"}

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
    for label, scorer in build_scorers(params.scorers).items():
        if label == "random":  # random draws its own numbers in each path
            continue
        compressed = compress_prefill(model, context, scorer, 0.5, n_sink=2, recent_window=8)
        real = float(((layer0_output(compressed) - full).norm(dim=-1) / full.norm(dim=-1)).mean())
        row = errors[(errors.scorer == label) & (errors.layer == 0)]
        assert float(row.output_error.iloc[0]) == pytest.approx(real, rel=1e-3, abs=1e-5), label
