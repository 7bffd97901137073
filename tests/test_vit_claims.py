"""Every vit-* claim judged from synthetic per-image tables whose answer is known: each part must follow the numbers
(and fail when they say the opposite), the baseline roles must be the ones the parameters name."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from salience.experiments import vit_cls_attention, vit_diversity, vit_leaderboard, vit_merging, vit_multilayer_flow
from salience.params import ParamsError
from salience.vision_readers import READERS

N = 300


class _Set(SimpleNamespace):
    def __len__(self):
        return self.n


def bench(train_table: pd.DataFrame | None = None) -> SimpleNamespace:
    """What judge_claim reads of a bench: the sets' sizes, the depth and the train images' rows."""
    def train():
        if train_table is None:
            raise AssertionError("this claim must not read the train images")
        return train_table

    return SimpleNamespace(sets={"test": _Set(n=N, grid=(8, 8)), "train": _Set(n=1000, grid=(8, 8))}, depth=12,
                           train_table=train)


BENCH = bench()


def synthetic(curves: dict[str, callable], keeps, *, setting="after_encoder", replicates=None, noise=0.01,
              unpruned=True, seed=0, methods=None) -> pd.DataFrame:
    """Per-image rows: ``curves[entry](base, keep, rng) -> p_true`` for every reader, image, kept share and replicate;
    ``base`` is each image's unpruned value (shared by every entry, so comparisons are paired)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 0.95, N)
    frames = []

    def add(entry, keep, rep, p, setting_):
        for reader in READERS:
            frames.append(pd.DataFrame(dict(setting=setting_, layer=12, entry=entry,
                                            method=(methods or {}).get(entry, "drop"), keep=keep,
                                            tokens=max(1, int(64 * keep)), replicate=rep, image=np.arange(N),
                                            label=0, reader=reader, p_true=np.clip(p, 0, 1), correct=p > 0.5,
                                            flops_ratio=1.0)))

    if unpruned:
        add("unpruned", 1.0, 0, base, "none")
    for entry, curve in curves.items():
        for keep in keeps:
            for rep in range((replicates or {}).get(entry, 1)):
                add(entry, keep, rep, curve(base, keep, rng) + rng.normal(0, noise, N), setting)
    return pd.concat(frames, ignore_index=True)


def verdicts(claim):
    return {p.id: p.verdict for p in claim.parts}


# ------------------------------------------------------------------------------------------ vit-cls-attention
def test_cls_attention_supported_when_the_numbers_say_so():
    params = vit_cls_attention.Params.defaults()
    table = synthetic({"cls_last": lambda b, k, r: b - 0.02, "cls_penultimate": lambda b, k, r: b - 0.03,
                       "multilayer": lambda b, k, r: b - 0.02, "random": lambda b, k, r: b - 0.3},
                      params.keeps, replicates={"random": 3})
    claim = vit_cls_attention.judge_claim(table, params, BENCH)
    assert verdicts(claim) == {"retention": "supported", "beats_random": "supported",
                               "ensemble_no_worse": "supported"}
    assert claim.label == "supported" and all(p.n == N for p in claim.parts)
    assert any("retrained_mean" in note for note in claim.notes)  # the other readers are reported too


def test_cls_attention_contradicted_when_the_numbers_say_the_opposite():
    params = vit_cls_attention.Params.defaults()
    table = synthetic({"cls_last": lambda b, k, r: 0.5 * b, "cls_penultimate": lambda b, k, r: 0.5 * b,
                       "multilayer": lambda b, k, r: 0.5 * b - 0.1, "random": lambda b, k, r: 0.7 * b},
                      params.keeps, replicates={"random": 3})
    claim = vit_cls_attention.judge_claim(table, params, BENCH)
    assert verdicts(claim) == {"retention": "contradicted", "beats_random": "contradicted",
                               "ensemble_no_worse": "contradicted"}
    assert claim.label == "contradicted"


def test_retention_is_judged_at_the_claimed_share_only():
    params = vit_cls_attention.Params.defaults()
    # fine at 25% and 10%, too low at 5%: the retention part must see the 5% values
    table = synthetic({"cls_last": lambda b, k, r: b - (0.4 if k == 0.05 else 0.0),
                       "cls_penultimate": lambda b, k, r: b, "multilayer": lambda b, k, r: b,
                       "random": lambda b, k, r: b - 0.5}, params.keeps)
    assert verdicts(vit_cls_attention.judge_claim(table, params, BENCH))["retention"] == "contradicted"


