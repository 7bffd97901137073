"""The attention-vs-gradients pipeline (salience.explanation_tasks and its notebook module) on tiny random models:
the head's accuracy gate, one row per text × method × replacement with finite ERASER metrics, the cached predictor
against the target's own, the readout of the linear head, and bad parameters."""

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer, LlamaConfig, LlamaForCausalLM

from salience import explanation_tasks as tasks
from salience import faithfulness
from salience.experiments import explain_attention_vs_gradients as exp
from salience.params import ParamsError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "fine", "film", "bad", "the", "plot", "is", "dull"]
METHODS = {"raw_attention": dict(scorer="raw_attention"), "attention_rollout": dict(scorer="attention_rollout"),
           "attention_flow": dict(scorer="attention_flow"), "gradient_x_input": dict(scorer="gradient_x_input"),
           "integrated_gradients": dict(scorer="integrated_gradients", n_steps=4, baseline="token",
                                        completeness_tolerance=None),
           "occlusion": dict(scorer="occlusion")}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer(str(path))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, initializer_range=0.3, attn_implementation="eager")
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def head():
    generator = torch.Generator().manual_seed(1)
    return tasks.LinearHead(torch.randn(2, 16, generator=generator), torch.zeros(2), 1.0, 1.0, 10, 10)


def test_the_head_refuses_a_classifier_near_chance():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(80, 8)), rng.integers(0, 2, 80)
    with pytest.raises(ValueError, match="below min_accuracy 90%.*explains nothing"):
        tasks.train_linear_head(features[:60], labels[:60], features[60:], labels[60:], inverse_regularization=1.0,
                                min_accuracy=0.9)
    with pytest.raises(ValueError, match="single class"):
        tasks.train_linear_head(features, np.zeros(80), features, labels, inverse_regularization=1.0,
                                min_accuracy=0.0)


def test_a_separable_head_passes_and_keeps_sklearns_decision():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 100)
    features = rng.normal(size=(100, 4)) + 3.0 * labels[:, None]
    head = tasks.train_linear_head(features[:70], labels[:70], features[70:], labels[70:],
                                   inverse_regularization=1.0, min_accuracy=0.9)
    assert head.test_accuracy >= 0.9 and head.weight.shape == (2, 4) and (head.n_train, head.n_test) == (70, 30)
    predicted = head.logits(torch.as_tensor(features[70:], dtype=torch.float32)).argmax(-1).numpy()
    assert (predicted == labels[70:]).mean() == head.test_accuracy


def test_the_classifier_readout_is_the_heads_probability_of_the_predicted_class(encoder, tokenizer, head):
    target = tasks.classifier_target(encoder, tokenizer, head, "a fine film", max_tokens=16, baseline_token="[MASK]",
                                     output="probability")
    with torch.no_grad():
        hidden = encoder(input_ids=target.input_ids).last_hidden_state.mean(1)
        probabilities = head.logits(hidden).softmax(-1)[0]
        value = target.forward(target.embeddings, target.attention_mask)
    torch.testing.assert_close(value, probabilities.max().reshape(1))


def _classifier_run(encoder, tokenizer, head, texts, flow_max_tokens=64):
    targets = [tasks.classifier_target(encoder, tokenizer, head, t, max_tokens=16, baseline_token="[MASK]",
                                       output="probability") for t in texts]
    how = {"mask": faithfulness.replacement("mask", "[MASK]", tokenizer), "remove": faithfulness.replacement("remove")}
    return tasks.explain_texts(targets, tasks.build_scorers(METHODS), tokenizer, replacements=how,
                               fractions=faithfulness.ERASER_FRACTIONS, seed=0, flow_max_tokens=flow_max_tokens,
                               task="classifier", progress=False)


def test_one_row_per_text_method_and_replacement(encoder, tokenizer, head):
    texts = ["a fine film", "the plot is dull", "a bad bad film is the plot"]
    table, scores = _classifier_run(encoder, tokenizer, head, texts)
    assert len(table) == len(texts) * (len(METHODS) + 1) * 2
    assert set(table.method) == set(METHODS) | {tasks.RANDOM} and set(table.replacement) == {"mask", "remove"}
    assert np.isfinite(table[["comprehensiveness", "sufficiency", "f_full"]].to_numpy()).all()
    # [CLS] and [SEP] are protected: never perturbed nor counted
    assert table.groupby("text").tokens.first().tolist() == [3, 4, 7]
    agreement = tasks.agreement_rows(scores, method="spearman", task="classifier")
    k = len(METHODS) + 1
    assert len(agreement) == len(texts) * k * (k - 1) // 2
    # the same seed gives the same random control; another text draws other numbers
    again, _ = _classifier_run(encoder, tokenizer, head, texts)
    pd.testing.assert_frame_equal(table, again)


