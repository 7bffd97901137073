"""Does this run reproduce the stored one? What nbval checks in a notebook, at the precision each result supports.

Printed digits are not a result: an interval's last shown digit can flip between two machines (another CPU's vector
width, another thread count) while nothing the claim rests on moves. So a notebook's checked cell shows, per part,
its unit count, its verdict and whether its effect and interval reproduce the stored run's **within a quarter of the
stored interval's half-width** (``TOLERANCE``), and nbval compares that table. Exhaustive checks (no interval) must
reproduce exactly. The numbers themselves stay in the Findings cell and ``claims.json``.

The stored run is ``notebooks/<notebook>.claims.json``: ``salience store`` executes the notebook with
``SALIENCE_WRITE_REFERENCE=1``, and the checked cell then writes the reference instead of reading it. A run whose
parameters differ from the stored run's (an interactive edit, ``salience run -p``) is not compared, and says so.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from .evidence import Claim
from .paths import notebooks_dir

#: environment variable `salience store` sets: the run writes its claim as the stored reference
WRITE_ENV = "SALIENCE_WRITE_REFERENCE"
#: how far an effect or interval bound may move, as a share of the stored interval's half-width
TOLERANCE = 0.25


def reference_path(notebook: str) -> Path:
    return notebooks_dir() / f"{notebook}.claims.json"


def _normalised(params: dict) -> dict:
    return json.loads(json.dumps(params, sort_keys=True, default=str))


def _interval(part: dict) -> str:
    return f"{part['effect']:+.6g} [{part['ci_low']:+.6g}, {part['ci_high']:+.6g}]"


def _numbers_agree(now: dict, stored: dict, tolerance: float) -> bool:
    values = [(now[k], stored[k]) for k in ("effect", "ci_low", "ci_high")]
    if any(math.isnan(a) != math.isnan(b) for a, b in values):
        return False
    half_width = max(stored["ci_high"] - stored["effect"], stored["effect"] - stored["ci_low"])
    if not math.isfinite(half_width) or half_width <= 0:  # an exhaustive check or a degenerate interval: exact
        return all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in values)
    return all(abs(a - b) <= tolerance * half_width for a, b in values if not math.isnan(a))


def reproduction_table(claim: Claim, params: dict, reference: dict | None,
                       tolerance: float = TOLERANCE) -> pd.DataFrame:
    """One row for the claim and one per part: ``n``, ``verdict`` and ``reproduces`` ("yes", or what differs).

    ``reference``: ``{"params": ..., "claim": claim.to_dict()}`` of the stored run, or None."""
    now = claim.to_dict()
    if reference is None:
        status = f"not compared: no stored run ({reference_path(claim.notebook).name}; `salience store`)"
    elif _normalised(params) != _normalised(reference["params"]):
        changed = sorted(k for k in set(params) | set(reference["params"])
                         if _normalised(params).get(k) != _normalised(reference["params"]).get(k))
        status = f"not compared: parameters differ from the stored run ({', '.join(changed)})"
    else:
        status = None
    stored_parts = {p["id"]: p for p in reference["claim"]["parts"]} if reference else {}
    rows = [{"part": "(claim)", "n": "", "verdict": now["label"],
             "reproduces": status or ("yes" if now["label"] == reference["claim"]["label"]
                                      else f"no: stored {reference['claim']['label']}")}]
    for part in now["parts"]:
        if status:
            verdict = status
        elif part["id"] not in stored_parts:
            verdict = "no: part not in the stored run"
        else:
            old = stored_parts[part["id"]]
            problems = []
            if part["n"] != old["n"]:
                problems.append(f"n {part['n']} vs stored {old['n']}")
            if part["verdict"] != old["verdict"]:
                problems.append(f"verdict vs stored {old['verdict']}")
            if not _numbers_agree(part, old, tolerance):
                problems.append(f"{_interval(part)} vs stored {_interval(old)}")
            verdict = "no: " + "; ".join(problems) if problems else "yes"
        rows.append({"part": part["id"], "n": part["n"], "verdict": part["verdict"], "reproduces": verdict})
    return pd.DataFrame(rows)


def check_reproduction(claim: Claim, params: dict) -> pd.DataFrame:
    """Compare with the stored run, or, under ``SALIENCE_WRITE_REFERENCE=1``, store this run as the reference."""
    path = reference_path(claim.notebook)
    current = {"params": _normalised(params), "claim": claim.to_dict()}
    if os.environ.get(WRITE_ENV) == "1":
        path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        reference = current
    else:
        reference = json.loads(path.read_text()) if path.is_file() else None
    return reproduction_table(claim, params, reference)
