"""Readers of a reduced token set: the attention-pooling reader reads a set (dropped tokens are simply absent, a merged
token of size s weighs as s copies), training is seeded, probes give per-image true-class probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from salience.vision_readers import (
    AttentionPoolReader,
    KeptTokens,
    ReaderSettings,
    class_count,
    fit_probe,
    probe_proba,
    train_attention_reader,
    true_class,
)

SETTINGS = ReaderSettings(heads=2, key_dim=4, epochs=15, lr=0.02, weight_decay=1e-4, batch_size=20, probe_c=1.0)


@pytest.fixture(scope="module")
def reader():
    torch.manual_seed(0)
    r = AttentionPoolReader(dim=8, n_classes=3, heads=2, key_dim=4).eval()
    with torch.no_grad():  # make the attention sharp enough that every token matters
        r.key.weight.mul_(5)
    return r


def test_a_set_reader_ignores_dropped_tokens_exactly(reader):
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1))
    kept = torch.tensor([0, 2, 5])
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, kept] = True
    with torch.no_grad():
        subset = reader(x[:, kept])
        masked = reader(x, mask=mask)
        junk = x.clone()
        junk[:, [1, 3, 4]] = 1e3  # whatever the dropped tokens hold, they are not read
        masked_junk = reader(junk, mask=mask)
        full = reader(x)
    torch.testing.assert_close(subset, masked, rtol=0, atol=1e-6)
    torch.testing.assert_close(subset, masked_junk, rtol=0, atol=1e-6)
    assert not torch.allclose(subset, full, atol=1e-3)  # and dropping does change the reading
    weights = reader.attention(x[:, kept])
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 2))  # softmax renormalised over what is kept


def test_log_size_bias_equals_duplicating_a_token(reader):
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    sizes = torch.tensor([[1.0, 3.0, 2.0], [2.0, 1.0, 1.0]])
    with torch.no_grad():
        merged = reader(x, sizes)
        for b in range(2):
            dup = x[b:b + 1].repeat_interleave(sizes[b].long(), dim=1)
            torch.testing.assert_close(merged[b:b + 1], reader(dup), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(merged, reader(x), atol=1e-4)  # the bias is not a no-op
    with torch.no_grad():
        torch.testing.assert_close(reader(x, torch.ones(2, 3)), reader(x), rtol=0, atol=0)


def _blobs(n: int, seed: int):
    """Three classes, each a set of 5 tokens around its own centre, with one informative token per set."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.eye(8)[:3] * 3
    x = torch.randn(n, 5, 8, generator=g) * 0.5
    x[:, 0] += centres[labels]
    return KeptTokens(x, torch.ones(n, 5), None), labels.numpy()


def test_training_is_seeded_and_learns():
    kept, labels = _blobs(120, 0)
    a = train_attention_reader(kept, labels, SETTINGS, seed=3)
    b = train_attention_reader(kept, labels, SETTINGS, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    test, test_labels = _blobs(60, 1)
    p_true, correct = true_class(a.proba(test), test_labels)
    assert correct.mean() > 0.9 and p_true.mean() > 0.6
    c = train_attention_reader(kept, labels, SETTINGS, seed=4)
    assert not torch.allclose(next(a.parameters()), next(c.parameters()))
    assert a.head.out_features == class_count(labels) == 3  # one class per label value, from the labels
    with pytest.raises(ValueError, match="labels"):
        train_attention_reader(kept, labels[:-1], SETTINGS, seed=0)


def test_kept_tokens_mean_is_size_weighted():
    x = torch.tensor([[[1.0], [4.0], [10.0]]])
    kept = KeptTokens(x, torch.tensor([[1.0, 3.0, 2.0]]), None)
    torch.testing.assert_close(kept.mean(), torch.tensor([[(1 + 12 + 20) / 6]]))
    with pytest.raises(ValueError, match=r"\(N, n, d\)"):
        KeptTokens(x[0], torch.ones(1, 3), None)


def test_true_class_and_probe():
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    p, correct = true_class(proba, np.array([0, 1]))
    assert p.tolist() == [0.7, 0.3] and correct.tolist() == [True, False]
    p, _ = true_class(proba, np.array([5, 9]), classes=np.array([1, 5, 9]))  # columns are labels 1, 5, 9
    assert p.tolist() == [0.2, 0.6]
    with pytest.raises(ValueError, match="not among"):
        true_class(proba, np.array([0, 7]))
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = rng.normal(size=(60, 4)) + y[:, None] * 2
    probe = fit_probe(x, y, C=1.0, seed=0)
    p, correct = true_class(probe_proba(probe, x), y, probe.classes_)
    assert correct.mean() > 0.9 and np.all((p > 0) & (p < 1))
    with pytest.raises(ValueError, match="C must be"):
        fit_probe(x, y, C=0, seed=0)
