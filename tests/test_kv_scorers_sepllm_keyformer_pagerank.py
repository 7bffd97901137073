"""KV-cache scorers, continued from tests/test_kv_scorers.py (its tiny views): SepLLM (separators, then recency),
Keyformer (Gumbel-softmax attention), attention PageRank, and ZipCache's probe queries, each against a hand
computation, the neighbour rule it could be confused with and its parameter ranges.
"""

import pytest
import torch
from test_kv_scorers import POS, A, causal_softmax, view

from salience.scorers import AttentionView, get_scorer, probe_rows, separator_mask

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
