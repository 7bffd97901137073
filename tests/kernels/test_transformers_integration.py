"""A stock transformers model runs on scored attention, and its recorded key mass equals eager attention's column sums.

Fast tests use a tiny randomly initialised Llama (GQA 4/2); the slow test uses the embedded SmolLM2-135M (9/3 heads).
"""

import pytest
import torch

from salience.kernels.transformers_integration import ATTENTION_NAME, record_key_mass, register


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def eager_column_sums(attentions, rows=slice(None)):
    """Eager weights ``[B, H, N_q, N_k]`` per layer -> mass over the chosen query rows, ``[B, H, N_k]``."""
    return [a[:, :, rows, :].sum(dim=2) for a in attentions]


@torch.no_grad()
def test_tiny_llama_matches_eager():
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 23))
    ref = model(ids, output_attentions=True)
    with record_key_mass(model) as rec:
        assert model.config._attn_implementation == ATTENTION_NAME
        out = model(ids)
    assert model.config._attn_implementation == "eager"  # restored on exit
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert sorted(rec.key_mass) == [0, 1, 2]
    for layer, expected in enumerate(eager_column_sums(ref.attentions)):
        torch.testing.assert_close(rec.key_mass[layer], expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_tiny_llama_window_normalized_gqa_and_padding():
    model = tiny_llama()
    ids = torch.randint(1, 101, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second sequence: masked path (blockwise)
    ref = model(ids, attention_mask=mask, output_attentions=True)
    with record_key_mass(model, mass="window", window=5, reduce_gqa=True) as rec:
        out = model(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], rtol=1e-4, atol=1e-4)
    for layer, expected in enumerate(eager_column_sums(ref.attentions, rows=slice(-5, None))):
        expected = expected.view(2, 2, 2, -1).sum(dim=2)  # sum over each kv head's group of 2 query heads
        torch.testing.assert_close(rec.key_mass[layer], expected, rtol=1e-4, atol=1e-5)
        assert (rec.key_mass[layer][1, :, :4] == 0).all()  # padding keys get no mass


@torch.no_grad()
def test_decoding_with_cache_accumulates_mass():
    from transformers import DynamicCache

    model = tiny_llama()
    ids = torch.randint(0, 101, (1, 12))
    with record_key_mass(model, accumulate=True) as rec:
        cache = DynamicCache(config=model.config)
        step = model(ids[:, :10], past_key_values=cache, use_cache=True)
        after_prefill = rec.key_mass[0].clone()
        model(ids[:, 10:11], past_key_values=step.past_key_values, use_cache=True)
    assert rec.key_mass[0].shape == (1, 4, 11)
    ref = model(ids[:, :11], output_attentions=True).attentions[0]
    # prefill mass over keys 0..9 plus the decode step's row over keys 0..10 = eager column sums over 11 queries
    torch.testing.assert_close(rec.key_mass[0], ref.sum(dim=2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec.key_mass[0][..., :10] - after_prefill, ref[:, :, 10, :10], rtol=1e-4, atol=1e-5)


def test_register_is_idempotent_and_bad_settings_fail_early():
    assert register() == register() == ATTENTION_NAME
    model = tiny_llama()
    with pytest.raises(ValueError, match="window"):
        with record_key_mass(model, mass="window"):
            pass
    assert model.config._attn_implementation == "eager"


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_logits_and_key_mass_match_eager():
    from salience.models import load_model

    bundle = load_model("smollm2-135m", attn_implementation="eager")
    model, tokenizer = bundle.model, bundle.processor
    text = (
        "The tokens a transformer attends to most are not always the ones it needs. Eviction policies such as H2O keep "
        "the keys with the largest accumulated attention, and SnapKV looks only at a window of recent queries."
    )
    inputs = tokenizer(text, return_tensors="pt")
    assert 40 <= inputs["input_ids"].shape[1] <= 90
    ref = model(**inputs, output_attentions=True)
    with record_key_mass(model) as rec:
        out = model(**inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=5e-4)
    assert len(rec.key_mass) == model.config.num_hidden_layers == len(ref.attentions)
    for layer, expected in enumerate(eager_column_sums(ref.attentions)):
        assert rec.key_mass[layer].shape == expected.shape == (1, 9, inputs["input_ids"].shape[1])
        torch.testing.assert_close(rec.key_mass[layer], expected, rtol=1e-4, atol=1e-4)
