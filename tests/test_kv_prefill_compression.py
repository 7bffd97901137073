"""Prefill compression on a tiny random Llama (``tiny_llama`` in conftest.py): the shared path (one prefill, every
scorer and budget cut from its cache, rows fed in batches) equals the one-at-a-time path, its scores equal scores
computed from a separate capture, a full budget reproduces the uncompressed model, every cache length is asserted, and
the continuation task computes from real runs. The real SmolLM2 runs in tests/test_kv_prefill_smollm2.py (slow);
passkey retrieval in tests/test_kv_passkey.py.
"""

import pandas as pd
import pytest
import torch

from salience import kv_tasks
from salience.harness import (ScoringView, capture_attention, compress_prefill, compress_shared, continuation_logits,
                              feed_batched, prefill_scores, shared_prefill)
from salience.harness.kv_prefill import view_seed
from salience.scorers import AttentionView, get_scorer

# ---------------------------------------------------------------- the shared path, on a tiny random Llama

TINY_SCORERS = ["accumulated_attention", "normalized_attention", "tova", "key_norm", "random", "recency", "vatp",
                "caote", "attention_pagerank", "keyformer"]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    ids = torch.randint(0, 32, (1, 40), generator=torch.Generator().manual_seed(1))
    scorers = {name: get_scorer(name) for name in TINY_SCORERS}
    scorers["snapkv"] = get_scorer("snapkv", window=4, kernel_size=3)
    return tiny_llama, ids[:, :24], ids[:, 24:30], ids[:, 30:], scorers


@pytest.mark.parametrize("head_mode", ["per_kv_head", "shared"])
def test_shared_path_equals_one_prefill_per_compression(tiny, head_mode):
    """Every scorer x mode x budget cut from one prefill keeps what a separate prefill + compression keeps, and the
    batched feed gives the logits the one-at-a-time feed gives."""
    model, ctx, question, rest, scorers = tiny
    prefill = shared_prefill(model, torch.cat([ctx, question, rest], dim=1), 24,
                             [ScoringView("agnostic", 24, scorers), ScoringView("aware", 30, scorers)], generator=7)
    settings = dict(head_mode=head_mode, n_sink=2, recent_window=4)
    items, expected = [], []
    for mode, end in (("agnostic", 24), ("aware", 30)):
        aware = mode == "aware"
        feed = rest if aware else torch.cat([question, rest], dim=1)
        for name, scorer in scorers.items():
            for budget in (8, 0.5):
                generator = torch.Generator().manual_seed(view_seed(7, mode, name))
                alone = compress_prefill(model, ctx, scorer, budget, question_ids=question if aware else None,
                                         query_aware=aware, generator=generator, **settings)
                shared = compress_shared(prefill, (mode, name), budget, prefix_len=end, **settings)
                assert torch.equal(shared.kept_positions, alone.kept_positions), (mode, name, budget)
                assert shared.cache_lengths == alone.cache_lengths == [alone.budget_tokens + end - 24] * 2
                items.append((shared, feed))
                expected.append(continuation_logits(model, alone, feed)[0])
    out = feed_batched(model, items, batch_size=7)
    assert len(out) == len(items)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    last = feed_batched(model, items, logits_rows=2)
    for got, want in zip(last, expected):
        torch.testing.assert_close(got, want[-2:], atol=2e-5, rtol=1e-5)


#: scorers that draw from the view's generator (prefill_scores hands them none)
DRAWING = {"random", "keyformer"}


