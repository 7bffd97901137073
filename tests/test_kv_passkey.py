"""Passkey retrieval (:mod:`salience.kv_passkey`) on a tiny random Llama (``tiny_llama`` in conftest.py), from
hand-made :class:`~salience.kv_passkey.NeedleInputs`: the oracle keeps the needle or, when it cannot fit, gives a
flagged row without numbers; each row's answer log-probability is the one its own (mode, scorer, budget) compression
gives, recomputed one compression at a time; and the solvable cells. The real SmolLM2 (real prompts, greedy decoding)
runs in tests/test_kv_prefill_smollm2.py (slow)."""

import math

import pandas as pd
import pytest
import torch

from salience import kv_passkey
from salience.harness import compress_prefill, continuation_logits
from salience.harness.kv_prefill import view_seed
from salience.kv_passkey import MODES, NeedleInputs, needle_runs
from salience.scorers import get_scorer
from salience.seeding import unit_seed

SEED, N_SINK, RECENT = 5, 1, 4
BUDGETS = [0.125, 0.5, 1.0]


def _inputs(seed: int, context_len: int, span: tuple[int, int], question_len: int, m: int) -> NeedleInputs:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, 32, (1, n), generator=g)

    return NeedleInputs(context_ids=ids(context_len), question_ids=ids(question_len), answer_prefix_ids=ids(2),
                        needle_span=span, answer_ids=ids(m), depth=span[0] / context_len, answer=f"key {seed}")


@pytest.fixture(scope="module")
def passkey(tiny_llama):
    # two prompts of different lengths and answer lengths, fed together (the answer rows are the last m of each feed)
    inputs = [_inputs(0, 40, (14, 20), 5, 3), _inputs(1, 36, (10, 14), 4, 2)]
    scorers = {"tova": get_scorer("tova"), "random": get_scorer("random"),
               "snapkv": get_scorer("snapkv", window=4, kernel_size=3)}
    runs = needle_runs(tiny_llama, inputs, scorers, BUDGETS, n_sink=N_SINK, recent_window=RECENT, seed=SEED,
                       batch_size=5, units_per_batch=2, progress=False)
    return tiny_llama, inputs, scorers, runs


def _row(runs, k, mode, scorer, budget) -> pd.Series:
    sel = runs[(runs.prompt == k) & (runs["mode"] == mode) & (runs.scorer == scorer) & (runs.budget == budget)]
    assert len(sel) == 1, (k, mode, scorer, budget)
    return sel.iloc[0]


def test_rows_of_every_prompt_mode_and_entry(passkey):
    _, inputs, scorers, runs = passkey
    per_mode = 1 + len(BUDGETS) * (1 + len(scorers))
    assert len(runs) == len(inputs) * len(MODES) * per_mode
    first = runs[(runs.prompt == 0) & (runs["mode"] == MODES[0])]
    assert list(first.scorer) == ["uncompressed"] + ["oracle"] * 3 + ["tova"] * 3 + ["random"] * 3 + ["snapkv"] * 3
    assert runs.answer.tolist()[0] == "key 0" and runs.depth.tolist()[0] == pytest.approx(0.35)
    assert runs[runs.prompt == 1].needle_start.unique().tolist() == [10]


def test_the_oracle_keeps_the_needle_or_gives_a_flagged_row(passkey):
    _, inputs, _, runs = passkey
    oracle = runs[runs.scorer == "oracle"]
    # 0.125 of 40 (36) tokens is 5: the needle (6 or 4 tokens) and the 5 protected tokens cannot fit
    unfit = oracle[oracle.budget == 0.125]
    assert len(unfit) == 4 and not unfit.oracle_fits.any()
    assert unfit.answer_logprob.isna().all() and unfit.answer_kl.isna().all() and unfit.needle_kept.isna().all()
    assert unfit.greedy_correct.isna().all() and unfit.cache_len.isna().all()
    fit = oracle[oracle.budget > 0.125]
    assert fit.oracle_fits.all() and (fit.needle_kept == 1.0).all() and (fit.needle_heads_intact == 1.0).all()
    assert fit.answer_logprob.notna().all()
    # the scorers run at every budget, the oracle's failure does not stop them
    scored = runs[~runs.scorer.isin(["oracle", "uncompressed"])]
    assert scored.answer_logprob.notna().all() and scored.oracle_fits.all()
    cells = kv_passkey.solvable_cells(runs, 0.01).set_index(["mode", "budget"])
    assert not cells.loc[(MODES[0], 0.125), "oracle_fits"] and not cells.loc[(MODES[1], 0.125), "solvable"]
    assert cells.loc[(MODES[1], 0.5), "oracle_fits"]


def test_a_full_budget_gives_the_uncompressed_answer(passkey):
    _, inputs, scorers, runs = passkey
    for k in range(len(inputs)):
        for mode in MODES:
            base = _row(runs, k, mode, "uncompressed", 1.0)
            assert base.answer_kl == 0.0 and base.cache_len == base.context_len + (mode == MODES[1]) * base.question_len
            for label in ["oracle", *scorers]:
                row = _row(runs, k, mode, label, 1.0)
                assert row.answer_logprob == pytest.approx(base.answer_logprob, abs=1e-5), (k, mode, label)
                assert row.answer_kl < 1e-6 and row.greedy_correct == base.greedy_correct
                assert row.cache_len == base.cache_len and row.needle_kept == 1.0


