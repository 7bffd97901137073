"""The model zoo: registry and cache mechanics (fast), and each embedded model doing a real job (slow).

The slow tests convert into the real cache on first use (``$SALIENCE_CACHE`` or ``~/.cache/salience``; ~1 minute for
all four on 2 cores) and afterwards take well under two minutes together. Every check would fail on a broken
conversion: wrong transposes or head splits give near-uniform attention, garbage perplexity and empty transcripts.
"""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
import time
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import torch

from salience.models import (
    EMBEDDED_MODELS,
    KINDS,
    MARKER,
    ModelBundle,
    UnknownModelError,
    embedded_name,
    load_model,
    prepare_zoo,
    read_marker,
)
from salience.models._cache import ensure_converted

# ---------------------------------------------------------------------------------------------------------------
# Fast: registry, names, cache mechanics, CT2 reader
# ---------------------------------------------------------------------------------------------------------------


def test_registry_names_and_kinds():
    assert list(EMBEDDED_MODELS) == ["smollm2-135m", "dinov2-s", "minilm-l6", "whisper-tiny.en"]
    assert {m.kind for m in EMBEDDED_MODELS.values()} == set(KINDS)


@pytest.mark.parametrize(
    "alias, name",
    [
        ("smollm2-135m", "smollm2-135m"),
        ("SmolLM2-135M-Instruct", "smollm2-135m"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
        ("dinov2-small", "dinov2-s"),
        ("DINOv2-S", "dinov2-s"),
        ("sentence-transformers/all-MiniLM-L6-v2", "minilm-l6"),
        ("openai/whisper-tiny.en", "whisper-tiny.en"),
        ("gpt2", None),
        ("./smollm2-135m", None),
    ],
)
def test_aliases(alias, name):
    assert embedded_name(alias) == name


def test_unknown_name_lists_embedded_names(monkeypatch):
    # Offline, so the Hub lookup fails at once instead of retrying a network that is not there.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for bad in ("no-such-org/no-such-model-xyz", "not a model name!"):
        with pytest.raises(ValueError) as info:
            load_model(bad)
        assert isinstance(info.value, UnknownModelError)
        for name in EMBEDDED_MODELS:
            assert name in str(info.value)


def _write_folder(dest: Path, calls: list, fail: bool = False) -> dict:
    calls.append(dest)
    (dest / "config.json").write_text("{}")
    if fail:
        raise RuntimeError("killed half-way")
    (dest / "weights.bin").write_bytes(b"\0" * 16)
    return {"source": "test"}


def test_conversion_is_atomic_and_runs_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path))
    calls: list = []
    with pytest.raises(RuntimeError):
        ensure_converted("toy", lambda d: _write_folder(d, calls, fail=True), format_version=1)
    models = tmp_path / "models"
    assert not (models / "toy").exists()
    assert not list(models.glob(".toy.tmp-*")), "a failed conversion left its temp folder"

    folder = ensure_converted("toy", lambda d: _write_folder(d, calls), format_version=1)
    assert folder == models / "toy" and (folder / "weights.bin").exists()
    marker = read_marker(folder)
    assert marker["source"] == "test" and marker["format_version"] == 1 and "transformers" in marker
    assert len(calls) == 2

    assert ensure_converted("toy", lambda d: _write_folder(d, calls), format_version=1) == folder
    assert len(calls) == 2, "a finished conversion ran again"

    ensure_converted("toy", lambda d: _write_folder(d, calls), format_version=2)  # converter changed: rebuild
    assert len(calls) == 3 and read_marker(folder)["format_version"] == 2
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == ["toy"]


def test_ctranslate2_reader(tmp_path):
    from salience.models.whisper import read_ctranslate2

    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    body = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, 2)
    body += string("a/weight") + struct.pack("<B", 2) + struct.pack("<II", 2, 3) + struct.pack("<BI", 4, weight.nbytes)
    body += weight.tobytes()
    body += string("a/num_heads") + struct.pack("<B", 0) + struct.pack("<BI", 2, 2) + struct.pack("<h", 6)
    body += struct.pack("<I", 1) + string("b/weight") + string("a/weight")
    path = tmp_path / "model.bin"
    path.write_bytes(body)
    out = read_ctranslate2(path)
    np.testing.assert_array_equal(out["a/weight"], weight)
    np.testing.assert_array_equal(out["b/weight"], weight)
    assert int(out["a/num_heads"]) == 6


