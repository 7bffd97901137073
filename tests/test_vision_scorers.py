"""Vision-token scorers (family B): each against a hand computation on a tiny ViT view, ordering properties,
parameter validation and the clear errors for what a view lacks."""

import math

import pytest
import torch

from salience.scorers import AttentionView, get_scorer
from salience.scorers.vision_common import interleave
from salience.scorers.spatial_grid import grid_levels


def grid_coords(rows, cols):
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], dim=-1)


def vit_view(attention_layers=None, hidden=None, keys=None, values=None, rows=2, cols=2, cls=True):
    """[CLS] + a rows×cols patch grid (raster order); without [CLS] only the patches."""
    coords = grid_coords(rows, cols)
    if cls:
        coords = torch.cat([torch.tensor([[-1, -1]]), coords])
    k = coords.shape[0]
    cls_mask = torch.zeros(k, dtype=torch.bool)
    cls_mask[0] = cls
    roles = {"cls": cls_mask, "patch": ~cls_mask} if cls else {"patch": ~cls_mask}
    attention = attention_layers[-1] if attention_layers else None
    return AttentionView(key_positions=torch.arange(k), query_positions=torch.arange(k), attention=attention,
                         attention_layers=attention_layers, hidden=hidden, keys=keys, values=values,
                         patch_coords=coords, roles=roles, generator=torch.Generator().manual_seed(0))


def rows_attention(cls_row, other_row=None):
    """(1, 1, K, K): [CLS]'s row as given, every other query row ``other_row`` (default uniform)."""
    k = len(cls_row)
    other = torch.full((k,), 1.0 / k) if other_row is None else torch.tensor(other_row)
    a = other.expand(k, k).clone()
    a[0] = torch.tensor(cls_row)
    return a.view(1, 1, k, k)


# 1 [CLS] + 4 patches (2×2): two layers, two heads
L1 = torch.stack([rows_attention([0.2, 0.4, 0.1, 0.2, 0.1]), rows_attention([0.0, 0.1, 0.5, 0.2, 0.2])], dim=1)[:, :, 0]
L2 = torch.stack([rows_attention([0.1, 0.1, 0.1, 0.6, 0.1]), rows_attention([0.3, 0.3, 0.1, 0.2, 0.1])], dim=1)[:, :, 0]


# ---------------------------------------------------------------- [CLS] attention (FasterVLM) and VTC-CLS


def test_cls_attention_is_the_cls_row_per_head():
    s = get_scorer("cls_attention")(vit_view([L1, L2]))
    torch.testing.assert_close(s, torch.tensor([[[0.1, 0.1, 0.1, 0.6, 0.1], [0.3, 0.3, 0.1, 0.2, 0.1]]]))
    penultimate = get_scorer("cls_attention", layer=-2)(vit_view([L1, L2]))
    torch.testing.assert_close(penultimate, L1[:, :, 0])
    torch.testing.assert_close(get_scorer("cls_attention", layer=0)(vit_view([L1, L2])), penultimate)


def test_cls_attention_finds_the_cls_row_by_position():
    # two query rows, positions [3, 0]: the [CLS] row is the second one
    a = torch.tensor([[[[0.2, 0.2, 0.2, 0.2, 0.2], [0.0, 0.5, 0.5, 0.0, 0.0]]]])
    v = vit_view([a])
    v.query_positions = torch.tensor([3, 0])
    torch.testing.assert_close(get_scorer("cls_attention")(v), torch.tensor([[[0.0, 0.5, 0.5, 0.0, 0.0]]]))


def test_cls_attention_layer_only_needs_attention_for_the_last_layer():
    v = vit_view([L2])
    v.attention_layers = None
    torch.testing.assert_close(get_scorer("cls_attention")(v), L2[:, :, 0])
    with pytest.raises(ValueError, match="attention_layers"):
        get_scorer("cls_attention", layer=-2)(v)


