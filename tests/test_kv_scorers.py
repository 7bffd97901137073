"""KV-cache scorers (TOVA, SnapKV, key norm, VATP, CAOTE; SepLLM, Keyformer, attention PageRank and ZipCache probes
in tests/test_kv_scorers_sepllm_keyformer_pagerank.py, which shares this file's tiny views).

Each against a hand computation on a tiny matrix, against the neighbour rule it could be confused with, the contract's
shape under GQA (every KV scorer), parameter validation and missing captures.
"""

import pytest
import torch

from salience.scorers import AttentionView, get_scorer

# 3 queries over 3 keys, causal, one batch, one head; rows sum to 1 (the matrix of tests/test_scorers.py)
A = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]])
POS = torch.arange(3)


def view(attention=A, **kw):
    k = attention.shape[-1]
    kw.setdefault("query_positions", torch.arange(k - attention.shape[-2], k))
    return AttentionView(key_positions=torch.arange(k), attention=attention, **kw)


def causal_softmax(b, h, q, k, seed=0, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = sharp * torch.randn(b, h, q, k, generator=g)
    mask = torch.arange(k)[None, :] > torch.arange(k - q, k)[:, None]
    return torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)


# ---------------------------------------------------------------- TOVA


def test_tova_is_the_newest_query_row():
    torch.testing.assert_close(get_scorer("tova")(view()), torch.tensor([[[0.2, 0.3, 0.5]]]))


def test_tova_picks_the_row_with_the_largest_position():
    v = AttentionView(key_positions=POS, query_positions=torch.tensor([5, 9, 7]), attention=A)
    torch.testing.assert_close(get_scorer("tova")(v), torch.tensor([[[0.5, 0.5, 0.0]]]))


def test_tova_is_not_accumulated_attention():
    # the column sum [1.7, 0.8, 0.5] ranks key 0 first; the newest query ranks key 2 first
    assert get_scorer("tova")(view())[0, 0].argmax() == 2
    assert get_scorer("accumulated_attention")(view())[0, 0].argmax() == 0


# ---------------------------------------------------------------- SnapKV


def test_snapkv_window_mean_without_pooling():
    # rows 1 and 2 are the window: mean = [(0.5+0.2)/2, (0.5+0.3)/2, (0+0.5)/2]; keys 1 and 2 are the window's own
    # keys and rank above every other key (2 + their mean)
    s = get_scorer("snapkv", window=2, kernel_size=1)(view())
    torch.testing.assert_close(s, torch.tensor([[[0.35, 2.4, 2.25]]]))


def test_snapkv_window_is_clipped_to_the_queries_present():
    s = get_scorer("snapkv", window=64, kernel_size=1)(view())
    torch.testing.assert_close(s, 2 + torch.tensor([[[1.7 / 3, 0.8 / 3, 0.5 / 3]]]))


def test_snapkv_pooling_spreads_a_peak_to_its_neighbours_before_the_window():
    spike = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 5)  # one query (position 4): the window is key 4
    avg = get_scorer("snapkv", window=1, kernel_size=3, pooling="avg")(view(spike))
    mx = get_scorer("snapkv", window=1, kernel_size=3, pooling="max")(view(spike))
    torch.testing.assert_close(avg, torch.tensor([[[0.0, 1 / 3, 1 / 3, 1 / 3, 2.0]]]))
    torch.testing.assert_close(mx, torch.tensor([[[0.0, 1.0, 1.0, 1.0, 2.0]]]))
    # at the edge the zero padding counts in the average: kernel 5 over the keys before the window, [1, 0, 0, 0]
    edge = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 5)
    avg5 = get_scorer("snapkv", window=1, kernel_size=5)(view(edge))
    torch.testing.assert_close(avg5, torch.tensor([[[0.2, 0.2, 0.2, 0.0, 2.0]]]))


def test_snapkv_pools_only_the_keys_before_the_window():
    """The window's own attention must not leak onto the keys just before it (kvpress's SnapKVPress pools
    ``attn[..., -w:, :-w]``)."""
    a = torch.zeros(1, 1, 6, 6)
    a[0, 0, :, 0] = 1.0
    a[0, 0, 4, [0, 4]] = torch.tensor([0.1, 0.9])
    a[0, 0, 5, [0, 2, 5]] = torch.tensor([0.1, 0.3, 0.6])
    s = get_scorer("snapkv", window=2, kernel_size=3)(view(a))
    mean = a[:, :, -2:, :4].mean(dim=-2)  # window rows over the keys before the window
    reference = torch.nn.functional.avg_pool1d(mean, 3, stride=1, padding=1)
    torch.testing.assert_close(s[..., :4], reference)
    # key 3 pools keys 2, 3 and the zero padding: (0.15 + 0 + 0) / 3; pooling over all keys would add key 4's 0.45
    assert float(s[0, 0, 3]) == pytest.approx(0.05)
    assert (s[..., 4:] > s[..., :4].max()).all()  # the window ranks first


