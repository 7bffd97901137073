"""Each scorer against a hand computation on a tiny attention matrix; the contract's shape and registry rules."""

import pytest
import torch

from salience.scorers import AttentionView, Scorer, available_scorers, get_scorer, register

# 3 queries over 3 keys, causal, one batch, one head; rows sum to 1
A = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]])
POS = torch.arange(3)


def view(**kw):
    return AttentionView(key_positions=POS, query_positions=POS, attention=A, **kw)


def test_accumulated_is_column_sum():
    torch.testing.assert_close(get_scorer("accumulated_attention")(view()), torch.tensor([[[1.7, 0.8, 0.5]]]))


def test_normalized_divides_by_visible_queries():
    # key 0 is seen by 3 queries, key 1 by 2, key 2 by 1
    expected = torch.tensor([[[1.7 / 3, 0.8 / 2, 0.5 / 1]]])
    torch.testing.assert_close(get_scorer("normalized_attention")(view()), expected)


def test_normalized_removes_the_count_bias_on_uniform_causal_attention():
    # causal uniform attention: query i spreads 1/(i+1) over keys 0..i; accumulated favours key 0, normalized less so
    n = 6
    att = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    v = AttentionView(key_positions=torch.arange(n), query_positions=torch.arange(n), attention=att[None, None])
    acc = get_scorer("accumulated_attention")(v)[0, 0]
    norm = get_scorer("normalized_attention")(v)[0, 0]
    assert torch.all(acc[:-1] > acc[1:])  # strictly decreasing with position
    assert (norm.max() / norm.min()) < (acc.max() / acc.min())


def test_forgetting_weights_older_queries_less():
    f = 0.5
    # query ages: 2, 1, 0 → weights 0.25, 0.5, 1
    expected = torch.tensor([[[0.25 * 1.0 + 0.5 * 0.5 + 0.2, 0.5 * 0.5 + 0.3, 0.5]]])
    torch.testing.assert_close(get_scorer("forgetting_attention", factor=f)(view()), expected)


def test_forgetting_factor_one_equals_accumulated():
    torch.testing.assert_close(get_scorer("forgetting_attention", factor=1.0)(view()),
                               get_scorer("accumulated_attention")(view()))


@pytest.mark.parametrize("factor", [0.0, -0.1, 1.5])
def test_forgetting_factor_range(factor):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        get_scorer("forgetting_attention", factor=factor)


def test_key_mass_summary_replaces_attention():
    mass = torch.tensor([[[2.0, 1.0, 0.5]]])
    v = AttentionView(key_positions=POS, key_mass=mass, visible_queries=torch.tensor([4, 2, 1]))
    torch.testing.assert_close(get_scorer("accumulated_attention")(v), mass)
    torch.testing.assert_close(get_scorer("normalized_attention")(v), torch.tensor([[[0.5, 0.5, 0.5]]]))


def test_recency_ranks_by_original_position():
    v = AttentionView(key_positions=torch.tensor([0, 7, 3]), key_mass=torch.zeros(1, 2, 3))
    s = get_scorer("recency")(v)
    assert s.shape == (1, 2, 3)
    assert s[0, 0].argsort().tolist() == [0, 2, 1]


def test_random_is_seeded():
    v1 = view(generator=torch.Generator().manual_seed(1))
    v2 = view(generator=torch.Generator().manual_seed(1))
    s = get_scorer("random")
    torch.testing.assert_close(s(v1), s(v2))
    assert s(view(generator=torch.Generator().manual_seed(2))).ne(s(v1)).any()


@pytest.mark.parametrize("name", ["accumulated_attention", "normalized_attention", "forgetting_attention", "recency", "random"])
def test_contract_shape(name):
    b, h, q, k = 2, 3, 4, 5
    att = torch.softmax(torch.randn(b, h, q, k), -1)
    v = AttentionView(key_positions=torch.arange(k), query_positions=torch.arange(1, q + 1), attention=att)
    assert get_scorer(name)(v).shape == (b, h, k)


def test_attention_free_flags():
    assert get_scorer("recency").attention_free and get_scorer("random").attention_free
    assert not get_scorer("accumulated_attention").attention_free


def test_scorer_that_needs_attention_fails_clearly_without_it():
    v = AttentionView(key_positions=POS, keys=torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="needs attention or key_mass"):
        get_scorer("accumulated_attention")(v)


def test_unknown_scorer_lists_choices():
    with pytest.raises(ValueError, match="available: .*normalized_attention"):
        get_scorer("h2o_typo")


def test_contract_violation_is_caught():
    class Broken(Scorer):
        name = "broken_for_test"

        def score(self, view):
            return torch.zeros(1, 1, view.num_keys + 1)

    with pytest.raises(RuntimeError, match="contract"):
        Broken()(view())


def test_register_rejects_unknown_captures_and_duplicates():
    class Weird(Scorer):
        name = "weird_for_test"
        needs = frozenset({"telepathy"})

    with pytest.raises(TypeError, match="unknown captures"):
        register(Weird)

    class Dup(Scorer):
        name = "recency"

    with pytest.raises(TypeError, match="taken"):
        register(Dup)
    assert "recency" in available_scorers()
