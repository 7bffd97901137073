"""Parameter sweeps: a grid over one notebook's parameters, one isolated papermill run per combination.

A sweep file, ``params/<notebook>.sweep.yaml`` (``params/<notebook>.<name>.sweep.yaml`` for more than one, or any
YAML path given with ``--file``)::

    name: block-size          # optional: the sweep's folder (default: from the file name: "sweep" or "<name>")
    params: default           # optional: the parameter set every combination starts from
    fixed: {heads: 1}         # optional: parameters set for every combination
    grid:                     # parameter → values; a dotted key reaches into a mapping (parts.x.smallest_effect)
      block: [16, 32]
      value_dim: [32, 48]

or the same grid on the command line: ``salience sweep NB --grid block=16,32 --grid value_dim=32,48``.

Every combination is validated by :mod:`salience.params` before anything runs (one line naming the parameter and the
value). Each runs through :func:`salience.runner.run_many` (local processes, or a Dask cluster with ``scheduler``)
into its own folder, ``outputs/<nb>/sweeps/<sweep>/runs/<key=value,...>/`` (``.failed`` when it failed), atomically
like any run. :mod:`salience.sweep_table` then gathers ``table.csv`` and ``effects.png`` beside ``sweep.json``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .params import DEFAULT_SET, ParamsError, load_params, read_param_file
from .paths import outputs_dir, params_dir
from .runner import DEFAULT_TIMEOUT_S, RunOutcome, RunSpec, plan, run_many
from .runs import atomic_write_text

SWEEP_SUFFIX = ".sweep.yaml"
SWEEP_KEYS = ("name", "params", "fixed", "grid")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*")
MAX_COMBINATION_NAME = 100


@dataclass
class Sweep:
    """A grid over one notebook's parameters: ``grid`` maps a parameter (dotted for nested ones) to its values."""

    notebook: str
    name: str
    grid: dict[str, list[Any]]
    base: str = DEFAULT_SET
    fixed: dict[str, Any] = field(default_factory=dict)
    source: str = "command line"

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, the last key varying fastest."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


@dataclass
class SweepResult:
    folder: Path
    outcomes: list[RunOutcome]
    table: Path


def sweep_file(notebook: str, name: str | None = None) -> Path:
    """``params/<notebook>.sweep.yaml``, or ``params/<notebook>.<name>.sweep.yaml`` for a named sweep."""
    return params_dir() / (f"{notebook}{SWEEP_SUFFIX}" if name is None else f"{notebook}.{name}{SWEEP_SUFFIX}")


def sweep_folder(notebook: str, name: str) -> Path:
    """``outputs/<notebook>/sweeps/<name>/``: sweep.json, table.csv, effects.png and ``runs/``."""
    return outputs_dir() / notebook / "sweeps" / name


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ParamsError(f"sweep name {name!r}: use letters, digits and . _ = , + - (not starting with . or -)")
    return name


def _default_name(path: Path, notebook: str) -> str:
    stem = path.name.removesuffix(SWEEP_SUFFIX).removesuffix(".yaml").removesuffix(".yml")
    if stem == notebook:
        return "sweep"
    return stem.removeprefix(f"{notebook}.")


def read_sweep(notebook: str, source: str | None = None) -> Sweep:
    """Read a sweep file: ``source`` is a YAML path, a sweep name (``params/<nb>.<name>.sweep.yaml``) or None
    (``params/<nb>.sweep.yaml``). Raises a one-line :class:`ParamsError` for a missing or malformed file."""
    path = Path(source).expanduser() if source and source.endswith((".yaml", ".yml")) else sweep_file(notebook, source)
    if not path.is_file():
        raise ParamsError(f"{notebook}: no sweep file {path} (write one, or give the grid with --grid key=v1,v2)")
    values = read_param_file(path)
    unknown = sorted(set(values) - set(SWEEP_KEYS))
    if unknown:
        raise ParamsError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(SWEEP_KEYS)})")
    grid, fixed = values.get("grid"), values.get("fixed") or {}
    if not isinstance(grid, dict) or not grid:
        raise ParamsError(f"{path}: 'grid' must map each swept parameter to a list of values")
    if not isinstance(fixed, dict):
        raise ParamsError(f"{path}: 'fixed' must map parameters to values, got {type(fixed).__name__}")
    for key, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            raise ParamsError(f"{path}: grid.{key} must be a non-empty list of values, got {vals!r}")
    name = check_name(str(values.get("name") or _default_name(path, notebook)))
    return Sweep(notebook, name, {str(k): v for k, v in grid.items()}, str(values.get("params") or DEFAULT_SET),
                 {str(k): v for k, v in fixed.items()}, str(path))