# ----------------------------------------------------------------------------------------- vit-multilayer-flow
def test_flow_is_judged_against_the_strongest_single_layer():
    params = vit_multilayer_flow.Params.defaults()
    curves = {"cls_last": lambda b, k, r: b - 0.3, "cls_penultimate": lambda b, k, r: b - 0.05,
              "cls_antepenultimate": lambda b, k, r: b - 0.2, "multilayer": lambda b, k, r: b - 0.1,
              "attention_rollout": lambda b, k, r: b - 0.1, "flowcut": lambda b, k, r: b - 0.15,
              "hiprune": lambda b, k, r: b, "random": lambda b, k, r: b - 0.4}
    table = synthetic(curves, params.keeps, replicates={"random": 2})
    assert vit_multilayer_flow.strongest_single_layer(table, params, "attention_pool") == "cls_penultimate"
    train = synthetic(curves, params.keeps, replicates={"random": 2}, seed=1)
    claim = vit_multilayer_flow.judge_claim(table, params, bench(train))
    # flowcut beats cls_last but not the strongest single layer: contradicted; hiprune beats it
    assert verdicts(claim) == {"flowcut_beats_cls": "contradicted", "hiprune_beats_cls": "supported"}
    assert claim.label == "partly supported" and "cls_penultimate" in claim.parts[0].detail


def test_flow_baseline_is_chosen_on_the_train_images():
    params = vit_multilayer_flow.Params.defaults()
    curves = {"cls_last": lambda b, k, r: b - 0.3, "cls_penultimate": lambda b, k, r: b - 0.05,
              "cls_antepenultimate": lambda b, k, r: b - 0.2, "multilayer": lambda b, k, r: b - 0.1,
              "attention_rollout": lambda b, k, r: b - 0.1, "flowcut": lambda b, k, r: b - 0.1,
              "hiprune": lambda b, k, r: b - 0.1, "random": lambda b, k, r: b - 0.4}
    # on the train images cls_last looks strongest; on the test images cls_penultimate is
    train = synthetic({**curves, "cls_last": lambda b, k, r: b}, params.keeps, seed=1)
    table = synthetic(curves, params.keeps)
    claim = vit_multilayer_flow.judge_claim(table, params, bench(train))
    # judged against cls_last on the test images (b - 0.3): both rules win; the test-best baseline would beat flowcut
    assert verdicts(claim) == {"flowcut_beats_cls": "supported", "hiprune_beats_cls": "supported"}
    assert "b: cls_last" in claim.parts[0].detail and "train images" in claim.parts[0].detail
    assert any("would have been cls_penultimate" in note for note in claim.notes)


# --------------------------------------------------------------------------------------------- vit-diversity
@pytest.mark.parametrize("random_offset, noise, expected", [
    (0.0, 0.01, "supported"),      # random within ±δ of [CLS] attention: equivalent
    (-0.2, 0.01, "contradicted"),  # far below: not equivalent
    (-0.015, 0.3, "inconclusive"),  # too noisy to tell
])
def test_random_as_strong_is_an_equivalence(random_offset, noise, expected):
    params = vit_diversity.Params.defaults()
    rng = np.random.default_rng(5)
    jitter = rng.normal(0, noise, N)
    curves = {"cls_attention": lambda b, k, r: b - 0.1, "divprune": lambda b, k, r: b,
              "dart": lambda b, k, r: b - 0.3, "todre": lambda b, k, r: b - 0.1, "spatial_grid": lambda b, k, r: b,
              "random": lambda b, k, r: b - 0.1 + random_offset + jitter}
    claim = vit_diversity.judge_claim(synthetic(curves, params.keeps, replicates={"random": 3}), params, BENCH)
    v = verdicts(claim)
    assert v["random_as_strong"] == expected
    assert v["divprune_beats_cls"] == "supported" and v["dart_beats_cls"] == "contradicted"
    assert v["todre_beats_cls"] == "inconclusive"  # a tie is not support for "better"
    assert claim.parts[-1].direction == "equivalent" and claim.parts[-1].confidence == 0.90


def test_diversity_parts_read_only_the_extreme_shares():
    params = vit_diversity.Params.defaults()
    # divprune loses at 25% and wins at 10% and 5%: the part is about the extreme shares
    curves = {"cls_attention": lambda b, k, r: b - 0.1, "divprune": lambda b, k, r: b - (0.5 if k > 0.1 else 0),
              "dart": lambda b, k, r: b, "todre": lambda b, k, r: b, "spatial_grid": lambda b, k, r: b,
              "random": lambda b, k, r: b - 0.1}
    claim = vit_diversity.judge_claim(synthetic(curves, params.keeps), params, BENCH)
    assert verdicts(claim)["divprune_beats_cls"] == "supported"


