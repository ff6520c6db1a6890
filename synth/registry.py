"""Agent classes by name (the manifest's `agent_class` column)."""
from __future__ import annotations

import importlib

_CLASSES = {"general": "dsaforge.synth.general:GeneralAgent", "code": "dsaforge.synth.code:CodeAgent",
            "search": "dsaforge.synth.search:SearchAgent",
            "code_interpreter": "dsaforge.synth.interpreter:CodeInterpreterAgent"}
_CACHE: dict = {}


def agent_class(name: str):
    if name not in _CLASSES:
        raise KeyError(f"unknown agent class {name!r}; known: {', '.join(_CLASSES)}")
    if name not in _CACHE:
        module, attr = _CLASSES[name].split(":")
        _CACHE[name] = getattr(importlib.import_module(module), attr)()
    return _CACHE[name]
