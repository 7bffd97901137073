"""Pruning Whisper's encoder frames before the decoder reads them, and decoding from what is left.

Whisper [@whisper] pads every input to 30 s: 3000 log-mel frames, which the encoder's stride-2 convolution turns into
:data:`N_FRAMES` = 1500 encoder positions of 20 ms (:data:`FRAME_SAMPLES` = 320 samples at 16 kHz). The decoder reads
them only through cross-attention, so dropping rows of ``encoder_hidden_states`` removes them from every decoding
step (their positional embedding was added at the encoder's input, so the kept rows keep their time stamps).

Frame scores, one per encoder position, higher = keep first:

* :func:`cross_attention_received`: the decoder's cross-attention of its first ``m`` decoding steps over all 1500
  frames (FastV's text-guided rule [@fastv]: a first pass reads everything, its attention picks what to keep);
* :func:`self_attention_received`: encoder self-attention each frame receives, averaged over queries, heads and
  the chosen layers (text-free, FasterVLM-style [@fastervlm]; Whisper's encoder has no [CLS]);
* :func:`frame_energy`: RMS of the waveform in each 20 ms frame (a voice-activity stand-in; padding is 0);
* :func:`uniform_indices` and seeded random choices are index sets, not scores.

:func:`greedy_decode` decodes a batch of pruned encoder outputs with the model's own suppress lists and asserts that
the decoder's cross-attention keys number exactly the kept frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

SAMPLING_RATE = 16_000
N_FRAMES = 1500
FRAME_SAMPLES = 320  # 20 ms at 16 kHz: 30 s / 1500 encoder positions
WINDOW_SAMPLES = N_FRAMES * FRAME_SAMPLES  # Whisper's 30 s window
PROMPT = (50257, 50362)  # <|startoftranscript|> <|notimestamps|> of the English-only checkpoints


def check_audio(audio, sampling_rate: int) -> np.ndarray:
    """Return ``audio`` as float32 of shape (samples,) or raise ValueError: it must be 16 kHz, mono (1-D), non-empty,
    finite and at most 30 s long (one Whisper window)."""
    if sampling_rate != SAMPLING_RATE:
        raise ValueError(f"audio must be sampled at {SAMPLING_RATE} Hz, got {sampling_rate} Hz: resample it first")
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono, shape (samples,), got shape {audio.shape}: mix the channels down")
    if audio.size == 0:
        raise ValueError("audio is empty: nothing to transcribe")
    if audio.size > WINDOW_SAMPLES:
        raise ValueError(f"audio has {audio.size} samples, more than one 30 s window ({WINDOW_SAMPLES})")
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples")
    return audio.astype(np.float32)


def check_kept_share(share: float) -> float:
    """A kept share must lie in (0, 1]; ValueError otherwise."""
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.0 < float(share) <= 1.0:
        raise ValueError(f"kept share must lie in (0, 1], got {share!r}")
    return float(share)


def kept_count(share: float, n: int = N_FRAMES) -> int:
    """Frames kept at ``share`` of ``n``: ``round(share · n)``, at least 1."""
    return max(1, int(round(check_kept_share(share) * n)))


def speech_frames(num_samples: int) -> int:
    """Encoder positions that hold audio (the rest of the 30 s window is zero padding): ``ceil(samples / 320)``."""
    return min(N_FRAMES, -(-int(num_samples) // FRAME_SAMPLES))


def log_mel(feature_extractor, audio: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> torch.Tensor:
    """Whisper's input: 80 log-mel bins of the zero-padded 30 s window, shape (1, 80, 3000)."""
    audio = check_audio(audio, sampling_rate)
    return feature_extractor(audio, sampling_rate=sampling_rate, return_tensors="pt").input_features


@torch.no_grad()
def encode(model, features: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, np.ndarray]:
    """Run the encoder once (eager attention): ``(hidden (1, 1500, d), self-attention received (1500,))``.

    The score of frame j is the attention it receives, averaged over all 1500 queries, the heads and ``layers``."""
    out = model.model.encoder(features.to(model.device), output_attentions=True)
    received = torch.stack([out.attentions[i][0].mean(dim=(0, 1)) for i in layers]).mean(0)
    return out.last_hidden_state, received.double().cpu().numpy()


def frame_energy(audio: np.ndarray) -> np.ndarray:
    """RMS of the 16 kHz waveform in each 20 ms encoder frame, shape (1500,); the padding frames score 0."""
    audio = check_audio(audio, SAMPLING_RATE)
    padded = np.zeros(WINDOW_SAMPLES, dtype=np.float64)
    padded[:audio.size] = audio
    return np.sqrt((padded.reshape(N_FRAMES, FRAME_SAMPLES) ** 2).mean(1))


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest-scoring frames in time order; ties go to the earlier frame (a stable sort)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not 1 <= k <= scores.size:
        raise ValueError(f"need 1 <= k <= {scores.size} on 1-D scores, got k={k}, shape {scores.shape}")
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def uniform_indices(k: int, n: int = N_FRAMES) -> np.ndarray:
    """``k`` frames evenly spread over ``n``: the frame at the centre of each of ``k`` equal stretches."""
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= {n}, got {k}")
    return np.floor((np.arange(k) + 0.5) * n / k).astype(np.int64)


def random_indices(k: int, rng: np.random.Generator, n: int = N_FRAMES) -> np.ndarray:
    """``k`` distinct frames drawn uniformly with ``rng``, in time order."""
    return np.sort(rng.choice(n, size=k, replace=False))


