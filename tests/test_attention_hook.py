"""The one attention hook (salience.attention_hook): every harness's use goes through one registered function, the
capture mode reproduces transformers' eager attention exactly (SDPA's mask format converted), and modes nest."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from salience.attention_hook import NAME, Capture, active_mode, additive_mask, attending, salience_attention
from salience.harness.attention_capture import capture_attention
from salience.harness.vit_attention import AttentionState, using_vit_attention
from salience.kernels.transformers_integration import record_key_mass


def _captured(model, **inputs):
    seen = {}
    with capture_attention(model, lambda layer, probs, k, v: seen.__setitem__(layer, probs.clone())):
        out = model(**inputs)
    return out, [seen[i] for i in sorted(seen)]


@torch.no_grad()
def test_capture_is_eager_attention_exactly_with_padding_and_a_cache(tiny_llama):
    ids = torch.randint(1, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: a materialised boolean mask
    ref = tiny_llama(ids, attention_mask=mask, output_attentions=True)
    out, probs = _captured(tiny_llama, input_ids=ids, attention_mask=mask)
    assert tiny_llama.config._attn_implementation == "eager"  # restored
    assert torch.equal(out.logits, ref.logits)
    for a, b in zip(probs, ref.attentions):
        assert torch.equal(a, b)
    # no padding, no cache: SDPA's mask is None (plain causal), rebuilt here
    ref = tiny_llama(ids[:1], output_attentions=True)
    out, probs = _captured(tiny_llama, input_ids=ids[:1])
    assert torch.equal(out.logits, ref.logits) and all(torch.equal(a, b) for a, b in zip(probs, ref.attentions))
    # three tokens fed on a cache of nine: the mask is end-aligned
    cache_ref, cache = DynamicCache(config=tiny_llama.config), DynamicCache(config=tiny_llama.config)
    tiny_llama(ids[:1, :9], past_key_values=cache_ref, use_cache=True)
    tiny_llama(ids[:1, :9], past_key_values=cache, use_cache=True)
    ref = tiny_llama(ids[:1, 9:], past_key_values=cache_ref, use_cache=True, output_attentions=True)
    out, probs = _captured(tiny_llama, input_ids=ids[:1, 9:], past_key_values=cache, use_cache=True)
    assert torch.equal(out.logits, ref.logits) and all(torch.equal(a, b) for a, b in zip(probs, ref.attentions))


@torch.no_grad()
def test_every_use_runs_under_the_one_name_and_modes_nest(tiny_llama):
    ids = torch.randint(1, 32, (1, 8), generator=torch.Generator().manual_seed(1))
    names = []
    with capture_attention(tiny_llama, lambda *a: names.append("capture")):
        assert tiny_llama.config._attn_implementation == NAME
        with record_key_mass(tiny_llama) as rec:  # an inner mode, then the outer one again
            assert tiny_llama.config._attn_implementation == NAME
            tiny_llama(ids)
        assert sorted(rec.key_mass) == [0, 1] and not names
        tiny_llama(ids)
        assert names == ["capture", "capture"]
    with using_vit_attention(tiny_llama):
        assert tiny_llama.config._attn_implementation == NAME
    assert tiny_llama.config._attn_implementation == "eager"


@torch.no_grad()
def test_without_a_mode_the_hook_is_sdpa(tiny_llama):
    ids = torch.randint(1, 32, (2, 10), generator=torch.Generator().manual_seed(2))
    ref = tiny_llama(ids).logits
    with attending(tiny_llama, None):
        torch.testing.assert_close(tiny_llama(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_additive_mask_reads_sdpa_masks():
    allowed = torch.tensor([[True, False], [True, True]])
    out = additive_mask(allowed, False, 2, 2, torch.float32, "cpu")
    assert out[0, 0] == 0 and out[0, 1] == torch.finfo(torch.float32).min
    causal = additive_mask(None, True, 3, 3, torch.float32, "cpu")
    assert torch.equal(causal == 0, torch.ones(3, 3, dtype=torch.bool).tril())
    assert additive_mask(None, False, 3, 3, torch.float32, "cpu") is None


def test_a_block_state_mode_records_what_it_is_asked():
    q, k, v = (torch.randn(1, 2, 4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3))
    state = AttentionState(record_probs=True, record_kv=True)
    with active_mode(state):
        out, probs = salience_attention(torch.nn.Identity().eval(), q, k, v, None, scaling=1.0)
    assert probs.shape == (1, 2, 4, 4) and state.keys is k and torch.equal(state.probs, probs)
    with active_mode(Capture()):  # a capture without a callback is plain eager attention
        eager, _ = salience_attention(torch.nn.Identity().eval(), q, k, v, None, scaling=1.0, is_causal=False)
    torch.testing.assert_close(out, eager)