# ---------------------------------------------------------------------------------------------------------------
# Slow: the embedded models, each loaded once per module
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm() -> ModelBundle:
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def dinov2() -> ModelBundle:
    return load_model("dinov2-s")


@pytest.fixture(scope="module")
def minilm() -> ModelBundle:
    return load_model("minilm-l6")


@pytest.fixture(scope="module")
def whisper() -> ModelBundle:
    return load_model("whisper-tiny.en")


@pytest.mark.slow
def test_smollm2_config_and_perplexity(smollm):
    from transformers import LlamaForCausalLM

    assert isinstance(smollm.model, LlamaForCausalLM) and smollm.kind == "causal-lm" and not smollm.model.training
    config = smollm.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert smollm.model.model.layers[0].self_attn.k_proj.out_features == 3 * 64  # GQA: 3 KV heads of 64
    text = ("The cat sat on the mat and looked out of the window. "
            "It was a sunny day, and the birds were singing in the garden.")
    enc = smollm.processor(text, return_tensors="pt")
    with torch.no_grad():
        out = smollm.model(**enc, labels=enc.input_ids, output_attentions=True)
    ppl = out.loss.exp().item()
    assert 5 < ppl < 40, f"perplexity {ppl:.1f} on plain English: the GGUF dequantization is off"
    T = enc.input_ids.shape[1]
    assert len(out.attentions) == 30 and out.attentions[0].shape == (1, 9, T, T)
    # Causal: nothing above the diagonal.
    assert out.attentions[-1][0, :, 0, 1:].abs().max() == 0


