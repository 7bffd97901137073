"""Claims judged from paired evidence: the one place where every notebook states and judges its claim.

A **claim** has **parts**. A part compares two arms on the same **units** (documents, prompts, images): ``a`` and
``b`` hold one value of one **metric** per unit, so the comparison is paired and the unit-to-unit spread sets the
interval. Each part declares a **direction** and a **smallest effect of interest** (``δ``, in the metric's units);
both live in the notebook's ``Params`` (:class:`PartRule`), with documented defaults in ``params/<notebook>.yaml``.

Rules (the same for every notebook):

* The **effect** is the mean over units of ``a − b``, reported with its interval from a seeded paired bootstrap
  (``scipy.stats.bootstrap``, BCa, :data:`N_RESAMPLES` resamples of the units). The **improvement** is the effect
  oriented so that positive means ``a`` is better (``−effect`` for a lower-is-better metric).
* ``better``: **supported** when the 95% interval of the improvement lies above zero, **contradicted** when it lies
  below zero, **inconclusive** otherwise. ``worse`` is the mirror image.
* ``no_worse`` (non-inferiority, e.g. "the layer ensemble is at least as good"): **supported** when the 95% interval
  of the improvement lies above ``−δ``, **contradicted** when it lies below ``−δ``, **inconclusive** otherwise.
* ``equivalent`` (two one-sided tests at α = 0.05, i.e. the 90% interval): **supported** when the interval lies inside
  ``(−δ, +δ)``, **contradicted** when it lies entirely outside (beyond ``+δ`` or below ``−δ``), **inconclusive**
  otherwise. A tie is never support for a superiority claim, and "no difference found" never proves equivalence.
* A claim about a share of a reference ("keeps ≥ 90% of the accuracy") passes ``a`` and ``0.9 × reference`` as
  ``b`` and is judged ``better``; a one-sample claim (a growth, a slope) passes zeros as ``b``
  (:func:`judge_one_sample`).
* An exhaustive check (every case of a correctness grid passes) is :func:`check`: **supported** when every case
  passes, **contradicted** otherwise; no interval (there is no sampling: every case is run).

The overall label follows from the parts (:func:`overall_label`): **supported** when every part is supported;
**contradicted** when at least one part is contradicted and none is supported; **partly supported** when at least one
part is supported and not all; **inconclusive** when every part is inconclusive.

Each run writes ``claims.json`` (:meth:`Claim.to_dict`) beside ``run.json``; the Findings cell and the report's
Claims page are rendered from it (:meth:`Claim.markdown`). Numbers are printed at the precision their interval
supports (:func:`fmt_interval`), so a stored notebook checks results, not round-off.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

#: resamples of every bootstrap interval (the issue's floor is 2,000)
N_RESAMPLES = 4000
DIRECTIONS = ("better", "worse", "no_worse", "equivalent")
PART_VERDICTS = ("supported", "contradicted", "inconclusive")
VERDICTS = ("supported", "partly supported", "contradicted", "inconclusive")
RULE = ("supported: every part supported; contradicted: a part contradicted and none supported; partly supported: "
        "some but not all parts supported; inconclusive: every part inconclusive")

Direction = Literal["better", "worse", "no_worse", "equivalent"]


class PartRule(BaseModel):
    """How one part of a claim is judged: the claimed direction and the smallest effect of interest (metric units)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    direction: Direction = Field(description="better / worse: superiority; no_worse: non-inferiority by at most δ; "
                                             "equivalent: two one-sided tests against ±δ")
    smallest_effect: float = Field(gt=0.0, description="smallest effect of interest δ, in the metric's units")


@dataclass(frozen=True)
class PartSpec:
    """What a part is about, fixed by the experiment's code: shown with every verdict.

    ``metric`` names the per-unit value (and its reader or task), ``unit`` what the comparison is paired over,
    ``higher_is_better`` the metric's orientation, ``papers`` the reference keys the part tests.
    """

    id: str
    statement: str
    metric: str
    unit: str
    higher_is_better: bool = True
    papers: tuple[str, ...] = ()


@dataclass
class Part:
    """One judged part: the spec, the rule and the numbers (``effect`` = mean of a − b, in metric units)."""

    id: str
    statement: str
    metric: str
    unit: str
    higher_is_better: bool
    direction: str
    smallest_effect: float
    n: int
    effect: float
    ci_low: float
    ci_high: float
    confidence: float
    method: str
    verdict: str
    papers: list[str] = field(default_factory=list)
    a_mean: float = float("nan")
    b_mean: float = float("nan")
    detail: str = ""

    @property
    def improvement(self) -> tuple[float, float, float]:
        """``(effect, low, high)`` oriented so that positive means the first arm is better."""
        if self.higher_is_better:
            return self.effect, self.ci_low, self.ci_high
        return -self.effect, -self.ci_high, -self.ci_low


