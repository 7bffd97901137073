"""The Whisper frame-pruning harness (salience.harness.whisper_pruning) and the speech data behind the notebook
``guided-whisper-pruning``: exact frame counts, scorer shapes and orderings on hand-made inputs, bad-input errors, a
tiny random Whisper proving the decoder reads only the kept frames, and (with espeak-ng) one real utterance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from salience.data.speech import espeak_available, speech_sentences, synthesize, to_16k_mono
from salience.experiments import guided_whisper_pruning as exp
from salience.harness import whisper_pruning as wp
from salience.params import ParamsError


# --------------------------------------------------------------------------------------------- pruning and scores
@pytest.mark.parametrize("share", [1.0, 0.5, 0.25, 0.1, 0.05, 0.001])
def test_prune_keeps_exactly_the_requested_frames(share):
    hidden = torch.arange(wp.N_FRAMES, dtype=torch.float32)[None, :, None].repeat(2, 1, 3)  # row value = frame index
    k = wp.kept_count(share)
    assert k == max(1, round(share * wp.N_FRAMES))
    idx = np.random.default_rng(0).choice(wp.N_FRAMES, size=k, replace=False)
    kept = wp.prune(hidden, idx)
    assert kept.shape == (2, k, 3)
    assert kept[0, :, 0].long().tolist() == sorted(idx.tolist())  # the very frames asked for, in time order


def test_prune_rejects_bad_indices():
    hidden = torch.zeros(1, wp.N_FRAMES, 4)
    for bad in ([], [3, 3], [-1], [wp.N_FRAMES]):
        with pytest.raises(ValueError):
            wp.prune(hidden, np.array(bad, dtype=np.int64))


def test_top_k_orders_by_score_and_breaks_ties_by_time():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.0, 0.5])
    assert wp.top_k_indices(scores, 1).tolist() == [1]
    assert wp.top_k_indices(scores, 2).tolist() == [1, 3]
    assert wp.top_k_indices(scores, 3).tolist() == [1, 2, 3]  # 2 beats 5 at equal score: earlier frame
    with pytest.raises(ValueError):
        wp.top_k_indices(scores, 0)


def test_energy_scores_one_value_per_frame_and_finds_the_loud_segment():
    rng = np.random.default_rng(0)
    audio = 0.01 * rng.standard_normal(5 * wp.SAMPLING_RATE).astype(np.float32)  # 5 s of quiet noise
    loud = slice(2 * wp.SAMPLING_RATE, 2 * wp.SAMPLING_RATE + 10 * wp.FRAME_SAMPLES)  # frames 100..109
    audio[loud] = 0.5 * np.sin(np.arange(10 * wp.FRAME_SAMPLES) * 0.3)
    energy = wp.frame_energy(audio)
    assert energy.shape == (wp.N_FRAMES,)
    assert wp.top_k_indices(energy, 10).tolist() == list(range(100, 110))
    assert (energy[wp.speech_frames(audio.size):] == 0).all() and (energy[:250] > 0).all()  # padding scores 0


def test_uniform_sampling_is_evenly_spaced():
    assert np.diff(wp.uniform_indices(150)).tolist() == [10] * 149
    assert wp.uniform_indices(150)[0] == 5
    assert wp.uniform_indices(wp.N_FRAMES).tolist() == list(range(wp.N_FRAMES))
    for k in (1, 7, 75, 333, 1499):
        idx = wp.uniform_indices(k)
        assert idx.size == k and np.unique(idx).size == k and idx.min() >= 0 and idx.max() < wp.N_FRAMES
        assert np.ptp(np.diff(idx)) <= 1 if k > 1 else True


def test_speech_span_oracle_stays_in_the_audio():
    samples = 200 * wp.FRAME_SAMPLES - 7  # 200 frames hold audio, the last one partly
    assert wp.speech_frames(samples) == 200
    inside = wp.speech_span_indices(samples, 50)
    assert inside.size == 50 and inside.max() < 200 and np.diff(inside).tolist() == [4] * 49
    beyond = wp.speech_span_indices(samples, 300)
    assert beyond.tolist() == list(range(300))


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("share", [0, 0.0, -0.1, 1.01, 2, float("nan"), "0.5", True])
def test_kept_share_outside_zero_one_is_an_error(share):
    with pytest.raises(ValueError, match="kept share"):
        wp.kept_count(share)


def test_bad_kept_share_in_the_parameters_fails_before_anything_runs():
    with pytest.raises(ParamsError, match="kept share"):
        exp.Params.defaults(kept_shares=[0.5, 0.0])
    with pytest.raises(ParamsError, match="kept share"):
        exp.Params.defaults(kept_shares=[1.5])


@pytest.mark.parametrize("audio, rate, message", [
    (np.zeros(0, dtype=np.float32), 16_000, "empty"),
    (np.zeros((16_000, 2), dtype=np.float32), 16_000, "mono"),
    (np.zeros(22_050, dtype=np.float32), 22_050, "16000 Hz"),
    (np.zeros(31 * 16_000, dtype=np.float32), 16_000, "30 s"),
    (np.full(100, np.nan, dtype=np.float32), 16_000, "NaN"),
])
def test_bad_audio_is_one_clear_error(audio, rate, message):
    with pytest.raises(ValueError, match=message):
        wp.check_audio(audio, rate)
    with pytest.raises(ValueError, match=message):
        wp.log_mel(None, audio, rate)  # checked before the feature extractor is touched


def test_resampling_to_16k():
    audio = np.sin(np.arange(22_050) * 2 * np.pi * 440 / 22_050).astype(np.float32)  # 1 s at 22.05 kHz
    out = to_16k_mono(audio, 22_050)
    assert out.shape == (16_000,) and out.dtype == np.float32
    with pytest.raises(ValueError, match="mono"):
        to_16k_mono(np.zeros((10, 2)), 22_050)


def test_wer_normalisation():
    assert exp.word_error_rate("Self-governed societies, based on it.", "self governed Societies based on it") == 0
    assert exp.word_error_rate("one two three four", "one two four") == 0.25
    assert exp.word_error_rate("one two", "") == 1.0
    with pytest.raises(ValueError):
        exp.word_error_rate("...", "anything")


# --------------------------------------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def tiny_whisper():
    """A random Whisper with the real vocabulary and 1500 encoder positions, small enough to run in a second."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=51864, d_model=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=1500, max_target_positions=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=50256, suppress_tokens=[1, 2], begin_suppress_tokens=[220])
    return model