def _captured_scores(model, ids, scorers, seed, view) -> dict[str, torch.Tensor]:
    """Every scorer's ``(layers, H, K)`` scores of all ``K`` keys of ``ids``, from a separate forward pass of ``ids``
    alone: each layer's captured attention (to the scorers that read it), keys and values handed straight to the
    scorer (stochastic ones with the generator the shared path gives ``(view, label)``)."""
    positions = torch.arange(ids.shape[1])
    generators = {name: torch.Generator().manual_seed(view_seed(seed, view, name)) for name in scorers}
    out = {name: [] for name in scorers}

    def on_attention(layer, probs, key, value):
        for name, scorer in scorers.items():
            attention = None if scorer.attention_free else probs
            out[name].append(scorer(AttentionView(key_positions=positions, query_positions=positions,
                                                  attention=attention, keys=key, values=value,
                                                  generator=generators[name]))[0].float())

    with torch.inference_mode(), capture_attention(model, on_attention):
        model(ids, use_cache=False)
    return {name: torch.stack(layers) for name, layers in out.items()}


def test_shared_prefill_scores_equal_scores_computed_apart(tiny):
    """The shared prefill's per-scorer scores of each view equal the scores of a separate forward pass of the view's
    tokens alone (the agnostic view: the context; the aware view: context + question), computed without the shared
    path: straight from a capture, and for the attention-based scorers that draw nothing from :func:`prefill_scores`
    too (it hands every scorer the attention, so attention-free ones would answer per query head there)."""
    model, ctx, question, rest, scorers = tiny
    prefill = shared_prefill(model, torch.cat([ctx, question, rest], dim=1), 24,
                             [ScoringView("agnostic", 24, scorers), ScoringView("aware", 30, scorers)], generator=7)
    for view, ids in (("agnostic", ctx), ("aware", torch.cat([ctx, question], dim=1))):
        apart = _captured_scores(model, ids, scorers, 7, view)
        plain = prefill_scores(model, ids, {n: s for n, s in scorers.items()
                                            if n not in DRAWING and not s.attention_free})
        for name in scorers:
            shared = prefill.scores[view, name]
            assert shared.shape == (2, apart[name].shape[1], 24), (view, name)
            torch.testing.assert_close(shared, apart[name][..., :24], atol=1e-5, rtol=1e-4, msg=f"{view} {name}")
            if name in plain:
                torch.testing.assert_close(shared, plain[name][..., :24], atol=1e-5, rtol=1e-4, msg=f"{view} {name}")
        # the two views differ (the question's rows are read), so the check is not comparing a view with itself
        assert not torch.allclose(prefill.scores["aware", "tova"], prefill.scores["agnostic", "tova"])


def test_full_budget_reproduces_the_uncompressed_model_on_the_shared_path(tiny):
    model, ctx, question, rest, scorers = tiny
    ids = torch.cat([ctx, question, rest], dim=1)
    prefill = shared_prefill(model, ids, 24, [ScoringView("agnostic", 24, scorers)], logits_rows=16)
    with torch.inference_mode():
        reference = model(ids).logits[0, -16:].float()
    torch.testing.assert_close(prefill.logits, reference, atol=1e-5, rtol=1e-5)
    full = compress_shared(prefill, ("agnostic", "random"), 1.0)
    assert full.cache_lengths == [24, 24] and full.kept_positions[0, 0].tolist() == list(range(24))
    (logits,) = feed_batched(model, [(full, torch.cat([question, rest], dim=1))])
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_compressing_leaves_the_shared_prefill_untouched(tiny):
    model, ctx, question, rest, scorers = tiny
    prefill = shared_prefill(model, torch.cat([ctx, question], dim=1), 24, [ScoringView("agnostic", 24, scorers)])
    before = [layer.keys.clone() for layer in prefill.cache.layers]
    compressed = compress_shared(prefill, ("agnostic", "tova"), 6, n_sink=1)
    feed_batched(model, [(compressed, question)])
    continuation_logits(model, compressed, question)
    assert compressed.cache.get_seq_length() == 6
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, prefill.cache.layers))


def test_stochastic_scorers_keep_their_draws_when_scorers_are_added(tiny):
    model, ctx, _, _, scorers = tiny
    one = shared_prefill(model, ctx, 24, [ScoringView("v", 24, {"random": scorers["random"]})], generator=3)
    many = shared_prefill(model, ctx, 24, [ScoringView("v", 24, scorers)], generator=3)
    assert torch.equal(one.scores["v", "random"], many.scores["v", "random"])
    other = shared_prefill(model, ctx, 24, [ScoringView("v", 24, scorers)], generator=4)
    assert not torch.equal(other.scores["v", "random"], many.scores["v", "random"])