def _seed(seed: int, key: str) -> int:
    """A stable per-part seed: the run's seed and the part's id (crc32, identical on every machine)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**32)


def paired_values(a, b, *, what: str = "comparison") -> tuple[np.ndarray, np.ndarray]:
    """Align two per-unit arrays. Series are aligned by their index (the unit ids must match exactly); arrays by
    position. Raises ValueError on mismatched units, NaN or fewer than 2 units."""
    if isinstance(a, pd.Series) and isinstance(b, pd.Series):
        if set(a.index) != set(b.index) or a.index.has_duplicates or b.index.has_duplicates:
            missing = sorted(set(a.index) ^ set(b.index), key=str)[:5]
            raise ValueError(f"{what}: the two arms must cover the same units once each; differing units: {missing}")
        b = b.loc[a.index]
    a_arr = np.asarray(a, dtype=np.float64).ravel()
    b_arr = np.asarray(b, dtype=np.float64).ravel()
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"{what}: {a_arr.size} values in the first arm, {b_arr.size} in the second")
    if a_arr.size < 2:
        raise ValueError(f"{what}: a paired interval needs at least 2 units, got {a_arr.size}")
    if not (np.isfinite(a_arr).all() and np.isfinite(b_arr).all()):
        raise ValueError(f"{what}: values must be finite (a NaN or infinity would pass silently into the mean)")
    return a_arr, b_arr


def paired_interval(diff: np.ndarray, *, confidence: float = 0.95, seed: int = 0,
                    n_resamples: int = N_RESAMPLES) -> tuple[float, float, str]:
    """Bootstrap interval of the mean of ``diff`` (BCa; percentile where BCa is undefined). Returns (low, high,
    method). All-equal differences give the degenerate interval [d, d]."""
    diff = np.asarray(diff, dtype=np.float64)
    if np.ptp(diff) == 0.0:
        d = float(diff[0])
        return d, d, "all units equal"
    rng = np.random.default_rng(seed)
    for method in ("BCa", "percentile"):
        with np.errstate(invalid="ignore", divide="ignore"):
            res = stats.bootstrap((diff,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                                  method=method, vectorized=True, random_state=rng)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi, f"paired bootstrap ({method}, {n_resamples} resamples)"
        rng = np.random.default_rng(seed)
    raise RuntimeError("bootstrap interval is undefined for these differences")  # pragma: no cover


def judge_interval(improvement_low: float, improvement_high: float, direction: str, smallest_effect: float) -> str:
    """A part's verdict from the interval of its improvement (positive = first arm better); see the module rules."""
    if direction == "better":
        return "supported" if improvement_low > 0 else "contradicted" if improvement_high < 0 else "inconclusive"
    if direction == "worse":
        return "supported" if improvement_high < 0 else "contradicted" if improvement_low > 0 else "inconclusive"
    if direction == "no_worse":
        if improvement_low > -smallest_effect:
            return "supported"
        return "contradicted" if improvement_high < -smallest_effect else "inconclusive"
    if direction == "equivalent":
        if -smallest_effect < improvement_low and improvement_high < smallest_effect:
            return "supported"
        if improvement_low >= smallest_effect or improvement_high <= -smallest_effect:
            return "contradicted"
        return "inconclusive"
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def judge(spec: PartSpec, rule: PartRule, a, b, *, seed: int = 0, n_resamples: int = N_RESAMPLES,
          detail: str = "") -> Part:
    """Judge one part from per-unit values ``a`` (the claimed-better arm) and ``b`` (its comparison).

    ``a`` and ``b``: pandas Series indexed by unit id (aligned by index) or equal-length arrays (aligned by position).
    """
    if n_resamples < 2000:
        raise ValueError(f"n_resamples must be >= 2000, got {n_resamples}")
    a_arr, b_arr = paired_values(a, b, what=spec.id)
    diff = a_arr - b_arr
    confidence = 0.90 if rule.direction == "equivalent" else 0.95
    lo, hi, method = paired_interval(diff, confidence=confidence, seed=_seed(seed, spec.id), n_resamples=n_resamples)
    effect = float(diff.mean())
    imp_lo, imp_hi = (lo, hi) if spec.higher_is_better else (-hi, -lo)
    verdict = judge_interval(imp_lo, imp_hi, rule.direction, rule.smallest_effect)
    return Part(id=spec.id, statement=spec.statement, metric=spec.metric, unit=spec.unit,
                higher_is_better=spec.higher_is_better, direction=rule.direction,
                smallest_effect=float(rule.smallest_effect), n=int(diff.size), effect=effect, ci_low=lo, ci_high=hi,
                confidence=confidence, method=method, verdict=verdict, papers=list(spec.papers),
                a_mean=float(a_arr.mean()), b_mean=float(b_arr.mean()), detail=detail)


