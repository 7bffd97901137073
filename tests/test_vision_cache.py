"""The activation cache: hits and misses, keys that change with the model, the image set and the code, the ``off``
switch, atomic writes, and a bench that computes once (siblings' requests included) and then only reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import salience.runs as runs
from salience import activation_cache as ac
from salience import vision_entries, vision_tasks
from salience import vision_eval as ve
from salience.data import loading as data_loading
from salience.scorers import divprune, get_scorer

from test_vit_harness import tiny_dinov2

SPEC = ac.ImageSetSpec("mnist", "test", 10, 28, 0, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))


def test_hit_and_miss(tmp_path):
    store = ac.ActivationStore(tmp_path, "m" * 64, SPEC)
    assert store.load("tokens", "c1") is None and not store.has("tokens", "c1")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.save("tokens", "c1", a)
    np.testing.assert_array_equal(store.load("tokens", "c1"), a)
    assert store.has("tokens", "c1") and store.load("tokens", "c2") is None  # another code hash misses
    assert store.load("hidden@6", "c1") is None
    assert (store.folder / "spec.json").is_file() and store.size_bytes() > 0
    with pytest.raises(ValueError, match="plain file stem"):
        store.path("a/b", "c1")


def test_keys_change_with_image_set_code_and_model():
    assert SPEC.key() == ac.ImageSetSpec("mnist", "test", 10, 28, 0, (0.5,) * 3, (0.2,) * 3).key()
    for changed in (dict(n=11), dict(seed=1), dict(size=56), dict(split="train"), dict(mean=(0.4, 0.5, 0.5))):
        assert ac.ImageSetSpec(**{**SPEC.__dict__, **changed}).key() != SPEC.key()
    assert ac.code_hash(ac.cache_root) == ac.code_hash(ac.cache_root)
    assert ac.code_hash(ac.cache_root) != ac.code_hash(ac.model_fingerprint)
    assert ac.code_hash(ac.cache_root, extra="ClsAttention(layer=-1)") != ac.code_hash(ac.cache_root, extra="x")
    a, b = tiny_dinov2(seed=0), tiny_dinov2(seed=0)
    assert ac.model_fingerprint(a) == ac.model_fingerprint(b)
    with torch.no_grad():
        b.encoder.layer[0].mlp.fc1.weight[0, 0] += 1e-3
    b.__dict__.pop("_salience_weights_fingerprint", None)
    assert ac.model_fingerprint(a) != ac.model_fingerprint(b)


def test_environment_variable_moves_or_disables_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(ac.ENV, str(tmp_path / "acts"))
    assert ac.cache_root() == tmp_path / "acts"
    monkeypatch.setenv(ac.ENV, "off")
    assert ac.cache_root() is None
    store = ac.ActivationStore(ac.cache_root(), "m" * 64, SPEC)
    store.save("tokens", "c", np.zeros(3))
    assert store.load("tokens", "c") is None and not store.enabled
    with store.lock():
        pass
    monkeypatch.delenv(ac.ENV)
    assert ac.cache_root().name == "activations"


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    store = ac.ActivationStore(tmp_path, "m" * 64, SPEC)
    store.save("tokens", "c", np.zeros(3))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save("hidden@1", "c", np.ones(3))
    assert not store.has("hidden@1", "c")
    assert sorted(p.name for p in store.folder.iterdir()) == ["spec.json", store.path("tokens", "c").name]


SETTINGS = ve.ReaderSettings(heads=2, key_dim=4, epochs=2, lr=3e-3, weight_decay=1e-4, batch_size=10, probe_c=1.0)


def _bench(model, batch_size=8, readers=SETTINGS):
    return ve.VisionBench(model, dataset="mnist", image_size=28, n_train=20, n_test=12, seed=0, batch_size=batch_size,
                          readers=readers, desc=False)


def test_bench_computes_once_then_reads(tmp_path, monkeypatch):
    monkeypatch.setenv(ac.ENV, str(tmp_path))
    model = tiny_dinov2()
    cls = ve.Entry("cls", "drop", get_scorer("cls_attention"))
    flow = ve.Entry("flow", "drop", get_scorer("flowcut"))
    calls = []
    real = ve.VisionBench._compute
    monkeypatch.setattr(ve.VisionBench, "_compute", lambda self, *a: calls.append(a[1]) or real(self, *a))
    first = _bench(model)
    first.prepare([cls], prefetch=[([cls, flow], [1])])  # a sibling's scorers and layer, in the same pass
    assert len(calls) == 2  # train and test, one pass each
    assert any(n.startswith("hidden@1") for n in calls[0]) and sum(n.startswith("scores@") for n in calls[0]) == 4
    second = _bench(model)
    second.prepare([cls, flow], in_encoder_layers=[1])  # everything was prefetched: no pass at all
    assert len(calls) == 2
    torch.testing.assert_close(first.sets["test"].tokens, second.sets["test"].tokens, rtol=0, atol=0)
    torch.testing.assert_close(first.sets["test"].scores[("cls", 2, 0)], second.sets["test"].scores[("cls", 2, 0)])
    # a code change invalidates: the encoder's source is part of every key
    monkeypatch.setattr(vision_entries, "ENCODER_CODE", vision_entries.ENCODER_CODE + (ve.drop_entries,))
    _bench(model).prepare([cls])
    assert len(calls) == 4
    # so does another scorer configuration
    _bench(model).prepare([ve.Entry("cls2", "drop", get_scorer("cls_attention", layer=-2))])
    assert len(calls) == 6 and all(sum(n.startswith("scores@") for n in c) == 1 for c in calls[4:])


def test_bench_with_the_cache_off_computes_every_time(tmp_path, monkeypatch):
    monkeypatch.setenv(ac.ENV, "off")
    model = tiny_dinov2()
    calls = []
    real = ve.VisionBench._compute
    monkeypatch.setattr(ve.VisionBench, "_compute", lambda self, *a: calls.append(1) or real(self, *a))
    entry = ve.Entry("cls", "drop", get_scorer("cls_attention"))
    _bench(model).prepare([entry])
    _bench(model).prepare([entry])
    assert len(calls) == 4 and not any(tmp_path.iterdir())


def test_reader_weights_are_cached_with_the_activations(tmp_path, monkeypatch):
    monkeypatch.setenv(ac.ENV, str(tmp_path))
    model = tiny_dinov2()
    entry = ve.Entry("cls", "drop", get_scorer("cls_attention"))
    a = _bench(model)
    a.prepare([entry])
    a.train_readers()
    monkeypatch.setattr(ve, "train_attention_reader", lambda *a, **k: pytest.fail("the reader was retrained"))
    b = _bench(model)
    b.prepare([entry])
    b.train_readers()
    for pa, pb in zip(a._reader.parameters(), b._reader.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def _edited(monkeypatch, module):
    """Pretend ``module``'s source was edited (what the cache keys read)."""
    real = ac.source_of
    monkeypatch.setattr(ac, "source_of", lambda obj: real(obj) + ("\n# edited" if obj is module else ""))


