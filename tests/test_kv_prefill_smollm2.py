"""Prefill compression on the real SmolLM2 (30 layers, 9 query / 3 KV heads; slow): a full budget reproduces the
uncompressed model, the kept sets, protections and cache lengths, original positions, the fused path, query-aware
scoring, the continuation and passkey tasks (teacher-forced greedy correctness against real greedy decoding), and
bad input named with its valid range. The tiny-model checks are in tests/test_kv_prefill_compression.py.
"""

import pytest
import torch

from salience import kv_passkey, kv_tasks
from salience.harness import compress_prefill, continuation_logits, full_prefill, greedy_tokens
from salience.scorers import get_scorer

TEXT = (
    "The history of the city begins in the Roman period, when a small fort was built beside the river crossing. "
    "Over the following centuries the settlement grew into a market town, and by the twelfth century it had a "
    "cathedral, a castle and a charter granting its citizens the right to hold a weekly market. The industrial "
    "revolution brought mills, canals and later the railway, and the population grew tenfold in a hundred years."
)
N_LAYERS, N_KV = 30, 3


@pytest.fixture(scope="module")
def lm():
    from salience.models import load_model

    bundle = load_model("smollm2-135m", attn_implementation="eager")
    ids = bundle.processor(TEXT, return_tensors="pt").input_ids
    assert ids.shape[1] >= 80
    return bundle.model, bundle.processor, ids[:, :64], ids[:, 64:80]


def reference_logits(model, *parts):
    """Logits of the last part, from one uncompressed forward pass of all parts."""
    with torch.inference_mode():
        logits = model(torch.cat(parts, dim=1)).logits.float()
    return logits[:, -parts[-1].shape[1]:]


