"""Notebook files: their papermill ``parameters`` cell (generated from ``params/<nb>.yaml``), and storing the outputs
nbval compares against."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

import nbformat

from .paths import notebooks_dir
from .reproduction import WRITE_ENV

#: names a parameters cell may hold that are not experiment parameters
RUNNER_NAMES = {"output_dir"}


def notebook_path(name: str) -> Path:
    return notebooks_dir() / f"{name}.ipynb"


def parameters_cell_defaults(path: Path) -> dict[str, Any]:
    """Literal assignments in the cell tagged ``parameters`` (papermill's convention)."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path.name}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    values = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def render_parameters_cell(name: str) -> str:
    """The ``parameters`` cell's source: one ``key = value  # description`` line per entry of ``params/<name>.yaml``
    (the single source of the defaults), then ``output_dir``."""
    from .experiments import params_class
    from .params import DEFAULT_SET, param_file, read_param_file

    path = param_file(name, DEFAULT_SET)
    values = read_param_file(path)
    fields = params_class(name).model_fields
    lines = [f"# Parameters (papermill). Generated from params/{path.name} by `salience store`: edit the YAML, "
             "not this cell."]
    for key, value in values.items():
        description = fields[key].description if key in fields else None
        comment = f"  # {description}" if description else ""
        lines.append(f"{key} = {value!r}{comment}")
    lines.append(f"output_dir = None  # set by the runner; interactive runs write to outputs/{name}/interactive/")
    return "\n".join(lines)


def sync_parameters_cell(name: str) -> bool:
    """Rewrite the notebook's ``parameters`` cell from its YAML; returns whether the cell changed."""
    path = notebook_path(name)
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path.name}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    source = render_parameters_cell(name)
    if cells[0].source == source:
        return False
    cells[0].source = source
    nbformat.write(nb, path)
    return True


def store_outputs(name: str, timeout_s: int = 1200) -> Path:
    """Execute ``notebooks/<name>.ipynb`` in place on its default parameters, keeping the outputs nbval checks.

    The parameters cell is first regenerated from ``params/<name>.yaml``. The run's claim is stored beside the notebook
    (``<name>.claims.json``, :mod:`salience.reproduction`): nbval's check compares with it. Execution metadata
    (timings) is dropped so the stored file changes only when results change.
    """
    import papermill as pm

    sync_parameters_cell(name)
    path = notebook_path(name)
    previous = os.environ.get(WRITE_ENV)
    os.environ[WRITE_ENV] = "1"  # the checked cell writes notebooks/<name>.claims.json, the run nbval compares with
    try:
        pm.execute_notebook(str(path), str(path), kernel_name="python3", cwd=str(path.parent), progress_bar=True,
                            execution_timeout=timeout_s)
    finally:
        if previous is None:
            os.environ.pop(WRITE_ENV)
        else:
            os.environ[WRITE_ENV] = previous
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return path
