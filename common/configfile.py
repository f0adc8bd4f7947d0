"""Config files: YAML (or JSON) validated by a frozen pydantic model, errors shown by key path.

``--set a.b=value`` overrides are applied before validation so a typo there fails the same way
as a typo in the file. Validators do no I/O; paths and hardware resolve at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config and message model: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ConfigError(ValueError):
    """A config that cannot be used; ``str()`` lists every problem with its key path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid config ({source}):\n" + "\n".join(f"  - {p}" for p in problems))


def format_validation_error(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `--help` lists the keys)"
        inp = e.get("input")
        shown = "" if isinstance(inp, dict | list) or e["type"] == "missing" else f" (got {inp!r})"
        out.append(f"{loc}: {msg}{shown}")
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError("--set", [f"{item!r}: expected KEY.PATH=VALUE"])
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError("--set", [f"{'.'.join(path)}: {part} is not a section"])
            node = nxt
        node[path[-1]] = value
    return data


def read_mapping(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(str(path), [f"file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"top level must be a mapping, got {type(data).__name__}"])
    return data


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from None


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """Defaults ← file ← ``--set`` overrides, validated as a whole."""
    data: dict[str, Any] = read_mapping(Path(path)) if path else {}
    data = apply_overrides(data, overrides)
    return validate(model, data, str(path) if path else "defaults")


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
