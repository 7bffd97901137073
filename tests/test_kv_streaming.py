"""Streaming eviction on a tiny random Llama (GQA: 6 query / 3 KV heads): batched streams, roles, per-KV-head budgets,
lazy eviction.

Fast (no embedded model); the real SmolLM2 checks live in test_kv_harness.py (slow).
"""

import copy
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from salience.harness import compress_prefill, stream_perplexity
from salience.harness.kv_eviction import evict_layers, LayerState
from salience.harness.kv_streaming import Stream, stream_batch
from salience.scorers import AttentionView, Scorer, get_scorer

T = 40
SEPARATOR_IDS = (5, 9)  # the fake tokenizer decodes these as "." and ",\n"


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    """conftest's tiny random Llama and one text of T tokens."""
    ids = torch.randint(0, 32, (1, T), generator=torch.Generator().manual_seed(1))
    return tiny_llama, ids


class FakeTokenizer:
    def decode(self, ids):
        return "".join({5: ".", 9: ",\n"}.get(i, f" w{i}") for i in ids)


def full_nll(model, ids):
    with torch.inference_mode():
        logits = model(ids).logits
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))


# ---------------------------------------------------------------- exactness, both head modes


@pytest.mark.parametrize("head_mode", ["shared", "per_kv_head"])
@pytest.mark.parametrize("scorer", ["accumulated_attention", "recency"])
def test_full_budget_reproduces_uncompressed_model(tiny, head_mode, scorer):
    model, ids = tiny
    r = stream_perplexity(model, ids, get_scorer(scorer), budget=T, chunk_size=8, head_mode=head_mode)
    assert r.evictions == 0 and r.kept_positions is None and r.peak_cache_len == T
    assert r.nll_sum == pytest.approx(full_nll(model, ids), rel=1e-6)


# ---------------------------------------------------------------- per KV head


def test_per_kv_head_keeps_budget_per_head_and_heads_differ(tiny):
    model, ids = tiny
    r = stream_perplexity(model, ids, get_scorer("normalized_attention"), budget=12, n_sink=2, recent_window=2,
                          chunk_size=4, head_mode="per_kv_head")
    assert r.head_mode == "per_kv_head" and r.evictions > 0
    assert all(lengths == [12, 12] for lengths in r.cache_lengths)
    assert all(heads == [[12] * 3] * 2 for heads in r.head_lengths)
    kept = r.kept_positions
    assert kept.shape == (2, 3, 12)
    for layer in kept:
        for head in layer:
            assert head.unique().numel() == 12 and {0, 1, T - 2, T - 1} <= set(head.tolist())
    assert any(not torch.equal(layer[0], layer[h]) for layer in kept for h in (1, 2))  # heads choose for themselves
    shared = stream_perplexity(model, ids, get_scorer("normalized_attention"), budget=12, n_sink=2, recent_window=2,
                               chunk_size=4)
    assert shared.kept_positions.shape == (2, 12) and shared.head_lengths == []


def test_per_kv_head_ranks_by_the_gqa_group_mean():
    """Hand computation: 4 query heads, 2 KV heads; each group's mean mass decides that head's kept slots."""
    state = LayerState(kv_heads=2)
    mass = torch.tensor([[[5.0, 0, 1, 0], [5.0, 0, 1, 0], [0, 3, 0, 1], [0, 3, 0, 2]]])  # (1, 4, 4)
    state.mass, state.positions = mass.clone(), torch.arange(10, 14).expand(1, 2, -1)
    keys = torch.arange(2 * 4, dtype=torch.float32).view(1, 2, 4, 1)
    cache = DynamicCache()
    cache.update(keys.clone(), keys.clone(), 0)
    evict_layers(cache, [state], get_scorer("accumulated_attention"), 2, 0, 0, 13, None)
    assert state.positions.tolist() == [[[10, 12], [11, 13]]]  # head 0 keeps slots 0, 2; head 1 keeps 1, 3
    assert cache.layers[0].keys[0, :, :, 0].tolist() == [[0.0, 2.0], [5.0, 7.0]]
    torch.testing.assert_close(state.mass, torch.tensor([[[5.0, 1], [5.0, 1], [3.0, 1], [3.0, 2]]]))