@pytest.mark.slow
def test_smollm2_greedy_continuation_is_sensible(smollm):
    enc = smollm.processor("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ids = smollm.model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert "paris" in smollm.processor.decode(ids[0, enc.input_ids.shape[1]:]).lower()


def _cls_attention(bundle: ModelBundle, image) -> torch.Tensor:
    """Last-layer [CLS] → patch attention, ``(heads, patches)``, each row summing to 1."""
    pixels = bundle.processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        out = bundle.model(pixel_values=pixels, output_attentions=True)
    assert out.last_hidden_state.shape == (1, 1 + 256, 384)
    assert len(out.attentions) == 12 and out.attentions[-1].shape == (1, 6, 257, 257)
    cls = out.attentions[-1][0, :, 0, 1:]
    return cls / cls.sum(-1, keepdim=True)


@pytest.mark.slow
def test_dinov2_cls_attention_is_focused(dinov2):
    from skimage import data

    from transformers import Dinov2Model

    assert isinstance(dinov2.model, Dinov2Model) and dinov2.kind == "vit"
    torch.manual_seed(0)
    noise = _cls_attention(dinov2, (torch.rand(224, 224, 3) * 255).to(torch.uint8).numpy())
    for image in (data.astronaut(), data.chelsea()):
        cls = _cls_attention(dinov2, image)
        mean = cls.mean(0)
        entropy = -(mean * mean.log()).sum().item()
        assert (mean.max() / mean.mean()).item() > 3, "head-mean [CLS] attention is nearly uniform"
        assert entropy < math.log(256) - 0.1
        # Photos give much sharper heads than noise does (noise: max/mean < 4 in every head).
        assert (cls.max(-1).values * 256).max() > 2 * (noise.max(-1).values * 256).max()


@pytest.mark.slow
def test_dinov2_matches_onnxruntime(dinov2):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (optional cross-check)")
    import onnx
    from skimage import data

    from salience.models._cache import package_file
    from salience.models.dinov2 import MODULE, ONNX_FILE, REQUIREMENT

    graph_model = onnx.load(str(package_file(MODULE, REQUIREMENT, ONNX_FILE)))
    # Expose the backbone's final LayerNorm output (the graph's own output is the saliency head's map).
    final_norm = next(n for n in graph_model.graph.node if "backbone.layernorm.bias" in n.input)
    graph_model.graph.output.append(
        onnx.helper.make_tensor_value_info(final_norm.output[0], onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = dinov2.processor(images=data.chelsea(), return_tensors="pt")["pixel_values"]
    (reference,) = session.run([final_norm.output[0]], {session.get_inputs()[0].name: pixels.numpy()})
    with torch.no_grad():
        ours = dinov2.model(pixel_values=pixels).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)


@pytest.mark.slow
def test_minilm_paraphrases_are_closer(minilm):
    from salience.models.minilm import mean_pool

    config = minilm.model.config
    assert minilm.kind == "text-encoder" and (config.num_hidden_layers, config.num_attention_heads) == (6, 12)
    sentences = [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar in front of an audience.",
        "The stock market fell sharply on Monday.",
    ]
    enc = minilm.processor(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = mean_pool(minilm.model(**enc).last_hidden_state, enc.attention_mask)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3, sim


def _speech(text: str, tmp_path: Path) -> np.ndarray:
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): no speech to transcribe")
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    rate, audio = wavfile.read(wav)
    audio = audio.astype(np.float32) / (32768.0 if audio.dtype == np.int16 else 1.0)
    if audio.ndim == 2:
        audio = audio.mean(1)
    g = gcd(16_000, rate)
    return resample_poly(audio, 16_000 // g, rate // g).astype(np.float32)


@pytest.mark.slow
def test_whisper_transcribes_speech(whisper, tmp_path):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    assert isinstance(whisper.model, WhisperForConditionalGeneration) and whisper.kind == "speech-to-text"
    assert isinstance(whisper.processor.feature_extractor, WhisperFeatureExtractor)
    assert whisper.processor.feature_extractor.feature_size == 80
    audio = _speech("The quick brown fox jumps over the lazy dog", tmp_path)
    features = whisper.processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    assert features.shape == (1, 80, 3000)
    with torch.no_grad():
        ids = whisper.model.generate(features, max_new_tokens=24)
    text = whisper.processor.tokenizer.decode(ids[0], skip_special_tokens=True)
    assert "quick brown fox" in text.lower(), text
    prompt = [50257, 50362]  # <|startoftranscript|> <|notimestamps|> (English-only model, no timestamps)
    if ids[0, 0].item() != prompt[0]:  # transformers 5 returns only the generated tokens
        ids = torch.cat([torch.tensor([prompt]), ids], dim=1)
    assert ids[0, :2].tolist() == prompt
    with torch.no_grad():
        out = whisper.model(input_features=features, decoder_input_ids=ids, output_attentions=True)
    assert len(out.cross_attentions) == 4
    for layer in out.cross_attentions:
        assert layer.shape == (1, 6, ids.shape[1], 1500)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EMBEDDED_MODELS))
def test_second_load_reads_the_cache(name, request, monkeypatch):
    fixture = {"smollm2-135m": "smollm", "dinov2-s": "dinov2", "minilm-l6": "minilm", "whisper-tiny.en": "whisper"}
    first = request.getfixturevalue(fixture[name])
    folder = Path(first.source)
    marker, stamp = read_marker(folder), (folder / MARKER).stat().st_mtime_ns
    assert marker["name"] == name and marker["format_version"] == EMBEDDED_MODELS[name].impl().FORMAT_VERSION

    def no_conversion(dest):
        raise AssertionError("the cached model was converted again")

    monkeypatch.setattr(EMBEDDED_MODELS[name].impl(), "convert", no_conversion)
    start = time.perf_counter()
    again = load_model(name)
    assert time.perf_counter() - start < 15  # ~1 s on 2 idle cores; conversion takes 5-60 s
    assert again.source == first.source and (folder / MARKER).stat().st_mtime_ns == stamp
    assert prepare_zoo([name], progress=False) == {name: folder}


@pytest.mark.slow
def test_attn_implementation_dtype_and_folder_loading(minilm):
    bundle = load_model("minilm-l6", attn_implementation="sdpa", dtype=torch.bfloat16)
    assert bundle.model.config._attn_implementation == "sdpa"
    assert next(bundle.model.parameters()).dtype == torch.bfloat16
    # A converted cache folder is an ordinary Hugging Face folder: the generic path loads it and finds the kind.
    again = load_model(minilm.source)
    assert again.kind == "text-encoder" and again.source == str(Path(minilm.source).resolve())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EMBEDDED_MODELS))
def test_generic_path_recognises_each_kind(name):
    from transformers import AutoConfig

    from salience.models import _kind_of, prepare

    assert _kind_of(AutoConfig.from_pretrained(prepare(name))) == EMBEDDED_MODELS[name].kind
