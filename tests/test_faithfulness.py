"""Faithfulness metrics on hand-made models whose answers are known, then on a tiny BERT through its target.

The additive model ``f(ids) = Σ_k w[ids_k]`` (the mask token weighs 0) makes every quantity a sum of weights:
perturbing the top-k tokens removes exactly their weights, so comprehensiveness, sufficiency and both curves can be
written down by hand, and the perfect ranking (the weights themselves) beats its reverse. A model that reads only the
last token makes masking and removal disagree.
"""

import math

import numpy as np
import pytest
import torch
from transformers import BertTokenizer

from salience import faithfulness as fa
from salience.scorers import get_scorer
from salience.scorers.attribution_target import attribution_target, explanation_view

MASK = 0
WEIGHTS = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])  # weight of token id = id
IDS = torch.tensor([[3, 9, 1, 7, 5, 2, 10, 4, 6, 8]])  # 10 tokens, sum 55
PERFECT = WEIGHTS[IDS]
HOW_MASK = fa.Replacement("mask", MASK)
HOW_REMOVE = fa.Replacement("remove")


def additive(ids, mask):
    return (WEIGHTS[ids] * mask).sum(dim=-1)


def last_token(ids, mask):
    last = (mask * torch.arange(ids.shape[1])).argmax(dim=-1)
    return WEIGHTS[ids[torch.arange(ids.shape[0]), last]]


@pytest.mark.parametrize("how", [HOW_MASK, HOW_REMOVE])
def test_aopc_by_hand_on_the_additive_model(how):
    # bins 10% and 50% of 10 tokens: top-1 = {10}, top-5 = {10, 9, 8, 7, 6}
    res = fa.comprehensiveness(additive, IDS, PERFECT, how, fractions=(0.1, 0.5))
    assert res.value == pytest.approx((10 + 40) / 2)
    suff = fa.sufficiency(additive, IDS, PERFECT, how, fractions=(0.1, 0.5))
    assert suff.value == pytest.approx(((55 - 10) + (55 - 40)) / 2)
    assert res.metric is fa.COMPREHENSIVENESS and not res.metric.lower_is_better
    assert suff.metric is fa.SUFFICIENCY and suff.metric.lower_is_better
    reverse = fa.comprehensiveness(additive, IDS, -PERFECT, how, fractions=(0.1, 0.5))
    assert reverse.value == pytest.approx((1 + 15) / 2) and reverse.value < res.value


def test_eraser_defaults_and_the_ceiling_rule():
    assert fa.ERASER_FRACTIONS == (0.01, 0.05, 0.10, 0.20, 0.50)
    # 10 tokens: 1% and 5% → ceil → 1 token each, 10% → 1, 20% → 2, 50% → 5
    res = fa.comprehensiveness(additive, IDS, PERFECT, HOW_MASK)
    assert res.value == pytest.approx((10 + 10 + 10 + 19 + 40) / 5)
    assert res.fractions == fa.ERASER_FRACTIONS
    np.testing.assert_allclose(res.curve[0], [55, 45, 45, 45, 36, 15])


def test_deletion_and_insertion_curves_by_hand():
    dele = fa.deletion_curve(additive, IDS, PERFECT, HOW_MASK, fractions=(0.5, 1.0))
    np.testing.assert_allclose(dele.curve[0], [55, 15, 0])
    assert dele.fractions == (0.0, 0.5, 1.0)
    assert dele.value == pytest.approx(((55 + 15) / 2 * 0.5 + (15 + 0) / 2 * 0.5) / 1.0)
    ins = fa.insertion_curve(additive, IDS, PERFECT, HOW_MASK, fractions=(0.2, 0.6, 1.0))
    np.testing.assert_allclose(ins.curve[0], [19, 45, 55])
    assert ins.value == pytest.approx(((19 + 45) / 2 * 0.4 + (45 + 55) / 2 * 0.4) / 0.8)
    worse = fa.deletion_curve(additive, IDS, -PERFECT, HOW_MASK, fractions=(0.5, 1.0))
    assert worse.value > dele.value and fa.DELETION_AUC.lower_is_better


def test_protected_tokens_are_never_perturbed_nor_counted():
    protected = torch.zeros(10, dtype=torch.bool)
    protected[6] = True  # the token of weight 10
    # 9 candidates: 20% → ceil(1.8) = 2 → {9, 8}
    res = fa.comprehensiveness(additive, IDS, PERFECT, HOW_MASK, fractions=(0.2,), protected=protected)
    assert res.value == pytest.approx(17)
    padded = torch.cat([IDS, torch.tensor([[10, 10]])], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 2)], dim=1).long()
    scores = torch.cat([PERFECT, torch.tensor([[99.0, 99.0]])], dim=1)  # padding scores high, must be ignored
    res = fa.comprehensiveness(additive, padded, scores, HOW_REMOVE, fractions=(0.1,), attention_mask=mask)
    assert res.value == pytest.approx(10)