def test_causal_mask_with_different_tokens_per_head(tiny):
    """Each KV head holds a different token set (same count). A chunk fed at once must equal the same tokens fed one
    by one (the causal mask lets new tokens see every cached slot and only their own past in the chunk), and the
    order of a head's cached slots must not matter (every cached slot is visible)."""
    model, ids = tiny
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids[:, :24], past_key_values=cache, use_cache=True)
        keep = torch.stack([torch.arange(0, 24, 2), torch.arange(1, 24, 2), torch.arange(12, 24)])  # (3, 12)
        shuffled = torch.stack([row[torch.randperm(12, generator=torch.Generator().manual_seed(h))]
                                for h, row in enumerate(keep)])
        caches = []
        for index in (keep, keep, shuffled, keep[[0, 0, 0]]):
            c = copy.deepcopy(cache)
            for layer in c.layers:
                g = index[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1])
                layer.keys, layer.values = layer.keys.gather(2, g), layer.values.gather(2, g)
            caches.append(c)
        pos = torch.arange(24, 32)[None]
        chunk = ids[:, 24:32]
        together = model(chunk, past_key_values=caches[0], position_ids=pos, use_cache=True).logits
        one_by_one = torch.cat([model(chunk[:, i : i + 1], past_key_values=caches[1], position_ids=pos[:, i : i + 1],
                                      use_cache=True).logits for i in range(8)], dim=1)
        permuted = model(chunk, past_key_values=caches[2], position_ids=pos, use_cache=True).logits
        same_everywhere = model(chunk, past_key_values=caches[3], position_ids=pos, use_cache=True).logits
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together, permuted, atol=1e-5, rtol=1e-5)
    assert (together - same_everywhere).abs().max() > 1e-3  # the check sees which tokens each head holds


# ---------------------------------------------------------------- roles


@dataclass
class RoleRecorder(Scorer):
    """Records each view's roles next to its key positions; scores by recency."""

    name = "role_recorder_test"
    requires_roles = frozenset({"separator"})

    def __post_init__(self):
        self.seen = []

    def score(self, view: AttentionView) -> torch.Tensor:
        self.seen.append((view.key_positions.clone(), view.roles["separator"].clone()))
        return view.key_positions.float().expand(1, 1, -1).clone()


@pytest.mark.parametrize("head_mode", ["shared", "per_kv_head"])
def test_roles_are_sliced_to_the_cached_positions(tiny, head_mode):
    model, ids = tiny
    mask = torch.zeros(T, dtype=torch.bool)
    mask[[3, 7, 20, 31]] = True
    scorer = RoleRecorder()
    stream_perplexity(model, ids, scorer, budget=10, n_sink=1, chunk_size=4, roles={"separator": mask},
                      head_mode=head_mode)
    assert scorer.seen
    for positions, role in scorer.seen:
        assert torch.equal(role, mask[positions])


def test_sepllm_separators_filled_from_the_tokenizer(tiny):
    model, ids = tiny
    ids = ids.clone()
    ids[0, [6, 13, 22]] = torch.tensor([5, 9, 5])
    ids[0, [i for i in range(T) if i not in (6, 13, 22)]] %= 5  # no other separator ids
    r = stream_perplexity(model, ids, get_scorer("sepllm"), budget=8, n_sink=2, chunk_size=4,
                          tokenizer=FakeTokenizer())
    for layer in r.kept_positions:
        assert {6, 13, 22} <= set(layer.tolist())  # separators outrank every other token
    with pytest.raises(ValueError, match="needs token role.*tokenizer="):
        stream_perplexity(model, ids, get_scorer("sepllm"), budget=8, chunk_size=4)
    # explicit roles win over the tokenizer
    only_first = torch.zeros(T, dtype=torch.bool)
    only_first[6] = True
    r = stream_perplexity(model, ids, get_scorer("sepllm"), budget=8, n_sink=2, chunk_size=4,
                          roles={"separator": only_first}, tokenizer=FakeTokenizer())
    assert all(6 in layer.tolist() and 13 not in layer.tolist() for layer in r.kept_positions)


def test_sepllm_survives_a_span_without_separators(tiny):
    model, ids = tiny
    r = stream_perplexity(model, ids % 5, get_scorer("sepllm"), budget=8, n_sink=2, chunk_size=4,
                          tokenizer=FakeTokenizer())  # no separator at all: recency decides
    assert r.kept_positions[0].tolist() == [0, 1] + list(range(T - 6, T))


