"""What both speech notebooks share: the Whisper model, the spoken sentences (how many, how long, how espeak-ng says
them) and their loader (:func:`load_speech`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..data.speech import speech_sentences, synthesize
from ..harness import whisper_pruning as wp
from ..params import ModelName, NotebookParams


class SpeechParams(NotebookParams):
    """The spoken-sentence settings; a speech notebook's ``Params`` adds its own on top."""

    model: ModelName = Field(description="speech-to-text model (an English-only Whisper checkpoint)")
    utterances: int = Field(ge=2, le=500, description="sentences spoken, one utterance each (the units of every part)")
    min_words: int = Field(ge=1, le=60, description="a sentence has at least this many words")
    max_words: int = Field(ge=1, le=60, description="a sentence has at most this many words")
    voice: str = Field(pattern=r"^[A-Za-z0-9+_-]+$", description="espeak-ng voice (-v)")
    speed: int = Field(ge=80, le=450, description="espeak-ng speed in words per minute (-s)")
    pitch: int = Field(ge=0, le=99, description="espeak-ng pitch (-p)")

    @model_validator(mode="after")
    def _word_range(self) -> "SpeechParams":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) > max_words ({self.max_words})")
        return self


def load_speech(params: SpeechParams) -> list[dict]:
    """The sentences and their 16 kHz mono waveforms: one dict (text, audio, words, seconds, speech_frames) each."""
    texts = speech_sentences(params.utterances, params.seed, params.min_words, params.max_words)
    audios = synthesize(texts, voice=params.voice, speed=params.speed, pitch=params.pitch)
    return [dict(text=t, audio=wp.check_audio(a, wp.SAMPLING_RATE), words=len(t.split()),
                 seconds=a.size / wp.SAMPLING_RATE, speech_frames=wp.speech_frames(a.size))
            for t, a in zip(texts, audios)]


__all__ = ["SpeechParams", "load_speech"]
