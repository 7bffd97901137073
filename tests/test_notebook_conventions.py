"""Every notebook follows DESIGN.md's conventions: parameters cell = params YAML, title with s# id, Findings, nbval marks."""

import re

import nbformat
import pytest
import yaml

from salience.experiments import NOTEBOOKS, experiment_module
from salience.notebooks import RUNNER_NAMES, notebook_path, parameters_cell_defaults
from salience.params import param_file

NAMES = sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_cell_equals_default_yaml(name):
    defaults = parameters_cell_defaults(notebook_path(name))
    assert defaults.pop("output_dir") is None
    assert set(defaults) - RUNNER_NAMES == set(defaults)
    yaml_values = yaml.safe_load(param_file(name).read_text())
    assert defaults == yaml_values
    # and every declared parameter appears in the cell, so papermill can set it
    assert set(experiment_module(name).Params.model_fields) == set(defaults)


@pytest.mark.parametrize("name", NAMES)
def test_structure(name):
    nb = nbformat.read(notebook_path(name), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"  # papermill needs it
    title = nb.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    assert re.search(r"\bs\d+\b", title.source), "title cell must cite the method's s# id from methods.md"
    assert "Claim under test" in title.source
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any("NBVAL_CHECK_OUTPUT" in s for s in sources), "mark the key result cells for nbval"
    assert any("run.conclude(" in s and "run.finish()" in s for s in sources)
    assert not any("sys.path" in s for s in sources)


@pytest.mark.parametrize("name", NAMES)
def test_stored_outputs_exist_for_nbval(name):
    nb = nbformat.read(notebook_path(name), as_version=4)
    checked = [c for c in nb.cells if c.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in c.source]
    assert all(c.outputs for c in checked), f"run `salience store {name}` so nbval has outputs to compare"
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("name", NAMES)
def test_papermill_parses_every_parameter(name):
    """papermill's own parser skips lines it cannot read (e.g. '=' or quotes in a comment) and then warns
    'Passed unknown parameter' at run time; every parameter must be visible to it."""
    import papermill as pm

    inspected = set(pm.inspect_notebook(str(notebook_path(name))))
    assert inspected == set(parameters_cell_defaults(notebook_path(name)))
