"""Build a validated Config from a preset, YAML files and `--set a.b=c` overrides, with errors that name the field."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel, ValidationError

from dsaforge.config.base import ConfigError
from dsaforge.config.presets import preset as make_preset
from dsaforge.config.sections import Config


def _describe(err: dict, root: type[BaseModel]) -> str:
    path = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(root, err["loc"][:-1])
        hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{path}: unknown key{hint}"
    got = err.get("input")
    if err["type"] == "value_error":        # a validator's own sentence names its fields
        msg = err["msg"].removeprefix("Value error, ")
        return f"{path}: {msg}" if path else msg
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {err['msg']}{shown}"


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    model: Any = root
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def validate(data: dict, where: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err, Config) for err in e.errors()]
        raise ConfigError(f"{where}: " + "; ".join(lines)) from None


def _merge(dst: dict, src: dict, prefix: str = "") -> dict:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, f"{prefix}{key}.")
        else:
            dst[key] = value
    return dst


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a YAML file (binary content, not UTF-8 text)") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML: 3 -> int, true -> bool, [a,b] -> list)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. model.n_layers=4")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            where = ".".join(parts[: i + 1])
            allowed = ", ".join(k for k in node) if isinstance(node, dict) else ""
            raise ConfigError(f"--set {key}: no section {where!r}; allowed: {allowed}")
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        raise ConfigError(f"--set {key}: unknown key {leaf!r}; allowed: {', '.join(node)}")
    node[leaf] = value


def load_config(preset: Optional[str] = "tiny", files: Iterable[str | Path] = (),
                overrides: Iterable[str] = ()) -> Config:
    """preset -> YAML files (in order; a file may name its own `preset:`) -> --set overrides -> validated Config."""
    layers = [read_yaml(f) for f in files]
    name = preset
    for layer in layers:
        name = layer.get("preset", name)
    data = make_preset(name or "tiny").model_dump()
    for f, layer in zip(files, layers):
        try:
            Config.model_validate(_merge(json.loads(json.dumps(data)), layer))
        except ValidationError:
            validate(_merge(json.loads(json.dumps(data)), layer), where=str(f))
        _merge(data, layer)
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(data)


def config_hash(cfg: Config) -> str:
    """Stable short hash of everything that changes results (tracking settings excluded)."""
    payload = cfg.model_dump(exclude={"tracking"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, BaseModel):
        data = data.model_dump()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def diff(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    fa, fb = flatten(a), flatten(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