def test_decoder_reads_exactly_the_kept_frames(tiny_whisper):
    features = torch.randn(1, 80, 3000)
    hidden, received = wp.encode(tiny_whisper, features, [0, 1])
    assert hidden.shape == (1, wp.N_FRAMES, 16) and received.shape == (wp.N_FRAMES,)
    assert math.isclose(received.sum(), 1.0, rel_tol=1e-4)  # attention received, averaged over the queries
    full = wp.greedy_decode(tiny_whisper, hidden, 5, guide_steps=3)
    assert full.cross_keys == wp.N_FRAMES and full.guide.shape == (1, wp.N_FRAMES)
    assert np.allclose(full.guide.sum(1), 1.0, atol=1e-4)  # a mean of softmax rows over the frames
    for k in (750, 75, 1):
        idx = wp.top_k_indices(full.guide[0], k)
        out = wp.greedy_decode(tiny_whisper, wp.prune(hidden.repeat(3, 1, 1), idx), 4)
        assert out.cross_keys == k and len(out.tokens) == 3 and out.steps <= 4
        assert all(1 not in row and 2 not in row for row in out.tokens)  # suppressed tokens never appear


# --------------------------------------------------------------------------------------------- real speech
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng)")


@needs_espeak
def test_sentences_and_synthesis():
    texts = speech_sentences(5, seed=0)
    assert len(set(texts)) == 5 and all(6 <= len(t.split()) <= 20 for t in texts)
    audio = synthesize(texts[:1])[0]
    assert audio.ndim == 1 and audio.dtype == np.float32 and 0.5 * wp.SAMPLING_RATE < audio.size < wp.WINDOW_SAMPLES
    assert wp.check_audio(audio, wp.SAMPLING_RATE) is not None


@needs_espeak
def test_real_utterance_unpruned_gives_low_wer():
    from salience.models import load_model

    bundle = load_model("whisper-tiny.en")
    text = "The quick brown fox jumps over the lazy dog."
    audio = synthesize([text], voice="en", speed=175)[0]  # espeak-ng's own defaults, as in tests/test_models.py
    hidden, _ = wp.encode(bundle.model, wp.log_mel(bundle.processor.feature_extractor, audio), [3])
    out = wp.greedy_decode(bundle.model, hidden, 24)
    hypothesis = bundle.processor.tokenizer.decode(out.tokens[0], skip_special_tokens=True)
    assert exp.word_error_rate(text, hypothesis) <= 0.2, hypothesis
    assert out.cross_keys == wp.N_FRAMES
