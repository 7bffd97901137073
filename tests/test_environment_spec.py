"""environment.yml, pyproject.toml and the set-up script must name the same things."""

import tomllib

import yaml

from salience.paths import REPO_ROOT


def _pyproject():
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_environment_yml_matches_pyproject():
    project = _pyproject()["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {r for r in pip_section if not r.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def test_environment_yml_comment_names_the_model_packages():
    models = _pyproject()["tool"]["salience"]["model-packages"]
    text = (REPO_ROOT / "environment.yml").read_text()
    assert all(pkg in text for pkg in models)


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {"salience"}
    for root, prefix in ((REPO_ROOT / "lib", "salience"), (REPO_ROOT / "kernels", "salience.kernels")):
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((prefix, *rel)))
    assert found == listed, f"missing from pyproject: {found - listed}; listed but absent: {listed - found}"
