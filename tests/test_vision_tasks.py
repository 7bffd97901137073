"""Vision tasks: image loading, pixel batches, features, probe, accuracy table, overlays (tiny random DINOv2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from salience import vision_tasks as vt
from salience.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from salience.scorers import get_scorer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56,
                          patch_size=14)
    return Dinov2Model(config).eval()


# ------------------------------------------------------------------------------------------------ load_image
def test_load_image_reads_files_and_arrays(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(vt.load_image(tmp_path / "a.png"), rgb)
    assert np.array_equal(vt.load_image(str(tmp_path / "a.png")), rgb)
    gray = rgb[:, :, 0]
    assert np.array_equal(vt.load_image(gray), np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(vt.load_image(np.concatenate([rgb, rgb[:, :, :1]], axis=2)), rgb)
    assert vt.load_image(np.ones((2, 2))).max() == 255


def test_load_image_errors_name_the_path_and_reason(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match=r"nope\.png.*no such file"):
        vt.load_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    with pytest.raises(ValueError, match=r"junk\.png.*not a readable image"):
        vt.load_image(junk)
    with pytest.raises(ValueError, match="directory"):
        vt.load_image(tmp_path)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\)"):
        vt.load_image(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vt.load_image(np.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="dtype"):
        vt.load_image(np.array([["a"]]))


# ------------------------------------------------------------------------------------------------- pixels
def test_to_pixels_normalises_with_the_models_statistics():
    white = np.full((2, 8, 8), 255, dtype=np.uint8)
    px = vt.to_pixels(white, 28)
    assert px.shape == (2, 3, 28, 28)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(px[0, :, 5, 5], expected)
    black = vt.to_pixels(np.zeros((1, 8, 8, 3), dtype=np.uint8), 14)
    torch.testing.assert_close(black[0, :, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


@pytest.mark.parametrize("size", [0, 100, 13, 112.0])
def test_bad_resolution(size):
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        vt.to_pixels(np.zeros((1, 8, 8), dtype=np.uint8), size)


def test_digit_pixels_both_data_sets():
    px, y = vt.digit_pixels("mnist", "test", n=6, size=56)
    assert px.shape == (6, 3, 56, 56) and y.shape == (6,)
    dpx, dy = vt.digit_pixels("digits", "train", n=4, size=28)
    top = ((1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).max()
    assert dpx.shape == (4, 3, 28, 28) and float(dpx.max()) <= float(top) + 1e-5
    assert float(dpx.max()) > 0.5 * float(top)  # scaled by 16, not by 255
    with pytest.raises(ValueError, match="mnist"):
        vt.digit_pixels("cifar")


# ---------------------------------------------------------------------------------------------- probe + table
def test_cls_cosine_by_hand():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(vt.cls_cosine(a, b), [0.0, 1.0])


def test_reduced_features_run_the_prefix_once_per_batch(model, monkeypatch):
    calls = []
    real = vt.vit_prefix
    monkeypatch.setattr(vt, "vit_prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
    px = torch.randn(5, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    reductions = {f"{m}{k}": vt.Reduction(get_scorer("accumulated_attention"), k, m)
                  for m in ("drop", "visionzip", "tome") for k in (0.5, 0.25)}
    out = vt.reduced_features(model, px, 1, reductions, batch_size=2)
    assert len(calls) == 3  # batches of 2, 2, 1
    assert out["drop0.5"].features.shape == (5, 64) and out["drop0.5"].kept_patches == 8
    assert out["tome0.25"].tokens_per_layer == [17, 5]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        vt.reduced_features(model, px, 1, {"bad": vt.Reduction(get_scorer("random"), 1.5)})


def test_accuracy_vs_keep_table(model):
    g = torch.Generator().manual_seed(0)
    labels = np.arange(40) % 2
    # two classes that differ in brightness: the probe can learn them from unpruned features
    px = torch.randn(40, 3, 56, 56, generator=g) * 0.1 + torch.tensor(labels, dtype=torch.float32)[:, None, None, None]
    table, probe = vt.accuracy_vs_keep(model, (px[:24], labels[:24]), (px[24:], labels[24:]),
                                       {"random": get_scorer("random"), "mass": get_scorer("accumulated_attention")},
                                       keeps=[1.0, 0.25], layers=[1], methods=("drop", "tome"), batch_size=16)
    assert list(table.columns[:8]) == ["layer", "scorer", "method", "keep", "kept_patches", "accuracy", "accuracy_se",
                                      "accuracy_cls"]
    assert table.iloc[0].scorer == "unpruned" and table.iloc[0].accuracy == 1.0
    assert len(table) == 1 + 2 * 2 + 2  # unpruned + 2 scorers x 2 keeps (drop) + tome x 2 keeps
    full = table[table.keep == 1.0]
    np.testing.assert_allclose(full.accuracy, 1.0)
    np.testing.assert_allclose(full.cls_cosine, 1.0, atol=1e-6)
    assert full.accuracy_cls.nunique() == 1  # the [CLS] probe sees identical features at keep 1
    reduced = table[table.keep == 0.25]
    assert (reduced.kept_patches == 4).all() and (reduced.flops_ratio < 1).all() and (reduced.cls_cosine < 1).all()
    with pytest.raises(ValueError, match="only method 'tome'"):
        vt.accuracy_vs_keep(model, (px[:4], labels[:4]), (px[4:8], labels[4:8]), {"none": None}, [0.5], [1])
    with pytest.raises(ValueError, match=r"\[1, 1\]"):
        vt.accuracy_vs_keep(model, (px[:4], labels[:4]), (px[4:8], labels[4:8]), {"r": get_scorer("random")},
                            [0.5], [2])


def test_measure_latency_and_flops(model):
    px = torch.randn(2, 3, 56, 56)
    full = vt.measure_latency(model, px, None, repeats=2)
    cut = vt.measure_latency(model, px, vt.Reduction(get_scorer("random"), 0.25), layer=1, repeats=2)
    assert full["tokens_last_layer"] == 17 and cut["tokens_last_layer"] == 5
    assert cut["flops"] < full["flops"] and full["seconds"] > 0


def test_kept_token_figure(model):
    rng = np.random.default_rng(0)
    images = {"a": rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
              "b": rng.integers(0, 256, (20, 20), dtype=np.uint8)}
    reductions = {"drop": vt.Reduction(get_scorer("accumulated_attention"), 0.25),
                  "tome": vt.Reduction(None, 0.25, "tome"),
                  "visionzip": vt.Reduction(get_scorer("accumulated_attention"), 0.5, "visionzip")}
    fig, table = vt.kept_token_figure(model, images, reductions, layer=1, size=56)
    assert len(fig.axes) == 6 and len(table) == 6
    drop = table[table.reduction == "drop"]
    assert all(len(k.split()) == 4 for k in drop.kept_patches)
    assert (table[table.reduction == "tome"].merged_groups > 0).all()