def test_compress_prefill_fills_separators_from_the_tokenizer(tiny):
    model, ids = tiny
    ids = ids % 5
    ids[0, [4, 10]] = torch.tensor([5, 9])
    out = compress_prefill(model, ids, "sepllm", 6, head_mode="shared", tokenizer=FakeTokenizer())
    assert {4, 10} <= set(out.kept_positions[0, 0].tolist())
    with pytest.raises(ValueError, match="needs token role"):
        compress_prefill(model, ids, "sepllm", 6)
    with pytest.raises(ValueError, match="one entry per token"):
        compress_prefill(model, ids, "sepllm", 6, roles={"separator": torch.zeros(3, dtype=torch.bool)})


# ---------------------------------------------------------------- lazy eviction


def test_evict_every_amortises_and_records_the_real_peak(tiny):
    model, ids = tiny
    scorer = get_scorer("accumulated_attention")
    every = stream_perplexity(model, ids, scorer, budget=12, n_sink=2, chunk_size=1)
    lazy = stream_perplexity(model, ids, scorer, budget=12, n_sink=2, chunk_size=1, evict_every=5)
    assert every.evictions == T - 12 and every.peak_cache_len == 13
    assert lazy.evictions == (T - 12) // 5 and lazy.peak_cache_len == 12 + 5
    assert all(set(lengths) == {12} for lengths in lazy.cache_lengths)  # each eviction goes down to the budget
    assert lazy.max_cache_len == 12


@pytest.mark.parametrize("kwargs,match", [
    (dict(head_mode="per_query_head"), "head_mode must be one of"),
    (dict(evict_every=0), "evict_every must be an int"),
    (dict(roles={"separator": torch.zeros(5, dtype=torch.bool)}), "one entry per token"),
])
def test_bad_arguments(tiny, kwargs, match):
    model, ids = tiny
    with pytest.raises(ValueError, match=match):
        stream_perplexity(model, ids, get_scorer("recency"), budget=8, **kwargs)


# ---------------------------------------------------------------- batched streams

BATCH_SCORERS = [get_scorer("accumulated_attention"), get_scorer("normalized_attention"),
                 get_scorer("forgetting_attention", factor=0.7), get_scorer("recency"), get_scorer("random"),
                 get_scorer("keyformer", tau=0.5), get_scorer("normalized_attention_probe", probe_fraction=0.5)]


def _documents(n=3):
    return torch.randint(0, 32, (n, T), generator=torch.Generator().manual_seed(7))


def _streams(docs, budgets=(9, 20)):
    """Every scorer x budget x document, protections varying by row, each row with its own seeded generator."""
    out = []
    for d in range(docs):
        for b in budgets:
            for k, scorer in enumerate(BATCH_SCORERS):
                out.append(Stream(doc=d, scorer=scorer, budget=b, n_sink=k % 3, recent_window=(2 * k) % 5,
                                  generator=torch.Generator().manual_seed(100 * d + k)))
    return out


def _alone(model, docs, s, head_mode):
    """The same stream run by itself (batch of one), with a fresh generator seeded alike."""
    gen = None if s.generator is None else torch.Generator().manual_seed(s.generator.initial_seed())
    return stream_perplexity(model, docs[s.doc : s.doc + 1], s.scorer, s.budget, n_sink=s.n_sink,
                             recent_window=s.recent_window, chunk_size=6, generator=gen, head_mode=head_mode)


@pytest.mark.parametrize("head_mode, max_rows", [("shared", 16), ("per_kv_head", 5)])
def test_batched_streams_equal_one_at_a_time(tiny, head_mode, max_rows):
    """Many rows (documents x scorers x budgets, mixed decays, protections and generators) in one batch: with 16 rows
    per pass two documents share a forward pass, with 5 a document's rows are split over passes. Each row's NLL,
    kept positions and recorded cache lengths equal the row streamed alone."""
    model, _ = tiny
    docs = _documents()
    streams = _streams(len(docs))
    batch = stream_batch(model, docs, streams, chunk_size=6, head_mode=head_mode, max_rows=max_rows)
    assert len(batch.results) == len(streams)
    for s, got in zip(streams, batch.results):
        want = _alone(model, docs, s, head_mode)
        assert got.nll_sum == pytest.approx(want.nll_sum, rel=1e-5), s
        assert got.n_predicted == want.n_predicted == T - 1
        assert torch.equal(got.kept_positions, want.kept_positions), s
        assert got.cache_lengths == want.cache_lengths and got.evictions == want.evictions > 0
        assert got.head_lengths == want.head_lengths and got.peak_cache_len == want.peak_cache_len