def test_cls_attention_errors():
    with pytest.raises(ValueError, match=r"outside \[-2, 1\]"):
        get_scorer("cls_attention", layer=2)(vit_view([L1, L2]))
    with pytest.raises(ValueError, match="int index"):
        get_scorer("cls_attention", layer=1.5)
    no_cls = vit_view([torch.full((1, 1, 4, 4), 0.25)], cls=False)
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        get_scorer("cls_attention")(no_cls)


def test_multilayer_cls_attention_averages_head_means_over_layers():
    # head means: L1 → [0.1, 0.25, 0.3, 0.2, 0.15], L2 → [0.2, 0.2, 0.1, 0.4, 0.1]
    s = get_scorer("multilayer_cls_attention")(vit_view([L1, L2]))
    torch.testing.assert_close(s, torch.tensor([[[0.15, 0.225, 0.2, 0.3, 0.125]]]))
    only_first = get_scorer("multilayer_cls_attention", layers=[0])(vit_view([L1, L2]))
    torch.testing.assert_close(only_first, torch.tensor([[[0.1, 0.25, 0.3, 0.2, 0.15]]]))
    # the ensemble ranks patch 3 first, layer 0 alone patch 2: the layers matter
    assert s[0, 0, 1:].argmax() == 2 and only_first[0, 0, 1:].argmax() == 1


@pytest.mark.parametrize("layers", [[], [0, 0], [0.5], "ab"])
def test_multilayer_cls_attention_rejects_bad_layers(layers):
    with pytest.raises(ValueError, match="layers"):
        get_scorer("multilayer_cls_attention", layers=layers)


# ---------------------------------------------------------------- attention rollout


def test_rollout_one_layer_is_half_identity_half_attention():
    s = get_scorer("attention_rollout")(vit_view([L2]))
    mean_row = torch.tensor([0.2, 0.2, 0.1, 0.4, 0.1])
    torch.testing.assert_close(s, (0.5 * torch.eye(5)[0] + 0.5 * mean_row).view(1, 1, 5))
    raw = get_scorer("attention_rollout", residual=0.0)(vit_view([L2]))
    torch.testing.assert_close(raw, mean_row.view(1, 1, 5))


def test_rollout_two_layers_by_hand():
    # K = 2 ([CLS], one patch), one head: A1 rows [1, 0] / [0.5, 0.5]; A2 rows [0, 1] / [0, 1]; residual 0.5
    a1 = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    a2 = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    v = AttentionView(key_positions=torch.arange(2), attention=a2, attention_layers=[a1, a2],
                      roles={"cls": torch.tensor([True, False])})
    # Ã1 = [[1, 0], [.25, .75]], Ã2 = [[.5, .5], [0, 1]]; Ã2 Ã1 row 0 = [.5 + .125, .375]
    torch.testing.assert_close(get_scorer("attention_rollout")(v), torch.tensor([[[0.625, 0.375]]]))
    # start_layer=1 keeps only Ã2
    torch.testing.assert_close(get_scorer("attention_rollout", start_layer=1)(v), torch.tensor([[[0.5, 0.5]]]))


def test_rollout_of_identity_attention_without_cls_is_uniform():
    eye = torch.eye(4).view(1, 1, 4, 4)
    s = get_scorer("attention_rollout")(vit_view([eye, eye, eye], cls=False))
    torch.testing.assert_close(s, torch.full((1, 1, 4), 0.25))
    # with [CLS] the identity keeps everything in [CLS]: the patches tie at 0
    s_cls = get_scorer("attention_rollout")(vit_view([torch.eye(5).view(1, 1, 5, 5)]))
    torch.testing.assert_close(s_cls, torch.eye(5)[0].view(1, 1, 5))


@pytest.mark.parametrize("params, match", [
    ({"residual": 1.0}, r"\[0, 1\)"), ({"residual": -0.1}, r"\[0, 1\)"), ({"head_fusion": "sum"}, "mean"),
    ({"start_layer": -1}, "≥ 0"),
])
def test_rollout_validation(params, match):
    with pytest.raises(ValueError, match=match):
        get_scorer("attention_rollout", **params)