def speech_span_indices(num_samples: int, k: int) -> np.ndarray:
    """The oracle that knows where the audio ends: ``k`` frames evenly spread over the speech span when ``k`` is
    smaller than it, else the whole span plus the first padding frames after it."""
    span = speech_frames(num_samples)
    if k <= span:
        return uniform_indices(k, span)
    return np.arange(min(k, N_FRAMES))


def prune(hidden: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
    """Keep the rows ``indices`` (in time order, distinct) of ``hidden`` (batch, 1500, d) → (batch, k, d)."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or indices.size == 0 or np.unique(indices).size != indices.size:
        raise ValueError("indices must be a non-empty 1-D set of distinct frames")
    if indices.min() < 0 or indices.max() >= hidden.shape[1]:
        raise ValueError(f"indices must lie in [0, {hidden.shape[1]}), got {indices.min()}..{indices.max()}")
    kept = hidden[:, torch.from_numpy(np.sort(indices))]
    assert kept.shape[1] == indices.size and kept.shape[0] == hidden.shape[0], "pruning kept the wrong frames"
    return kept


@dataclass
class Decoded:
    """Greedy decoding of a batch: ``tokens`` per row (prompt and end-of-text excluded), ``cross_keys`` (the length
    of the decoder's cross-attention keys, asserted equal to the frames given), ``guide`` (batch, k) the
    cross-attention the first ``guide_steps`` steps paid to each frame (mean over those steps, heads, guide layers),
    or None, and ``steps`` (decoding steps run)."""

    tokens: list[list[int]]
    cross_keys: int
    guide: np.ndarray | None
    steps: int


@torch.no_grad()
def greedy_decode(model, encoder_hidden: torch.Tensor, max_new_tokens: int, guide_steps: int = 0,
                  guide_layers: list[int] | None = None, check_keys: bool = True) -> Decoded:
    """Greedy decoding from ``encoder_hidden`` (batch, k, d), which may hold any number k of kept frames.

    Applies the generation config's ``suppress_tokens`` at every step and ``begin_suppress_tokens`` at the first,
    like ``generate``; stops when every row has emitted end-of-text or after ``max_new_tokens``. With
    ``check_keys`` the first step returns attention weights and asserts that every decoder layer's cross-attention
    has exactly k keys. With ``guide_steps = m > 0`` it also averages the cross-attention rows of the first m steps
    (the query positions that predict the first m text tokens) over heads and ``guide_layers``.
    """
    from transformers.modeling_outputs import BaseModelOutput

    config = model.generation_config
    eos = int(config.eos_token_id)
    batch, frames = encoder_hidden.shape[:2]
    encoder_outputs = BaseModelOutput(last_hidden_state=encoder_hidden)
    device = encoder_hidden.device
    ids = torch.tensor([PROMPT] * batch, device=device)
    suppress = torch.tensor(list(config.suppress_tokens or []), dtype=torch.long, device=device)
    begin = torch.tensor(list(config.begin_suppress_tokens or []), dtype=torch.long, device=device)
    layers = list(range(model.config.decoder_layers)) if guide_layers is None else guide_layers
    tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache, guide_rows, cross_keys, step = None, [], frames, 0
    for step in range(max_new_tokens):
        want_attn = (check_keys and step == 0) or step < guide_steps
        out = model(encoder_outputs=encoder_outputs, decoder_input_ids=ids, past_key_values=cache, use_cache=True,
                    output_attentions=want_attn)
        cache = out.past_key_values
        if want_attn:
            cross_keys = {int(a.shape[-1]) for a in out.cross_attentions}.pop() if out.cross_attentions else -1
            if cross_keys != frames or len({a.shape[-1] for a in out.cross_attentions}) != 1:
                raise AssertionError(f"decoder cross-attention reads {cross_keys} keys, {frames} frames were kept")
            if step < guide_steps:
                guide_rows.append(torch.stack([out.cross_attentions[i][:, :, -1] for i in layers]).mean(dim=(0, 2)))
        logits = out.logits[:, -1].float()
        if suppress.numel():
            logits[:, suppress] = -torch.inf
        if step == 0 and begin.numel():
            logits[:, begin] = -torch.inf
        nxt = torch.where(finished, torch.full_like(logits[:, 0], eos, dtype=torch.long), logits.argmax(-1))
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        finished |= nxt == eos
        ids = nxt[:, None]
        if bool(finished.all()):
            break
    rows = [[t for t in row.tolist()] for row in tokens]
    rows = [row[:row.index(eos)] if eos in row else row for row in rows]
    guide = torch.stack(guide_rows).mean(0).double().cpu().numpy() if guide_rows else None
    return Decoded(tokens=rows, cross_keys=cross_keys, guide=guide, steps=step + 1)


def timed_decode(model, encoder_hidden: torch.Tensor, max_new_tokens: int, repeats: int, guide_steps: int = 0,
                 ) -> tuple[float, Decoded]:
    """Fastest of ``repeats`` wall-clock times (``time.perf_counter``, seconds) of :func:`greedy_decode` without the
    key check (``guide_steps`` > 0 adds the attention weights the scoring pass needs), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = greedy_decode(model, encoder_hidden, max_new_tokens, guide_steps=guide_steps, check_keys=False)
        best = min(best, time.perf_counter() - start)
    return best, result
