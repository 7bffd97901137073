"""centrality-lexrank's parameters, sentence graphs from a model (tiny random models) and the per-article pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from salience.experiments import centrality_lexrank as exp
from salience.models import ModelBundle
from salience.params import ParamsError
from salience.sentence_graphs import attention_sentence_graph, sentence_windows


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


def _tiny_lm(attn: str) -> ModelBundle:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()
    return ModelBundle("tiny-llama", model, _CharTokenizer(), "causal-lm", "test")


def test_sentence_windows_group_whole_sentences():
    assert sentence_windows([3, 4, 2, 9, 1], window=7) == [[0, 1], [2], [3], [4]]
    with pytest.raises(ValueError, match="window"):
        sentence_windows([1], window=1)


def test_attention_graph_is_symmetric_without_self_links_or_cross_window_edges():
    sentences = ["The cat sat.", "A dog ran off.", "Rain fell.", "It stopped at noon."]
    graph = attention_sentence_graph(_tiny_lm("eager"), sentences, window=30)
    windows = sentence_windows([len(" " + s) for s in sentences], 30)
    assert np.allclose(graph, graph.T) and (graph >= 0).all() and np.allclose(np.diag(graph), 0.0)
    same = np.zeros_like(graph, dtype=bool)
    for w in windows:
        same[np.ix_(w, w)] = True
    assert len(windows) > 1 and np.allclose(graph[~same], 0.0) and graph[same & ~np.eye(4, dtype=bool)].min() >= 0
    # a causal row's attention shares are at most 1 (the sink and the sentence itself are left out)
    assert (graph[same] <= 2.0 + 1e-6).all()


def test_attention_graph_under_sdpa_names_the_switch():
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        attention_sentence_graph(_tiny_lm("sdpa"), ["One.", "Two."], window=16)


@pytest.mark.parametrize("override, message", [
    (dict(threshold=0.25), "must be one of thresholds"),
    (dict(thresholds=[0.1, 1.0]), r"threshold must lie in \[0, 1\)"),
    (dict(threshold=-0.1, thresholds=[-0.1]), r"threshold must lie in \[0, 1\)"),
    (dict(min_body_sentences=100), "max_sentences"),
    (dict(metric="rouge3"), "rouge1"),
    (dict(parts={"lexrank_beats_centroid": {"direction": "better", "smallest_effect": 0.01}}), "part"),
])
def test_bad_parameters_are_one_clear_error(override, message):
    with pytest.raises(ParamsError, match=message):
        exp.Params.defaults(**override)


def test_too_many_articles_is_a_clear_error():
    with pytest.raises(ValueError, match="only .* articles"):
        exp.load_articles(exp.Params.defaults(articles=500))


def test_pipeline_on_three_articles_has_every_row_and_the_budget():
    params = exp.Params.defaults(articles=3, embedding_model=None, attention_model=None, random_replicates=2)
    articles, idf = exp.load_articles(params)
    table = exp.evaluate(articles, idf, params, progress=False)
    budget = table[table.variant == "budget"]
    expected = {"centroid", "continuous_lexrank", "lead", "oracle", "random", "full_pool",
                *(exp.method_id(k, t) for k in ("degree", "lexrank") for t in params.thresholds)}
    assert set(budget.method) == expected and budget.groupby("method").size().eq(3).all()
    scored = budget[~budget.method.isin(["random", "full_pool"])]
    assert (scored.words == params.budget_words).all()
    # the oracle is the best row on ROUGE-1 recall + ROUGE-2 recall on average, the full pool the highest recall
    mean = budget.groupby("method")[["rouge1_recall", "rouge2_recall"]].mean().sum(1)
    assert mean.drop("full_pool").idxmax() == "oracle"
    assert budget.groupby("method").rouge1_recall.mean().idxmax() == "full_pool"
    claim = exp.judge_claim(table, params)
    assert [p.id for p in claim.parts] == [s.id for s in exp.JUDGED] and all(p.n == 3 for p in claim.parts)
