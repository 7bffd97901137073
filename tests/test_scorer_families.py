"""One contract for every family: each registered scorer runs on a causal KV view and on a vision view.

Every scorer (``available_scorers()``, default parameters) must return ``(B, H or 1, K)`` finite scores on both a tiny
causal KV-cache view and a tiny ViT view (1 [CLS] + 8 patches of a 3×3 grid, one patch already pruned), both holding
every capture; the few rules that cannot apply (a [CLS] rule on a decoder, a spatial rule without a patch grid,
SepLLM without separators, an explanation rule that runs the model on a view without one) must raise one clear
``ValueError`` that names what is missing. A second pass gives each
scorer only the captures it declares in ``needs``, so a harness that captures exactly that is enough.
"""

from dataclasses import dataclass

import pytest
import torch

from salience.scorers import AttentionView, available_scorers, get_scorer
from salience.scorers.base import Scorer, register
from salience.selection import to_kv_heads

B, H, D = 2, 2, 4

# rules that run the model themselves (explanation: gradients, occlusion, GlobEnc): a view of captures holds no model
MODEL_ERRORS = {name: "attribution target" for name in available_scorers() if "model" in get_scorer(name).needs}
# scorer → words its error must contain, per view kind; every other scorer must succeed there
KV_ERRORS = {
    "cls_attention": "[CLS]", "multilayer_cls_attention": "[CLS]", "flowcut": "[CLS]",
    "spatial_grid": "patch_coords", "hiprune": "patch_coords", **MODEL_ERRORS,
}
VISION_ERRORS = {"sepllm": "separator", **MODEL_ERRORS}