def test_rollout_errors_name_the_range_and_shape():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_scorer("attention_rollout", start_layer=2)(vit_view([L1, L2]))
    with pytest.raises(ValueError, match="square"):
        get_scorer("attention_rollout")(AttentionView(key_positions=torch.arange(5), attention=L1[:, :, :2]))


def test_rollout_head_fusion_max():
    s = get_scorer("attention_rollout", residual=0.0, head_fusion="max")(vit_view([L2]))
    row = torch.maximum(L2[0, 0], L2[0, 1])  # rows renormalised after the max
    torch.testing.assert_close(s[0, 0], row[0] / row[0].sum())


# ---------------------------------------------------------------- FlowCut


def test_flowcut_ignores_a_uniform_layer_and_weights_by_value_norm():
    uniform = rows_attention([0.2, 0.2, 0.2, 0.2, 0.2])
    focused = rows_attention([0.2, 0.4, 0.2, 0.1, 0.1])  # patches renormalised: [0.5, 0.25, 0.125, 0.125]
    values = torch.zeros(1, 1, 5, 2)
    values[0, 0, :, 0] = torch.tensor([1.0, 1.0, 1.0, 4.0, 1.0])
    v = vit_view([uniform, focused], values=values)
    plain = get_scorer("flowcut", value_weighted=False)(v)
    torch.testing.assert_close(plain[0, 0, 1:], torch.tensor([0.5, 0.25, 0.125, 0.125]))
    weighted = get_scorer("flowcut")(v)
    torch.testing.assert_close(weighted[0, 0, 1:], torch.tensor([0.5, 0.25, 0.5, 0.125]))
    assert weighted[0, 0, 0] > weighted[0, 0, 1:].max()  # [CLS], the relay, ranks first
    # without concentration weights the uniform layer dilutes the row: the mean of the two
    mean = get_scorer("flowcut", value_weighted=False, concentration_weighted=False)(v)
    torch.testing.assert_close(mean[0, 0, 1:], torch.tensor([0.375, 0.25, 0.1875, 0.1875]))


def test_flowcut_concentration_by_hand():
    a = rows_attention([0.0, 0.5, 0.5, 0.0, 0.0])  # c = 1 − log 2 / log 4 = 0.5
    b = rows_attention([0.0, 0.0, 0.0, 0.0, 1.0])  # c = 1
    s = get_scorer("flowcut", value_weighted=False)(vit_view([a, b]))
    expected = (0.5 * torch.tensor([0.5, 0.5, 0.0, 0.0]) + torch.tensor([0.0, 0.0, 0.0, 1.0])) / 1.5
    torch.testing.assert_close(s[0, 0, 1:], expected)
    all_uniform = get_scorer("flowcut", value_weighted=False)(vit_view([rows_attention([0.2] * 5)]))
    torch.testing.assert_close(all_uniform[0, 0, 1:], torch.full((4,), 0.25))


def test_flowcut_validation_and_missing_values():
    with pytest.raises(ValueError, match="True or False"):
        get_scorer("flowcut", value_weighted="yes")
    with pytest.raises(ValueError, match="values"):
        get_scorer("flowcut")(vit_view([L1]))


# ---------------------------------------------------------------- HiPrune


def test_interleave_keeps_the_share_in_every_prefix():
    assert interleave([1, 2, 3], [3, 4, 5], 0.5) == [1, 3, 2, 4, 5]
    assert interleave([1, 2], [3, 4], 1.0) == [1, 2, 3, 4]
    order = interleave(list(range(20)), list(range(20, 40)), 0.25)
    for k in range(1, 41):
        # once the second list runs out (k > 20 + 5) the rest comes from the first
        assert sum(i < 20 for i in order[:k]) == max(math.ceil(0.25 * k), k - 20)


def received(k, peak_to):
    """(1, 1, K, K) where every query gives most attention to the keys in ``peak_to`` (descending weight)."""
    row = torch.full((k,), 0.01)
    for rank, key in enumerate(peak_to):
        row[key] = 1.0 - 0.1 * rank
    return (row / row.sum()).expand(1, 1, k, k).clone()


