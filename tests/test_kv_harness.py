"""The KV harness on the real SmolLM2: it reproduces the uncompressed model, really evicts, and keeps positions right."""

import copy

import pytest
import torch
from transformers import DynamicCache

from salience.harness import capture_attention, prefill_scores, stream_perplexity
from salience.harness.kv_eviction import take_slots
from salience.harness.kv_streaming import Stream, stream_batch
from salience.models import load_model
from salience.scorers import get_scorer

pytestmark = pytest.mark.slow
TEXT = (
    "The history of the city begins in the Roman period, when a small fort was built beside the river crossing. "
    "Over the following centuries the settlement grew into a market town, and by the twelfth century it had a "
    "cathedral, a castle and a charter granting its citizens the right to hold a weekly market. The industrial "
    "revolution brought mills, canals and later the railway, and the population grew tenfold in a hundred years."
)


@pytest.fixture(scope="module")
def bundle():
    return load_model("smollm2-135m", attn_implementation="eager")


@pytest.fixture(scope="module")
def lm(bundle):
    ids = bundle.processor(TEXT, return_tensors="pt").input_ids[:, :80]
    return bundle.model, ids


def full_nll(model, ids):
    with torch.inference_mode():
        logits = model(ids).logits
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))


@pytest.mark.parametrize("head_mode", ["shared", "per_kv_head"])
@pytest.mark.parametrize("scorer", ["accumulated_attention", "recency"])
def test_full_budget_reproduces_uncompressed_model(lm, scorer, head_mode):
    model, ids = lm
    r = stream_perplexity(model, ids, get_scorer(scorer), budget=ids.shape[1], chunk_size=16, head_mode=head_mode)
    assert r.evictions == 0 and r.n_predicted == ids.shape[1] - 1
    assert r.nll_sum == pytest.approx(full_nll(model, ids), rel=1e-5)


def test_per_kv_head_eviction_holds_the_budget_in_every_head(lm):
    model, ids = lm
    r = stream_perplexity(model, ids, get_scorer("normalized_attention"), budget=24, n_sink=4, recent_window=4,
                          chunk_size=8, head_mode="per_kv_head")
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert r.evictions == len(r.head_lengths) > 0
    assert all(lengths == [24] * n_layers for lengths in r.cache_lengths)
    assert all(heads == [[24] * n_kv] * n_layers for heads in r.head_lengths)
    assert r.kept_positions.shape == (n_layers, n_kv, 24)
    differ = (r.kept_positions[:, 1:] != r.kept_positions[:, :1]).any(-1).float().mean()
    assert differ > 0.2  # the KV heads of a layer mostly keep different sets
    assert r.nll_sum > full_nll(model, ids)


def test_sepllm_streams_with_separators_from_the_tokenizer(bundle, lm):
    from salience.scorers import separator_mask

    model, ids = lm
    r = stream_perplexity(model, ids, get_scorer("sepllm"), budget=24, n_sink=4, recent_window=4, chunk_size=8,
                          tokenizer=bundle.processor)
    separators = set(separator_mask(ids[0], bundle.processor).nonzero().flatten().tolist())
    assert 0 < len(separators) <= 16  # they fit next to the 8 protected tokens, so every layer keeps them all
    assert all(separators <= set(layer.tolist()) for layer in r.kept_positions)


def test_batched_streams_equal_one_at_a_time(bundle, lm):
    """Two documents x four scorers in one batch: each row's perplexity equals the row streamed alone (float
    round-off of a batched product may flip a near-tie, so kept sets must agree almost everywhere), and every row
    records its own cache length per eviction step and layer."""
    model, ids = lm
    other_text = ". ".join(TEXT.split(". ")[::-1])  # the sentences in reverse order: a second text
    other = bundle.processor(other_text, return_tensors="pt").input_ids[:, : ids.shape[1]]
    docs = torch.cat([ids, other])
    names = ["accumulated_attention", "normalized_attention", "recency", "random"]
    streams = [Stream(doc=d, scorer=get_scorer(n), budget=24, n_sink=4, recent_window=4,
                      generator=torch.Generator().manual_seed(d)) for d in range(2) for n in names]
    batch = stream_batch(model, docs, streams, chunk_size=16, max_rows=3)
    n_layers = model.config.num_hidden_layers
    for s, got in zip(streams, batch.results):
        alone = stream_perplexity(model, docs[s.doc : s.doc + 1], s.scorer, 24, n_sink=4, recent_window=4,
                                  chunk_size=16, generator=torch.Generator().manual_seed(s.doc))
        assert got.perplexity == pytest.approx(alone.perplexity, rel=1e-3), s
        assert (got.kept_positions == alone.kept_positions).float().mean() > 0.95
        assert got.cache_lengths == alone.cache_lengths == [[24] * n_layers] * got.evictions
    for d in range(2):
        assert batch.full[d].nll_sum == pytest.approx(full_nll(model, docs[d : d + 1]), rel=1e-5)