@pytest.mark.slow
@pytest.mark.parametrize("head_mode", ["per_kv_head", "shared"])
def test_full_budget_reproduces_uncompressed_model(lm, head_mode):
    model, _, ctx, cont = lm
    c = compress_prefill(model, ctx, "accumulated_attention", 1.0, head_mode=head_mode)
    assert c.cache_lengths == [64] * N_LAYERS and c.next_position == 64 and c.budget_tokens == 64
    torch.testing.assert_close(continuation_logits(model, c, cont), reference_logits(model, ctx, cont),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_full_budget_query_aware_reproduces_uncompressed_model(lm):
    model, _, ctx, cont = lm
    question, rest = cont[:, :8], cont[:, 8:]
    c = compress_prefill(model, ctx, get_scorer("snapkv", window=8), 1.0, question_ids=question, query_aware=True)
    assert c.cache_lengths == [64 + 8] * N_LAYERS and c.next_position == 72 and c.question_len == 8
    torch.testing.assert_close(continuation_logits(model, c, rest), reference_logits(model, ctx, question, rest),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("head_mode", ["per_kv_head", "shared"])
def test_compression_keeps_the_budget_the_top_scores_and_the_protected_tokens(lm, head_mode):
    model, _, ctx, _ = lm
    c = compress_prefill(model, ctx, "accumulated_attention", 24, head_mode=head_mode, n_sink=4, recent_window=4)
    assert c.cache_lengths == [24] * N_LAYERS
    assert all(layer.keys.shape[-2] == layer.values.shape[-2] == 24 for layer in c.cache.layers)
    assert c.kept_positions.shape == (N_LAYERS, N_KV, 24)
    full = full_prefill(model, ctx)
    protected = set(range(4)) | set(range(60, 64))
    for i in range(N_LAYERS):
        for h in range(N_KV):
            kept = c.kept_positions[i, h]
            assert protected <= set(kept.tolist())
            # the cache holds the original (rotated) keys and values of exactly the kept positions, per KV head
            torch.testing.assert_close(c.cache.layers[i].keys[0, h], full.cache.layers[i].keys[0, h, kept])
            torch.testing.assert_close(c.cache.layers[i].values[0, h], full.cache.layers[i].values[0, h, kept])
            # and they are the top-scored ones among the unprotected
            scores = c.scores[i, h if head_mode == "per_kv_head" else 0]
            free = torch.ones(64, dtype=torch.bool)
            free[list(protected)] = False
            chosen = torch.zeros(64, dtype=torch.bool)
            chosen[kept] = True
            assert scores[free & chosen].min() >= scores[free & ~chosen].max()
    differs = [bool((c.kept_positions[i, 0] != c.kept_positions[i, 1:]).any()) for i in range(N_LAYERS)]
    if head_mode == "per_kv_head":
        assert any(differs)  # each KV head keeps its own set in at least one layer
        assert c.scores.shape == (N_LAYERS, N_KV, 64)
    else:
        assert not any(differs)
        assert c.scores.shape == (N_LAYERS, 1, 64)


@pytest.mark.slow
def test_compressed_cache_uses_original_positions(lm):
    model, _, ctx, cont = lm
    c = compress_prefill(model, ctx, "normalized_attention", 0.5, n_sink=2, recent_window=4)
    assert c.compressed_length == 32 and c.next_position == 64
    at_once = continuation_logits(model, c, cont)
    assert c.cache.get_seq_length() == 32  # restored after the call
    one_by_one = torch.cat([continuation_logits(model, c, cont[:, i : i + 1], restore=False)
                            for i in range(cont.shape[1])], dim=1)
    assert c.cache.get_seq_length() == 32 + cont.shape[1] and c.appended() == cont.shape[1]
    torch.testing.assert_close(one_by_one, at_once, atol=2e-4, rtol=1e-4)
    # cache-relative positions (32.., what the model infers from the cache length) give other logits: the check bites
    c = compress_prefill(model, ctx, "normalized_attention", 0.5, n_sink=2, recent_window=4)
    with torch.inference_mode():
        relative = model(cont, cache=c.cache, use_cache=True).logits.float()
    assert (relative - at_once).abs().max() > 1e-2


@pytest.mark.slow
def test_cache_length_assertion_is_live(lm, monkeypatch):
    import salience.harness.kv_prefill_compression as kvc

    model, _, ctx, _ = lm
    original = kvc._gather_context
    monkeypatch.setattr(kvc, "_gather_context", lambda states, index, n: original(states, index, n)[:, :, 1:])
    with pytest.raises(RuntimeError, match="expected 16"):
        compress_prefill(model, ctx, "key_norm", 16)


@pytest.mark.slow
def test_fused_path_keeps_what_eager_keeps(lm):
    model, _, ctx, _ = lm
    eager = compress_prefill(model, ctx, "accumulated_attention", 0.25, n_sink=2)
    fused = compress_prefill(model, ctx, "accumulated_attention", 0.25, n_sink=2, attention="fused")
    assert fused.cache_lengths == eager.cache_lengths == [16] * N_LAYERS
    assert (fused.kept_positions == eager.kept_positions).float().mean() > 0.9  # near-ties may flip


@pytest.fixture(scope="module")
def needle(lm):
    from salience.data import build_needle_prompt, random_passkey, wikipedia_haystack

    _, tok, _, _ = lm
    hay = wikipedia_haystack(min_chars=20_000)
    return [build_needle_prompt(tok, hay, *random_passkey(seed=s), depth=d, context_tokens=128)
            for s, d in [(0, 0.1), (3, 0.5)]]


@pytest.mark.slow
def test_query_aware_scores_with_the_question_rows(lm, needle):
    model, tok, _, _ = lm
    x = kv_passkey.needle_inputs(tok, needle[0])
    ctx, question = x.context_ids, x.question_ids
    n_ctx, n_q = ctx.shape[1], question.shape[1]
    snapkv = get_scorer("snapkv", window=n_q)
    agnostic = compress_prefill(model, ctx, snapkv, 0.2, n_sink=4)
    aware = compress_prefill(model, ctx, snapkv, 0.2, question_ids=question, query_aware=True, n_sink=4)
    budget = agnostic.budget_tokens
    assert budget == aware.budget_tokens == -(-n_ctx // 5)
    assert agnostic.cache_lengths == [budget] * N_LAYERS and agnostic.next_position == n_ctx
    assert aware.cache_lengths == [budget + n_q] * N_LAYERS and aware.next_position == n_ctx + n_q
    # the question's entries stay whole after the kept context entries
    full = full_prefill(model, ctx, question)
    for i in (0, N_LAYERS - 1):
        torch.testing.assert_close(aware.cache.layers[i].keys[:, :, budget:], full.cache.layers[i].keys[:, :, n_ctx:])
    # scoring used the question's rows: the window is the question, not the end of the context
    assert (aware.scores - agnostic.scores).abs().max() > 1e-3
    assert (aware.kept_positions != agnostic.kept_positions).any()
    # an oracle that protects the needle keeps all of it in every layer and head
    span = torch.zeros(n_ctx, dtype=torch.bool)
    span[slice(*x.needle_span)] = True
    oracle = compress_prefill(model, ctx, "key_norm", 0.2, protect=span)
    assert (oracle.span_kept(*x.needle_span) == 1).all()
    for name, c in (("agnostic", agnostic), ("query-aware", aware)):
        kept = c.span_kept(*x.needle_span)
        print(f"\nsnapkv@0.2 {name}: needle kept {float(kept.mean()):.3f} of entries, whole span in "
              f"{int((kept == 1).sum())}/{kept.numel()} layer-heads")


@pytest.mark.slow
def test_continuation_nll_and_kl_on_wikipedia(lm):
    model, tok, _, _ = lm
    ((ctx, cont),) = kv_tasks.wikipedia_continuations(tok, n=1, context_tokens=96, continuation_tokens=24)
    df = kv_tasks.continuation_metrics(model, ctx, cont, ["accumulated_attention", "key_norm"], [1.0, 0.25],
                                       n_sink=4, recent_window=4)
    print("\n" + df.to_string())
    assert list(df.scorer) == ["uncompressed"] + ["accumulated_attention"] * 2 + ["key_norm"] * 2
    base = df.iloc[0]
    assert base.budget == 1.0 and base.kl_mean == 0.0 and base.n_predicted == 23
    full, small = df[df.budget_tokens == 96].iloc[1:], df[df.budget_tokens == 24]
    assert (full.kl_mean < 1e-6).all() and full.nll.tolist() == pytest.approx([base.nll] * 2, rel=1e-5)
    assert len(small) == 2 and (small.kl_mean > 1e-3).all() and (small.top1_agreement <= 1).all()
    kl = kv_tasks.kl_to_full_cache(model, ctx, cont, "key_norm", 0.25, n_sink=4, recent_window=4)
    assert "nll" not in kl and kl.kl_mean.tolist() == pytest.approx([0.0, small.kl_mean.iloc[1]], abs=1e-6)
    auc = kv_tasks.area_under_budget_curve(df, "kl_mean")
    print(auc.to_string())
    assert list(auc.scorer) == ["uncompressed", "accumulated_attention", "key_norm"]
    assert auc.auc.iloc[0] == 0.0 and (auc.auc.iloc[1:] > 0).all()


@pytest.mark.slow
def test_passkey_runs_teacher_forced_greedy_equals_real_greedy_decoding(lm, needle):
    """greedy_correct (every answer token is the argmax, teacher-forced) is exactly 'greedy decoding after the answer
    prefix emits the passkey first'; checked against real greedy decoding on the compressed caches."""
    model, tok, _, _ = lm
    prefix = "The secret passkey is"
    scorers = {"snapkv": get_scorer("snapkv", window=8), "recency": get_scorer("recency")}
    df = kv_passkey.passkey_runs(model, tok, needle, scorers, [0.25, 0.5], n_sink=4, recent_window=8,
                                 answer_prefix=prefix, chat_template=False, progress=False)
    print("\n" + df[["prompt", "mode", "scorer", "budget", "cache_len", "answer_logprob", "greedy_correct",
                     "needle_kept"]].to_string())
    assert len(df) == 2 * 2 * (1 + 2 * 3)
    assert (df[df.scorer == "oracle"].needle_kept == 1.0).all()
    base = df[df.scorer == "uncompressed"]
    assert (base.answer_kl.abs() < 1e-6).all() and (base.needle_kept == 1.0).all()
    checked = 0
    for k, prompt in enumerate(needle):
        x = kv_passkey.needle_inputs(tok, prompt, answer_prefix=prefix, chat_template=False)
        m = x.answer_ids.shape[1]
        for mode in kv_passkey.MODES:
            aware = mode == "query-aware"
            for name in ("uncompressed", "snapkv", "recency"):
                row = df[(df.prompt == k) & (df["mode"] == mode) & (df.scorer == name) & (df.budget.isin([1.0, 0.5]))]
                if name == "uncompressed":
                    c = full_prefill(model, x.context_ids, x.question_ids if aware else None)
                else:
                    c = compress_prefill(model, x.context_ids, scorers[name], 0.5, n_sink=4, recent_window=8,
                                         question_ids=x.question_ids if aware else None, query_aware=aware)
                feed = x.answer_prefix_ids if aware else torch.cat([x.question_ids, x.answer_prefix_ids], dim=1)
                assert int(row.cache_len.iloc[0]) == c.compressed_length
                decoded = greedy_tokens(model, c, feed, m)
                assert bool(row.greedy_correct.iloc[0]) == (decoded == x.answer_ids[0].tolist()), (k, mode, name)
                checked += 1
    assert checked == 12
    cells = kv_passkey.solvable_cells(df, 0.5)
    print(cells.to_string())
    assert set(cells["mode"]) == set(kv_passkey.MODES) and cells.oracle_fits.all()


BAD = [
    (dict(budget=0.0), r"ratio must lie in \(0, 1\]"),
    (dict(budget=-0.5), r"ratio must lie in \(0, 1\]"),
    (dict(budget=1.5), r"ratio must lie in \(0, 1\]"),
    (dict(budget=65), r"token budget must lie in \[1, 64\]"),
    (dict(budget=0), r"token budget must lie in \[1, 64\]"),
    (dict(budget=16, recent_window=65), r"recent_window \(65\) is longer than the context .*\[0, 64\]"),
    (dict(budget=16, scorer=get_scorer("snapkv", window=80)), r"window \(80\) is longer than the prompt .*\[1, 64\]"),
    (dict(budget=8, n_sink=4, recent_window=8), r"exceed the budget of 8 tokens"),
    (dict(budget=16, head_mode="per_query_head"), r"head_mode must be one of \('per_kv_head', 'shared'\)"),
    (dict(budget=16, scorer="h2o"), r"unknown scorer 'h2o'; available: .*accumulated_attention"),
    (dict(budget=16, scorer="snapkv", attention="fused"), r"need more than key mass; run them with attention='eager'"),
    (dict(budget=16, attention="flash"), r"attention must be one of \('eager', 'fused'\)"),
    (dict(budget=4, protect=torch.arange(64) < 5), r"5 protected tokens .* exceed the budget of 4 tokens"),
    (dict(budget=16, query_aware=True), r"query_aware=True needs question_ids"),
    (dict(budget=16, question_ids=torch.ones(1, 4, dtype=torch.long)), r"only with query_aware=True"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kwargs,match", BAD, ids=[
    "ratio0", "ratio_negative", "ratio_above_1", "tokens_above_context", "tokens0", "recent_window_too_long",
    "scorer_window_too_long", "protected_exceed_budget", "head_mode", "unknown_scorer", "fused_needs_attention",
    "attention_path", "protect_exceeds_budget", "query_aware_without_question", "question_without_query_aware"])
def test_bad_input_names_the_valid_range(lm, kwargs, match):
    model, _, ctx, _ = lm
    kwargs = {"scorer": "accumulated_attention", **kwargs}
    with pytest.raises(ValueError, match=match):
        compress_prefill(model, ctx, **kwargs)


@pytest.mark.slow
def test_tasks_refuse_bad_input_before_running(lm):
    model, tok, ctx, cont = lm
    with pytest.raises(ValueError, match=r"token budget must lie in \[1, 64\]"):
        kv_tasks.continuation_metrics(model, ctx, cont, "key_norm", [0.5, 100])
    with pytest.raises(ValueError, match="unknown scorer"):
        kv_tasks.continuation_metrics(model, ctx, cont, ["key_norm", "nope"], 0.5)
    with pytest.raises(ValueError, match="pass a dict"):
        kv_tasks.continuation_metrics(model, ctx, cont, ["key_norm", "key_norm"], 0.5)
    with pytest.raises(ValueError, match="need more than key mass"):
        kv_tasks.continuation_metrics(model, ctx, cont, "tova", 0.5, attention="fused")