def test_snapkv_window_keys_follow_the_query_positions():
    # a view whose keys are a cache (positions 0, 3, 7, 9) and whose two rows are queries at positions 7 and 9
    a = torch.tensor([[[[0.4, 0.3, 0.3, 0.0], [0.1, 0.2, 0.3, 0.4]]]])
    v = AttentionView(key_positions=torch.tensor([0, 3, 7, 9]), query_positions=torch.tensor([7, 9]), attention=a)
    scorer = get_scorer("snapkv", window=2, kernel_size=1)
    assert scorer.window_keys(v).tolist() == [False, False, True, True]
    torch.testing.assert_close(scorer(v), torch.tensor([[[0.25, 0.25, 2.3, 2.2]]]))


def test_snapkv_ranks_like_tova_for_a_one_query_window():
    snap = get_scorer("snapkv", window=2, kernel_size=1)(view())
    assert not torch.equal(snap.argsort(-1), get_scorer("tova")(view()).argsort(-1))
    one = get_scorer("snapkv", window=1, kernel_size=1)(view())
    tova = get_scorer("tova")(view())
    torch.testing.assert_close(one[..., :2], tova[..., :2])  # the keys before the window: the newest row
    assert torch.equal(one.argsort(-1), tova.argsort(-1))


@pytest.mark.parametrize("params, match", [
    ({"window": 0}, "≥ 1"), ({"kernel_size": 4}, "odd"), ({"kernel_size": 0}, "odd"), ({"pooling": "min"}, "max"),
])
def test_snapkv_parameter_ranges(params, match):
    with pytest.raises(ValueError, match=match):
        get_scorer("snapkv", **params)


# ---------------------------------------------------------------- key norm


def test_key_norm_is_minus_the_l2_norm_of_each_key():
    keys = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]]).view(1, 1, 3, 2)
    values = torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0]]).view(1, 1, 3, 2)  # a value-norm rule would rank 0 first
    s = get_scorer("key_norm")(AttentionView(key_positions=POS, keys=keys, values=values))
    torch.testing.assert_close(s, torch.tensor([[[-5.0, -1.0, 0.0]]]))
    assert get_scorer("key_norm").attention_free


# ---------------------------------------------------------------- VATP


def test_vatp_weights_accumulated_attention_by_value_l1_norm():
    values = torch.tensor([[1.0, -1.0], [0.0, 0.5], [2.0, 2.0]]).view(1, 1, 3, 2)  # ℓ1: 2, 0.5, 4 (ℓ2 would differ)
    s = get_scorer("vatp")(view(values=values))
    torch.testing.assert_close(s, torch.tensor([[[1.7 * 2, 0.8 * 0.5, 0.5 * 4]]]))
    # accumulated attention ranks 0 > 1 > 2; the value weighting moves key 2 above key 1
    assert s[0, 0].argsort(descending=True).tolist() == [0, 2, 1]


def test_vatp_broadcasts_each_kv_head_to_its_query_group():
    mass = torch.ones(1, 6, 2)
    values = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]]).view(1, 2, 2, 1)
    s = get_scorer("vatp")(AttentionView(key_positions=torch.arange(2), key_mass=mass, values=values))
    expected = torch.tensor([[1.0, 2.0]] * 3 + [[3.0, 4.0]] * 3)[None]
    torch.testing.assert_close(s, expected)


# ---------------------------------------------------------------- CAOTE


def test_caote_hand_computation():
    # newest row a = [0.2, 0.3, 0.5], v = [1, 0, 2] → o = 0.2 + 0 + 1.0 = 1.2
    # e_k = a_k / (1 − a_k) · |v_k − o| = [0.25·0.2, (3/7)·1.2, 1·0.8]
    v = view(values=torch.tensor([1.0, 0.0, 2.0]).view(1, 1, 3, 1))
    torch.testing.assert_close(get_scorer("caote")(v), torch.tensor([[[0.05, 3.6 / 7, 0.8]]]))