def judge_one_sample(spec: PartSpec, rule: PartRule, values, *, seed: int = 0, n_resamples: int = N_RESAMPLES,
                     detail: str = "") -> Part:
    """A part about one per-unit quantity (a growth, a slope) against zero: :func:`judge` with ``b = 0``."""
    zeros = values * 0.0 if isinstance(values, pd.Series) else np.zeros(np.asarray(values).shape)
    return judge(spec, rule, values, zeros, seed=seed, n_resamples=n_resamples, detail=detail)


def check(spec: PartSpec, passed: Sequence[bool], worst: float, *, detail: str = "") -> Part:
    """An exhaustive check: every case must pass. ``worst`` is the worst case's statistic in ``spec.metric`` (e.g.
    error ÷ allowed error, where ≤ 1 passes); it is reported as the effect, with no interval."""
    passed = [bool(p) for p in passed]
    if not passed:
        raise ValueError(f"{spec.id}: a check needs at least one case")
    ok = all(passed)
    return Part(id=spec.id, statement=spec.statement, metric=spec.metric, unit=spec.unit,
                higher_is_better=spec.higher_is_better, direction="check", smallest_effect=0.0, n=len(passed),
                effect=float(worst), ci_low=float(worst), ci_high=float(worst), confidence=1.0,
                method=f"exhaustive check: {sum(passed)}/{len(passed)} cases pass",
                verdict="supported" if ok else "contradicted", papers=list(spec.papers), detail=detail)