def test_batched_rows_record_their_own_cache_and_keep_their_own_tokens(tiny):
    model, _ = tiny
    docs = _documents(2)
    streams = [Stream(doc=d, scorer=get_scorer(name), budget=10, n_sink=2, recent_window=2)
               for d in range(2) for name in ("accumulated_attention", "normalized_attention")]
    batch = stream_batch(model, docs, streams, chunk_size=4, head_mode="per_kv_head")
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    for r in batch.results:
        assert r.evictions == len(r.cache_lengths) == len(r.head_lengths) > 0
        assert all(lengths == [10] * n_layers for lengths in r.cache_lengths)
        assert all(heads == [[10] * n_kv] * n_layers for heads in r.head_lengths)
        assert r.max_cache_len == 10 and r.peak_cache_len == 10 + 4  # budget + one chunk before eviction
    kept = [r.kept_positions for r in batch.results]
    assert not torch.equal(kept[0], kept[1])  # two scorers on one document keep different tokens
    assert not torch.equal(kept[0], kept[2])  # one scorer on two documents too


def test_uncompressed_trunk_is_the_full_cache_baseline(tiny):
    model, _ = tiny
    docs = _documents(2)
    batch = stream_batch(model, docs, [Stream(doc=1, scorer=get_scorer("recency"), budget=T)], chunk_size=7)
    for d in range(2):
        assert batch.full[d].nll_sum == pytest.approx(full_nll(model, docs[d : d + 1]), rel=1e-5)
        assert batch.full[d].evictions == 0 and batch.full[d].peak_cache_len == T
    never = batch.results[0]  # a budget that holds the whole text never evicts: the full row
    assert never.evictions == 0 and never.kept_positions is None
    assert never.nll_sum == batch.full[1].nll_sum