def test_eviction_holds_the_budget_in_every_layer(lm):
    model, ids = lm
    r = stream_perplexity(model, ids, get_scorer("normalized_attention"), budget=24, n_sink=4, recent_window=4,
                          chunk_size=8)
    n_layers = model.config.num_hidden_layers
    assert r.evictions == len(r.cache_lengths) > 0
    assert all(lengths == [24] * n_layers for lengths in r.cache_lengths)
    kept = r.kept_positions
    assert kept.shape == (n_layers, 24)
    last = ids.shape[1] - 1
    for layer in kept:
        assert set(range(4)) <= set(layer.tolist())  # sinks
        assert set(range(last - 3, last + 1)) <= set(layer.tolist())  # recent window
    # compression costs something: perplexity is worse than the full cache
    assert r.nll_sum > full_nll(model, ids)


def test_compressed_cache_attends_causally_with_original_positions(lm):
    """After an eviction, a chunk fed at once must give the same logits as the same tokens fed one by one.

    This fails if the causal mask followed absolute positions instead of the compressed cache (a chunk would see its
    own future) or if new tokens got cache-relative rotary positions.
    """
    model, ids = lm
    prefix, chunk = ids[:, :40], ids[:, 40:48]
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(prefix, past_key_values=cache, use_cache=True)
        keep = torch.tensor([0, 1, 2, 3] + list(range(20, 40)))
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        c1, c2 = copy.deepcopy(cache), copy.deepcopy(cache)
        pos = torch.arange(40, 48)[None]
        together = model(chunk, past_key_values=c1, position_ids=pos, use_cache=True).logits
        one_by_one = torch.cat([
            model(chunk[:, i : i + 1], past_key_values=c2, position_ids=pos[:, i : i + 1], use_cache=True).logits
            for i in range(chunk.shape[1])
        ], dim=1)
        wrong_pos = model(chunk, past_key_values=copy.deepcopy(cache), use_cache=True).logits  # positions 24..31
    torch.testing.assert_close(together, one_by_one, atol=2e-4, rtol=1e-4)
    assert (wrong_pos - together).abs().max() > 1e-2  # the check is sensitive to positions


def test_prefill_scores_equal_eager_column_sums(lm):
    model, ids = lm
    ids = ids[:, :32]
    scores = prefill_scores(model, ids, {"acc": get_scorer("accumulated_attention"),
                                         "norm": get_scorer("normalized_attention")})
    with torch.inference_mode():
        eager = model(ids, output_attentions=True).attentions
    colsum = torch.stack([a[0].float().sum(dim=-2) for a in eager])  # (L, H, T)
    torch.testing.assert_close(scores["acc"], colsum, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores["norm"], colsum / torch.arange(32, 0, -1), atol=1e-4, rtol=1e-4)


def test_capture_restores_attention_implementation(lm):
    model, ids = lm
    before = model.config._attn_implementation
    seen = []
    with capture_attention(model, lambda layer, p, k, v: seen.append(layer)):
        with torch.inference_mode():
            model(ids[:, :8])
    assert model.config._attn_implementation == before
    assert seen == list(range(model.config.num_hidden_layers))


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=8, n_sink=4, recent_window=8), "exceed the budget"),
    (dict(budget=0), "budget must be"),
    (dict(budget=8, chunk_size=0), "chunk_size"),
])
def test_bad_arguments(lm, kwargs, match):
    model, ids = lm
    with pytest.raises(ValueError, match=match):
        stream_perplexity(model, ids, get_scorer("recency"), **kwargs)


