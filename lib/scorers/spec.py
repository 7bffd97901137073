"""Scorers as data: a notebook's ``scorers`` parameter is a list of specs, one YAML line each.

    scorers:
      - random                                      # a registered name alone
      - {name: snapkv, window: 16, kernel_size: 5}  # with the dataclass's fields
      - {name: cls_attention, layer: -2, label: cls_attention_prev}   # a second variant needs its own label

Every key but ``name`` and ``label`` must be a field of the registered scorer's dataclass; the spec is validated by
building the scorer once (its own ``__post_init__`` checks run), so a typo fails before any model loads, naming the
fields that exist. ``label`` (default: the name) is what tables, claims and figures call the entry.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

from .base import Scorer, scorer_class


class ScorerSpec(BaseModel):
    """One scorer of a notebook: a registered ``name``, an optional ``label`` and the scorer's own fields."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known_fields(self) -> "ScorerSpec":
        allowed = [f.name for f in dataclasses.fields(scorer_class(self.name)) if f.init]
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(f"scorer {self.name!r} has no field(s) {unknown}; its fields: {allowed or 'none'}")
        try:
            self.build()
        except (TypeError, ValueError) as err:
            raise ValueError(f"scorer {self.name!r}: {err}") from None
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The scorer's own fields given in the spec."""
        return dict(self.model_extra or {})

    @property
    def key(self) -> str:
        """The entry's label: ``label`` if given, else the registered name."""
        return self.label or self.name

    def build(self) -> Scorer:
        return scorer_class(self.name)(**self.options)


def _unique_labels(specs: list[ScorerSpec]) -> list[ScorerSpec]:
    keys = [s.key for s in specs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"scorer labels must be unique, {dupes} repeat: give variants a `label`")
    return specs


#: a notebook's ``scorers`` parameter
ScorerList = Annotated[list[ScorerSpec], AfterValidator(_unique_labels)]


def build_scorers(specs: list[ScorerSpec]) -> dict[str, Scorer]:
    """``{label: scorer}`` in the order given."""
    return {s.key: s.build() for s in specs}


__all__ = ["ScorerList", "ScorerSpec", "build_scorers"]