def test_caote_ignores_a_heavily_attended_key_whose_value_is_the_output():
    # a = [0.4, 0.3, 0.3], v = [1, 0, 2] → o = 1 = v_0: evicting key 0 leaves the output unchanged
    a = torch.tensor([0.4, 0.3, 0.3]).view(1, 1, 1, 3)
    s = get_scorer("caote")(view(a, values=torch.tensor([1.0, 0.0, 2.0]).view(1, 1, 3, 1)))
    torch.testing.assert_close(s, torch.tensor([[[0.0, 3 / 7, 3 / 7]]]))
    assert get_scorer("tova")(view(a))[0, 0].argmax() == 0  # the attention-only neighbour keeps key 0 first


def brute_force_eviction_error(att, values, window):
    """Remove each key, renormalise, recompute the output; mean over the last `window` queries."""
    b, h, q, k = att.shape
    v = values.double().repeat_interleave(h // values.shape[1], dim=1)
    out = torch.zeros(b, h, k, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for qi in range(q - window, q):
                a = att[bi, hi, qi].double()
                o = a @ v[bi, hi]
                for ki in range(k):
                    if a[ki] == 0:
                        continue
                    rest = a.clone()
                    rest[ki] = 0
                    out[bi, hi, ki] += (o - rest @ v[bi, hi] / rest.sum()).norm() / window
    return out


def test_caote_matches_removing_the_token_and_recomputing_the_output_under_gqa():
    att = causal_softmax(2, 6, 4, 5, seed=1, sharp=3.0)
    values = torch.randn(2, 2, 5, 3, generator=torch.Generator().manual_seed(2))
    s = get_scorer("caote", window=2)(view(att, values=values))
    torch.testing.assert_close(s.double(), brute_force_eviction_error(att, values, 2), rtol=1e-4, atol=1e-5)


def test_caote_is_stable_for_a_key_that_holds_almost_all_attention():
    # logits [20, 0, 0]: a_0 rounds to 1 in float32; the error tends to |v_0 − (v_1 + v_2)/2| = |3 − 1| = 2
    a = torch.softmax(torch.tensor([20.0, 0.0, 0.0]), -1).view(1, 1, 1, 3)
    s = get_scorer("caote")(view(a, values=torch.tensor([3.0, 0.0, 2.0]).view(1, 1, 3, 1)))
    torch.testing.assert_close(s[0, 0, 0], torch.tensor(2.0), rtol=1e-5, atol=0)
    assert s[0, 0, 1:].max() < 1e-7


def test_caote_a_key_alone_cannot_be_evicted_and_unseen_keys_cost_nothing():
    a = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 3)
    s = get_scorer("caote")(view(a, values=torch.ones(1, 1, 3, 2)))
    assert s[0, 0, 0] == float("inf") and s[0, 0, 1:].eq(0).all()


def test_caote_window_range():
    with pytest.raises(ValueError, match="≥ 1"):
        get_scorer("caote", window=0)


# ---------------------------------------------------------------- contract, for every new scorer

PER_QUERY_HEAD = ["tova", "snapkv", "vatp", "caote", "sepllm", "keyformer", "attention_pagerank",
                  "normalized_attention_probe"]


@pytest.mark.parametrize("name", PER_QUERY_HEAD + ["key_norm"])
def test_contract_shape_under_gqa(name):
    b, h_q, h_kv, k, d = 2, 6, 2, 5, 4
    g = torch.Generator().manual_seed(0)
    v = view(
        causal_softmax(b, h_q, k, k, seed=5),
        keys=torch.randn(b, h_kv, k, d, generator=g),
        values=torch.randn(b, h_kv, k, d, generator=g),
        roles={"separator": torch.tensor([False, True, False, False, True])},
        generator=g,
    )
    s = get_scorer(name)(v)
    assert s.shape == (b, h_kv if name == "key_norm" else h_q, k)
    assert torch.isfinite(s).all()


@pytest.mark.parametrize("name, match", [
    ("tova", "tova needs attention"), ("snapkv", "snapkv needs attention"), ("key_norm", "key_norm needs keys"),
    ("vatp", "vatp needs values"), ("caote", "caote needs attention"), ("keyformer", "keyformer needs attention"),
    ("attention_pagerank", "attention_pagerank needs attention"),
    ("normalized_attention_probe", "normalized_attention_probe needs attention"),
])
def test_missing_capture_is_named(name, match):
    v = AttentionView(key_positions=POS, key_mass=torch.ones(1, 1, 3))  # a streamed summary only
    with pytest.raises(ValueError, match=match):
        get_scorer(name)(v)


def test_caote_names_missing_values():
    with pytest.raises(ValueError, match="caote needs values"):
        get_scorer("caote")(view())