def test_flow_is_left_out_of_long_texts(encoder, tokenizer, head):
    table, _ = _classifier_run(encoder, tokenizer, head, ["a fine film", "the plot is dull and the film is bad"],
                               flow_max_tokens=6)
    flows = table[table.method == "attention_flow"]
    assert set(flows.text) == {0}


def test_the_cached_predictor_matches_the_target_and_evaluates_each_variant_once(encoder, tokenizer, head):
    target = tasks.classifier_target(encoder, tokenizer, head, "the plot is dull", max_tokens=16,
                                     baseline_token="[MASK]", output="probability")
    cached = tasks.CachedPredictor(target)
    ids = torch.cat([target.input_ids, target.input_ids, torch.full_like(target.input_ids, 4)])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(cached(ids, mask), target.predictor(0)(ids, mask))
    assert cached.evaluated == 2
    cached(ids[:1], mask[:1])
    assert cached.evaluated == 2


def test_language_model_prefixes_and_targets():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()

    class Split:  # a stand-in tokenizer: one id per character
        def __call__(self, text):
            return type("Encoded", (), {"input_ids": [5 + ord(c) % 7 for c in text]})()

    prefixes = tasks.lm_prefixes(Split(), ["short", "a much longer sentence", "another long sentence"], n=2,
                                 min_tokens=6, max_tokens=10, seed=0)
    assert all(6 <= len(p["ids"]) <= 10 for p in prefixes) and len(prefixes) == 2
    with pytest.raises(ValueError, match="only 2 sentences"):
        tasks.lm_prefixes(Split(), ["short", "a much longer sentence", "another long sentence"], n=3, min_tokens=6,
                          max_tokens=10, seed=0)
    targets = [tasks.lm_target(model, None, p["ids"], p["gold"], baseline_token=0, output="log_probability")
               for p in prefixes]
    methods = {k: v for k, v in METHODS.items() if k != "attention_flow"}
    table, _ = tasks.explain_texts(targets, tasks.build_scorers(methods), None,
                                   replacements={"remove": faithfulness.replacement("remove")}, fractions=[0.1, 0.5],
                                   seed=0, flow_max_tokens=64, task="lm", progress=False)
    assert len(table) == 2 * (len(methods) + 1) and (table.f_full < 0).all()  # log-probabilities


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="no texts"):
        tasks.explain_texts([], {}, None, replacements={"remove": faithfulness.replacement("remove")},
                            fractions=[0.1], seed=0, flow_max_tokens=8, task="x")
    with pytest.raises(ValueError, match="names no scorer"):
        tasks.build_scorers({"raw": {}})
    with pytest.raises(ValueError, match="built-in control"):
        tasks.build_scorers({"random": dict(scorer="random")})


@pytest.mark.parametrize("overrides, message", [
    (dict(replacements=["mask"], judged_replacement="remove"), "judged_replacement"),
    (dict(lm_min_tokens=30, lm_max_tokens=20), "lm_min_tokens"),
    (dict(classifier_min_tokens=50, classifier_max_tokens=40), "classifier_min_tokens"),
    (dict(fractions=[0.0, 0.5]), "fractions"),
    (dict(replacements=["mask", "mask"]), "repeat"),
    (dict(parts={}), "parts"),
    (dict(gradient_methods={"lm": "occlusion"}), "gradient_methods"),
])
def test_bad_params(overrides, message):
    with pytest.raises(ParamsError, match=message):
        exp.Params.defaults(**overrides)


def test_default_params_and_scorer_config():
    params = exp.Params.defaults()
    assert params.fractions == list(faithfulness.ERASER_FRACTIONS)
    assert "attention_flow" in exp.scorer_config(params, "classifier")
    assert "attention_flow" not in exp.scorer_config(params, "lm")
    assert set(tasks.build_scorers(exp.scorer_config(params, "classifier"))) == set(exp.METHODS)


def test_non_converged_integrated_gradients_is_refused_not_judged():
    gaps = pd.DataFrame(dict(task=["classifier"] * 3 + ["lm"] * 3, completeness_gap=[0.1, 0.2, 0.1, 4.0, 5.0, 0.1]))
    ig_everywhere = exp.Params.defaults(gradient_methods={"classifier": "integrated_gradients",
                                                         "lm": "integrated_gradients"})
    with pytest.raises(ValueError, match="not converged on the lm task"):
        exp.check_completeness(gaps, ig_everywhere)
    exp.check_completeness(gaps, exp.Params.defaults())  # the LM judges gradient x input: nothing to refuse
    with pytest.raises(ValueError, match="not converged on the classifier task"):
        exp.check_completeness(gaps, exp.Params.defaults(ig_max_gap=0.05))
