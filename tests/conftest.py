"""Test-wide settings: no network, headless plotting."""

import os

import pytest

# The embedded models and data ship in packages; nothing may reach for a hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "agg")


@pytest.fixture(scope="session")
def tiny_llama():
    """A tiny random Llama: 2 layers, 6 query / 3 KV heads (GQA), vocab 32, eager attention, eval mode.
    ``initializer_range`` well above the default 0.02 so that attention is far from uniform and heads disagree."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256,
                         initializer_range=0.3, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()
