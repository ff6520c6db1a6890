"""Keeps the design card's top-level folders from shadowing installed packages of the same name.

`kernels/`, `model/`, `eval/`, `synth/`, `components/` and `pipelines/` are the packages `dsaforge.kernels`,
`dsaforge.model`, ... (setup.py maps them). Python puts the current directory first on `sys.path` for `python -c`,
`python -m` and the REPL, so from a checkout's root a bare `import kernels` would find our folder before the installed
distribution of that name (transformers imports the `kernels` package from PyPI). Each folder's `__init__` calls
`hand_over` when it is imported under its bare name: the import then yields the installed package of that name, or
an empty stand-in whose every attribute fails naming the dsaforge module meant.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types


def hand_over(name: str, folder: str) -> None:
    """Replace the module being imported as `name` (our folder `folder`) by the installed package `name`.

    The import machinery returns whatever `sys.modules[name]` holds once `__init__` has run, so the caller's import
    statement gets the installed package, and its submodules resolve under that package's own path. With no such
    package it gets an empty stand-in instead: no `__file__`, no `__path__` (so `import model.transformer` fails),
    and any attribute fails naming the dsaforge module meant. Raising ImportError here would be clearer, but libraries
    that probe for an optional package with `find_spec` then import it (transformers probes for `kernels`) would
    crash on it; the stand-in reads to them as a namespace package shadowing on sys.path, that is, not installed.
    """
    checkout = os.path.dirname(os.path.abspath(folder))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        sys.modules[name] = _StandIn(name)
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        if spec.loader is not None:   # None for a namespace package, which has no code to run
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


class _StandIn(types.ModuleType):
    """What a bare `import NAME` of one of our folders yields when no installed package has that name."""

    def __init__(self, name: str) -> None:
        super().__init__(name, f"Not a module: the folder {name}/ of a dsaforge checkout is dsaforge.{name}.")

    def __getattr__(self, attr: str):
        raise AttributeError(f"module {self.__name__!r} is a stand-in: the folder {self.__name__}/ of this checkout "
                             f"is dsaforge.{self.__name__}, import it under that name (asked for {attr!r})")
