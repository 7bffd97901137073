"""KV-cache scorers (TOVA, SnapKV, key norm, VATP, CAOTE, SepLLM, Keyformer, attention PageRank, ZipCache probes).

Each against a hand computation on a tiny matrix, against the neighbour rule it could be confused with, the contract's
shape under GQA, parameter validation and missing captures.
"""

import pytest
import torch

from salience.scorers import AttentionView, get_scorer, probe_rows, separator_mask

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
    # rows 1 and 2: mean = [(0.5+0.2)/2, (0.5+0.3)/2, (0+0.5)/2]
    s = get_scorer("snapkv", window=2, kernel_size=1)(view())
    torch.testing.assert_close(s, torch.tensor([[[0.35, 0.4, 0.25]]]))


def test_snapkv_window_is_clipped_to_the_queries_present():
    s = get_scorer("snapkv", window=64, kernel_size=1)(view())
    torch.testing.assert_close(s, torch.tensor([[[1.7 / 3, 0.8 / 3, 0.5 / 3]]]))


def test_snapkv_pooling_spreads_a_peak_to_its_neighbours():
    spike = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 5)
    avg = get_scorer("snapkv", window=1, kernel_size=3, pooling="avg")(view(spike))
    mx = get_scorer("snapkv", window=1, kernel_size=3, pooling="max")(view(spike))
    torch.testing.assert_close(avg, torch.tensor([[[0.0, 1 / 3, 1 / 3, 1 / 3, 0.0]]]))
    torch.testing.assert_close(mx, torch.tensor([[[0.0, 1.0, 1.0, 1.0, 0.0]]]))
    # at the edge the zero padding counts in the average: kernel 5 over [1, 0, 0, 0, 0]
    edge = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 5)
    avg5 = get_scorer("snapkv", window=1, kernel_size=5)(view(edge))
    torch.testing.assert_close(avg5, torch.tensor([[[0.2, 0.2, 0.2, 0.0, 0.0]]]))


def test_snapkv_differs_from_tova_and_equals_it_for_a_one_query_window():
    snap = get_scorer("snapkv", window=2, kernel_size=1)(view())
    assert not torch.allclose(snap, get_scorer("tova")(view()))
    torch.testing.assert_close(get_scorer("snapkv", window=1, kernel_size=1)(view()), get_scorer("tova")(view()))


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


# ---------------------------------------------------------------- SepLLM


def sep_view():
    roles = {"separator": torch.tensor([False, True, False, True, False])}
    return AttentionView(key_positions=torch.arange(5), key_mass=torch.zeros(1, 2, 5), roles=roles)


def test_sepllm_separators_first_then_recency():
    # recency term pos / (2·(4 + 1)) = pos / 10
    s = get_scorer("sepllm")(sep_view())
    torch.testing.assert_close(s[0, 0], torch.tensor([0.0, 1.1, 0.2, 1.3, 0.4]))
    assert s.shape == (1, 2, 5)
    assert get_scorer("recency")(sep_view())[0, 0].argmax() == 4  # the neighbour rule keeps the newest token first
    assert s[0, 0].argmax() == 3
    assert get_scorer("sepllm").attention_free


def test_sepllm_needs_the_separator_role():
    with pytest.raises(ValueError, match="needs token role"):
        get_scorer("sepllm")(AttentionView(key_positions=POS, key_mass=torch.zeros(1, 1, 3)))


class FakeTokenizer:
    vocab = {0: "Hello", 1: " .", 2: "\n\n", 3: "),", 4: ".\n", 5: " ", 6: "a.", 7: ","}

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_separator_mask_from_token_ids():
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    mask = separator_mask(ids, FakeTokenizer())
    assert mask.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert separator_mask([7, 1], FakeTokenizer(), separators=(";",)).tolist() == [False, False]


# ---------------------------------------------------------------- Keyformer


