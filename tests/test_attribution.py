"""Explanation scorers (family C) against hand computations on hand-made graphs and tiny random models.

Attention flow on a 3-token, 2-layer graph whose max-flows are worked out by hand (and differ from rollout); GlobEnc
on one BERT and one Llama block against an explicit per-(i, j, head) loop; gradient × input against autograd;
integrated gradients' completeness; occlusion against re-running the model on edited token ids; attention ×
gradient against autograd; and every bad input the issue lists (SDPA, no-grad, a no-grad model path, an unknown
baseline token, an empty text, a view without a model).
"""

import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, LlamaConfig, LlamaForCausalLM

from salience.scorers import AttentionView, available_scorers, get_scorer
from salience.scorers.attribution_target import attribution_target, explanation_view
from salience.scorers.globenc import token_contributions

IDS = torch.tensor([[2, 5, 6, 7, 8, 3], [2, 9, 10, 11, 5, 3]])
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "fine", "film", "bad", "the", "plot", "is"]
MODEL_SCORERS = sorted(n for n in available_scorers() if "model" in get_scorer(n).needs)


def tiny_bert(layers=2, attn="eager", seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, num_labels=3, initializer_range=0.3, attn_implementation=attn)
    return BertForSequenceClassification(config).eval()


def tiny_llama(layers=2, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer(str(path))


@pytest.fixture(scope="module")
def bert_view(tokenizer):
    return explanation_view(attribution_target(tiny_bert(), IDS, baseline_token="[MASK]", tokenizer=tokenizer),
                            tokenizer=tokenizer)


@pytest.fixture(scope="module")
def llama_view():
    return explanation_view(attribution_target(tiny_llama(), IDS, baseline_token=4))


def layer_view(layers, cls=True):
    k = layers[0].shape[-1]
    roles = {"cls": torch.arange(k) == 0} if cls else {}
    return AttentionView(key_positions=torch.arange(k), query_positions=torch.arange(k), attention=layers[-1],
                         attention_layers=layers, roles=roles)


# ---------------------------------------------------------------- attention-only rules


def test_raw_attention_fuses_heads_of_the_explained_row():
    a = torch.softmax(torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    b = torch.softmax(torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    torch.testing.assert_close(get_scorer("raw_attention")(layer_view([a, b])), b[:, :, 0].mean(1, keepdim=True))
    torch.testing.assert_close(get_scorer("raw_attention", layer=-2, head_fusion="max")(layer_view([a, b])),
                               a[:, :, 0].amax(1).unsqueeze(1))
    # no [CLS]: the last query row (the position a causal LM predicts from)
    torch.testing.assert_close(get_scorer("raw_attention")(layer_view([a, b], cls=False)),
                               b[:, :, -1].mean(1, keepdim=True))
    with pytest.raises(ValueError, match=r"query='cls' needs a \[CLS\] role"):
        get_scorer("raw_attention", query="cls")(layer_view([a, b], cls=False))


# Layer graph by hand (rows = the layer's output token, columns = its input token; residual 0):
#   layer 1: out0 ← in0 (1.0); out1 ← in0 (0.5), in1 (0.5); out2 ← in2 (1.0)
#   layer 2: out0 ← 0.2 from token 0, 0.4 from token 1, 0.4 from token 2
# Max-flow to the top node of token 0: in0 → {min(1, .2) via 0, min(.5, .4) via 1} = 0.6; in1 → min(.5, .4) = 0.4;
# in2 → min(1, .4) = 0.4. Rollout multiplies: row 0 of A2·A1 = .2·[1,0,0] + .4·[.5,.5,0] + .4·[0,0,1] = [.4,.2,.4].
A1 = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
A2 = torch.tensor([[0.2, 0.4, 0.4], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def test_attention_flow_is_the_hand_computed_max_flow_and_differs_from_rollout():
    view = layer_view([A1[None, None], A2[None, None]])
    flow = get_scorer("attention_flow", residual=0.0)(view)
    rollout = get_scorer("attention_rollout", residual=0.0)(view)
    torch.testing.assert_close(flow, torch.tensor([[[0.6, 0.4, 0.4]]]))
    torch.testing.assert_close(rollout, torch.tensor([[[0.4, 0.2, 0.4]]]))
    assert flow[0, 0, 0] > flow[0, 0, 2] and rollout[0, 0, 0] == rollout[0, 0, 2]  # they rank differently


def test_rollout_explains_the_last_token_when_asked_and_averages_rows_by_default():
    # no [CLS]: rows of A2·A1 are [.4, .2, .4], [.5, .5, 0], [0, 0, 1]
    view = layer_view([A1[None, None], A2[None, None]], cls=False)
    last = get_scorer("attention_rollout", residual=0.0, query="last")(view)
    torch.testing.assert_close(last, torch.tensor([[[0.0, 0.0, 1.0]]]))
    torch.testing.assert_close(get_scorer("attention_rollout", residual=0.0, query="auto")(view), last)
    torch.testing.assert_close(get_scorer("attention_rollout", residual=0.0)(view),
                               torch.tensor([[[0.3, 0.7 / 3, 1.4 / 3]]]))
    with pytest.raises(ValueError, match="query must be one of"):
        get_scorer("attention_rollout", query="first")


def test_attention_flow_bounds_by_the_narrowest_edge_where_rollout_multiplies():
    half = torch.full((1, 1, 2, 2), 0.5)
    view = layer_view([half, half])
    # each input reaches top token 0 by two paths of capacity min(.5, .5): flow 1.0; rollout .5·.5 + .5·.5 = .5
    torch.testing.assert_close(get_scorer("attention_flow", residual=0.0)(view), torch.tensor([[[1.0, 1.0]]]))
    torch.testing.assert_close(get_scorer("attention_rollout", residual=0.0)(view), torch.tensor([[[0.5, 0.5]]]))


def test_attention_flow_residual_augments_the_graph():
    # one layer, ρ = 0.5: Ã = .5·A1 + .5·I; top token 1 gets in0 .25 and in1 .5 + .25 = .75, in2 nothing
    view = layer_view([A1[None, None]], cls=False)
    torch.testing.assert_close(get_scorer("attention_flow")(view), torch.tensor([[[0.0, 0.0, 1.0]]]))
    view.roles = {"cls": torch.tensor([False, True, False])}
    torch.testing.assert_close(get_scorer("attention_flow")(view), torch.tensor([[[0.25, 0.75, 0.0]]]))


def test_attention_flow_refuses_long_inputs():
    long = torch.full((1, 1, 5, 5), 0.2)
    with pytest.raises(ValueError, match="limited to 4 tokens.*attention_rollout"):
        get_scorer("attention_flow", max_tokens=4)(layer_view([long]))


# ---------------------------------------------------------------- GlobEnc


def _block_inputs(model, ids):
    """The input of the first block and, for BERT, the input of its first LayerNorm, via hooks."""
    seen = {}
    block = model.base_model.encoder.layer[0] if hasattr(model.base_model, "encoder") else model.base_model.layers[0]
    handles = [block.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]),
                                               with_kwargs=True)]
    if hasattr(block, "attention"):
        handles.append(block.attention.output.LayerNorm.register_forward_hook(
            lambda m, a, out: seen.update(ln_in=a[0], ln_out=out)))
    else:
        handles.append(block.self_attn.o_proj.register_forward_hook(lambda m, a, out: seen.update(attn_out=out)))
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    for h in handles:
        h.remove()
    return block, seen, out.attentions[0]


def test_globenc_bert_block_matches_an_explicit_loop(tokenizer):
    model = tiny_bert(layers=1)
    ids = IDS[:1]
    block, seen, att = _block_inputs(model, ids)
    x, sa, so = seen["x"][0], block.attention.self, block.attention.output
    heads, dh = sa.num_attention_heads, sa.attention_head_size
    k = ids.shape[1]
    s = (seen["ln_in"][0].var(-1, unbiased=False) + so.LayerNorm.eps).sqrt()
    norms = torch.zeros(k, k)
    total = torch.zeros(k, x.shape[-1])
    for i in range(k):
        for j in range(k):
            y = torch.zeros(x.shape[-1])
            for h in range(heads):
                cols = slice(h * dh, (h + 1) * dh)
                v = x[j] @ sa.value.weight[cols].T  # head h's value of token j, no bias
                y += att[0, h, i, j] * (v @ so.dense.weight[:, cols].T)
            if i == j:
                y += x[i]
            g = so.LayerNorm.weight * (y - y.mean()) / s[i]
            norms[i, j] = g.norm()
            total[i] += g
    # the decomposition is exact: Σ_j contributions + the biases' share + β = the LayerNorm output
    bias = sa.value.bias @ so.dense.weight.T + so.dense.bias
    total += so.LayerNorm.weight * (bias - bias.mean()) / s[:, None] + so.LayerNorm.bias
    torch.testing.assert_close(total, seen["ln_out"][0], atol=1e-5, rtol=1e-4)
    z = token_contributions("post_ln", block, seen["x"], att, seen["ln_in"])
    torch.testing.assert_close(z.norm(dim=-1)[0], norms, atol=1e-5, rtol=1e-4)
    view = explanation_view(attribution_target(model, ids), tokenizer=tokenizer)  # [CLS] is the explained row
    expected = norms[0] / norms[0].sum()
    torch.testing.assert_close(get_scorer("globenc")(view)[0, 0], expected, atol=1e-5, rtol=1e-4)


def test_globenc_llama_block_decomposes_the_residual_stream():
    model = tiny_llama(layers=1)
    ids = IDS[:1]
    block, seen, att = _block_inputs(model, ids)
    z = token_contributions("pre_ln", block, seen["x"], att)
    # Σ_j z_ij = x_i + attention output_i (Llama has no biases); causal: nothing from later tokens
    torch.testing.assert_close(z.sum(dim=2), seen["x"] + seen["attn_out"], atol=1e-5, rtol=1e-4)
    assert torch.all(z[0].norm(dim=-1).triu(1) == 0)
    # one hand entry: token 2 → token 4 through every head (GQA: head h reads KV head h // 2)
    attn = block.self_attn
    xn = block.input_layernorm(seen["x"])[0]
    hand = sum(att[0, h, 4, 2] * ((xn[2] @ attn.v_proj.weight[(h // 2) * 4:(h // 2 + 1) * 4].T)
                                  @ attn.o_proj.weight[:, h * 4:(h + 1) * 4].T) for h in range(4))
    torch.testing.assert_close(z[0, 4, 2], hand, atol=1e-6, rtol=1e-5)
    n = z[0].norm(dim=-1)
    view = explanation_view(attribution_target(model, ids))  # no [CLS]: the last token is explained
    torch.testing.assert_close(get_scorer("globenc")(view)[0, 0], n[-1] / n[-1].sum(), atol=1e-5, rtol=1e-4)


def test_globenc_rolls_out_over_layers(bert_view):
    from salience.scorers.globenc import layer_attributions

    n1, n2 = layer_attributions(bert_view.attribution_target)
    torch.testing.assert_close(get_scorer("globenc")(bert_view)[:, 0], (n2 @ n1)[:, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(n1.sum(-1), torch.ones_like(n1.sum(-1)))


def test_globenc_names_the_block_layouts_it_knows():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=12, n_embd=16, n_layer=1, n_head=2,
                                      attn_implementation="eager")).eval()
    view = explanation_view(attribution_target(gpt2, IDS))
    with pytest.raises(ValueError, match="BERT-style post-LayerNorm.*Llama-style pre-RMSNorm.*GPT2LMHeadModel"):
        get_scorer("globenc")(view)


# ---------------------------------------------------------------- gradient rules


def _autograd_embedding_gradient(target):
    emb = target.embeddings.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target.forward(emb, target.attention_mask).sum(), emb)
    return emb, grad


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_gradient_x_input_is_embedding_times_gradient(which, bert_view, llama_view):
    view = bert_view if which == "bert" else llama_view
    emb, grad = _autograd_embedding_gradient(view.attribution_target)
    torch.testing.assert_close(get_scorer("gradient_x_input")(view)[:, 0], (emb * grad).sum(-1).detach())
    torch.testing.assert_close(get_scorer("gradient_x_input", reduce="l2")(view)[:, 0],
                               (emb * grad).norm(dim=-1).detach())


@pytest.mark.parametrize("which,baseline", [("bert", "zeros"), ("bert", "token"), ("llama", "token")])
def test_integrated_gradients_completeness(which, baseline, bert_view, llama_view):
    view = bert_view if which == "bert" else llama_view
    target = view.attribution_target
    start = torch.zeros_like(target.embeddings) if baseline == "zeros" else target.baseline_embeddings("test")
    with torch.no_grad():
        gap = target.forward(target.embeddings, target.attention_mask) - target.forward(start, target.attention_mask)
    assert gap.abs().min() > 1e-3  # a gap worth explaining
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no completeness warning
        scores = get_scorer("integrated_gradients", n_steps=64, baseline=baseline)(view)
    torch.testing.assert_close(scores.sum(dim=-1).squeeze(1), gap, atol=2e-4, rtol=1e-3)
    # a two-point rule does not close the gap: the check can fail, and the scorer says so
    with pytest.warns(UserWarning, match="miss completeness.*raise n_steps"):
        coarse = get_scorer("integrated_gradients", n_steps=2, method="riemann_left", baseline=baseline)(view)
    assert (coarse.sum(dim=-1).squeeze(1) - gap).abs().max() > 1e-3


def test_attention_x_gradient_matches_autograd(bert_view):
    target = bert_view.attribution_target
    target.model.zero_grad(set_to_none=True)
    emb = target.embeddings.clone().requires_grad_(True)
    value, outputs = target.run(emb, target.attention_mask, output_attentions=True)
    (grad,) = torch.autograd.grad(value.sum(), outputs.attentions[-1])
    expected = (outputs.attentions[-1] * grad)[:, :, 0].mean(dim=1).clamp_min(0).detach()  # [CLS] row
    scores = get_scorer("attention_x_gradient")(bert_view)
    torch.testing.assert_close(scores[:, 0], expected)
    assert scores.abs().sum() > 0
    assert all(p.grad is None for p in target.model.parameters())  # nothing accumulated in the model


# ---------------------------------------------------------------- occlusion


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_occlusion_is_the_drop_when_a_token_is_replaced_or_removed(which, bert_view, llama_view):
    view = bert_view if which == "bert" else llama_view
    target = view.attribution_target
    replaced = get_scorer("occlusion")(view)[:, 0]
    removed = get_scorer("occlusion", replacement="remove")(view)[:, 0]
    for example in range(IDS.shape[0]):
        predict = target.predictor(example)
        ids, mask = target.input_ids[example:example + 1], target.attention_mask[example:example + 1]
        full = predict(ids, mask)[0]
        for i in range(ids.shape[1]):
            edited = ids.clone()
            edited[0, i] = target.baseline_token_id
            torch.testing.assert_close(replaced[example, i], full - predict(edited, mask)[0], atol=1e-6, rtol=1e-5)
            keep = torch.arange(ids.shape[1]) != i
            torch.testing.assert_close(removed[example, i], full - predict(ids[:, keep], mask[:, keep])[0],
                                       atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- one contract, and bad input


@pytest.mark.parametrize("name", ["raw_attention", "attention_rollout", "attention_flow", *MODEL_SCORERS])
@pytest.mark.parametrize("which", ["bert", "llama"])
def test_every_explanation_scorer_runs_on_an_explanation_view(name, which, bert_view, llama_view):
    view = bert_view if which == "bert" else llama_view
    if (name, which) == ("integrated_gradients", "llama"):
        # the zero baseline on an RMSNorm model: the scorer warns that completeness fails (see its docstring)
        with pytest.warns(UserWarning, match="miss completeness"):
            scores = get_scorer(name)(view)
    else:
        scores = get_scorer(name)(view)
    assert scores.shape == (2, 1, IDS.shape[1]) and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", MODEL_SCORERS)
def test_model_scorers_on_a_view_without_a_model_name_the_builder(name):
    a = torch.full((1, 1, 3, 3), 1 / 3)
    with pytest.raises(ValueError, match="needs an attribution target.*explanation_view"):
        get_scorer(name)(layer_view([a]))


def test_sdpa_attention_is_refused_naming_eager():
    target = attribution_target(tiny_bert(attn="sdpa"), IDS)
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa'.*attn_implementation='eager'"):
        explanation_view(target)
    view = explanation_view(target, attention=False)
    for name in ("globenc", "attention_x_gradient"):
        with pytest.raises(ValueError, match=r"needs attention weights.*attn_implementation='eager'"):
            get_scorer(name)(view)


@pytest.mark.parametrize("name", ["gradient_x_input", "integrated_gradients", "attention_x_gradient"])
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_gradient_scorers_under_no_grad_say_so(name, context, bert_view):
    with context(), pytest.raises(ValueError, match=r"torch.no_grad\(\) or torch.inference_mode\(\)"):
        get_scorer(name)(bert_view)


class NoGradClassifier(nn.Module):
    """A model whose forward cuts the graph (as a quantized or detached kernel does)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_bert()
        self.config = self.inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    @torch.no_grad()
    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("name", ["gradient_x_input", "integrated_gradients", "attention_x_gradient"])
def test_a_model_without_gradients_is_named(name):
    view = explanation_view(attribution_target(NoGradClassifier(), IDS))
    with pytest.raises(ValueError, match=r"quantized or no-grad path in NoGradClassifier.*dtype=torch.float32"):
        get_scorer(name)(view)
    assert get_scorer("occlusion", replacement="zeros")(view).shape == (2, 1, 6)  # no gradients needed


def test_bad_target_inputs(tokenizer):
    model = tiny_bert()
    with pytest.raises(ValueError, match="empty text"):
        attribution_target(model, text="   ", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="empty text"):
        attribution_target(model, text=["a fine film", ""], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="non-empty"):
        attribution_target(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"'\[FOO\]' is not in the tokenizer's vocabulary.*\[MASK\]"):
        attribution_target(model, IDS, baseline_token="[FOO]", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="id 99 is unknown to the tokenizer"):
        attribution_target(model, IDS, baseline_token=99, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="outside the model's embedding table"):
        attribution_target(model, IDS, baseline_token=40)
    with pytest.raises(ValueError, match="declares none.*baseline_token="):
        get_scorer("occlusion")(explanation_view(attribution_target(model, IDS)))
    with pytest.raises(ValueError, match="returns no logits.*readout="):
        attribution_target(model.bert, IDS)


def test_text_and_padding(tokenizer):
    model = tiny_bert()
    target = attribution_target(model, text=["a fine film", "the plot"], tokenizer=tokenizer, baseline_token="[MASK]")
    assert target.input_ids.tolist() == [[2, 5, 6, 7, 3], [2, 9, 10, 3, 0]]
    assert target.attention_mask[1].tolist() == [1, 1, 1, 1, 0]
    with torch.no_grad():
        expected = model(input_ids=target.input_ids, attention_mask=target.attention_mask).logits.softmax(-1)
    torch.testing.assert_close(target.forward(target.embeddings, target.attention_mask),
                               expected.max(dim=-1).values)  # the predicted class's probability
    assert explanation_view(target, tokenizer=tokenizer).roles["cls"].tolist() == [True, False, False, False, False]