class TokenCounter:
    """Counts the tokens (rows x positions) every forward pass of a model processes."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.model.embed_tokens.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.tokens += args[0].numel()


def test_rows_share_the_uncompressed_prefix(tiny):
    """Work is shared: one trunk per document runs the tokens before a budget's first eviction once; every row
    forks from it there. Tokens processed = D·T (trunk to the end) + Σ rows × (T − first eviction point)."""
    model, _ = tiny
    docs = _documents(2)
    streams = [Stream(doc=d, scorer=get_scorer(name), budget=b, n_sink=1)
               for d in range(2) for b in (8, 17) for name in ("accumulated_attention", "recency", "random")]
    counter = TokenCounter(model)
    try:
        stream_batch(model, docs, streams, chunk_size=5, max_rows=4)
    finally:
        counter.handle.remove()
    # chunks end at 5, 10, ...: budget 8 first evicts after the chunk ending at 10, budget 17 after the one at 20
    assert counter.tokens == 2 * T + 6 * (T - 10) + 6 * (T - 20)


@pytest.mark.parametrize("max_rows", [16, 2])
def test_observe_sees_the_uncompressed_attention_rows(tiny, max_rows):
    """The trunk's attention rows, chunk by chunk (in slices of max_rows documents), are those of one plain forward
    pass; the forks of the slices are merged in document order (rows equal their streams alone)."""
    model, _ = tiny
    docs = _documents(3)
    seen = {}

    def observe(layer, probs, positions, rows):
        seen.setdefault(layer, []).append((probs.clone(), positions.clone(), rows))

    streams = [Stream(doc=d, scorer=get_scorer("normalized_attention"), budget=12, n_sink=1) for d in (2, 0, 1)]
    batch = stream_batch(model, docs, streams, chunk_size=8, observe=observe, max_rows=max_rows)
    with torch.inference_mode():
        full = model(docs, output_attentions=True).attentions
    for layer, parts in seen.items():
        got = torch.zeros_like(full[layer])
        for probs, positions, rows in parts:
            got[rows.start : rows.stop, :, positions, : probs.shape[-1]] = probs
        torch.testing.assert_close(got, full[layer], atol=1e-5, rtol=1e-4)
    assert sorted(seen) == list(range(model.config.num_hidden_layers))
    for s, got in zip(streams, batch.results):
        alone = stream_perplexity(model, docs[s.doc : s.doc + 1], s.scorer, 12, n_sink=1, chunk_size=8)
        assert got.nll_sum == pytest.approx(alone.nll_sum, rel=1e-5) and torch.equal(got.kept_positions,
                                                                                      alone.kept_positions)


@dataclass
class DecayRecorder(Scorer):
    """Keeps the newest tokens (recency) and records, at every eviction, each layer's view: positions, the chunk's
    attention rows and the running key mass the harness aged by ``factor`` per query."""

    name = "decay_recorder_test"
    needs = frozenset({"attention", "key_mass"})
    factor: float = 0.5

    def __post_init__(self):
        self.views = []

    @property
    def mass_decay(self) -> float:
        return self.factor

    def score(self, view: AttentionView) -> torch.Tensor:
        self.views.append((view.key_positions.clone(), view.attention.clone(), view.key_mass.clone()))
        return view.key_positions.float().expand(1, view.key_mass.shape[1], -1).clone()


def test_running_mass_is_aged_per_row_across_the_fork(tiny):
    """Rows with decays 0.5 and 1 batched together (two trunk masses, one group): at every eviction each row's key
    mass equals Σ_q factor^(newest − q) a_q computed independently: from a plain forward pass of the uncompressed
    prefix up to the fork, then from the chunks' recorded attention rows on the evicted cache."""
    model, _ = tiny
    docs = _documents(1)
    chunk, budget, fork = 4, 8, 12  # the first chunk end with at least budget + 1 entries
    recorders = [DecayRecorder(factor=0.5), DecayRecorder(factor=1.0)]
    stream_batch(model, docs, [Stream(0, r, budget, n_sink=1) for r in recorders], chunk_size=chunk)
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        prefix = model(docs[:, :fork], output_attentions=True).attentions
    for recorder in recorders:
        f = recorder.factor
        steps = [recorder.views[i : i + layers] for i in range(0, len(recorder.views), layers)]
        weights = f ** torch.arange(fork - 1, -1, -1, dtype=torch.float32)
        previous = [torch.einsum("bhqk,q->bhk", a.float(), weights) for a in prefix]
        previous_positions = [torch.arange(fork)] * layers
        for k, step in enumerate(steps):
            for layer, (positions, attention, mass) in enumerate(step):
                if k == 0:
                    expected = previous[layer]
                else:
                    carried = [previous_positions[layer].tolist().index(p) for p in positions[:-chunk]]
                    rows = torch.einsum("bhqk,q->bhk", attention.float(), f ** torch.arange(chunk - 1, -1, -1.0))
                    expected = torch.nn.functional.pad(previous[layer][..., carried] * f**chunk, (0, chunk)) + rows
                torch.testing.assert_close(mass, expected, atol=1e-5, rtol=1e-4)
                previous[layer], previous_positions[layer] = mass, positions
        assert len(steps) == (T - fork) // chunk + 1


def test_decays_are_per_row():
    """Two rows absorbed with decays 1 and 0.5 equal each row absorbed alone."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    both = LayerState(rows=2)
    both.absorb(probs, torch.arange(3), torch.tensor([1.0, 0.5]))
    for r, f in enumerate((1.0, 0.5)):
        alone = LayerState()
        alone.absorb(probs[r : r + 1], torch.arange(3), f)
        torch.testing.assert_close(both.mass[r : r + 1], alone.mass)
    torch.testing.assert_close(both.mass[1, :, 0], 0.25 * probs[1, :, 0, 0] + 0.5 * probs[1, :, 1, 0]
                               + probs[1, :, 2, 0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(streams=[Stream(doc=2, scorer=get_scorer("recency"), budget=8)]), r"doc must be a row of input_ids in \[0, 1"),
    (dict(max_rows=0), "max_rows must be"),
    (dict(roles={"separator": torch.zeros(3, T, dtype=torch.bool)}), r"must be \(documents, tokens\)"),
    (dict(observe=lambda *a: None, attention="fused"), "observe needs attention='eager'"),
    (dict(streams=[]), "at least one stream"),
])
def test_batch_bad_arguments(tiny, kwargs, match):
    model, _ = tiny
    kwargs = {"streams": [Stream(doc=0, scorer=get_scorer("recency"), budget=8)], **kwargs}
    with pytest.raises(ValueError, match=match):
        stream_batch(model, _documents(2), **kwargs)
