"""Cross-attention vs saliency in speech-to-text (salience.speech_relevance): the correlation helpers by hand, and on
a tiny random Whisper the cross-attention rows and the batched saliency against per-token autograd."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from salience.experiments import speech_cross_attention as exp
from salience.params import ParamsError
from salience.speech_relevance import (TokenMaps, alignment_prior, cross_attention_maps, map_correlations,
                                       pearson_rows, predicting_rows, saliency_maps)


@pytest.fixture(scope="module")
def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=50365, d_model=8, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_mel_bins=80,
                           max_source_positions=1500, max_target_positions=64, attn_implementation="eager")
    return WhisperForConditionalGeneration(config).eval()


def test_pearson_rows_and_the_alignment_prior():
    a = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    b = np.array([[2.0, 4.0, 6.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    r = pearson_rows(a, b)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and np.isnan(r[2])
    prior = alignment_prior(4, 44)  # centres at (j + 0.5) / 4 of 44 frames: 5.5, 16.5, 27.5, 38.5 (frame i is i + 0.5)
    assert prior.shape == (4, 44) and list(prior.argmax(1)) == [5, 16, 27, 38]
    with pytest.raises(ValueError):
        alignment_prior(0, 10)


def test_map_correlations_reward_the_aggregation_that_matches():
    rng = np.random.default_rng(123)  # not the noise row's seed 0
    n, frames = 5, 60
    saliency = rng.random((n, frames))
    # 2 layers x 3 heads: each head is the saliency plus strong independent noise; their mean is closer to it
    attention = saliency[None, None] + 2.0 * rng.random((2, 3, n, frames))
    r = map_correlations(TokenMaps(list(range(n)), attention, saliency), seed=0)
    assert set(r) == {"head_mean", "layer_0", "layer_1", "all_layers_heads", "alignment_prior", "noise"}
    assert (r["all_layers_heads"] > r["head_mean"]).all()  # 6 heads averaged against one at a time
    assert r["all_layers_heads"].mean() > r["layer_1"].mean()  # against 3 heads averaged: on average
    assert abs(r["noise"].mean()) < 0.3


def test_cross_attention_rows_are_the_predicting_rows(tiny_whisper):
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    tokens = [100, 200, 300]
    maps = cross_attention_maps(tiny_whisper, features, tokens, speech_frames=50)
    assert maps.shape == (2, 2, 3, 50)
    ids = torch.tensor([[50257, 50362, *tokens]])
    with torch.no_grad():
        out = tiny_whisper(input_features=features, decoder_input_ids=ids, output_attentions=True)
    np.testing.assert_allclose(maps[1, 0, 2], out.cross_attentions[1][0, 0, predicting_rows(3)[2], :50].double())
    # handing over the encoder's output (the encoder not run again) gives the same maps, bit for bit
    with torch.no_grad():
        hidden = tiny_whisper.model.encoder(features).last_hidden_state
    calls = []
    hook = tiny_whisper.model.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        reused = cross_attention_maps(tiny_whisper, features, tokens, 50, encoder_hidden=hidden)
    finally:
        hook.remove()
    assert not calls, "the encoder ran again although its output was handed over"
    np.testing.assert_array_equal(reused, maps)


def test_batched_saliency_is_each_tokens_own_gradient(tiny_whisper):
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(2))
    tokens = [100, 200, 300, 400, 500]
    got = saliency_maps(tiny_whisper, features, tokens, speech_frames=30, chunk=2)  # chunks of 2, 2, 1
    ids = torch.tensor([[50257, 50362, *tokens]])
    for j in (0, 3, 4):
        x = features.clone().requires_grad_(True)
        logp = tiny_whisper(input_features=x, decoder_input_ids=ids).logits[0, 1 + j].log_softmax(-1)[tokens[j]]
        (grad,) = torch.autograd.grad(logp, x)
        per_mel = (grad * features).abs().sum(1)[0, :60].reshape(30, 2).sum(-1).double().numpy()
        np.testing.assert_allclose(got[j], per_mel, rtol=1e-4, atol=1e-9)


def test_judge_on_synthetic_correlations():
    params = exp.Params.defaults()
    rng = np.random.default_rng(0)
    rows = []
    for unit in range(16):
        for token in range(6):
            for variant, level in (("head_mean", 0.3), ("layer_0", 0.35), ("layer_3", 0.4), ("all_layers_heads", 0.5),
                                   ("alignment_prior", 0.2), ("noise", 0.0)):
                rows.append(dict(utterance=unit, token=token, variant=variant, r=level + 0.05 * rng.standard_normal()))
    claim = exp.judge_claim(pd.DataFrame(rows), params, layers=4)
    assert {p.id: p.verdict for p in claim.parts} == {
        "captures_only_part": "supported", "aggregated_beats_single_heads": "supported",
        "aggregated_beats_last_layer": "supported", "aggregated_beats_alignment_prior": "supported"}
    summary = exp.variant_table(pd.DataFrame(rows), params)
    assert list(summary.variant)[:1] == ["head_mean"] and (summary.utterances == 16).all()


@pytest.mark.parametrize("overrides, message", [
    (dict(min_words=10, max_words=5), "min_words"),
    (dict(partial_bound=1.5), "partial_bound"),
    (dict(parts={}), "parts"),
])
def test_bad_params(overrides, message):
    with pytest.raises(ParamsError, match=message):
        exp.Params.defaults(**overrides)
