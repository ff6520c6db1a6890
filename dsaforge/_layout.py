"""Keeps the design card's top-level folders from shadowing installed packages of the same name.

`kernels/`, `model/`, `eval/`, `synth/`, `components/` and `pipelines/` are the packages `dsaforge.kernels`,
`dsaforge.model`, ... (setup.py maps them). Python puts the current directory first on `sys.path` for `python -c`,
`python -m` and the REPL, so from a checkout's root a bare `import kernels` would find our folder before the installed
distribution of that name (transformers imports the `kernels` package from PyPI). Each folder's `__init__` calls
`hand_over` when it is imported under its bare name: the import then yields the installed package of that name, or
fails naming the dsaforge module meant.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, folder: str) -> None:
    """Replace the module being imported as `name` (our folder `folder`) by the installed package `name`.

    The import machinery returns whatever `sys.modules[name]` holds once `__init__` has run, so the caller's import
    statement gets the installed package, and its submodules resolve under that package's own path.
    """
    checkout = os.path.dirname(os.path.abspath(folder))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}: the folder {name}/ of this checkout is "
                                  f"dsaforge.{name}, import it under that name", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        if spec.loader is not None:   # None for a namespace package, which has no code to run
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