@pytest.mark.parametrize("scorer", ["tova", "snapkv", "vatp", "key_norm", "caote", "forgetting_attention"])
def test_other_scorers_stream_under_the_budget(lm, scorer):
    model, ids = lm
    r = stream_perplexity(model, ids[:, :48], get_scorer(scorer), budget=20, n_sink=2, recent_window=2, chunk_size=8)
    assert r.evictions > 0 and all(set(lengths) == {20} for lengths in r.cache_lengths)
    assert torch.isfinite(torch.tensor(r.perplexity))


def test_running_mass_decays_like_a2sf():
    """Two chunks absorbed with decay f equal Σ_q f^(t−q) a_q over every query seen, per key."""
    from salience.harness.kv_eviction import LayerState

    torch.manual_seed(0)
    f = 0.7
    first = torch.softmax(torch.randn(1, 2, 3, 3), -1)   # queries 0..2 over keys 0..2
    second = torch.softmax(torch.randn(1, 2, 2, 5), -1)  # queries 3..4 over keys 0..4
    state = LayerState()
    state.absorb(first, torch.arange(3), f)
    state.absorb(second, torch.arange(3, 5), f)
    rows = [torch.nn.functional.pad(first[:, :, i], (0, 2)) for i in range(3)] + [second[:, :, i] for i in range(2)]
    expected = sum(f ** (4 - q) * row for q, row in enumerate(rows))
    torch.testing.assert_close(state.mass, expected)
    assert state.positions.tolist() == [[0, 1, 2, 3, 4]]  # one row


def test_fused_path_gives_the_eager_scores_without_the_matrix(lm):
    model, ids = lm
    scorers = {"acc": get_scorer("accumulated_attention"), "norm": get_scorer("normalized_attention")}
    eager = prefill_scores(model, ids[:, :48], scorers)
    fused = prefill_scores(model, ids[:, :48], scorers, attention="fused")
    for name in scorers:
        torch.testing.assert_close(fused[name], eager[name], atol=1e-4, rtol=1e-4)


def test_fused_streaming_matches_eager_streaming(lm):
    model, ids = lm
    kw = dict(budget=24, n_sink=4, recent_window=4, chunk_size=8)
    eager = stream_perplexity(model, ids, get_scorer("normalized_attention"), **kw)
    fused = stream_perplexity(model, ids, get_scorer("normalized_attention"), attention="fused", **kw)
    assert fused.evictions == eager.evictions and fused.cache_lengths == eager.cache_lengths
    assert fused.perplexity == pytest.approx(eager.perplexity, rel=1e-3)
    same = (fused.kept_positions.sort(-1).values == eager.kept_positions.sort(-1).values).float().mean()
    assert same > 0.9  # near-ties may flip under float32 rounding; the rest must agree


@pytest.mark.parametrize("scorer,match", [("tova", "need more than key mass"),
                                          ("forgetting_attention", "decays its mass")])
def test_fused_path_refuses_what_it_cannot_feed(lm, scorer, match):
    model, ids = lm
    with pytest.raises(ValueError, match=match):
        stream_perplexity(model, ids, get_scorer(scorer), budget=24, attention="fused")
    if scorer == "tova":
        with pytest.raises(ValueError, match=match):
            prefill_scores(model, ids, {"t": get_scorer(scorer)}, attention="fused")


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-kv-head"])
def test_take_slots_is_the_gather_along_the_slot_axis(per_head):
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 3, 11, 4, generator=gen)
    shape = (2, 3, 6) if per_head else (2, 6)
    kept = torch.stack([torch.randperm(11, generator=gen)[:6].sort().values for _ in range(6 if per_head else 2)])
    kept = kept.view(shape)
    index = (kept if per_head else kept[:, None].expand(-1, 3, -1))[..., None].expand(-1, -1, -1, 4)
    (taken,) = take_slots(kept, cache)
    assert torch.equal(taken, cache.gather(2, index))
