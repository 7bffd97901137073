"""Vision tasks: image loading, pixel batches, reductions, paired latency, overlays (tiny random DINOv2)."""

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
def test_reduction_checks_its_arguments_first():
    with pytest.raises(ValueError, match="needs a scorer"):
        vt.Reduction(None, 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        vt.Reduction(get_scorer("random"), 1.5)
    with pytest.raises(ValueError, match="method must be one of"):
        vt.Reduction(get_scorer("random"), 0.5, "pool")


def test_paired_latency_times_every_configuration_in_every_repeat(model, monkeypatch):
    px = torch.randn(2, 3, 56, 56)
    reductions = {"drop": vt.Reduction(get_scorer("random"), 0.25), "tome": vt.Reduction(None, 0.25, "tome")}
    calls = []
    real = vt.vit_forward
    monkeypatch.setattr(vt, "vit_forward", lambda *a: calls.append(1) or real(*a))
    lat = vt.paired_latency(model, px, reductions, 1, repeats=3, inner=2, warmup=1)
    assert len(calls) == 4 * 2  # (warm-up + 3 repeats) x 2 inner runs of the unreduced pass
    assert len(lat) == 9 and lat.groupby("repeat").config.nunique().eq(3).all()
    by = lat.groupby("config").first()
    assert by.loc["unreduced", "tokens_last_layer"] == 17 and by.loc["drop", "tokens_last_layer"] == 5
    assert by.loc["drop", "flops"] < by.loc["unreduced", "flops"] and (lat.seconds > 0).all()
    with pytest.raises(ValueError, match="repeats must be >= 2"):
        vt.paired_latency(model, px, reductions, 1, repeats=1)


@pytest.mark.parametrize("layer", [None, 1])
def test_kept_token_figure(model, layer):
    rng = np.random.default_rng(0)
    images = {"a": rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
              "b": rng.integers(0, 256, (20, 20), dtype=np.uint8)}
    reductions = {"drop": vt.Reduction(get_scorer("accumulated_attention"), 0.25),
                  "tome": vt.Reduction(None, 0.25, "tome"),
                  "visionzip": vt.Reduction(get_scorer("accumulated_attention"), 0.5, "visionzip")}
    fig, table = vt.kept_token_figure(model, images, reductions, layer, size=56)
    assert len(fig.axes) == 6 and len(table) == 6
    drop = table[table.reduction == "drop"]
    assert all(len(k.split()) == 4 for k in drop.kept_patches) and (drop.tokens == 5).all()
    assert (table[table.reduction == "tome"].merged_groups > 0).all()
    assert (table[table.reduction == "visionzip"].tokens == 9).all()
