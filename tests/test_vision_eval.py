"""The two settings on a tiny random DINOv2: after-encoder reduction is a selection over the cached output of one full
pass (no model run), in-encoder reduction runs the later blocks on fewer tokens; random replicates differ."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_vit_harness import tiny_dinov2
from torch.nn.utils import parameters_to_vector

from salience import activation_cache as ac
from salience import vision_eval as ve
from salience.harness import encode, prune_vit
from salience.harness.vit_encoder import ScoreRequest
from salience.harness.vit_pruning import replicate_seed, vit_prefix
from salience.scorers import get_scorer
from salience.vision_tasks import Reduction, digit_pixels


SETTINGS = ve.ReaderSettings(heads=2, key_dim=4, epochs=2, lr=3e-3, weight_decay=1e-4, batch_size=8, probe_c=1.0)


@pytest.fixture(scope="module")
def model():
    return tiny_dinov2()


@pytest.fixture
def bench(model, tmp_path, monkeypatch):
    monkeypatch.setenv(ac.ENV, str(tmp_path))
    b = ve.VisionBench(model, dataset="mnist", image_size=28, n_train=24, n_test=16, seed=0, batch_size=8,
                       readers=SETTINGS, desc=False)
    return b


ENTRIES = {
    "cls": ve.Entry("cls", "drop", get_scorer("cls_attention")),
    "random": ve.Entry("random", "drop", get_scorer("random")),
    "grid": ve.Entry("grid", "drop", get_scorer("spatial_grid")),
    "tome": ve.Entry("tome", "tome"),
    "vzip": ve.Entry("vzip", "visionzip", get_scorer("cls_attention")),
}


def test_one_pass_records_the_output_and_every_view(model):
    x, _ = digit_pixels("mnist", "test", n=4, size=28)
    out = encode(model, x, scores={"cls": ScoreRequest(get_scorer("cls_attention"), 2),
                                   "cls1": ScoreRequest(get_scorer("cls_attention"), 1),
                                   "flow": ScoreRequest(get_scorer("flowcut"), 2)},
                 hidden_layers=[1], key_layers=[1, 2])
    assert out.tokens_per_layer == [17, 17]  # the encoder ran on every token
    with torch.no_grad():
        ref = model(x).last_hidden_state
    torch.testing.assert_close(out.tokens, ref, atol=1e-5, rtol=1e-5)
    prefix = vit_prefix(model, x, 1, needs={"attention"})
    torch.testing.assert_close(out.hidden[1], prefix.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.keys[1], prefix.keys.mean(dim=1), atol=1e-5, rtol=1e-5)
    cls_row = prefix.attention_layers[-1][:, :, 0, :].mean(dim=1)  # layer 1's [CLS] row, head mean
    torch.testing.assert_close(out.scores["cls1"], cls_row, atol=1e-5, rtol=1e-5)
    assert out.scores["flow"].shape == (4, 17)
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        encode(model, x, hidden_layers=[3])


def test_after_encoder_is_a_selection_over_the_cached_output(bench, monkeypatch):
    bench.prepare(list(ENTRIES.values()))
    test = bench.sets["test"]
    # no model run from here on: an after-encoder reduction only reads cached tensors
    monkeypatch.setattr(bench.model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    for block in bench.parts.blocks:
        monkeypatch.setattr(block, "forward", lambda *a, **k: pytest.fail("a block ran"))
    kept = bench.after_encoder_tokens("test", ENTRIES["cls"], 0.25)
    scores = test.scores[("cls", 2, 0)]
    top = scores[:, 1:].topk(4).indices.sort(dim=1).values + 1
    expected = torch.stack([test.tokens[i, top[i]] for i in range(len(test))])
    torch.testing.assert_close(kept.patches, expected, rtol=0, atol=0)
    torch.testing.assert_close(kept.cls, test.tokens[:, 0], rtol=0, atol=0)  # [CLS] unchanged by construction
    assert bool((kept.sizes == 1).all())
    for name in ("tome", "vzip"):
        merged = bench.after_encoder_tokens("test", ENTRIES[name], 0.25)
        assert merged.n_tokens == 4 and bool((merged.sizes.sum(dim=1) == 16).all())  # every patch accounted for
        torch.testing.assert_close(merged.mean(), test.tokens[:, 1:].mean(dim=1), atol=1e-5, rtol=1e-5)


def test_in_encoder_runs_the_later_blocks_on_fewer_tokens(bench, model):
    bench.prepare([ENTRIES["cls"], ENTRIES["tome"]], in_encoder_layers=[1])
    kept, flops_ratio = bench.in_encoder_tokens("test", ENTRIES["cls"], 0.25, 1)
    x, _ = digit_pixels("mnist", "test", n=16, size=28)
    direct = prune_vit(model, x, get_scorer("cls_attention"), 0.25, layer=1)
    assert direct.tokens_per_layer == [17, 5] and kept.n_tokens == 4
    torch.testing.assert_close(kept.patches, direct.patches, atol=1e-5, rtol=1e-4)
    assert 0.3 < flops_ratio < 1.0
    merged, _ = bench.in_encoder_tokens("test", ENTRIES["tome"], 0.25, 1)
    assert bool((merged.sizes.sum(dim=1) == 16).all())


def test_random_replicates_keep_different_patches(bench, model):
    bench.prepare([ENTRIES["random"]], in_encoder_layers=[1], replicates=2)
    test = bench.sets["test"]
    a, b = test.scores[("random", 2, 0)], test.scores[("random", 2, 1)]
    kept_a = a[:, 1:].topk(4).indices.sort(dim=1).values
    kept_b = b[:, 1:].topk(4).indices.sort(dim=1).values
    assert (kept_a != kept_b).any(dim=1).float().mean() > 0.8  # nearly every image keeps another set
    assert not torch.equal(test.scores[("random", 2, 0)], test.scores[("random", 1, 0)])
    assert not torch.equal(test.scores[("random", 2, 0)], bench.sets["train"].scores[("random", 2, 0)][:16])
    table = bench.after_encoder([ENTRIES["random"]], [0.25], replicates=2)
    per_rep = table[table.reader == "attention_pool"].pivot_table(index="image", columns="replicate", values="p_true")
    assert not np.allclose(per_rep[0], per_rep[1])
    # the deterministic grid does not get replicates, and repeats exactly
    bench.prepare([ENTRIES["grid"]], replicates=2)
    assert ("grid", 2, 1) not in bench.sets["test"].scores


def test_reduction_seeds_differ_per_replicate_and_batch_and_accept_a_seed_option(model):
    x, _ = digit_pixels("mnist", "test", n=8, size=28)
    prefix = vit_prefix(model, x, 1)
    runs = {(r, batch): Reduction(get_scorer("random"), 0.25, replicate=r).run(model, prefix, batch=batch)
            for r in (0, 1) for batch in (0, 1)}
    positions = {k: v.kept_positions for k, v in runs.items()}
    assert not torch.equal(positions[(0, 0)], positions[(1, 0)])
    assert not torch.equal(positions[(0, 0)], positions[(0, 1)])
    same = Reduction(get_scorer("random"), 0.25).run(model, prefix, batch=0)
    assert torch.equal(same.kept_positions, positions[(0, 0)])
    seeded = Reduction(get_scorer("random"), 0.25, options={"seed": 7}).run(model, prefix, seed=0)
    assert not torch.equal(seeded.kept_positions, positions[(0, 0)])
    assert len({replicate_seed(0, r, b) for r in range(5) for b in range(5)}) == 25


def test_readers_and_the_per_image_table(bench):
    bench.prepare([ENTRIES["cls"], ENTRIES["random"]], replicates=2)
    table = pd.concat([bench.unpruned_rows(), bench.after_encoder([ENTRIES["cls"], ENTRIES["random"]], [0.5, 0.25],
                                                                  replicates=2)], ignore_index=True)
    assert set(table.reader) == {"attention_pool", "retrained_mean", "cls_probe"}
    assert table.p_true.between(0, 1).all() and table.groupby(["entry", "keep", "replicate", "reader"]).size().eq(16).all()
    # after the encoder the [CLS] probe reads the same [CLS] whatever is kept
    cls = table[table.reader == "cls_probe"].groupby("image").p_true.nunique()
    assert (cls == 1).all()
    s = ve.summary(table)
    rand = s[(s.entry == "random") & (s.reader == "attention_pool")]
    assert (rand.replicates == 2).all() and (rand.n_images == 16).all()
    series = ve.per_image_metric(table, reader="attention_pool", entry="random", keeps=[0.25])
    manual = table[(table.entry == "random") & (table.keep == 0.25) & (table.reader == "attention_pool")]
    np.testing.assert_allclose(series.to_numpy(), manual.groupby("image").p_true.mean().to_numpy())
    with pytest.raises(ValueError, match="no rows for entry 'nope'"):
        ve.per_image_metric(table, reader="attention_pool", entry="nope")
    # the same readers on the train images, same columns: where baselines are chosen
    train = bench.train_table()
    assert list(train.columns) == list(table.columns) and set(train.image) == set(range(24))
    assert train.groupby(["entry", "keep", "replicate", "reader"]).size().eq(24).all()
    assert len(train) == len(table) // 16 * 24


def test_readers_and_probes_never_read_the_test_images(model, monkeypatch):
    """Poison every test tensor: the trained reader, the [CLS] probe and the retrained probe (seen through its train
    values) must come out exactly the same; only the test rows may change."""
    monkeypatch.setenv(ac.ENV, "off")  # train both benches' readers (no cached weights)
    entry = ENTRIES["cls"]
    runs = {}
    for poison in (False, True):
        b = ve.VisionBench(model, dataset="mnist", image_size=28, n_train=24, n_test=16, seed=0, batch_size=8,
                           readers=SETTINGS, desc=False)
        b.prepare([entry])
        if poison:
            test = b.sets["test"]
            g = torch.Generator().manual_seed(1)
            test.tokens = torch.randn(test.tokens.shape, generator=g) * 100
            test.keys = {k: torch.randn(v.shape, generator=g) for k, v in test.keys.items()}
            test.scores = {k: torch.rand(v.shape, generator=g) for k, v in test.scores.items()}
        b.train_readers()
        test_rows = pd.concat([b.unpruned_rows(), b.after_encoder([entry], [0.5])], ignore_index=True)
        runs[poison] = (b, test_rows, b.train_table())
    (clean, clean_test, clean_train), (bad, bad_test, bad_train) = runs[False], runs[True]
    torch.testing.assert_close(parameters_to_vector(clean._reader.parameters()),
                               parameters_to_vector(bad._reader.parameters()), rtol=0, atol=0)
    np.testing.assert_array_equal(clean._cls_probe[-1].coef_, bad._cls_probe[-1].coef_)
    pd.testing.assert_frame_equal(clean_train, bad_train)  # the retrained probe's train values too
    assert not np.allclose(clean_test.p_true, bad_test.p_true)  # the poison did reach the test rows


def test_bad_input_fails_before_any_pass(bench):
    with pytest.raises(ValueError, match="needs a scorer"):
        ve.Entry("x", "drop")
    with pytest.raises(ValueError, match="method must be one of"):
        ve.Entry("x", "pool", get_scorer("random"))
    with pytest.raises(ValueError, match=r"\[1, 1\]"):
        bench.prepare([ENTRIES["cls"]], in_encoder_layers=[2])
    with pytest.raises(ValueError, match="replicates"):
        bench.prepare([ENTRIES["cls"]], replicates=0)
