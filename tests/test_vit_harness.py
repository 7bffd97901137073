"""Vision harness: reduced forward passes on a tiny random DINOv2 (fast), one slow check on the embedded dinov2-s."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Dinov2Config, Dinov2Model

from salience.attention_hook import salience_attention
from salience.harness import token_merging as tm
from salience.harness import vit_attention as va
from salience.harness import vit_pruning as vp
from salience.scorers import get_scorer
from salience.scorers.base import Scorer


def tiny_dinov2(layers: int = 2, seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, mlp_ratio=2,
                          image_size=28, patch_size=7)
    return Dinov2Model(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_dinov2()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))  # 4x4 = 16 patches + [CLS]


@torch.no_grad()
def reference(model, pixels):
    out = model(pixels).last_hidden_state  # Dinov2Model applies the final layernorm
    return out[:, 0], out[:, 1:].mean(dim=1)


@pytest.mark.parametrize("method", vp.METHODS)
def test_keep_one_reproduces_the_unpruned_model(model, pixels, method):
    cls, patch_mean = reference(model, pixels)
    scorer = get_scorer("accumulated_attention")
    out = vp.prune_vit(model, pixels, scorer, 1.0, layer=1, method=method)
    torch.testing.assert_close(out.cls, cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch_mean, patch_mean, atol=1e-5, rtol=1e-5)
    assert out.tokens_per_layer == [17, 17]
    assert out.tokens.shape == (3, 17, 32) and out.patches.shape == (3, 16, 32)


def test_vit_forward_is_the_plain_model(model, pixels):
    cls, patch_mean = reference(model, pixels)
    out = vp.vit_forward(model, pixels)
    torch.testing.assert_close(out.cls, cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patch_mean, patch_mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", vp.METHODS)
def test_tokens_really_shrink_and_merges_account_for_every_patch(model, pixels, method):
    out = vp.prune_vit(model, pixels, get_scorer("accumulated_attention"), 0.25, layer=1, method=method)
    assert out.tokens_per_layer == [17, 1 + 4]
    assert out.kept_positions.shape == (3, 5) and bool((out.kept_positions[:, 0] == 0).all())  # [CLS] kept first
    assert out.flops < vp.vit_forward(model, pixels).flops
    counts = torch.stack([(out.assignment == j).sum(dim=1) for j in range(5)], dim=1)
    if method == "drop":
        assert int((out.assignment >= 0).sum()) == 3 * 4 and bool((out.sizes == 1).all())
    else:  # every patch ends in exactly one output token, and sizes count them
        assert bool((out.assignment >= 1).all())
        torch.testing.assert_close(out.sizes[:, 1:], counts[:, 1:].float())
        assert bool((out.sizes.sum(dim=1) == 17).all())


def test_drop_keeps_the_top_scored_patches(model, pixels):
    prefix = vp.vit_prefix(model, pixels, 1, needs=get_scorer("accumulated_attention"))
    mass = prefix.attention_layers[-1].sum(dim=-2).mean(dim=1)  # (B, K) head-averaged received attention
    out = vp.reduce_and_finish(model, prefix, get_scorer("accumulated_attention"), 3, "drop")
    for b in range(3):
        top = mass[b, 1:].topk(3).indices + 1
        assert out.kept_positions[b, 1:].tolist() == sorted(top.tolist())


def test_prefix_once_suffix_many_gives_the_same_answer(model, pixels):
    scorer = get_scorer("random")
    prefix = vp.vit_prefix(model, pixels, 1, needs=scorer)
    a = vp.reduce_and_finish(model, prefix, scorer, 0.5, "drop", seed=3)
    b = vp.reduce_and_finish(model, prefix, scorer, 0.5, "drop", seed=3)
    c = vp.prune_vit(model, pixels, scorer, 0.5, layer=1, seed=3)
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(a.tokens, c.tokens)


@pytest.mark.parametrize("method", vp.METHODS)
def test_multi_stage_plan(method):
    model = tiny_dinov2(layers=4)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    scorer = get_scorer("accumulated_attention")
    out = vp.prune_vit(model, pixels, scorer, 0.5, layer=1, method=method, stages=[(2, 0.5), (3, 2)])
    assert out.tokens_per_layer == [17, 9, 5, 3]
    assert out.tokens_per_layer == vp.expected_tokens_per_layer(4, 1, 16, [vp.Stage(1, 0.5), vp.Stage(2, 0.5),
                                                                          vp.Stage(3, 2)])
    if method != "drop":  # every patch is still accounted for after three merges (VisionZip: 1 dominant + 1 context)
        assert bool((out.sizes.sum(dim=1) == 17).all())


# ------------------------------------------------------------------------------------------------- merging
def test_tome_merges_identical_tokens_exactly_and_sizes_add_up():
    torch.manual_seed(0)
    distinct = torch.randn(2, 4, 8)
    x = distinct.repeat_interleave(2, dim=1)  # tokens 2i and 2i+1 identical: A token 2i's best partner is 2i+1
    sizes = torch.ones(2, 8)
    dest, survives = tm.bipartite_destination(x, 4)
    assert survives[:, 1::2].all() and not survives[:, 0::2].any()
    merged, new_sizes = tm.merge_by_destination(x, sizes, dest, 4)
    torch.testing.assert_close(merged, distinct, rtol=0, atol=0)
    assert new_sizes.tolist() == [[2.0] * 4] * 2


def test_merge_is_size_weighted():
    x = torch.tensor([[[1.0], [4.0], [10.0]]])
    sizes = torch.tensor([[1.0, 3.0, 2.0]])
    merged, new_sizes = tm.merge_by_destination(x, sizes, torch.tensor([[0, 0, 1]]), 2)
    assert merged.flatten().tolist() == [(1 * 1 + 3 * 4) / 4, 10.0] and new_sizes.tolist() == [[4.0, 2.0]]


def test_tome_protects_cls_and_goes_past_half_in_rounds():
    metric = torch.randn(1, 17, 4, generator=torch.Generator().manual_seed(0))
    protected = torch.zeros(17, dtype=torch.bool)
    protected[0] = True
    dest, survives = tm.tome_destination(metric, torch.ones(1, 17), 14, protected)
    assert int(survives.sum()) == 3 and bool(survives[0, 0]) and int(dest[0, 0]) == 0
    assert int((dest == 0).sum()) == 1  # nothing merged into [CLS]
    with pytest.raises(ValueError, match="cannot remove"):
        tm.tome_destination(metric, torch.ones(1, 17), 16, protected)


def test_contextual_merging_groups_by_similarity():
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [0.9, 0.0], [0.0, 0.9]]])
    keep = torch.tensor([[True, False, False, False, False, False]])
    dest, survives = tm.contextual_destination(metric, keep, 2)  # centres: rest tokens 1 and 3 (evenly spread)
    assert survives.tolist() == [[True, True, False, True, False, False]]
    assert dest.tolist() == [[0, 1, 2, 2, 2, 1]]


# -------------------------------------------------------------------------------------- proportional attention
def _attention(q, k, v, log_sizes=None, record=False):
    state = va.AttentionState(log_sizes=log_sizes, record_probs=record)
    with va.attention_state(state):
        out, _ = salience_attention(torch.nn.Identity().eval(), q, k, v, None, scaling=0.5)
    return out


def test_proportional_attention_with_unit_sizes_is_plain_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    plain = torch.softmax(q @ k.transpose(2, 3) * 0.5, dim=-1) @ v
    for record in (False, True):
        torch.testing.assert_close(_attention(q, k, v, torch.zeros(2, 5), record), plain.transpose(1, 2))
        torch.testing.assert_close(_attention(q, k, v, None, record), plain.transpose(1, 2))


def test_proportional_attention_equals_duplicated_keys():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 3, generator=g) for _ in range(3))
    sizes = torch.tensor([[1.0, 3.0, 1.0, 2.0]])
    reps = sizes[0].long()
    dup = _attention(q, k.repeat_interleave(reps, dim=2), v.repeat_interleave(reps, dim=2))
    for record in (False, True):
        torch.testing.assert_close(_attention(q, k, v, sizes.log(), record), dup)


# ---------------------------------------------------------------------------------------------------- FLOPs
def test_flops_formula_against_a_hand_count(model):
    # d = 32, MLP 64, 16 patches of 7x7x3, 17 tokens in both blocks. Per block (MACs):
    # QKVO 4*17*32*32 = 69632, scores + weighted sum 2*17*17*32 = 18496, MLP 2*17*32*64 = 69632 -> 157760.
    # Patch embedding 16*147*32 = 75264. FLOPs = 2 x MACs.
    assert vp.estimate_flops(model.config, [17, 17], n_patches=16) == 2 * (75264 + 2 * 157760)
    assert vp.estimate_flops(model.config, [17, 5], n_patches=16) == 2 * (
        75264 + 157760 + 4 * 5 * 32 * 32 + 2 * 5 * 5 * 32 + 2 * 5 * 32 * 64)


@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_flops_formula_matches_pytorchs_counter(model, pixels, keep, monkeypatch):
    def math_sdpa(q, k, v, attn_mask=None, scale=None, dropout_p=0.0):  # the CPU fused kernel is not counted
        logits = q @ k.transpose(-2, -1) * scale
        return torch.softmax(logits if attn_mask is None else logits + attn_mask, dim=-1) @ v

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", math_sdpa)
    counter = FlopCounterMode(display=False)
    with counter:
        out = vp.prune_vit(model, pixels[:1], get_scorer("random"), keep, layer=1)
    # the counter also sees the harness's own small matmuls (none for random drop); estimate must match exactly
    assert out.flops == counter.get_total_flops()


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, True, "half"])
def test_bad_keep_ratio(model, pixels, keep):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        vp.prune_vit(model, pixels, get_scorer("random"), keep, layer=1)


def test_patch_count_out_of_range(model, pixels):
    prefix = vp.vit_prefix(model, pixels, 1)
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        vp.reduce_and_finish(model, prefix, get_scorer("random"), 17)


@pytest.mark.parametrize("layer", [0, 2, 12, -1])
def test_layer_past_the_depth(model, pixels, layer):
    with pytest.raises(ValueError, match=r"\[1, 1\] for this 2-layer model"):
        vp.vit_prefix(model, pixels, layer)


def test_bad_method_and_missing_scorer(model, pixels):
    with pytest.raises(ValueError, match="drop"):
        vp.prune_vit(model, pixels, get_scorer("random"), 0.5, layer=1, method="pool")
    with pytest.raises(ValueError, match="needs a scorer"):
        vp.prune_vit(model, pixels, None, 0.5, layer=1, method="drop")


def test_image_size_not_a_multiple_of_the_patch(model):
    with pytest.raises(ValueError, match="multiple of the patch size 7"):
        vp.vit_prefix(model, torch.randn(1, 3, 30, 28), 1)


@dataclass
class _NeedsCls(Scorer):
    name = "test_needs_cls"
    needs = frozenset({"attention"})
    requires_roles = frozenset({"cls"})

    def score(self, view):
        return view.attention[:, :, 0, :]


def test_cls_scorer_on_a_model_without_cls():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=7)
    siglip = SiglipVisionModel(config).eval()
    pixels = torch.randn(1, 3, 28, 28)
    out = vp.prune_vit(siglip, pixels, get_scorer("random"), 0.5, layer=1)  # fine without [CLS]
    assert out.cls is None and out.tokens_per_layer == [16, 8]
    with pytest.raises(ValueError, match=r"needs token role\(s\) \['cls'\].*no \[CLS\]"):
        vp.prune_vit(siglip, pixels, _NeedsCls(), 0.5, layer=1)
    # the same scorer runs on a model with [CLS]
    vp.prune_vit(tiny_dinov2(), pixels, _NeedsCls(), 0.5, layer=1)


def test_views_follow_the_vision_contract(model, pixels):
    prefix = vp.vit_prefix(model, pixels, 1, needs={"attention_layers"})
    view = vp.build_view(prefix.hidden, prefix.positions[0], prefix.keys, prefix.values, prefix.attention_layers,
                         n_prefix=1, has_cls=True, grid=prefix.grid)
    assert view.attention.shape == (3, 2, 17, 17) and len(view.attention_layers) == 1
    assert view.roles["cls"].tolist() == [True] + [False] * 16 and int(view.roles["patch"].sum()) == 16
    assert view.patch_coords[0].tolist() == [-1, -1] and view.patch_coords[1 + 5].tolist() == [1, 1]


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_embedded_dinov2_reduced_pass():
    from salience.models import load_model

    model = load_model("dinov2-s").model
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(pixels).last_hidden_state
    full = vp.prune_vit(model, pixels, get_scorer("accumulated_attention"), 1.0, layer=6)
    torch.testing.assert_close(full.cls, ref[:, 0], atol=1e-4, rtol=1e-4)
    assert full.tokens_per_layer == [65] * 12
    for method in vp.METHODS:
        out = vp.prune_vit(model, pixels, get_scorer("accumulated_attention"), 0.1, layer=6, method=method)
        assert out.tokens_per_layer == [65] * 6 + [8] * 6
        assert out.flops < 0.7 * full.flops


def _paired_patch_model_and_image():
    """Without position embeddings, patches (r, 2c) and (r, 2c+1) of this image are identical tokens in every layer."""
    model = tiny_dinov2()
    with torch.no_grad():
        model.embeddings.position_embeddings.zero_()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    x[..., 7:14] = x[..., 0:7]
    x[..., 21:28] = x[..., 14:21]
    return model, x


def test_tome_with_proportional_attention_is_exact_on_duplicate_tokens():
    model, x = _paired_patch_model_and_image()
    cls, patch_mean = reference(model, x)
    out = vp.prune_vit(model, x, None, 0.5, layer=1, method="tome")
    assert out.tokens_per_layer == [17, 9] and bool((out.sizes[:, 1:] == 2).all())
    torch.testing.assert_close(out.cls, cls, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.patch_mean, patch_mean, atol=1e-5, rtol=1e-4)
    plain = vp.prune_vit(model, x, None, 0.5, layer=1, method="tome", proportional_attention=False)
    assert not torch.allclose(plain.cls, cls, atol=1e-4)  # without log(size) the merged pairs are under-weighted


def test_encoder_views_count_every_query_as_visible():
    """A ViT's attention is bidirectional, so ZipCache's normaliser is K for every key, not a causal count."""
    import torch

    from salience.harness.vit_pruning import build_view

    positions = torch.tensor([0, 1, 3, 4])
    keys = torch.zeros(1, 2, 4, 8)
    view = build_view(torch.zeros(1, 4, 16), positions, keys, keys, [], n_prefix=1, has_cls=True, grid=(2, 2))
    assert view.visible().tolist() == [4, 4, 4, 4]


@dataclass
class ClsRowFromTheFullMatrix(get_scorer("cls_attention").__class__):
    """[CLS] attention read from the captured full matrix (what the harness did before the fused row)."""

    attention_rows = "all"


@pytest.mark.parametrize("stages", [(), [(2, 0.5)]], ids=["one-stage", "two-stages"])
def test_cls_scorer_reads_its_row_from_the_fused_kernel_with_the_same_result(stages):
    model = tiny_dinov2(layers=3)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    fused, full = get_scorer("cls_attention"), ClsRowFromTheFullMatrix()
    assert vp.reads_cls_row_only(fused) and not vp.reads_cls_row_only(full)
    assert not vp.reads_cls_row_only([fused, get_scorer("random")]) and not vp.reads_cls_row_only({"attention"})
    row_prefix, full_prefix = vp.vit_prefix(model, pixels, 1, needs=fused), vp.vit_prefix(model, pixels, 1, needs=full)
    (row,), (matrix,) = row_prefix.attention_layers, full_prefix.attention_layers
    assert row.shape == (2, 2, 1, 17) and matrix.shape == (2, 2, 17, 17)  # the row alone, no K x K matrix
    torch.testing.assert_close(row, matrix[:, :, :1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(row_prefix.hidden, full_prefix.hidden, atol=1e-5, rtol=1e-5)
    a = vp.reduce_and_finish(model, row_prefix, fused, 0.5, "drop", stages=stages)
    b = vp.reduce_and_finish(model, full_prefix, full, 0.5, "drop", stages=stages)
    assert torch.equal(a.kept_positions, b.kept_positions) and a.tokens_per_layer == b.tokens_per_layer
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=1e-5)


def test_a_prefix_holding_only_the_cls_row_refuses_a_scorer_that_reads_more():
    model = tiny_dinov2(layers=2)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    prefix = vp.vit_prefix(model, pixels, 1, needs=get_scorer("cls_attention"))
    with pytest.raises(ValueError, match="only the \\[CLS\\] row.*accumulated_attention"):
        vp.reduce_and_finish(model, prefix, get_scorer("accumulated_attention"), 0.5, "drop")
    vp.reduce_and_finish(model, prefix, None, 0.5, "tome")  # merging reads keys, not attention: fine
    both = vp.vit_prefix(model, pixels, 1, needs=[get_scorer("cls_attention"), get_scorer("accumulated_attention")])
    assert both.attention_layers[-1].shape[-2] == 17  # any scorer that reads more gets the whole matrix