@pytest.mark.parametrize("helper", [divprune, vision_entries.scorer_modules()[0]])
def test_scores_keys_follow_the_helpers_a_scorer_calls(monkeypatch, helper):
    # ToDRE's class body does not change when divprune.pairwise_distance (a module-level helper it calls) does
    todre, cls = get_scorer("todre"), get_scorer("cls_attention")
    before = {s.name: vision_entries.scores_code(s, 8) for s in (todre, cls)}
    _edited(monkeypatch, helper)
    assert vision_entries.scores_code(todre, 8) != before["todre"]
    assert vision_entries.scores_code(cls, 8) != before["cls_attention"]  # any scorer module: every scores key


@pytest.mark.parametrize("module", [data_loading, vision_tasks])
def test_encoder_key_follows_the_subset_draw_and_the_pixel_scaling(monkeypatch, module):
    # data.loading.subset_indices picks the images, vision_tasks._MAX_VALUE scales their pixels
    before = vision_entries.encoder_code()
    _edited(monkeypatch, module)
    assert vision_entries.encoder_code() != before


def test_a_stochastic_scorer_draws_per_batch_and_its_key_names_the_batch_size(tmp_path, monkeypatch):
    monkeypatch.setenv(ac.ENV, str(tmp_path))
    dart = ve.Entry("dart", "drop", get_scorer("dart", pivot_rule="random", n_pivots=2))
    cls = ve.Entry("cls", "drop", get_scorer("cls_attention"))
    assert dart.stochastic and not ve.Entry("d", "drop", get_scorer("dart")).stochastic and not cls.stochastic
    assert ve.Entry("r", "drop", get_scorer("random")).stochastic
    bench = _bench(tiny_dinov2())  # 12 test images in batches of 8 and 4
    bench.prepare([dart], replicates=2)
    scores = bench.sets["test"].scores
    pivots = [scores[("dart", 2, r)] == 2.0 for r in (0, 1)]  # DART's pivots score 2
    assert bool((pivots[0].sum(dim=1) == 2).all())
    # one seed for every batch would give image 8 + i the pivots of image i
    assert not torch.equal(pivots[0][:4], pivots[0][8:12])
    assert not torch.equal(pivots[0], pivots[1])  # replicates draw differently
    # the draws follow the batch size, so it is part of the stochastic scorer's key (not of a deterministic one's)
    assert vision_entries.scores_code(dart.scorer, 8) != vision_entries.scores_code(dart.scorer, 16)
    assert vision_entries.scores_code(cls.scorer, 8) == vision_entries.scores_code(cls.scorer, 16)
