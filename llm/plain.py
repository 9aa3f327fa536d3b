"""Config dataclasses to and from plain dicts (what params.yaml, config.json and MLflow hold),
and the check that names a bad field.

    config = TrainConfig.from_dict(yaml.safe_load(...)["train"])    # an unknown key is named
    json.dumps(config.to_dict())                                     # tuples become lists
    check = field_checker("TrainConfig"); check(lr > 0, "lr", lr, "must be > 0")
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

Check = Callable[[bool, str, Any, str], None]


def field_checker(owner: str) -> Check:
    """check(ok, field, value, rule) raises 'Owner.field rule, got value' unless ok."""
    def check(ok: bool, field_name: str, value: Any, rule: str) -> None:
        if not ok:
            raise ValueError(f"{owner}.{field_name} {rule}, got {value!r}")
    return check


class PlainDict:
    """Mixin for a config dataclass: from_dict / to_dict."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a plain dict, naming any key that is not a field (a typo in params.yaml
        should stop the run, not be ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; fields: {', '.join(sorted(fields))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, tuples as lists, as YAML, JSON and MLflow want them."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}
