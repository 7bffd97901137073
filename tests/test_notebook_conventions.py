"""Every notebook follows DESIGN.md's conventions: one source of defaults (the YAML), a cited title, a Findings cell
rendered from claims.json, and nbval checks only on stable result cells."""

import json
import re

import nbformat
import pytest
import yaml
from pydantic_core import PydanticUndefined

from salience.experiments import NOTEBOOKS, experiment_module
from salience.notebooks import RUNNER_NAMES, notebook_path, parameters_cell_defaults, render_parameters_cell
from salience.params import load_params, param_file
from salience.references import check_keys, cited_keys
from salience.reproduction import reference_path

NAMES = sorted(NOTEBOOKS)


def _parameters_cell(nb):
    return next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))


@pytest.mark.parametrize("name", NAMES)
def test_parameters_cell_is_generated_from_the_default_yaml(name):
    nb = nbformat.read(notebook_path(name), as_version=4)
    assert _parameters_cell(nb).source == render_parameters_cell(name), (
        f"run `salience store {name}` (it regenerates the parameters cell from {param_file(name).name})")
    defaults = parameters_cell_defaults(notebook_path(name))
    runner_names = {k: defaults.pop(k) for k in RUNNER_NAMES}
    assert runner_names == {"output_dir": None}
    assert defaults == yaml.safe_load(param_file(name).read_text())


@pytest.mark.parametrize("name", NAMES)
def test_yaml_is_the_only_source_of_defaults(name):
    fields = experiment_module(name).Params.model_fields
    with_defaults = sorted(k for k, f in fields.items() if f.default is not PydanticUndefined or f.default_factory)
    assert not with_defaults, f"Params fields with a default value (it belongs in the YAML only): {with_defaults}"
    assert set(fields) == set(yaml.safe_load(param_file(name).read_text())), "the YAML must give every field"
    undocumented = sorted(k for k, f in fields.items() if not f.description)
    assert not undocumented, f"Params fields without a description: {undocumented}"


@pytest.mark.parametrize("name", NAMES)
def test_structure(name):
    nb = nbformat.read(notebook_path(name), as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"  # papermill needs it
    title = nb.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    keys = cited_keys(title.source)
    assert keys, "the title cell must cite its papers as [@key] (references.yaml)"
    check_keys(keys)
    assert "Claim under test" in title.source
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert not any("sys.path" in s for s in code)
    concluding, last = code[-2], code[-1]
    assert all(k in concluding for k in ("run.conclude(", "run.finish()", "run.reproduction()", "NBVAL_CHECK_OUTPUT")), (
        "the next-to-last code cell concludes the claim (claims.json), finishes the run and shows, checked by nbval, "
        "whether each part reproduces the stored run (n, verdict, numbers within the interval's precision)")
    assert "NBVAL_CHECK_OUTPUT" not in last and "claim.table()" in last and "Markdown(findings)" in last, (
        "the last code cell shows the claim table and the Findings (their printed digits are not what nbval checks)")


@pytest.mark.parametrize("name", NAMES)
def test_checked_cells_have_stable_stored_outputs(name):
    nb = nbformat.read(notebook_path(name), as_version=4)
    checked = [c for c in nb.cells if c.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in c.source]
    assert all(c.outputs for c in checked), f"run `salience store {name}` so nbval has outputs to compare"
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for c in checked:
        streams = [o for o in c.outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
        assert not streams, f"a checked cell writes to stderr (a progress bar or a warning): {c.source[:80]!r}"
        text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in c.outputs)
        assert not re.search(r"\d+(\.\d+)? ?(s|ms|it/s)\b", text), f"a checked cell shows a timing: {c.source[:80]!r}"
        assert "not compared" not in text, (
            f"the stored run was not compared with its reference: run `salience store {name}`")


@pytest.mark.parametrize("name", NAMES)
def test_stored_reference_matches_the_stored_notebook(name):
    """notebooks/<nb>.claims.json is what the stored outputs were made with: same parameters as the YAML, and the
    stored notebook's checked cell says every part reproduces it."""
    ref = json.loads(reference_path(name).read_text())
    assert ref["params"] == json.loads(json.dumps(load_params(name).model_dump(mode="json"), sort_keys=True,
                                                  default=str)), f"run `salience store {name}`"
    nb = nbformat.read(notebook_path(name), as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "run.reproduction()" in c.source)
    text = "".join(str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)
    assert text.count(" yes") == len(ref["claim"]["parts"]) + 1, text


@pytest.mark.parametrize("name", NAMES)
def test_papermill_parses_every_parameter(name):
    """papermill's own parser skips lines it cannot read (e.g. '=' or quotes in a comment) and then warns
    'Passed unknown parameter' at run time; every parameter must be visible to it."""
    import papermill as pm

    inspected = set(pm.inspect_notebook(str(notebook_path(name))))
    assert inspected == set(parameters_cell_defaults(notebook_path(name)))