def test_hiprune_anchor_buffer_register_order():
    # 3×3 grid + [CLS]: key 1 + 3r + c. Object layer: centre (1, 1) = key 5; deep layer: corners 1, 3, 7, 9.
    obj = received(10, [5])
    deep = received(10, [9, 1, 3, 7])
    v = vit_view([obj, deep], rows=3, cols=3)
    only_anchor = get_scorer("hiprune", alpha=1.0, object_layer=0)(v)[0, 0]
    order = only_anchor[1:].argsort(descending=True).tolist()
    # anchor (1, 1) then its buffers up (0, 1), down (2, 1), left (1, 0), right (1, 2): keys 5, 2, 8, 4, 6,
    # i.e. patch indices 4, 1, 7, 3, 5
    assert order[:5] == [4, 1, 7, 3, 5]
    half = get_scorer("hiprune", alpha=0.5, object_layer=0)(v)[0, 0]
    # alternate: anchor 5, register 9, buffer 2, register 1, buffer 8, register 3, ...
    assert (half[1:].argsort(descending=True) + 1).tolist()[:6] == [5, 9, 2, 1, 8, 3]
    assert half[0] > half[1:].max()


def test_hiprune_needs_no_cls_but_a_grid():
    v = vit_view([received(4, [0]), received(4, [3])], cls=False)
    s = get_scorer("hiprune", alpha=0.5)(v)  # object layer = 2 // 2 = 1 of 2 layers
    assert s.shape == (1, 1, 4)
    v.patch_coords = None
    with pytest.raises(ValueError, match="patch_coords"):
        get_scorer("hiprune")(v)


@pytest.mark.parametrize("params, match", [
    ({"alpha": 0.0}, r"\(0, 1\]"), ({"alpha": 1.5}, r"\(0, 1\]"), ({"neighbourhood": 6}, "4 or 8"),
    ({"object_layer": 1.5}, "ints"),
])
def test_hiprune_validation(params, match):
    with pytest.raises(ValueError, match=match):
        get_scorer("hiprune", **params)


def test_hiprune_object_layer_out_of_range():
    with pytest.raises(ValueError, match=r"outside \[-2, 1\]"):
        get_scorer("hiprune", object_layer=5)(vit_view([L1, L2]))


# ---------------------------------------------------------------- spatial grid


def spatial_view(rows, cols):
    return vit_view(hidden=torch.zeros(1, 1 + rows * cols, 2), rows=rows, cols=cols)


def top_coords(scores, view, k):
    idx = scores[0, 0].argsort(descending=True)
    picked = [i for i in idx.tolist() if view.patch_coords[i, 0] >= 0][:k]
    return view.patch_coords[picked]


def test_spatial_grid_top4_of_4x4_is_one_per_quadrant():
    v = spatial_view(4, 4)
    s = get_scorer("spatial_grid")(v)
    quadrants = {(int(r) // 2, int(c) // 2) for r, c in top_coords(s, v, 4)}
    assert quadrants == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert s[0, 0, 0] > s[0, 0, 1:].max()  # [CLS] by role


def test_spatial_grid_top16_of_8x8_is_the_stride2_lattice():
    v = spatial_view(8, 8)
    top = top_coords(get_scorer("spatial_grid")(v), v, 16)
    assert {tuple(x) for x in top.tolist()} == {(r, c) for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)}


@pytest.mark.parametrize("k", [2, 3, 5, 7, 10])
def test_spatial_grid_any_prefix_is_spread(k):
    # the top-k is far more spread than the first k in raster order: min pairwise distance ≥ 2 up to k = 16
    v = spatial_view(8, 8)
    top = top_coords(get_scorer("spatial_grid")(v), v, k).float()
    d = torch.cdist(top, top) + torch.eye(k) * 99
    assert d.min() >= 2.0


def test_grid_levels_nest():
    levels = grid_levels(grid_coords(8, 8)).view(8, 8)
    assert levels[5, 5] == 3 and levels[1, 1] == 2 and levels[1, 3] == 1 and levels[0, 0] == 0
    assert (levels[::2] == 0).all() and (levels[:, ::2] == 0).all()


def test_spatial_grid_needs_coordinates():
    v = spatial_view(2, 2)
    v.patch_coords = None
    with pytest.raises(ValueError, match="patch_coords"):
        get_scorer("spatial_grid")(v)


# ---------------------------------------------------------------- DivPrune, ToDRE, DART, G-Prune

ANGLES = [180.0, 0.0, 5.0, 10.0, 90.0, 180.0]  # [CLS] first (its feature is never ranked)


def angle_hidden(angles=ANGLES):
    rad = torch.tensor(angles) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1).unsqueeze(0)  # (1, K, 2)