def test_feed_batched_groups_rows_by_cache_length_and_asserts_it(tiny, monkeypatch):
    import salience.harness.kv_feed as feed

    model, ctx, question, _, scorers = tiny
    prefill = shared_prefill(model, torch.cat([ctx, question], dim=1), 24, [ScoringView("agnostic", 24, scorers)])
    rows = [(compress_shared(prefill, ("agnostic", name), b), question)
            for name in ("tova", "recency") for b in (5, 9, 5)]
    alone = [continuation_logits(model, c, q)[0] for c, q in rows]
    for got, want in zip(feed_batched(model, rows, batch_size=2), alone):  # groups of 4 and 2 rows, in pieces
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    original = feed._batch_cache

    def short(rows, config):  # a batch cache that lost one entry per layer must not pass
        cache = original(rows, config)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, 1:], layer.values[:, :, 1:]
        return cache

    monkeypatch.setattr(feed, "_batch_cache", short)
    with pytest.raises(RuntimeError, match="expected 5 in every layer"):
        feed_batched(model, rows)


def test_the_prefill_records_each_scorers_head_layout(tiny):
    """GQA model (6 query heads, 3 KV heads): each entry's rows are what its layout says, so compression reduces them
    by the layout."""
    model, ctx, question, _, scorers = tiny
    prefill = shared_prefill(model, torch.cat([ctx, question], dim=1), 24, [ScoringView("a", 24, scorers)],
                             generator=0)
    rows = {"query": 6, "kv": 3, "shared": 1}
    for (_, label), scores in prefill.scores.items():
        layout = prefill.layouts["a", label]
        assert scores.shape[1] == rows[layout], (label, layout)
    assert prefill.layouts["a", "tova"] == "query" and prefill.layouts["a", "key_norm"] == "kv"
    assert prefill.layouts["a", "random"] == "kv"  # a "view" rule in a view that carries keys only


def test_scoring_views_and_feeds_refuse_bad_input(tiny):
    model, ctx, question, _, scorers = tiny
    ids = torch.cat([ctx, question], dim=1)
    with pytest.raises(ValueError, match="must hold the context's keys"):
        shared_prefill(model, ids, 24, [ScoringView("short", 20, scorers)])
    with pytest.raises(ValueError, match="view names must be unique"):
        shared_prefill(model, ids, 24, [ScoringView("a", 24, scorers), ScoringView("a", 30, scorers)])
    with pytest.raises(ValueError, match="has no scorers"):
        shared_prefill(model, ids, 24, [ScoringView("a", 24, {})])
    with pytest.raises(ValueError, match="one view covering the whole prompt"):
        shared_prefill(model, ids, 24, [ScoringView("a", 24, {"h2o": scorers["accumulated_attention"]})],
                       attention="fused")
    prefill = shared_prefill(model, ids, 24, [ScoringView("a", 24, scorers)])
    with pytest.raises(ValueError, match=r"prefix_len must lie in \[24, 30\]"):
        compress_shared(prefill, ("a", "tova"), 6, prefix_len=31)
    with pytest.raises(ValueError, match=r"no scores for \('a', 'h2o'\) in this prefill"):
        compress_shared(prefill, ("a", "h2o"), 6)
    compressed = compress_shared(prefill, ("a", "tova"), 6)
    with pytest.raises(ValueError, match=r"logits_rows must lie in \[1, 6\]"):
        feed_batched(model, [(compressed, question)], logits_rows=7)


