"""The submit form, generated from the config's JSON schema, and the way back: form fields -> a validated Config.

Every leaf of `Config.model_json_schema()` becomes one input named by its field path (`train.sparse.lr`), filled
with the chosen preset's value (or a run's, when re-submitting). A posted form is applied to the preset's values
field by field and validated by the same `validate` the CLI uses, so the errors read the same
("train.sparse.lr: Input should be greater than 0 (got -1.0)"). Fields that name where the console itself
writes (`LOCKED`) are set by the console, never by a form.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import yaml

from dsaforge.config import Config, ConfigError, preset, validate

# The console decides where runs write: the store and the home folder are its own, not a form's to choose.
LOCKED = ("pipeline.home", "tracking.uri")


@dataclass(frozen=True)
class Field:
    path: str                   # dotted field path, also the input's name
    section: str
    kind: str                   # bool, int, number, string, enum, yaml (lists, dicts, unions)
    choices: tuple[str, ...]
    nullable: bool
    description: str
    bounds: str                 # "> 0", "0 <= x < 1", ...


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    if ref:
        return schema["$defs"][ref.split("/")[-1]]
    return node


def _bounds(node: dict) -> str:
    parts = []
    for key, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in node:
            parts.append(f"{sym} {node[key]}")
    return ", ".join(parts)


def _leaf(path: str, node: dict) -> Field:
    options = node.get("anyOf", [node])
    nullable = any(o.get("type") == "null" for o in options)
    real = [o for o in options if o.get("type") != "null"]
    kind, choices = "yaml", ()
    if len(real) == 1:
        o = real[0]
        if "enum" in o:
            kind, choices = "enum", tuple(str(v) for v in o["enum"])
        elif "const" in o:
            kind, choices = "enum", (str(o["const"]),)
        else:
            kind = {"boolean": "bool", "integer": "int", "number": "number", "string": "string"}.get(o.get("type"), "yaml")
        bounds = _bounds(o)
    else:
        bounds = ""
    section = path.split(".")[0] if "." in path else "general"
    return Field(path, section, kind, choices, nullable, node.get("description", ""), bounds)


@lru_cache(maxsize=1)
def form_fields() -> tuple[Field, ...]:
    schema = Config.model_json_schema()
    out: list[Field] = []

    def walk(node: dict, prefix: str) -> None:
        for name, prop in node.get("properties", {}).items():
            target = _resolve(schema, prop)
            if "properties" in target:
                walk(target, f"{prefix}{name}.")
            else:
                out.append(_leaf(f"{prefix}{name}", prop))

    walk(schema, "")
    return tuple(f for f in out if f.path != "preset")


def get_path(data: dict, path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        node = node[part]
    return node


def _set_path(data: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def show(field: Field, value: Any) -> str:
    """A value as its input shows it (and as `parse` reads it back)."""
    if value is None:
        return ""
    if field.kind == "bool":
        return "true" if value else "false"
    if field.kind in ("int", "number", "string", "enum"):
        return str(value)
    return json.dumps(value)


def parse(field: Field, raw: str) -> Any:
    raw = raw.strip()
    if raw == "" and field.nullable:
        return None
    if field.kind in ("string", "enum"):
        return raw
    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw                      # left to validation, which names the field and shows the value


def config_from_form(form: dict[str, str], base: Optional[Config] = None) -> Config:
    """Apply posted fields over `base` (a preset, chosen by the form's `preset`) and validate the result."""
    fields = {f.path: f for f in form_fields()}
    unknown = [k for k in form if k not in fields and k not in ("preset", "pipeline_name", "csrf", "backend")]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key")
    locked = [k for k in form if k in LOCKED]
    if locked:
        raise ConfigError(f"{locked[0]}: set by the console, not by a submitted form")
    if base is None:
        base = preset(form.get("preset") or "tiny")
    data = base.model_dump()
    for path, raw in form.items():
        if path in fields:
            _set_path(data, path, parse(fields[path], raw))
    return validate(data)


def form_values(cfg: Config) -> dict[str, str]:
    data = cfg.model_dump()
    return {f.path: show(f, get_path(data, f.path)) for f in form_fields()}
