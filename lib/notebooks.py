"""Notebook files: their papermill ``parameters`` cell, and storing the outputs nbval compares against."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import nbformat

from .paths import notebooks_dir

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


def store_outputs(name: str, timeout_s: int = 1200) -> Path:
    """Execute ``notebooks/<name>.ipynb`` in place on its default parameters, keeping the outputs nbval checks.

    Execution metadata (timings) is dropped so the stored file changes only when results change.
    """
    import papermill as pm

    path = notebook_path(name)
    pm.execute_notebook(str(path), str(path), kernel_name="python3", cwd=str(path.parent), progress_bar=True,
                        execution_timeout=timeout_s)
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return path