def test_every_row_is_its_own_compression(passkey):
    """Each (prompt, mode, scorer, budget) row equals a separate prefill + compression of that prompt with that
    scorer (the random scorer with the generator the shared path gives it) and the answer fed on it alone: the
    batched rows line up with their compressions."""
    model, inputs, scorers, runs = passkey
    checked = 0
    for k, x in enumerate(inputs):
        m = x.answer_ids.shape[1]
        taught = torch.cat([x.answer_prefix_ids, x.answer_ids[:, :-1]], dim=1)
        answer = x.answer_ids[0]
        full = torch.cat([x.context_ids, x.question_ids, taught], dim=1)
        with torch.inference_mode():
            reference = torch.log_softmax(model(full).logits[0, -m:].float(), dim=-1)
        uncompressed = float(reference.gather(-1, answer[:, None]).mean())
        for mode in MODES:
            aware = mode == MODES[1]
            assert _row(runs, k, mode, "uncompressed", 1.0).answer_logprob == pytest.approx(uncompressed, abs=1e-5)
            feed = taught if aware else torch.cat([x.question_ids, taught], dim=1)
            for label, scorer in scorers.items():
                for budget in BUDGETS[:2]:
                    generator = torch.Generator().manual_seed(view_seed(unit_seed(SEED, k), mode, label))
                    c = compress_prefill(model, x.context_ids, scorer, budget, question_ids=x.question_ids if aware
                                         else None, query_aware=aware, n_sink=N_SINK, recent_window=RECENT,
                                         generator=generator)
                    logp = torch.log_softmax(continuation_logits(model, c, feed)[0, -m:], dim=-1)
                    kl = (reference.exp() * (reference - logp)).sum(-1).clamp(min=0.0).mean()
                    row = _row(runs, k, mode, label, budget)
                    assert row.answer_logprob == pytest.approx(float(logp.gather(-1, answer[:, None]).mean()),
                                                               abs=1e-4), (k, mode, label, budget)
                    assert row.answer_kl == pytest.approx(float(kl), abs=1e-4)
                    assert row.greedy_correct == bool((logp.argmax(-1) == answer).all())
                    assert row.cache_len == c.compressed_length == c.cache_lengths[0]
                    assert row.needle_kept == pytest.approx(float(c.span_kept(*x.needle_span).mean()))
                    checked += 1
    assert checked == len(inputs) * len(MODES) * len(scorers) * 2
    # at budget 0.5 the rows really differ from one another, so a mix-up could not pass unnoticed (at 0.125 every
    # scorer keeps just the 5 protected tokens)
    compressed = runs[(runs.budget == 0.5) & ~runs.scorer.isin(["oracle", "uncompressed"])]
    assert compressed.answer_logprob.round(6).nunique() == len(compressed)
    assert all(math.isfinite(v) for v in compressed.answer_logprob)


def test_needle_runs_refuse_inputs_without_an_answer(tiny_llama):
    x = _inputs(0, 40, (14, 20), 5, 3)
    bare = NeedleInputs(x.context_ids, x.question_ids, None, x.needle_span, x.answer_ids)
    with pytest.raises(ValueError, match="answer_prefix_ids and answer_ids"):
        needle_runs(tiny_llama, [bare], "tova", [0.5], progress=False)
    with pytest.raises(ValueError, match="modes must be among"):
        needle_runs(tiny_llama, [x], "tova", [0.5], modes=["aware"], progress=False)


def test_solvable_cells_need_the_oracle_to_fit_and_answer():
    rows = []
    for mode in kv_passkey.MODES:
        for prompt in range(4):
            rows.append(dict(mode=mode, prompt=prompt, scorer="uncompressed", budget=1.0, oracle_fits=True,
                             greedy_correct=True, answer_logprob=-0.1))
            rows.append(dict(mode=mode, prompt=prompt, scorer="oracle", budget=0.1, oracle_fits=False,
                             greedy_correct=None, answer_logprob=float("nan")))
            rows.append(dict(mode=mode, prompt=prompt, scorer="oracle", budget=0.5, oracle_fits=True,
                             greedy_correct=prompt < (3 if mode == "query-agnostic" else 2), answer_logprob=-0.2))
    cells = kv_passkey.solvable_cells(pd.DataFrame(rows), 0.75).set_index(["mode", "budget"])
    assert not cells.loc[("query-agnostic", 0.1), "solvable"] and not cells.loc[("query-agnostic", 0.1), "oracle_fits"]
    agnostic = cells.loc[("query-agnostic", 0.5)]
    assert agnostic.solvable and agnostic.oracle_accuracy == 0.75
    assert not cells.loc[("query-aware", 0.5), "solvable"]  # 2 of 4 prompts
    with pytest.raises(ValueError, match=r"min_accuracy must lie in \(0, 1\]"):
        kv_passkey.solvable_cells(pd.DataFrame(rows), 0.0)

