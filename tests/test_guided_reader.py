"""The question-conditioned reader (salience.guided_reader) and guided-visual-pruning's parameters: grids, questions,
pruning that really drops tokens, each rule's choice on hand-made attention, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from salience.experiments import guided_visual_pruning as exp
from salience.guided_reader import (RULES, TEXT_TOKENS, QuestionReader, digit_grids, load_reader,
                                    pruned_answer, quadrant_of_patches, question_tokens, rule_scores, save_reader,
                                    train_reader)
from salience.params import ParamsError
from salience.validation import check_keep


def test_grids_place_each_digit_in_its_quadrant():
    images = np.stack([np.full((2, 2), i, dtype=np.uint8) for i in range(6)])
    grids, labels = digit_grids(images, np.arange(6), n=3, seed=0)
    assert grids.shape == (3, 4, 4) and labels.shape == (3, 4)
    for g in range(3):
        for q in range(4):
            r, c = divmod(q, 2)
            assert (grids[g, 2 * r:2 * r + 2, 2 * c:2 * c + 2] == labels[g, q]).all()
        assert len(set(labels[g])) == 4  # four distinct source digits


def test_questions_and_quadrants():
    assert question_tokens("bottom-right") == question_tokens(3) != question_tokens(0)
    quads = quadrant_of_patches((4, 4)).view(4, 4)
    assert quads[0, 0] == 0 and quads[0, 3] == 1 and quads[3, 0] == 2 and quads[3, 3] == 3
    for bad in (4, -1, "middle", "top"):
        with pytest.raises(ValueError, match="no quadrant"):
            question_tokens(bad)
    with pytest.raises(ValueError, match="even sides"):
        quadrant_of_patches((3, 4))


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.5])
def test_kept_share_outside_unit_interval_is_an_error(keep):
    with pytest.raises(ValueError, match=r"keep ratio must lie in \(0, 1\]"):
        check_keep(keep)


def _reader(patches=16):
    torch.manual_seed(0)
    return QuestionReader(feature_dim=8, patches=patches, dim=16, heads=2, layers=3).eval()


@pytest.mark.parametrize("rule", RULES)
def test_pruning_really_drops_tokens(rule):
    reader, b = _reader(), 5
    feats, question = torch.randn(b, 16, 8), torch.tensor([question_tokens(q % 4) for q in range(b)])
    with torch.no_grad():
        res = pruned_answer(reader, feats, question, torch.rand(b, 16), rule, 0.25, layer=1, grid=(4, 4), seed=3)
    assert res.kept.shape == (b, 4) and res.tokens_per_block == [TEXT_TOKENS + 16, TEXT_TOKENS + 4, TEXT_TOKENS + 4]
    assert res.logits.shape == (b, 10)
    assert (res.kept.diff(dim=-1) > 0).all()  # distinct, in raster order


def test_keeping_everything_is_the_unpruned_reader():
    reader = _reader()
    feats, question = torch.randn(3, 16, 8), torch.tensor([question_tokens(q) for q in range(3)])
    with torch.no_grad():
        full = reader(feats, question)
        res = pruned_answer(reader, feats, question, torch.rand(3, 16), "random", 1.0, layer=1, grid=(4, 4))
    assert torch.allclose(full, res.logits, atol=1e-5)


def test_rules_on_hand_made_attention():
    b, p, n = 2, 16, TEXT_TOKENS + 16
    probs = torch.zeros(b, 1, n, n)
    probs[:, :, :TEXT_TOKENS, TEXT_TOKENS + 5] = 1.0  # every question token looks at patch 5 only
    probs[:, :, 0, TEXT_TOKENS + 9] = 0.5  # [ASK] also at patch 9, less
    question = torch.tensor([question_tokens(0), question_tokens(3)])
    g = torch.Generator().manual_seed(0)
    quads = quadrant_of_patches((4, 4))
    for rule in ("question_attention", "text_raters"):
        assert rule_scores(rule, probs, question, torch.zeros(b, p), quads, (4, 4), g).argmax(-1).tolist() == [5, 5]
    cls = torch.arange(p, dtype=torch.float).expand(b, p)
    assert rule_scores("cls_attention", probs, question, cls, quads, (4, 4), g).argmax(-1).tolist() == [15, 15]
    oracle = rule_scores("asked_quadrant", probs, question, cls, quads, (4, 4), g)
    top4 = oracle.topk(4, dim=-1).indices
    assert (quads[top4[0]] == 0).all() and (quads[top4[1]] == 3).all()
    wrong = rule_scores("wrong_quadrant", probs, question, cls, quads, (4, 4), g).topk(4, dim=-1).indices
    assert (quads[wrong[0]] != 0).all() and (quads[wrong[1]] != 3).all()
    grid_top4 = rule_scores("spatial_grid", probs, question, cls, quads, (4, 4), g).topk(4, dim=-1).indices[0]
    assert sorted(quads[grid_top4].tolist()) == [0, 1, 2, 3]  # one patch per quadrant
    with pytest.raises(ValueError, match="unknown rule"):
        rule_scores("fastest", probs, question, cls, quads, (4, 4), g)


def test_reader_learns_a_quadrant_lookup():
    # features carry the digit of their quadrant as a one-hot in the first 10 dims: the reader must read the asked one
    torch.manual_seed(0)
    g = 200
    labels = torch.randint(0, 10, (g, 4))
    quads = quadrant_of_patches((4, 4))
    feats = torch.nn.functional.one_hot(labels[:, quads], 10).float() + 0.05 * torch.randn(g, 16, 10)
    reader = train_reader(feats, labels, dim=32, heads=2, layers=2, epochs=40, lr=3e-3, batch_size=64, seed=0,
                          progress=False)
    with torch.no_grad():
        acc = np.mean([(reader(feats, torch.tensor([question_tokens(q)]).expand(g, -1)).argmax(-1) == labels[:, q])
                       .float().mean().item() for q in range(4)])
    assert acc > 0.9, acc


def test_stored_reader_answers_as_the_trained_one_and_refuses_other_settings(tmp_path):
    torch.manual_seed(0)
    reader = QuestionReader(10, 16, dim=16, heads=2, layers=2).double()
    training = dict(model="m", seed=0, dim=16, heads=2, layers=2, patches=16, feature_dim=10, epochs=3)
    path = save_reader(reader, tmp_path / "r.pt", training, train_accuracy=0.5)
    loaded, made = load_reader(path, training)
    feats, question = torch.randn(5, 16, 10, dtype=torch.float64), torch.tensor([question_tokens(1)] * 5)
    with torch.no_grad():
        assert torch.equal(loaded(feats, question), reader.eval()(feats, question))
    assert made == {"train_accuracy": 0.5}
    with pytest.raises(ValueError, match=r"epochs: stored 3, asked 4.*reader: train"):
        load_reader(path, {**training, "epochs": 4})
    with pytest.raises(FileNotFoundError, match="reader: train"):
        load_reader(tmp_path / "missing.pt", training)


@pytest.mark.parametrize("override, message", [
    (dict(reader="no/such/reader.pt"), "neither 'train' nor a file"),
    (dict(prune_layer=3), "prune_layer"),
    (dict(image_size=126), "odd patch grid"),
    (dict(judged_keeps=[0.3]), "not in keeps"),
    (dict(keeps=[0.5, 0.0]), r"\(0, 1\]"),
])
def test_bad_parameters_are_one_clear_error(override, message):
    with pytest.raises(ParamsError, match=message):
        exp.Params.defaults(**override)


def test_gate_refuses_a_reader_that_does_not_read_the_asked_quadrant():
    import pandas as pd

    params = exp.Params.defaults()
    rows = []
    for qid in range(40):
        rows.append(dict(question=qid, rule="unpruned", keep=1.0, correct=True, p_true=0.9))
        for rule in ("asked_quadrant", "wrong_quadrant"):
            rows.append(dict(question=qid, rule=rule, keep=0.25, correct=False, p_true=0.5 + 0.01 * (qid % 3)))
    with pytest.raises(ValueError, match="fails its gate"):
        exp.judge_claim(pd.DataFrame(rows), params)