def test_mask_and_removal_differ_where_position_matters_and_both_are_reported():
    ids = torch.tensor([[2, 5, 9]])
    scores = torch.tensor([[0.0, 0.0, 1.0]])  # the last token ranks first
    # masking the last token: f = w[MASK] = 0 → 9 − 0; removing it: the new last token is 5 → 9 − 5
    results, differ = fa.across_replacements(fa.comprehensiveness, last_token, ids, scores, [HOW_MASK, HOW_REMOVE],
                                             fractions=(0.3,))
    assert [r.value for r in results] == pytest.approx([9.0, 4.0]) and differ
    assert [r.replacement for r in results] == ["mask:0", "remove"]
    results, differ = fa.across_replacements(fa.comprehensiveness, additive, IDS, PERFECT, [HOW_MASK, HOW_REMOVE])
    assert not differ


def test_rank_agreement_by_hand():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[1.0, 2.0, 4.0, 3.0]])
    # one swapped pair of six: tau = (5 − 1) / 6; Spearman 1 − 6·Σd² / (n(n² − 1)) = 1 − 12 / 60
    assert fa.rank_agreement(a, b, "kendall").value == pytest.approx(2 / 3)
    assert fa.rank_agreement(a, b, "spearman").value == pytest.approx(0.8)
    assert fa.rank_agreement(a, -a).value == pytest.approx(-1.0)
    both = fa.rank_agreement(torch.cat([a, a]), torch.cat([a, b])[:, None], "spearman")  # (B, 1, K) accepted
    assert both.value == pytest.approx(0.9) and both.metric is fa.SPEARMAN and both.metric.best_value == 1.0
    # the protected first token is left out: the rest agree perfectly
    c = torch.tensor([[9.0, 2.0, 3.0, 4.0]])
    assert fa.rank_agreement(a, c, protected=torch.tensor([True, False, False, False])).value == pytest.approx(1.0)


def test_result_rows_carry_the_metadata():
    row = fa.comprehensiveness(additive, IDS, PERFECT, HOW_MASK).row()
    assert row["comprehensiveness"] == pytest.approx(17.8) and row["metric_family"] == "faithfulness"
    assert row["replacement"] == "mask:0" and row["fractions"] == "0.01,0.05,0.1,0.2,0.5"
    assert row["lower_is_better"] is False and row["n_examples"] == 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("fractions", [(0.0,), (1.5,), (-0.1, 0.5), (float("nan"),), ()])
def test_fractions_outside_zero_one(fractions):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fa.comprehensiveness(additive, IDS, PERFECT, HOW_MASK, fractions=fractions)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fa.deletion_curve(additive, IDS, PERFECT, HOW_MASK, fractions=fractions)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "fine", "film"]) + "\n")
    return BertTokenizer(str(path))


def test_baseline_token_must_be_known(tokenizer):
    assert fa.replacement("mask", tokenizer=tokenizer) == fa.Replacement("mask", 4)  # [MASK] by default
    assert fa.replacement("mask", "[PAD]", tokenizer) == fa.Replacement("mask", 0)
    with pytest.raises(ValueError, match=r"'\[FOO\]' is not in the tokenizer's vocabulary"):
        fa.replacement("mask", "[FOO]", tokenizer)
    with pytest.raises(ValueError, match="id 8 is unknown to the tokenizer"):
        fa.replacement("mask", 8, tokenizer)
    with pytest.raises(ValueError, match="one of \\('mask', 'remove'\\)"):
        fa.replacement("blank")
    with pytest.raises(ValueError, match="needs a baseline token_id"):
        fa.Replacement("mask")


def test_empty_inputs_and_removing_everything():
    with pytest.raises(ValueError, match="no token to perturb"):
        fa.comprehensiveness(additive, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0), HOW_MASK)
    with pytest.raises(ValueError, match="no token to perturb"):
        fa.sufficiency(additive, IDS, PERFECT, HOW_MASK, protected=torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty input.*protect a token"):
        fa.deletion_curve(additive, IDS, PERFECT, HOW_REMOVE)
    with pytest.raises(ValueError, match="scores must be"):
        fa.comprehensiveness(additive, IDS, PERFECT[:, :5], HOW_MASK)


# ---------------------------------------------------------------- a real (tiny) model through its target


def test_an_attribution_target_is_a_predictor(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=2,
                                                     initializer_range=0.3, attn_implementation="eager")).eval()
    target = attribution_target(model, text=["a fine film film", "fine film"], tokenizer=tokenizer)
    view = explanation_view(target, tokenizer=tokenizer)
    scores = get_scorer("occlusion", replacement="zeros")(view)
    how = fa.replacement("mask", tokenizer=tokenizer)
    protected = view.roles["cls"] | (target.input_ids[0] == tokenizer.sep_token_id)
    res = fa.comprehensiveness(target, target.input_ids, scores, how, fractions=(0.5,),
                               attention_mask=target.attention_mask, protected=protected)
    with torch.no_grad():
        full = target.forward(target.embeddings, target.attention_mask)
    np.testing.assert_allclose(res.curve[:, 0], full.numpy(), rtol=1e-5)
    # example 0 ("a fine film film"): 4 candidates → the top 2 masked, checked against the model directly
    top = torch.argsort(-scores[0, 0].masked_fill(protected, -math.inf), stable=True)[:2]
    masked = target.input_ids[:1].clone()
    masked[0, top] = tokenizer.mask_token_id
    expected = full[0] - target.predictor(0)(masked, target.attention_mask[:1])[0]
    assert res.per_example[0] == pytest.approx(float(expected), rel=1e-5)
