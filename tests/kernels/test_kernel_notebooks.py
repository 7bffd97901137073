"""The kernel notebooks' verdict logic: each part can be supported and each can fail, on synthetic grids and CSVs.

Nothing here times anything: benchmark rows are made up so that the rule, not the machine, is under test.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from salience.experiments import kernel_lightning_attention as la
from salience.experiments import kernel_scored_attention as sa
from salience.experiments.kernel_common import correctness_part

CSV = Path("synthetic.csv")


def _la_bench(per_token_us, sdpa_factor=4.0, sweeps=8, noise=0.02, seed=0) -> pd.DataFrame:
    """Synthetic LA-2 / SDPA rows: ``per_token_us(n)`` is LA-2's time per token, SDPA is ``sdpa_factor`` × slower
    at every N; each sweep multiplies both by its own load factor and each row by independent noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for sweep in range(1, sweeps + 1):
        load = rng.uniform(0.9, 1.3)
        for n in (512, 1024, 2048, 4096, 8192, 16384):
            for method, factor in (("la2", 1.0), ("sdpa", sdpa_factor)):
                us = per_token_us(n) * factor * load * (1 + noise * rng.standard_normal())
                rows.append(dict(device="cpu", threads=1, dtype="float32", head_dim=64, heads=4, sweep=sweep, n=n,
                                 method=method, status="ok", time_ms=us * n / 1e3, us_per_token=us,
                                 cpu_ms=us * n / 1e3, cpu_us_per_token=us, peak_mib=1.0, load_avg_1m=1.0))
    return pd.DataFrame(rows)


def _passing_grid(n=12) -> pd.DataFrame:
    return pd.DataFrame(dict(n=range(n), dtype="float32", backend="blockwise", reference="masked", error=1e-7,
                             control_error=1e-7, allowed=3e-7, ratio=1.0, passed=True))  # fmt: skip


@pytest.fixture(scope="module")
def la_params():
    return la.Params.defaults()


def test_growth_is_zero_for_a_flat_time_per_token_and_tracks_a_power_law():
    flat = la.growth_per_sweep(_la_bench(lambda n: 8.0, noise=0.0), 2048)
    assert np.allclose(flat, 0.0) and len(flat) == 8
    rising = la.growth_per_sweep(_la_bench(lambda n: 8.0 * (n / 2048) ** 0.5, noise=0.0), 2048)
    assert np.allclose(rising, (16384 / 2048) ** 0.5 - 1)  # the growth from 2k to 16k


def test_speedup_is_the_smallest_ratio_over_long_n():
    bench = _la_bench(lambda n: 8.0, sdpa_factor=3.0, noise=0.0)
    bench.loc[(bench.method == "sdpa") & (bench.n == 16384), "time_ms"] *= 0.5  # SDPA only 1.5x slower at 16k
    assert np.allclose(la.speedup_per_sweep(bench, 8192), 1.5)
    with pytest.raises(ValueError, match="no N >= long_from"):
        la.speedup_per_sweep(bench, 32768)


@pytest.mark.parametrize("per_token, sdpa_factor, expected", [
    (lambda n: 8.0 * (2048 / n) ** 0.2, 4.0, ("supported", "supported", "supported")),  # falling time passes
    (lambda n: 8.0 * (n / 2048) ** 0.6, 4.0, ("supported", "contradicted", "partly supported")),  # grows 3.5x
    (lambda n: 8.0, 0.5, ("supported", "supported", "partly supported")),  # softmax twice as fast: not beaten
])
def test_la_verdict_follows_the_sweeps(la_params, per_token, sdpa_factor, expected):
    claim = la.judge_claim(_passing_grid(), _la_bench(per_token, sdpa_factor), CSV, la_params)
    flat, beats = claim.parts[1], claim.parts[2]
    assert (flat.verdict, claim.label) == (expected[1], expected[2])
    assert beats.verdict == ("supported" if sdpa_factor > 1 else "contradicted")
    assert flat.n == beats.n == 8 and flat.unit == "benchmark sweep"


def test_one_failing_case_contradicts_the_correctness_part(la_params):
    grid = _passing_grid()
    grid.loc[5, ["error", "passed"]] = [1e-3, False]
    part = correctness_part(la.CORRECT, grid, "test grid")
    assert part.verdict == "contradicted" and part.n == 12 and "1 fail, the first at n=5" in part.detail
    claim = la.judge_claim(grid, _la_bench(lambda n: 8.0), CSV, la_params)
    assert claim.label == "partly supported"


def test_memory_part_passes_below_the_target_and_fails_above():
    rows = [dict(device="cpu", threads=1, dtype="float32", head_dim=64, heads=4, kv_heads=2, n=n, method=m,
                 status="ok", time_ms=1.0, peak_mib=mib, load_avg_1m=1.0)
            for n, m, mib in ((4096, "scored", 40.0), (4096, "eager", 600.0), (8192, "scored", 130.0),
                              (8192, "eager", 2300.0), (8192, "sdpa", 9.0))]  # fmt: skip
    bench = pd.DataFrame(rows)
    ok = sa.memory_part(bench, 0.10)  # judged at 8192, the largest N where eager ran: 130 / 2300 = 5.7%
    assert ok.verdict == "supported" and ok.n == 1 and "5.7%" in ok.detail and "10%" in ok.statement
    assert sa.memory_part(bench, 0.05).verdict == "contradicted"
    with pytest.raises(ValueError, match="no N where both"):
        sa.memory_part(bench[bench.method != "eager"], 0.10)


def test_parts_parameter_must_name_exactly_the_judged_parts():
    from salience.params import ParamsError

    with pytest.raises(ParamsError, match="flat_time_per_token"):
        la.Params.defaults(parts={"flat_time_per_token": {"direction": "no_worse", "smallest_effect": 0.2}})


def test_the_judged_clock_must_be_in_the_csv(tmp_path):
    csv = tmp_path / "wall-only.csv"
    _la_bench(lambda n: 8.0).drop(columns=["cpu_ms", "cpu_us_per_token"]).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="no CPU time"):
        la.load_benchmark(la.Params.defaults(benchmark_csv=str(csv)), tmp_path)
    bench, _ = la.load_benchmark(la.Params.defaults(benchmark_csv=str(csv), clock="wall"), tmp_path)
    assert len(bench) == 96


def test_a_csv_with_two_configurations_is_refused(tmp_path):
    bench = pd.concat([_la_bench(lambda n: 8.0), _la_bench(lambda n: 8.0).assign(head_dim=128)])
    csv = tmp_path / "two.csv"
    bench.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="2 configurations"):
        la.load_benchmark(la.Params.defaults(benchmark_csv=str(csv)), tmp_path)
