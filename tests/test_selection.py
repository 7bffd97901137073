import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from salience.selection import protected_mask, reduce_to_kv_heads, resolve_budget, select_topk, to_kv_heads


def test_topk_keeps_highest_in_order():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2])
    assert select_topk(scores, 2).tolist() == [1, 3]


def test_protected_tokens_always_kept():
    scores = torch.tensor([0.0, 0.0, 5.0, 4.0, 3.0, 0.0])
    keep = protected_mask(torch.arange(6), n_sink=1, recent=1)
    assert keep.tolist() == [True, False, False, False, False, True]
    assert select_topk(scores, 3, keep).tolist() == [0, 2, 5]


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 40), data=st.data())
def test_budget_and_protection_property(k, data):
    budget = data.draw(st.integers(1, k))
    n_sink = data.draw(st.integers(0, budget))
    recent = data.draw(st.integers(0, budget - n_sink))
    scores = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=k, max_size=k)))
    keep = protected_mask(torch.arange(k), n_sink=n_sink, recent=recent)
    idx = select_topk(scores, budget, keep)
    assert idx.numel() == budget and len(set(idx.tolist())) == budget
    assert idx.tolist() == sorted(idx.tolist())
    assert set(torch.nonzero(keep).flatten().tolist()) <= set(idx.tolist())
    # every dropped unprotected token scores no higher than every kept unprotected one
    kept = set(idx.tolist())
    free_kept = [scores[i] for i in kept if not keep[i]]
    dropped = [scores[i] for i in range(k) if i not in kept]
    if free_kept and dropped:
        assert max(dropped) <= min(free_kept)


def test_batched_rows_select_independently():
    scores = torch.tensor([[[1.0, 0.0, 2.0]], [[0.0, 3.0, 1.0]]])
    assert select_topk(scores, 1).flatten().tolist() == [2, 1]


@pytest.mark.parametrize("budget,n,expected", [(0.5, 10, 5), (0.05, 10, 1), (1.0, 7, 7), (3, 10, 3)])
def test_resolve_budget(budget, n, expected):
    assert resolve_budget(budget, n) == expected


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.2, 0, 11, "half", True])
def test_resolve_budget_rejects(budget):
    with pytest.raises(ValueError, match=r"\(0, 1\]|\[1, 10\]|ratio"):
        resolve_budget(budget, 10)


def test_errors_name_the_limits():
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        select_topk(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="exceed the budget"):
        select_topk(torch.zeros(5), 1, torch.tensor([True, True, False, False, False]))
    with pytest.raises(ValueError, match="NaN"):
        select_topk(torch.tensor([0.0, float("nan")]), 1)


def test_gqa_reduction():
    s = torch.arange(12.0).view(1, 6, 2)  # 6 query heads, 2 KV heads → groups of 3
    mean = reduce_to_kv_heads(s, 2)
    assert mean.shape == (1, 2, 2)
    torch.testing.assert_close(mean[0, 0], s[0, :3].mean(0))
    torch.testing.assert_close(reduce_to_kv_heads(s, 2, "max")[0, 1], s[0, 3:].amax(0))
    shared = reduce_to_kv_heads(s, 2, "shared")
    torch.testing.assert_close(shared[0, 0], shared[0, 1])
    with pytest.raises(ValueError, match="multiple"):
        reduce_to_kv_heads(s, 4)


def test_to_kv_heads_follows_the_declared_layout_not_the_count():
    s = torch.arange(24.0).view(2, 6, 2)  # (layers, 6 query heads, K); 2 KV heads → groups of 3
    torch.testing.assert_close(to_kv_heads(s, "query", 2), reduce_to_kv_heads(s, 2))
    kv = s[:, :2]
    assert to_kv_heads(kv, "kv", 2) is kv
    shared = to_kv_heads(s[:, :1], "shared", 2)
    assert shared.shape == (2, 2, 2) and torch.equal(shared[:, 1], s[:, 0])
    # one query head per KV head: the group mean is the row itself, bit for bit
    assert torch.equal(to_kv_heads(kv, "query", 2), kv)
    with pytest.raises(ValueError, match="KV-head scores need 2 head rows, got 6"):
        to_kv_heads(s, "kv", 2)
    with pytest.raises(ValueError, match="shared scores need one head row, got 2"):
        to_kv_heads(kv, "shared", 2)
    with pytest.raises(ValueError, match="multiple"):
        to_kv_heads(s, "query", 4)
    with pytest.raises(ValueError, match="resolve 'view'"):
        to_kv_heads(s, "view", 2)


def _topk_then_sort(scores, budget, protected=None):
    """What select_topk computed before it learned to find the dropped tokens instead: topk, then sort."""
    ranked = scores.float()
    if protected is not None:
        ranked = ranked.masked_fill(protected, float("inf"))
    return ranked.topk(budget, dim=-1).indices.sort(dim=-1).values


@pytest.mark.parametrize("drop", [0, 1, 3, 40])
def test_dropping_few_keeps_the_same_set_as_topk(drop):
    gen = torch.Generator().manual_seed(drop)
    scores = torch.randn(2, 30, 101, generator=gen)
    protected = torch.zeros(101, dtype=torch.bool)
    protected[:4] = True
    got = select_topk(scores, 101 - drop, protected)
    assert torch.equal(got, _topk_then_sort(scores, 101 - drop, protected))


def test_a_tie_across_the_boundary_is_left_to_topk():
    # eight tokens share the lowest score and one must go: the fast path cannot tell which, so topk decides
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0]])
    assert torch.equal(select_topk(scores, 9), _topk_then_sort(scores, 9))
    assert select_topk(scores, 9)[0].tolist().count(0) == 1 and 9 in select_topk(scores, 9)[0].tolist()