def line_view(hidden, attention=None):
    k = hidden.shape[1]
    cls = torch.zeros(k, dtype=torch.bool)
    cls[0] = True
    return AttentionView(key_positions=torch.arange(k), query_positions=torch.arange(k), hidden=hidden,
                         attention=attention, roles={"cls": cls, "patch": ~cls},
                         generator=torch.Generator().manual_seed(0))


def ranking(scores):
    return scores[0, 0].argsort(descending=True).tolist()


def test_divprune_picks_the_far_points_first():
    # patches at 0°, 5°, 10°, 90°, 180° (keys 1..5): most isolated 180°, then 0° (opposite), then 90°, then 10°, 5°
    assert ranking(get_scorer("divprune")(line_view(angle_hidden()))) == [0, 5, 1, 4, 3, 2]


def test_divprune_euclidean_and_keys():
    pts = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [5.0, 0.0]]])
    v = line_view(pts)
    # patches at x = 0, 1, 10, 5: most isolated is 10 (nearest 5 away), then 0, then 5, then 1
    assert ranking(get_scorer("divprune", metric="euclidean")(v)) == [0, 3, 1, 4, 2]
    v.keys = pts.unsqueeze(1)  # one head
    assert ranking(get_scorer("divprune", metric="euclidean", feature="keys")(v)) == [0, 3, 1, 4, 2]


@pytest.mark.parametrize("params, match", [({"feature": "values"}, "hidden"), ({"metric": "l1"}, "cosine")])
def test_divprune_validation(params, match):
    with pytest.raises(ValueError, match=match):
        get_scorer("divprune", **params)


def cls_attention_matrix(cls_row):
    k = len(cls_row)
    a = torch.full((1, 1, k, k), 1.0 / k)
    a[0, 0, 0] = torch.tensor(cls_row)
    return a


def test_todre_seeds_at_the_most_relevant_token():
    # [CLS] attends most to 5° (key 2): k-center from there: 180°, then 90°, then 10° vs 0° (both 5° from 5°)
    v = line_view(angle_hidden(), cls_attention_matrix([0.1, 0.1, 0.5, 0.1, 0.1, 0.1]))
    order = ranking(get_scorer("todre", relevance_weight=0.0)(v))
    assert order[:4] == [0, 2, 5, 4]
    # a large weight orders by relevance: the key [CLS] attends to second most comes right after the seed
    v2 = line_view(angle_hidden(), cls_attention_matrix([0.0, 0.1, 0.5, 0.05, 0.3, 0.05]))
    assert ranking(get_scorer("todre", relevance_weight=100.0)(v2))[:4] == [0, 2, 4, 1]


def test_todre_without_relevance_is_divprune():
    v = line_view(angle_hidden(), cls_attention_matrix([0.1, 0.1, 0.5, 0.1, 0.1, 0.1]))
    torch.testing.assert_close(get_scorer("todre", relevance="none")(v), get_scorer("divprune")(v))
    similar = get_scorer("todre", relevance="cls_similarity", relevance_weight=0.0)(v)
    assert ranking(similar)[1] == 5  # [CLS]'s hidden is the 180° vector: the 180° patch is most similar


def test_todre_validation():
    with pytest.raises(ValueError, match="≥ 0"):
        get_scorer("todre", relevance_weight=-1.0)
    with pytest.raises(ValueError, match="cls_attention"):
        get_scorer("todre", relevance="text")


