"""Notebook parameters: one typed, validated object per notebook, loaded from ``params/<notebook>[.<set>].yaml``.

**One source for each default**: ``params/<notebook>.yaml`` (the embedded default set) holds every default value. The
``Params`` class declares types, ranges and descriptions but no default values; the notebook's papermill
``parameters`` cell is generated from the YAML (``salience store`` rewrites it; a test keeps them equal). A named set
``params/<notebook>.<set>.yaml`` lists only what differs from the default set (it may repeat the rest).

Validation happens before any model loads. Errors are one line naming the file, the key and what is allowed, so a
typo in a YAML file costs seconds, not a two-minute run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .evidence import PartRule, PartSpec, check_part_rules
from .paths import params_dir

DEFAULT_SET = "default"
_HF_ID = re.compile(r"^(hf:)?[\w.-]+/[\w.-]+$")  # "hf:" bypasses the embedded aliases


class ParamsError(ValueError):
    """A parameter file or value is invalid; the message is one line, fit for a terminal."""


class NotebookParams(BaseModel):
    """Base of every notebook's parameters: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    #: the notebook (file stem under notebooks/) these parameters belong to
    notebook: ClassVar[str] = ""
    #: the notebook's judged claim parts (its experiment module's ``PartSpec`` s): a ``parts`` field must hold a rule
    #: for exactly their ids (checked here once for every notebook)
    judged: ClassVar[tuple[PartSpec, ...]] = ()

    seed: int = Field(description="seed of every random choice (data subsets, random scorers, bootstrap)")
    device: str = Field(description="cpu, cuda, cuda:N or mps")

    @field_validator("parts", check_fields=False)
    @classmethod
    def _part_ids(cls, rules: dict[str, PartRule]) -> dict[str, PartRule]:
        return check_part_rules(rules, cls.judged)

    @model_validator(mode="before")
    @classmethod
    def _parse_structured_strings(cls, values: Any) -> Any:
        """``papermill -p lengths '[1, 5, 70]'`` passes a string: for a field that is not a string, a value written
        as a YAML / JSON list or mapping (starting with ``[`` or ``{``) is parsed first."""
        if not isinstance(values, dict):
            return values
        parsed = dict(values)
        for key, value in values.items():
            field = cls.model_fields.get(key)
            if field is None or field.annotation is str or not isinstance(value, str):
                continue
            if not value.lstrip().startswith(("[", "{")):
                continue
            try:
                loaded = yaml.safe_load(value)
            except yaml.YAMLError:
                continue  # left as it is: the field's own validation names the problem
            if isinstance(loaded, (list, dict)):
                parsed[key] = loaded
        return parsed

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "cpu" and not re.fullmatch(r"cuda(:\d+)?|mps", value):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any]) -> "NotebookParams":
        """Build from a notebook's globals (the papermill parameters cell), taking only declared fields."""
        return validate_params(cls, {k: namespace[k] for k in cls.model_fields if k in namespace})

    @classmethod
    def defaults(cls, **overrides: Any) -> "NotebookParams":
        """The embedded default set ``params/<notebook>.yaml``, with ``overrides`` applied, validated."""
        return load_params(cls.notebook, DEFAULT_SET, overrides, cls=cls)


def check_model_name(value: str) -> str:
    """Accept an embedded model name, an existing local folder or a Hugging Face id ``org/name``."""
    from .models import EMBEDDED_MODELS, embedded_name

    if embedded_name(value) or Path(value).expanduser().is_dir() or _HF_ID.match(value):
        return value
    raise ValueError(
        f"unknown model {value!r}: use an embedded name ({', '.join(EMBEDDED_MODELS)}), a local folder or a "
        "Hugging Face id org/name"
    )


#: a model parameter: embedded name, local folder or Hugging Face id (checked before anything loads)
ModelName = Annotated[str, AfterValidator(check_model_name)]


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        elif not e["loc"]:  # a rule across several keys: its message names them
            parts.append(msg)
        else:
            parts.append(f"{key}: {msg} (got {e.get('input')!r})")
    return f"{source}: " + "; ".join(parts)


def validate_params(cls: type[NotebookParams], values: dict[str, Any], source: str = "parameters") -> NotebookParams:
    """Validate ``values`` against ``cls``; raise :class:`ParamsError` with one line on failure."""
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        msg = _format_error(err, source)
        if any(e["type"] == "extra_forbidden" for e in err.errors()):
            msg += f" (allowed keys: {', '.join(cls.model_fields)})"
        raise ParamsError(msg) from None


def is_param_path(param_set: str) -> bool:
    """A parameter set given as a YAML file (``--params my.yaml``) rather than a set name."""
    return str(param_set).endswith((".yaml", ".yml"))


def param_set_name(param_set: str) -> str:
    """The name a set's outputs are filed under: the set's name, or a YAML file's stem."""
    return Path(param_set).stem if is_param_path(param_set) else param_set


def param_file(notebook: str, param_set: str = DEFAULT_SET) -> Path:
    """``params/<notebook>.yaml`` for the default set, ``params/<notebook>.<set>.yaml`` for a named set, or the YAML
    file itself when the set is given as a path (applied on top of the default set like a named set)."""
    if is_param_path(param_set):
        return Path(param_set).expanduser()
    suffix = "" if param_set == DEFAULT_SET else f".{param_set}"
    return params_dir() / f"{notebook}{suffix}.yaml"


def param_sets(notebook: str) -> list[str]:
    """Names of the parameter sets available for ``notebook`` (``default`` first); sweep files
    (``<notebook>[.<name>].sweep.yaml``, :mod:`salience.sweep`) are not parameter sets."""
    sets = []
    for path in sorted(params_dir().glob(f"{notebook}*.yaml")):
        rest = path.name[len(notebook) : -len(".yaml")]
        if rest == "":
            sets.insert(0, DEFAULT_SET)
        elif rest.startswith(".") and not (rest == ".sweep" or rest.endswith(".sweep")):
            sets.append(rest[1:])
    return sets


def read_param_file(path: Path) -> dict[str, Any]:
    """The mapping in one parameter file (one-line ParamsError if it is missing, not YAML or not a mapping)."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ParamsError(f"{path}: expected a mapping of parameter names to values, got {type(values).__name__}")
    return values


def load_params(notebook: str, param_set: str = DEFAULT_SET, overrides: dict[str, Any] | None = None,
                cls: type[NotebookParams] | None = None) -> NotebookParams:
    """Read and validate a parameter set on top of the default set; ``overrides`` (``-p key=value``) win over both."""
    if cls is None:
        from .experiments import params_class

        cls = params_class(notebook)
    path = param_file(notebook, param_set)
    if not path.is_file():
        available = ", ".join(param_sets(notebook)) or "none"
        raise ParamsError(f"{notebook}: no parameter set {param_set!r} ({path} missing); available: {available}")
    default_path = param_file(notebook, DEFAULT_SET)
    values = read_param_file(default_path) if default_path.is_file() else {}
    if param_set != DEFAULT_SET:
        values.update(read_param_file(path))
    values.update(overrides or {})
    return validate_params(cls, values, source=f"{path.parent.name}/{path.name}")