def test_keyformer_at_high_temperature_spreads_each_query_evenly_over_what_it_sees():
    # τ → ∞: each query's softmax is uniform over its visible keys; masked keys (a = 0) stay at 0
    s = get_scorer("keyformer", tau=1e6)(view(generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(s, torch.tensor([[[1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]]]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(s, get_scorer("accumulated_attention")(view()), atol=0.05)


def test_keyformer_at_low_temperature_samples_keys_in_proportion_to_attention():
    # τ → 0: Gumbel-max, each query votes for key k with probability a_{q,k}; the batch mean tends to the column sum
    att = A.expand(4000, 1, 3, 3)
    s = get_scorer("keyformer", tau=1e-3)(view(att, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(s.mean(0)[0], torch.tensor([1.7, 0.8, 0.5]), atol=0.05, rtol=0)


def test_keyformer_is_seeded():
    s = get_scorer("keyformer")
    first = s(view(generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(first, s(view(generator=torch.Generator().manual_seed(1))))
    assert s(view(generator=torch.Generator().manual_seed(2))).ne(first).any()


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_keyformer_tau_range(tau):
    with pytest.raises(ValueError, match="> 0"):
        get_scorer("keyformer", tau=tau)


# ---------------------------------------------------------------- attention PageRank


def test_pagerank_hand_example():
    # r = (1 − d)/3 + d·rA with d = 1/2: r_2 = 1/6 + r_2/4 → 2/9; r_1 = 1/6 + (r_1/2 + 0.3·r_2)/2 → 4/15; r_0 = 23/45
    s = get_scorer("attention_pagerank", damping=0.5)(view())
    torch.testing.assert_close(s, torch.tensor([[[23 / 45, 4 / 15, 2 / 9]]]))


def test_pagerank_of_uniform_attention_is_uniform():
    s = get_scorer("attention_pagerank")(view(torch.full((1, 2, 4, 4), 0.25)))
    torch.testing.assert_close(s, torch.full((1, 2, 4), 0.25))


def test_pagerank_rewards_keys_attended_by_central_tokens_not_by_many():
    # token 0 is the hub (1 and 3 point to it) and points only to key 3; key 2 draws more attention in total
    # (column sums 1.2 vs 1.0) but only from the peripheral tokens 1 and 2, so PageRank ranks key 3 above key 2
    g = torch.tensor([[0, 0, 0, 1.0], [0.4, 0, 0.6, 0], [0.4, 0, 0.6, 0], [1.0, 0, 0, 0]]).view(1, 1, 4, 4)
    s = get_scorer("attention_pagerank", damping=0.5)(view(g))[0, 0]
    acc = get_scorer("accumulated_attention")(view(g))[0, 0]
    assert acc[2] > acc[3] and s[3] > s[2]
    torch.testing.assert_close(s[1:3], torch.tensor([1 / 8, 13 / 56]))  # r_1 = 1/8; r_2 = (1/8 + 0.3 r_1) / 0.7


def test_pagerank_uses_the_last_k_queries_and_rejects_a_non_square_graph():
    extra = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 2, 3)
    s = get_scorer("attention_pagerank")(view(torch.cat([extra, A], dim=2)))
    torch.testing.assert_close(s, get_scorer("attention_pagerank")(view()))
    with pytest.raises(ValueError, match="Q ≥ K"):
        get_scorer("attention_pagerank")(view(A[:, :, 1:]))


def test_pagerank_matches_networkx():
    nx = pytest.importorskip("networkx")
    att = causal_softmax(1, 2, 5, 5, seed=3)
    s = get_scorer("attention_pagerank")(view(att))
    for head in range(2):
        graph = nx.DiGraph()
        graph.add_nodes_from(range(5))
        graph.add_weighted_edges_from((q, k, float(att[0, head, q, k])) for q in range(5) for k in range(5)
                                      if att[0, head, q, k] > 0)
        ranks = nx.pagerank(graph, alpha=0.85, tol=1e-10)
        torch.testing.assert_close(s[0, head], torch.tensor([ranks[i] for i in range(5)]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("params, match", [
    ({"damping": 0.0}, r"\(0, 1\)"), ({"damping": 1.0}, r"\(0, 1\)"), ({"tol": 0.0}, "> 0"), ({"max_iter": 0}, "≥ 1"),
])
def test_pagerank_parameter_ranges(params, match):
    with pytest.raises(ValueError, match=match):
        get_scorer("attention_pagerank", **params)


# ---------------------------------------------------------------- ZipCache probe queries


def test_probe_rows_take_the_newest_and_a_seeded_random_share():
    rows = probe_rows(40, 0.25, torch.Generator().manual_seed(0))  # 10 probes: 5 newest + 5 of rows 0..34
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == 10
    assert rows[-5:].tolist() == [35, 36, 37, 38, 39] and rows[:5].max() < 35
    torch.testing.assert_close(rows, probe_rows(40, 0.25, torch.Generator().manual_seed(0)))
    assert probe_rows(3, 0.01).tolist() == [2]  # at least one probe, and it is the newest query


def test_probe_normalized_attention_hand_computation():
    # probe_fraction 0.6 of 3 → 2 probes, both recent: rows 1 and 2; mass [0.7, 0.8, 0.5], seen by [2, 2, 1]
    s = get_scorer("normalized_attention_probe", probe_fraction=0.6, recent_share=1.0)(view())
    torch.testing.assert_close(s, torch.tensor([[[0.35, 0.4, 0.5]]]))
    exact = get_scorer("normalized_attention")(view())  # [1.7/3, 0.4, 0.5]: the probes change key 0's score
    assert not torch.allclose(s, exact)


def test_probe_normalized_attention_with_every_query_is_exact():
    att = causal_softmax(2, 6, 7, 7, seed=4)
    s = get_scorer("normalized_attention_probe", probe_fraction=1.0)(view(att, generator=torch.Generator()))
    torch.testing.assert_close(s, get_scorer("normalized_attention")(view(att)))


def test_probe_keys_no_probe_sees_score_zero():
    # a single random probe (recent_share 0): its own row is the score; keys it cannot see (after it) score 0
    s = get_scorer("normalized_attention_probe", probe_fraction=0.3, recent_share=0.0)
    out = s(view(generator=torch.Generator().manual_seed(0)))[0, 0]
    row = int(probe_rows(3, 0.3, torch.Generator().manual_seed(0), recent_share=0.0))
    torch.testing.assert_close(out, A[0, 0, row])


@pytest.mark.parametrize("params, match", [
    ({"probe_fraction": 0.0}, r"\(0, 1\]"), ({"probe_fraction": 1.5}, r"\(0, 1\]"),
    ({"recent_share": -0.1}, r"\[0, 1\]"), ({"recent_share": 1.1}, r"\[0, 1\]"),
])
def test_probe_parameter_ranges(params, match):
    with pytest.raises(ValueError, match=match):
        get_scorer("normalized_attention_probe", **params)


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
