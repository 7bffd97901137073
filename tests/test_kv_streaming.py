"""Streaming eviction on a tiny random Llama (GQA: 6 query / 3 KV heads): roles, per-KV-head budgets, lazy eviction.

Fast (no embedded model); the real SmolLM2 checks live in test_kv_harness.py (slow).
"""

import copy
from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from salience.harness import compress_prefill, stream_perplexity
from salience.harness.kv_streaming import _LayerState
from salience.scorers import AttentionView, Scorer, get_scorer

T = 40
SEPARATOR_IDS = (5, 9)  # the fake tokenizer decodes these as "." and ",\n"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    # initializer_range well above the default 0.02 so that attention is far from uniform and heads disagree
    config = LlamaConfig(vocab_size=32, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                         initializer_range=0.3, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32, (1, T), generator=torch.Generator().manual_seed(1))
    return model, ids


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
    state = _LayerState(kv_heads=2)
    mass = torch.tensor([[[5.0, 0, 1, 0], [5.0, 0, 1, 0], [0, 3, 0, 1], [0, 3, 0, 2]]])  # (1, 4, 4)
    state.mass, state.positions = mass.clone(), torch.arange(10, 14).expand(2, -1)
    keys = torch.arange(2 * 4, dtype=torch.float32).view(1, 2, 4, 1)
    cache = DynamicCache()
    cache.update(keys.clone(), keys.clone(), 0)
    from salience.harness.kv_streaming import _evict

    _evict(cache, [state], get_scorer("accumulated_attention"), 2, 0, 0, 13, None)
    assert state.positions.tolist() == [[10, 12], [11, 13]]  # head 0 keeps slots 0, 2; head 1 keeps 1, 3
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