def parse_grid(pairs: list[str]) -> dict[str, list[Any]]:
    """``["block=16,32", "device=cpu"]`` → ``{"block": [16, 32], "device": ["cpu"]}`` (values typed as YAML, so
    ``lengths=[1,37],[130]`` gives two lists)."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise ParamsError(f"--grid expects key=value1,value2,..., got {pair!r}")
        try:
            values = yaml.safe_load(f"[{text}]")
        except yaml.YAMLError as err:
            raise ParamsError(f"--grid {pair!r}: values are not valid YAML: {str(err).splitlines()[0]}") from None
        grid[key.strip()] = values
    return grid


def combination_names(combinations: list[dict[str, Any]]) -> list[str]:
    """Readable, stable folder names (``block=16,value_dim=32``); numbered hashes when those would collide or be
    too long for a folder."""

    def text(value: Any) -> str:
        raw = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        return re.sub(r"[^A-Za-z0-9._+-]+", "-", raw).strip("-") or "-"

    names = [",".join(f"{k}={text(v)}" for k, v in combo.items()) for combo in combinations]
    if len(set(names)) == len(names) and all(len(n) <= MAX_COMBINATION_NAME for n in names):
        return names
    digest = [hashlib.sha1(json.dumps(c, sort_keys=True).encode()).hexdigest()[:8] for c in combinations]
    return [f"{i:03d}-{d}" for i, d in enumerate(digest, 1)]


def _assign(values: dict[str, Any], base: dict[str, Any], key: str, value: Any, sweep: Sweep) -> None:
    """Set parameter ``key`` (dotted: inside a mapping parameter, copied from ``base``) to ``value`` in ``values``."""
    top, *path = key.split(".")
    if top not in base:
        raise ParamsError(f"sweep {sweep.name!r}: {sweep.notebook} has no parameter {top!r} (key {key!r}); "
                          f"parameters: {', '.join(base)}")
    if not path:
        values[top] = value
        return
    node = values.setdefault(top, copy.deepcopy(base[top]))
    for i, part in enumerate(path[:-1]):
        if not isinstance(node.get(part) if isinstance(node, dict) else None, dict):
            where = ".".join([top, *path[: i + 1]])
            raise ParamsError(f"sweep {sweep.name!r}: key {key!r}: {where} is missing or not a mapping")
        node = node[part]
    if not isinstance(node, dict):
        raise ParamsError(f"sweep {sweep.name!r}: key {key!r}: {top} is not a mapping")
    node[path[-1]] = value


def _overrides(sweep: Sweep, base: dict[str, Any], combination: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in {**sweep.fixed, **combination}.items():
        _assign(values, base, key, value, sweep)
    return values


def _describe(combination: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in combination.items())


def plan_sweep(sweep: Sweep, timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None) -> list[RunSpec]:
    """Validate every value, then every combination, through the notebook's parameters; write nothing. Returns one
    :class:`RunSpec` per combination, filed under the sweep's ``runs/`` folder. Raises a one-line ParamsError."""
    check_name(sweep.name)
    if not sweep.grid:
        raise ParamsError(f"sweep {sweep.name!r}: the grid is empty")
    base = load_params(sweep.notebook, sweep.base).model_dump(mode="json")
    try:
        plan([sweep.notebook], sweep.base, _overrides(sweep, base, {}), timeout_s, threads)
    except ParamsError as err:
        raise ParamsError(f"sweep {sweep.name!r}: the fixed parameters are invalid: {err}") from None
    for key, values in sweep.grid.items():  # one value at a time first, so the error names exactly the culprit
        if not isinstance(values, list) or not values:
            raise ParamsError(f"sweep {sweep.name!r}: {key} needs a non-empty list of values, got {values!r}")
        for value in values:
            try:
                plan([sweep.notebook], sweep.base, _overrides(sweep, base, {key: value}), timeout_s, threads)
            except ParamsError as err:
                raise ParamsError(f"sweep {sweep.name!r}: {key}={value!r} is invalid: {err}") from None
    combinations = sweep.combinations()
    runs = sweep_folder(sweep.notebook, sweep.name) / "runs"
    specs = []
    for combination, name in zip(combinations, combination_names(combinations)):
        try:
            (spec,) = plan([sweep.notebook], sweep.base, _overrides(sweep, base, combination), timeout_s, threads)
        except ParamsError as err:  # a rule across parameters
            raise ParamsError(f"sweep {sweep.name!r}: the combination {_describe(combination)} is invalid: {err}") \
                from None
        specs.append(replace(spec, param_set=name, output_base=str(runs)))
    return specs


def run_sweep(sweep: Sweep, jobs: int = 1, scheduler: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
              threads: int | None = None) -> SweepResult:
    """Validate, run every combination (``jobs`` local processes, or the Dask cluster at ``scheduler``), gather the
    table and its figure. A failed combination is a row with its error; it never stops the others."""
    from .sweep_table import write_table

    specs = plan_sweep(sweep, timeout_s, threads)
    folder = sweep_folder(sweep.notebook, sweep.name)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    combinations = sweep.combinations()
    record = {
        "notebook": sweep.notebook, "name": sweep.name, "params": sweep.base, "fixed": sweep.fixed,
        "grid": sweep.grid, "source": sweep.source, "scheduler": scheduler, "jobs": jobs,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "combinations": [{"name": s.param_set, "values": c} for s, c in zip(specs, combinations)],
    }
    atomic_write_text(folder / "sweep.json", json.dumps(record, indent=2, default=str))
    outcomes = run_many(specs, jobs=jobs, scheduler=scheduler)
    return SweepResult(folder, outcomes, write_table(folder))