def overall_label(verdicts: Iterable[str]) -> str:
    """The claim's label from its parts' verdicts (:data:`RULE`)."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("a claim needs at least one part")
    bad = [v for v in verdicts if v not in PART_VERDICTS]
    if bad:
        raise ValueError(f"part verdicts must be among {PART_VERDICTS}, got {bad}")
    supported = sum(v == "supported" for v in verdicts)
    if supported == len(verdicts):
        return "supported"
    if supported:
        return "partly supported"
    if any(v == "contradicted" for v in verdicts):
        return "contradicted"
    return "inconclusive"


# ------------------------------------------------------------------------------------------------- formatting
def decimals_for(width: float, extra: int = 1) -> int:
    """Decimals that show an interval of half-width ``width`` to one digit beyond its first significant digit."""
    if not math.isfinite(width) or width <= 0:
        return 3
    return max(0, min(8, extra - int(math.floor(math.log10(width)))))


def fmt_interval(effect: float, low: float, high: float, sign: bool = True) -> str:
    """``+0.023 [+0.012, +0.035]``: the point estimate and interval rounded to what the interval supports."""
    d = decimals_for(max(high - effect, effect - low))
    f = (lambda x: f"{x:+.{d}f}") if sign else (lambda x: f"{x:.{d}f}")
    return f"{f(effect)} [{f(low)}, {f(high)}]"


def fmt_value(x: float, width: float) -> str:
    """One number rounded like an interval of half-width ``width`` (e.g. an arm's mean next to its effect)."""
    return f"{x:.{decimals_for(width)}f}"


# ------------------------------------------------------------------------------------------------------ claim
@dataclass
class Claim:
    """A notebook's claim, its judged parts and the text that goes with them.

    ``setting`` says in one or two sentences how this run's setting differs from the papers' (model, data, where the
    reduction happens, reader); ``notes`` are further computed remarks (each must come from this run's numbers or
    be a statement of method, never a conclusion typed in by hand).
    """

    notebook: str
    title: str
    statement: str
    papers: list[str]
    parts: list[Part]
    setting: str = ""
    notes: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def label(self) -> str:
        return overall_label(p.verdict for p in self.parts)

    @property
    def summary(self) -> str:
        """One line: each part's verdict and n."""
        return "; ".join(f"{p.id}: {p.verdict} (n={p.n})" for p in self.parts)

    def to_dict(self) -> dict:
        return {"notebook": self.notebook, "title": self.title, "claim": self.statement, "papers": self.papers,
                "label": self.label, "rule": RULE, "setting": self.setting, "notes": self.notes, "seed": self.seed,
                "parts": [asdict(p) for p in self.parts]}

    @classmethod
    def from_dict(cls, d: dict) -> "Claim":
        parts = [Part(**p) for p in d["parts"]]
        return cls(notebook=d["notebook"], title=d["title"], statement=d["claim"], papers=list(d["papers"]),
                   parts=parts, setting=d.get("setting", ""), notes=list(d.get("notes", [])), seed=d.get("seed", 0))

    def table(self) -> pd.DataFrame:
        """One row per part: what nbval checks (labels, n and numbers at the precision their interval supports)."""
        rows = []
        for p in self.parts:
            rows.append({"part": p.id, "metric": p.metric, "unit": p.unit, "n": p.n, "claimed": p.direction,
                         "δ": f"{p.smallest_effect:g}" if p.direction != "check" else "",
                         "a": _arm_text(p, p.a_mean), "b": _arm_text(p, p.b_mean), "effect a−b [CI]": _effect_text(p),
                         "CI": f"{p.confidence:.0%}" if p.direction != "check" else "", "verdict": p.verdict})
        return pd.DataFrame(rows)

    def markdown(self) -> str:
        """The Findings text, rendered from the judged parts only."""
        cites = ", ".join(f"[@{k}]" for k in self.papers)
        lines = [
            "### Findings", "",
            f"**Verdict: {self.label}.** Claim under test ({cites}): {self.statement}", "",
            "| part | statement | metric (unit) | n | claimed | δ | effect a − b [CI] | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in self.parts:
            better = "higher" if p.higher_is_better else "lower"
            delta = f"{p.smallest_effect:g}" if p.direction != "check" else "—"
            ci = _effect_text(p) + (f" ({p.confidence:.0%})" if p.direction != "check" else "")
            cells = [p.id, p.statement, f"{p.metric}, {better} is better ({p.unit})", str(p.n), p.direction, delta, ci,
                     f"**{p.verdict}**"]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        units = ", ".join(sorted({p.unit + "s" for p in self.parts if p.direction != "check"}))
        method = (f"Comparisons are paired over {units}; each interval is a seeded paired bootstrap of the mean "
                  f"difference (BCa, {N_RESAMPLES} resamples; 90% for equivalence parts, which are two one-sided "
                  "tests against ±δ). ") if units else ""
        lines += ["", method + "Overall rule: " + RULE + "."]
        details = [f"- **{p.id}**: {p.detail}" for p in self.parts if p.detail]
        if details:
            lines += [""] + details
        if self.setting:
            lines += ["", f"**Setting.** {self.setting}"]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A markdown table cell: a literal ``|`` (e.g. in ``|ρ|``) would end the cell, so it is escaped."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _effect_text(p: Part) -> str:
    if p.direction == "check":
        return p.method.removeprefix("exhaustive check: ")
    return fmt_interval(p.effect, p.ci_low, p.ci_high)


def _arm_text(p: Part, value: float) -> str:
    if p.direction == "check" or not math.isfinite(value):
        return ""
    return fmt_value(value, max(p.ci_high - p.effect, p.effect - p.ci_low))


def parts_for(specs: Sequence[PartSpec], rules: dict[str, PartRule]) -> list[tuple[PartSpec, PartRule]]:
    """Pair each spec with its rule from ``Params``; a missing or unknown part id is an error naming the ids."""
    ids = [s.id for s in specs]
    if set(rules) != set(ids):
        raise ValueError(f"claim parts in the parameters must be exactly {ids}, got {sorted(rules)}")
    return [(s, rules[s.id]) for s in specs]


def check_part_rules(rules: dict[str, PartRule], specs: Sequence[PartSpec]) -> dict[str, PartRule]:
    """Validator for a ``Params`` field ``parts``: the keys must be the notebook's part ids."""
    parts_for(specs, rules)
    return rules


__all__ = [
    "DIRECTIONS",
    "N_RESAMPLES",
    "PART_VERDICTS",
    "RULE",
    "VERDICTS",
    "Claim",
    "Part",
    "PartRule",
    "PartSpec",
    "check_part_rules",
    "decimals_for",
    "fmt_interval",
    "fmt_value",
    "check",
    "judge",
    "judge_interval",
    "judge_one_sample",
    "overall_label",
    "paired_interval",
    "paired_values",
    "parts_for",
]
