"""Bad parameters stop a run before anything loads: one line naming the key and what is allowed; outputs untouched."""

import os
import shutil
import subprocess
import sys

import pytest

from salience.experiments.kv_normalized_attention import Params
from salience.params import ParamsError, load_params, param_file, param_sets, read_param_file, validate_params
from salience.paths import REPO_ROOT

NB = "kv-normalized-attention"


def _on_defaults(values: dict) -> dict:
    """``values`` over the default set (``Params`` has no default values of its own)."""
    return {**read_param_file(param_file(NB)), **values}


@pytest.mark.parametrize("values,needle", [
    ({"budgetz": [0.1]}, "unknown key 'budgetz' (allowed keys: seed, device, model"),
    ({"budgets": [0.1, 1.5]}, "budgets: every budget must be a ratio in (0, 1)"),
    ({"n_documents": "two"}, "n_documents: Input should be a valid integer"),
    ({"model": "not-a-model"}, "use an embedded name (smollm2-135m"),
    ({"dataset": "imdb"}, "dataset: Input should be 'wikipedia' or 'news'"),
    ({"scorers": ["h2o"]}, "unknown scorer 'h2o'"),
    ({"n_sink": 40, "recent_window": 8}, "must hold n_sink + recent_window = 48"),
    ({"device": "gpu"}, "device must be cpu, cuda, cuda:N or mps"),
])
def test_one_line_errors(values, needle):
    with pytest.raises(ParamsError) as err:
        validate_params(Params, _on_defaults(values), "params/x.yaml")
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and msg.startswith("params/x.yaml: ")


def test_claim_parts_are_checked_once_for_every_notebook():
    """The base class checks ``parts`` against each notebook's ``judged`` specs: a wrong id is one clear error, and
    every notebook with claim parts declares its specs (an empty ``judged`` would refuse every set)."""
    import importlib
    import pkgutil

    import salience.experiments as experiments
    from salience.params import NotebookParams

    with pytest.raises(ParamsError, match="claim parts in the parameters must be exactly"):
        validate_params(Params, _on_defaults({"parts": {"no_such_part": {"direction": "better", "smallest_effect": 0.1}}}), "params/x.yaml")
    with_parts = []
    for info in pkgutil.iter_modules(experiments.__path__):
        module = importlib.import_module(f"salience.experiments.{info.name}")
        params = getattr(module, "Params", None)
        if isinstance(params, type) and issubclass(params, NotebookParams) and "parts" in params.model_fields:
            with_parts.append(info.name)
            assert params.judged, f"{info.name}.Params has claim parts but no judged specs"
    assert len(with_parts) >= 15, with_parts


def test_every_shipped_parameter_set_validates():
    for name in param_sets(NB):
        load_params(NB, name)
    assert param_sets(NB)[0] == "default" and "gpu" in param_sets(NB)


def test_model_accepts_hf_ids_and_local_folders(tmp_path):
    hf_id = validate_params(Params, _on_defaults({"model": "HuggingFaceTB/SmolLM2-360M"}))
    assert hf_id.model == "HuggingFaceTB/SmolLM2-360M"
    assert validate_params(Params, _on_defaults({"model": str(tmp_path)})).model == str(tmp_path)


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*")) if folder.exists() else []


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "salience.cli", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_bad_parameter_file_changes_nothing(tmp_path):
    params = tmp_path / "params"
    shutil.copytree(REPO_ROOT / "params", params)
    (params / f"{NB}.yaml").write_text((params / f"{NB}.yaml").read_text() + "budgetz: [0.5]\n")
    outputs = tmp_path / "outputs"
    (outputs / NB / "default").mkdir(parents=True)
    (outputs / NB / "default" / "run.json").write_text("{}")
    before = _snapshot(outputs)
    proc = _cli("run", NB, env={"SALIENCE_PARAMS": str(params), "SALIENCE_OUTPUTS": str(outputs)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'budgetz'" in lines[0] and f"params/{NB}.yaml" in lines[0]
    assert _snapshot(outputs) == before


def test_bad_override_and_unknown_set(tmp_path):
    env = {"SALIENCE_OUTPUTS": str(tmp_path / "outputs")}
    proc = _cli("validate", NB, "-p", "budgets=[0.1, 2]", env=env)
    assert proc.returncode == 2 and "budgets" in proc.stderr and "(0, 1)" in proc.stderr
    proc = _cli("run", NB, "--params", "tpu", env=env)
    assert proc.returncode == 2 and "no parameter set 'tpu'" in proc.stderr and "default, gpu" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_papermill_strings_for_lists_and_mappings_are_parsed():
    """`papermill -p budgets '[0.1, 0.25]'` hands the notebook a string; a list or mapping field parses it."""
    assert Params.defaults(budgets="[0.1, 0.25]").budgets == [0.1, 0.25]
    namespace = {**Params.defaults().model_dump(), "budgets": " [0.2, 0.5]"}
    assert Params.from_namespace(namespace).budgets == [0.2, 0.5]
    with pytest.raises(ParamsError, match="budgets"):  # not YAML: left as a string, and the field says what it wants
        Params.defaults(budgets="[0.1, oops")


def test_a_parameter_set_can_be_a_yaml_file(tmp_path):
    from salience.runner import plan

    mine = tmp_path / "mine.yaml"
    mine.write_text("n_documents: 4\n")
    assert load_params("kv-normalized-attention", str(mine)).n_documents == 4
    (spec,) = plan(["kv-normalized-attention"], str(mine))
    assert spec.param_set == "mine" and spec.params["n_documents"] == 4  # outputs go to outputs/<nb>/mine/
    with pytest.raises(ParamsError, match="missing"):
        load_params("kv-normalized-attention", str(tmp_path / "absent.yaml"))