def test_dart_ranks_by_least_duplication_with_the_pivot():
    # patches: (3, 0) the largest norm → pivot; (1, 0.1) duplicates it; (0, 1) is orthogonal; (−1, 0) opposite
    h = torch.tensor([[[0.0, 5.0], [3.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
    s = get_scorer("dart", n_pivots=1, feature="hidden")(line_view(h))
    cos = 1.0 / math.sqrt(1.01)
    torch.testing.assert_close(s, torch.tensor([[[3.0, 2.0, -cos, 0.0, 1.0]]]))
    assert ranking(s) == [0, 1, 4, 3, 2]


def test_dart_two_pivots_take_the_max_duplication():
    h = torch.tensor([[[0.0, 5.0], [3.0, 0.0], [0.0, 2.5], [1.0, 1.0], [-1.0, 0.0]]])
    s = get_scorer("dart", n_pivots=2, feature="hidden")(line_view(h))
    # pivots keys 1, 2; key 3 at 45° has cos 0.707 to both; key 4 has max(−1, 0) = 0
    torch.testing.assert_close(s[0, 0, 3:], torch.tensor([-math.sqrt(0.5), 0.0]))
    random_pivots = get_scorer("dart", n_pivots=2, feature="hidden", pivot_rule="random")
    torch.testing.assert_close(random_pivots(line_view(h)), random_pivots(line_view(h)))  # seeded


@pytest.mark.parametrize("params, match", [
    ({"n_pivots": 0}, "≥ 1"), ({"feature": "query"}, "hidden"), ({"pivot_rule": "first"}, "norm"),
])
def test_dart_validation(params, match):
    with pytest.raises(ValueError, match=match):
        get_scorer("dart", **params)


def test_graph_propagation_matches_the_closed_form():
    h = angle_hidden([30.0, 0.0, 10.0, 20.0, 60.0])
    s = get_scorer("graph_propagation", tol=1e-10, max_iter=1000)(line_view(h))
    unit = torch.nn.functional.normalize(h[0], dim=-1)
    w = (unit @ unit.T).clamp(min=0) * (1 - torch.eye(5))
    p = w / w.sum(dim=-1, keepdim=True)
    d = 0.85
    closed = (1 - d) / 5 * torch.ones(5) @ torch.linalg.inv(torch.eye(5) - d * p)
    torch.testing.assert_close(s[0, 0], closed, atol=1e-5, rtol=1e-5)
    assert abs(float(s.sum()) - 1.0) < 1e-5


def test_graph_propagation_ranks_an_outlier_last():
    # three duplicates at 0°, one token at 90° and [CLS] at −90°: the last two have no edge in (cosine ≤ 0), so they
    # get only the teleport and the dangling mass, equally; the duplicates share the rest
    h = angle_hidden([-90.0, 0.0, 0.0, 0.0, 90.0])
    s = get_scorer("graph_propagation")(line_view(h))
    assert set(ranking(s)[-2:]) == {0, 4}
    torch.testing.assert_close(s[0, 0, 4], s[0, 0, 0])
    torch.testing.assert_close(s[0, 0, 1:4], s[0, 0, 1:2].expand(3))
    assert s[0, 0, 1] > 2 * s[0, 0, 4]


def test_graph_propagation_cls_prior_changes_the_teleport():
    h = angle_hidden([0.0, 0.0, 45.0, 90.0, 135.0])
    v = line_view(h, cls_attention_matrix([0.0, 0.0, 0.0, 0.0, 1.0]))
    uniform = get_scorer("graph_propagation")(v)
    prior = get_scorer("graph_propagation", prior="cls_attention")(v)
    assert prior[0, 0, 4] > uniform[0, 0, 4]


@pytest.mark.parametrize("params, match", [
    ({"damping": 1.0}, r"\(0, 1\)"), ({"tol": 0.0}, "> 0"), ({"max_iter": 0}, "≥ 1"), ({"prior": "text"}, "uniform"),
    ({"feature": "values"}, "hidden"),
])
def test_graph_propagation_validation(params, match):
    with pytest.raises(ValueError, match=match):
        get_scorer("graph_propagation", **params)
