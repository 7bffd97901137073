"""Speech of known text: English sentences from the shipped Wikipedia articles, synthesized with espeak-ng.

``espeak-ng`` (Debian package ``espeak-ng``; ``scripts/setup.sh`` installs it) writes 16-bit mono WAV at 22 050 Hz.
:func:`synthesize` runs it in a temporary folder (nothing is cached or kept), reads the file with the stdlib
``wave`` module and resamples to Whisper's 16 kHz with ``scipy.signal.resample_poly`` (polyphase, up 320 / down 441
for 22 050 Hz: an exact rational ratio, with its built-in Kaiser anti-aliasing filter). The voice, speed, pitch and
amplitude are fixed arguments, so the same text gives the same samples on the same espeak-ng build.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import wave
from math import gcd
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from ..sentences import split_sentences
from .text import wikipedia_articles

ESPEAK = "espeak-ng"
SAMPLING_RATE = 16_000
#: characters a spoken sentence may contain: letters, spaces and punctuation espeak-ng does not read aloud
_SPEAKABLE = re.compile(r"^[A-Za-z][A-Za-z ,.;:'\-]*[.]$")


def espeak_available() -> bool:
    """Whether the ``espeak-ng`` executable is on the PATH."""
    return shutil.which(ESPEAK) is not None


def speech_sentences(n: int, seed: int, min_words: int = 6, max_words: int = 20) -> list[str]:
    """``n`` distinct sentences from the leads of the shipped Wikipedia articles, a seeded subset in corpus order.

    Kept: ASCII letters, spaces and ``, . ; : ' -`` only (no digits, brackets or symbols, which espeak-ng would read
    in words a transcript does not spell the same way), ending with a full stop, ``min_words``–``max_words`` words.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pool: list[str] = []
    for lead in wikipedia_articles(min_chars=0)["lead"]:
        for sentence in split_sentences(lead):
            if _SPEAKABLE.match(sentence) and min_words <= len(sentence.split()) <= max_words and sentence not in pool:
                pool.append(sentence)
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} speakable sentences of {min_words}-{max_words} words; ask for fewer")
    chosen = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return [pool[i] for i in sorted(chosen)]


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file as ``(float32 samples in [-1, 1] of shape (samples,) or (samples, channels), rate)``."""
    with wave.open(str(path), "rb") as fh:
        if fh.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * fh.getsampwidth()}-bit samples")
        channels, rate = fh.getnchannels(), fh.getframerate()
        raw = np.frombuffer(fh.readframes(fh.getnframes()), dtype="<i2")
    audio = raw.astype(np.float32) / 32768.0
    return (audio if channels == 1 else audio.reshape(-1, channels)), rate


def to_16k_mono(audio: np.ndarray, rate: int) -> np.ndarray:
    """Resample mono ``audio`` (shape (samples,)) from ``rate`` Hz to 16 kHz with ``resample_poly``."""
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio of shape (samples,), got shape {audio.shape}")
    if rate == SAMPLING_RATE:
        return audio.astype(np.float32)
    g = gcd(SAMPLING_RATE, rate)
    return resample_poly(audio, SAMPLING_RATE // g, rate // g).astype(np.float32)


def synthesize(texts: list[str], voice: str = "en-us", speed: int = 160, pitch: int = 50,
               amplitude: int = 100) -> list[np.ndarray]:
    """Speak each text with espeak-ng; returns 16 kHz mono float32 waveforms, shape (samples,) each.

    ``speed`` in words per minute, ``pitch`` and ``amplitude`` on espeak-ng's 0–99 / 0–200 scales. Raises
    RuntimeError when espeak-ng is missing and ValueError for an empty text.
    """
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng; scripts/setup.sh does it)")
    out = []
    with tempfile.TemporaryDirectory(prefix="salience-speech-") as folder:
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"text {i} is empty: nothing to speak")
            path = Path(folder) / f"{i}.wav"
            subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-p", str(pitch), "-a", str(amplitude),
                            "-w", str(path), "--", text], check=True, capture_output=True)
            audio, rate = read_wav(path)
            out.append(to_16k_mono(audio, rate))
    return out