def test_continuation_runs_put_the_reference_rows_first(tiny):
    model, ctx, question, rest, scorers = tiny
    pairs = [(ctx, torch.cat([question, rest], dim=1)), (rest.flip(1).repeat(1, 3)[:, :24], question)]
    df = kv_tasks.continuation_runs(model, pairs, {"tova": scorers["tova"], "random": scorers["random"]},
                                    [0.25, 0.5], n_sink=1, recent_window=2, units_per_batch=1, progress=False)
    for doc, g in df.groupby("doc"):
        assert list(g.scorer) == ["uncompressed"] + ["oracle"] * 2 + ["tova"] * 2 + ["random"] * 2
        assert list(g.cache_len) == [24, 6, 12, 6, 12, 6, 12]
        assert g.kl_mean.iloc[0] == 0.0 and (g.kl_mean.iloc[1:] > 0).all()
    single = kv_tasks.continuation_metrics(model, *pairs[1], {"tova": scorers["tova"]}, 0.25, n_sink=1,
                                           recent_window=2)
    row = df[(df.doc == 1) & (df.scorer == "tova") & (df.budget == 0.25)].iloc[0]
    assert single.iloc[1].kl_mean == pytest.approx(row.kl_mean, rel=1e-5)
    assert "doc" not in single and list(single.scorer) == ["uncompressed", "tova"]


def test_continuation_metrics_seeds_random_scorers_as_continuation_runs_does(tiny):
    """By default a stochastic scorer draws what ``continuation_runs(seed=0)`` draws for its first document, so two
    calls agree; another int seed draws otherwise."""
    model, ctx, question, rest, scorers = tiny
    cont = torch.cat([question, rest], dim=1)
    random = {"random": scorers["random"]}
    first = kv_tasks.continuation_metrics(model, ctx, cont, random, [0.25, 0.5], n_sink=1)
    again = kv_tasks.continuation_metrics(model, ctx, cont, random, [0.25, 0.5], n_sink=1)
    runs = kv_tasks.continuation_runs(model, [(ctx, cont)], random, [0.25, 0.5], oracle=False, n_sink=1, seed=0,
                                      progress=False)
    pd.testing.assert_frame_equal(first, again)
    pd.testing.assert_frame_equal(first, runs.drop(columns="doc"))
    other = kv_tasks.continuation_metrics(model, ctx, cont, random, [0.25, 0.5], n_sink=1, generator=1)
    assert (other.kl_mean.iloc[1:].to_numpy() != first.kl_mean.iloc[1:].to_numpy()).any()


def test_the_continuation_oracle_reads_the_continuation_rows(tiny):
    """The oracle keeps the context keys the continuation's queries attend to most: its kept set is the top of the
    attention that those rows pay to the context, which a context-only scorer never sees."""
    model, ctx, question, rest, scorers = tiny
    cont = torch.cat([question, rest], dim=1)
    ids = torch.cat([ctx, cont], dim=1)
    prefill = shared_prefill(model, ids, 24, [ScoringView("future", 40, {"oracle": kv_tasks.oracle_scorer()},
                                                          first_query=24)], rows_from=24)
    paid = torch.stack([rows[0, :, :, :24].sum(dim=1) for rows in prefill.rows_attention])  # (layers, H, 24)
    torch.testing.assert_close(prefill.scores["future", "oracle"], paid)
    kept = compress_shared(prefill, ("future", "oracle"), 6, head_mode="shared").kept_positions
    assert set(kept[0, 0].tolist()) == set(paid[0].mean(0).topk(6).indices.tolist())


def test_area_under_budget_curve_closes_curves_at_the_uncompressed_value():
    df = pd.DataFrame({"scorer": ["uncompressed", "a", "a", "b", "b"], "budget": [1.0, 0.5, 0.5, 0.5, 1.0],
                       "acc": [1.0, 0.0, 1.0, 0.0, 1.0]})
    auc = kv_tasks.area_under_budget_curve(df, "acc").set_index("scorer").auc
    assert auc["uncompressed"] == 1.0
    assert auc["a"] == pytest.approx(0.75)  # (0.5 at 0.5, closed with 1.0 at 1.0)
    assert auc["b"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="choose from"):
        kv_tasks.area_under_budget_curve(df, "nll")