def _attention(k, causal, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, k, k, generator=g)
    if causal:
        logits = logits.masked_fill(torch.ones(k, k, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def _captures(k, causal):
    g = torch.Generator().manual_seed(1)
    layers = [_attention(k, causal, seed) for seed in range(3)]
    return {
        "attention": layers[-1], "attention_layers": layers, "key_mass": layers[-1].sum(dim=-2),
        "keys": torch.randn(B, H, k, D, generator=g), "values": torch.randn(B, H, k, D, generator=g),
        "hidden": torch.randn(B, k, 2 * D, generator=g),
    }


def kv_view(captures=None):
    k = 6
    sep = torch.tensor([False, False, True, False, False, True])
    base = dict(key_positions=torch.arange(k), query_positions=torch.arange(k),
                visible_queries=torch.arange(k, 0, -1), roles={"separator": sep, "sink": torch.arange(k) < 1},
                generator=torch.Generator().manual_seed(0))
    return AttentionView(**base, **_captures(k, causal=True) if captures is None else captures)


def vision_view(captures=None):
    positions = torch.tensor([0, 1, 2, 3, 4, 6, 7, 8, 9])  # patch 4 (grid (1, 1)) pruned by an earlier stage
    k = positions.numel()
    cls = positions == 0
    flat = positions - 1
    coords = torch.where(cls[:, None], torch.tensor(-1), torch.stack([flat // 3, flat % 3], dim=-1))
    base = dict(key_positions=positions, query_positions=positions, visible_queries=torch.full((k,), k),
                roles={"cls": cls, "patch": ~cls}, patch_coords=coords, generator=torch.Generator().manual_seed(0))
    return AttentionView(**base, **_captures(k, causal=False) if captures is None else captures)


def check(name, view, errors, num_keys):
    scorer = get_scorer(name)
    if name in errors:
        with pytest.raises(ValueError, match=errors[name].replace("[", r"\[").replace("]", r"\]")):
            scorer(view)
        return
    scores = scorer(view)
    assert scores.shape[0] == B and scores.shape[1] in (1, H) and scores.shape[2] == num_keys, scores.shape
    assert torch.isfinite(scores).all() or name == "caote"  # CAOTE scores an un-evictable key +inf by design
    assert not torch.isnan(scores).any()


@pytest.mark.parametrize("name", available_scorers())
def test_every_scorer_on_a_causal_kv_view(name):
    check(name, kv_view(), KV_ERRORS, 6)


@pytest.mark.parametrize("name", available_scorers())
def test_every_scorer_on_a_vision_view(name):
    check(name, vision_view(), VISION_ERRORS, 9)


@pytest.mark.parametrize("name", [n for n in available_scorers() if n not in VISION_ERRORS])
def test_declared_needs_are_enough(name):
    scorer = get_scorer(name)
    full = _captures(9, causal=False)
    view = vision_view({c: full[c] for c in scorer.needs if c in full})
    if view.attention is None and view.key_mass is None and view.keys is None and view.hidden is None:
        view.hidden = full["hidden"]  # attention-free scorers read B from any tensor; a ViT harness always has hidden
    check(name, view, VISION_ERRORS, 9)


def test_instance_needs_follow_the_parameters():
    assert get_scorer("cls_attention").needs == {"attention"}
    assert get_scorer("cls_attention", layer=-2).needs == {"attention_layers"}
    assert get_scorer("divprune", feature="keys").needs == {"keys"}
    assert get_scorer("flowcut", value_weighted=False).needs == {"attention_layers"}
    assert get_scorer("todre", relevance="none").needs == {"hidden"}
    assert get_scorer("spatial_grid").attention_free and not get_scorer("cls_attention").attention_free


def test_every_family_b_scorer_is_registered():
    family_b = {"random", "spatial_grid", "cls_attention", "multilayer_cls_attention", "attention_rollout", "flowcut",
                "hiprune", "accumulated_attention", "divprune", "dart", "todre", "graph_propagation"}
    assert family_b <= set(available_scorers())


def gqa_view():
    """The vision view with 4 query heads over 2 KV heads: a rule's declared head layout becomes a distinct count."""
    full = _captures(9, causal=False)
    g = torch.Generator().manual_seed(3)
    wide = [torch.softmax(torch.randn(B, 2 * H, 9, 9, generator=g), dim=-1) for _ in range(3)]
    return vision_view(dict(full, attention=wide[-1], attention_layers=wide, key_mass=wide[-1].sum(dim=-2)))


@pytest.mark.parametrize("name", [n for n in available_scorers() if n not in VISION_ERRORS])
def test_every_scorer_returns_its_declared_head_layout_on_a_gqa_view(name):
    scorer = get_scorer(name)
    expected = {"query": 2 * H, "kv": H, "shared": 1, "view": 2 * H}[scorer.head_layout]
    assert scorer(gqa_view()).shape[1] == expected


@pytest.mark.parametrize("name", [n for n in available_scorers() if n not in VISION_ERRORS])
def test_every_scorer_reduces_to_kv_heads_by_its_concrete_layout(name):
    scorer, view = get_scorer(name), gqa_view()
    layout = scorer.head_layout_for(view)
    assert layout in ("query", "kv", "shared")
    assert to_kv_heads(scorer(view), layout, H).shape == (B, H, view.num_keys)


def test_a_view_layout_is_resolved_by_what_the_view_carries():
    recency, keys = get_scorer("recency"), torch.randn(B, H, 9, 4)
    positions = torch.arange(9)
    assert recency.head_layout_for(gqa_view()) == "query"
    assert recency.head_layout_for(AttentionView(key_positions=positions, keys=keys)) == "kv"
    hidden_only = AttentionView(key_positions=positions, hidden=torch.randn(B, 9, 4))
    assert recency.head_layout_for(hidden_only) == "shared"
    assert get_scorer("key_norm").head_layout_for(gqa_view()) == "kv"


def test_a_scorer_that_breaks_its_head_layout_is_stopped():
    @dataclass
    class OneRow(Scorer):
        name = "test_one_row_as_query"

        def score(self, view):
            return view.attention.sum(dim=(1, 2)).unsqueeze(1)

    with pytest.raises(RuntimeError, match="head_layout 'query'.*4 row"):
        OneRow()(gqa_view())
    OneRow.head_layout = "shared"
    assert OneRow()(gqa_view()).shape[1] == 1
    OneRow.head_layout = "per head"
    with pytest.raises(TypeError, match="head_layout must be one of"):
        register(OneRow)
    OneRow.head_layout, OneRow.attention_rows = "shared", "first"
    with pytest.raises(TypeError, match="attention_rows must be one of"):
        register(OneRow)