# ---------------------------------------------------------------------------------------------- vit-merging
def _latency(tome_seconds: float, repeats: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for r in range(repeats):
        load = rng.uniform(1, 3)  # a load change hits both configurations of a repeat alike
        for config, s in (("unreduced", 1.0), ("tome", tome_seconds * rng.uniform(0.95, 1.05)), ("cls", 0.8)):
            rows.append(dict(repeat=r, config=config, method="x", keep=0.1, seconds=s * load,
                             cpu_seconds=s * load * 2, flops=100.0 * s, tokens_last_layer=8))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("tome_seconds, expected", [(0.6, "supported"), (1.4, "contradicted")])
def test_merging_parts_follow_the_numbers(tome_seconds, expected):
    params = vit_merging.Params.defaults()
    after = synthetic({"cls": lambda b, k, r: b - 0.2, "random": lambda b, k, r: b - 0.4,
                       "visionzip": lambda b, k, r: b - 0.1, "tome": lambda b, k, r: b - 0.3}, params.keeps)
    inside = synthetic({"cls": lambda b, k, r: b - 0.2, "tome": lambda b, k, r: b - 0.4},
                       params.in_encoder_keeps, setting="in_encoder", unpruned=False)
    claim = vit_merging.judge_claim(pd.concat([after, inside]), _latency(tome_seconds), params, BENCH)
    v = verdicts(claim)
    assert v["visionzip_beats_drop"] == "supported"  # after the encoder, VisionZip ahead
    assert v["tome_beats_drop"] == "contradicted"  # inside it, ToMe behind: each part reads its own setting
    assert v["speedup"] == expected and claim.parts[-1].n == 8
    sp = vit_merging.speedups(_latency(tome_seconds))
    np.testing.assert_allclose(sp[sp.config == "tome"].log_speedup, -np.log(tome_seconds), atol=0.06)


# ------------------------------------------------------------------------------------------ vit-leaderboard
def test_area_by_hand():
    table = synthetic({"lin": lambda b, k, r: k + 0 * b}, [0.25, 0.5], noise=0.0)
    table.loc[table.entry == "unpruned", "p_true"] = 1.0
    areas = vit_leaderboard.area_table(table)
    area = vit_leaderboard.per_image_area(areas, "attention_pool", "lin", "after_encoder")
    # points (0.25, 0.25), (0.5, 0.5), (1, 1): a straight line, mean height over [0.25, 1] = 0.625
    np.testing.assert_allclose(area.to_numpy(), 0.625)
    assert len(area) == N
    with pytest.raises(ValueError, match="no area for entry 'missing'"):
        vit_leaderboard.per_image_area(areas, "attention_pool", "missing", "after_encoder")
    with pytest.raises(ValueError, match="every kept share"):  # an image without a value at some share
        vit_leaderboard.area_table(table.drop(table[(table.entry == "lin") & (table.image == 3)
                                                    & (table.keep == 0.5)].index))


def test_leaderboard_parts_and_board():
    params = vit_leaderboard.Params.defaults()
    labels = [s.key for s in params.scorers] + [m.label for m in params.merges]
    curves = {label: (lambda b, k, r: b - 0.2) for label in labels}
    curves["cls_attention"] = lambda b, k, r: b - 0.05
    curves["divprune"] = lambda b, k, r: b  # the best entry
    curves["random"] = lambda b, k, r: b - 0.25
    methods = {m.label: m.method for m in params.merges}
    table = pd.concat([synthetic(curves, params.keeps, replicates={"random": 3}, methods=methods),
                       synthetic(curves, params.in_encoder_keeps, setting="in_encoder", unpruned=False,
                                 methods=methods)])
    areas = vit_leaderboard.area_table(table)
    assert vit_leaderboard.best_entry(areas, params, "attention_pool") == "divprune"
    claim = vit_leaderboard.judge_claim(table, params, bench(table), areas)
    assert verdicts(claim) == {"attention_beats_random": "supported", "random_as_strong": "contradicted"}
    board = vit_leaderboard.board(table, params, areas)
    top = board[board.setting == "after_encoder"].iloc[0]
    assert top.entry == "divprune" and top["rank"] == 1 and top.vs_random_low > 0
    assert set(board.group) == {"attention", "attention-free", "merging", "random"}


def test_leaderboard_best_entry_is_chosen_on_the_train_images():
    params = vit_leaderboard.Params.defaults()
    labels = [s.key for s in params.scorers] + [m.label for m in params.merges]
    methods = {m.label: m.method for m in params.merges}
    curves = {label: (lambda b, k, r: b - 0.2) for label in labels}
    curves["random"] = lambda b, k, r: b - 0.1
    curves["key_norm"] = lambda b, k, r: b - 0.1  # as good as random on the test images
    curves["divprune"] = lambda b, k, r: b  # the test images' best
    table = synthetic(curves, params.keeps, replicates={"random": 3}, methods=methods)
    # on the train images key_norm is the best entry (divprune trails it)
    train = synthetic({**curves, "key_norm": lambda b, k, r: b, "divprune": lambda b, k, r: b - 0.2}, params.keeps,
                      replicates={"random": 3}, methods=methods, seed=1)
    claim = vit_leaderboard.judge_claim(table, params, bench(train), vit_leaderboard.area_table(table))
    # random vs key_norm (chosen on train) is a tie; against the test-best divprune it would be contradicted
    assert verdicts(claim)["random_as_strong"] == "supported"
    assert "b: key_norm" in claim.parts[1].detail and "train images" in claim.parts[1].detail
    assert any("would have been divprune" in note for note in claim.notes)


@pytest.mark.parametrize("module, values, needle", [
    (vit_leaderboard, {"scorers": ["random", "snapkv", "cls_attention"]}, "causal query stream"),
    (vit_leaderboard, {"keeps": [1.0, 0.5]}, "must be < 1"),
    (vit_cls_attention, {"claim_keep": 0.2}, "claim_keep 0.2 must be one of"),
    (vit_cls_attention, {"last_layer": "nope"}, "must be labels in `scorers`"),
    (vit_cls_attention, {"parts": {"retention": {"direction": "better", "smallest_effect": 0.02}}},
     "claim parts in the parameters must be exactly"),
    (vit_diversity, {"extreme_keep": 0.01}, "no kept share"),
    (vit_merging, {"merges": [{"method": "visionzip", "label": "vz"}]}, "needs `dominant`"),
    (vit_merging, {"in_encoder_entries": ["tome"]}, "include the drop baseline"),
    (vit_merging, {"latency_keep": 0.3}, "latency_keep 0.3 must be one of"),
    (vit_multilayer_flow, {"photo": "nope"}, "unknown photo"),
])
def test_bad_parameters_name_what_is_allowed(module, values, needle):
    with pytest.raises(ParamsError, match=needle):
        module.Params.defaults(**values)


def test_merging_reads_stored_timings_and_refuses_other_settings(tmp_path):
    params = vit_merging.Params.defaults()
    lat = _latency(0.6).assign(model=params.model, image_size=params.image_size, layer=params.in_encoder_layer,
                               batch=params.latency_batch, repeats=params.repeats, timing_inner=params.timing_inner,
                               device="cpu", threads=1, torch="x", load_avg_1m=0.5)
    lat.loc[lat.config == "unreduced", "keep"] = 1.0
    lat.to_csv(tmp_path / "lat.csv", index=False)
    read, source = vit_merging.latency(None, vit_merging.Params.defaults(latency_csv=str(tmp_path / "lat.csv")))
    assert len(read) == len(lat) and "lat.csv" in source and "1 thread" in source
    other = vit_merging.Params.defaults(latency_csv=str(tmp_path / "lat.csv"), in_encoder_layer=3)
    with pytest.raises(ValueError, match="was measured with"):
        vit_merging.latency(None, other)
    # every setting the timings depend on is checked, and the error names what differs
    for field, value in (("model", "facebook/dinov2-base"), ("image_size", 224), ("repeats", 10), ("timing_inner", 5)):
        other = vit_merging.Params.defaults(latency_csv=str(tmp_path / "lat.csv"), **{field: value})
        with pytest.raises(ValueError, match=rf"measured with {field}=\S+, this run asks for {field}={value}:"):
            vit_merging.latency(None, other)
    lat.assign(threads=2).to_csv(tmp_path / "threads.csv", index=False)
    with pytest.raises(ValueError, match="threads=2, this run asks for threads=1"):
        vit_merging.latency(None, vit_merging.Params.defaults(latency_csv=str(tmp_path / "threads.csv")))
    lat.drop(columns=["image_size"]).to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(ValueError, match="does not say which image_size"):
        vit_merging.latency(None, vit_merging.Params.defaults(latency_csv=str(tmp_path / "old.csv")))
    with pytest.raises(ValueError, match="does not exist"):
        vit_merging.latency(None, vit_merging.Params.defaults(latency_csv=str(tmp_path / "nope.csv")))
