"""requirements.lock, environment.yml, pyproject.toml and the set-up script must name the same things."""

import os
import re
import subprocess
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

from salience.paths import REPO_ROOT


def _pyproject():
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_canonical(name)] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_environment_yml_names_exactly_the_lock_pins():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_canonical(r.split("==")[0]): r.split("==")[1] for r in pip_section if not r.startswith("-e")}
    lock = _lock()
    assert listed == lock, {k: (listed.get(k), lock.get(k)) for k in set(listed) | set(lock)
                            if listed.get(k) != lock.get(k)}
    assert "-e ." in pip_section


def test_every_dependency_is_locked_inside_its_pyproject_range():
    project = _pyproject()["project"]
    lock = _lock()
    for spec in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        req = Requirement(spec)
        name = _canonical(req.name)
        assert name in lock, f"{req.name} is a dependency but requirements.lock does not pin it"
        assert req.specifier.contains(lock[name], prereleases=True), f"lock {name}=={lock[name]} is outside {spec}"


def test_lock_pins_versions_only_and_leaves_model_packages_to_pyproject():
    lock = _lock()
    models = {_canonical(m.split("==")[0]) for m in _pyproject()["tool"]["salience"]["model-packages"]}
    assert not models & set(lock), "model packages are installed with --no-deps from pyproject's list, not the lock"
    assert all(re.fullmatch(r"[0-9][0-9a-z.]*", v) for v in lock.values()), "pins must be plain versions"
    assert "torch" in lock and "+" not in lock["torch"]


def test_setup_installs_from_the_lock_without_resolving():
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r"--no-deps -r \"\$LOCK\"", setup) and 'LOCK=requirements.lock' in setup
    assert "grep -E '^torch==' \"$LOCK\"" in setup  # torch's pin comes from the lock too


@pytest.mark.slow
def test_lock_matches_the_installed_environment():
    """The environment the tests run in is the locked one (catches a hand-installed or upgraded package)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "lock.py"), "--check", "--python", sys.executable],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


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


def test_make_lab_passes_allow_root_only_to_root():
    """Jupyter refuses to start as root without --allow-root; containers and these machines run as root."""
    out = subprocess.run(["make", "-n", "lab"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    lab = next(line for line in out.splitlines() if "jupyter lab" in line)
    assert ("--allow-root" in lab) == (os.getuid() == 0)
