"""The design card's top-level folders never shadow installed packages of the same name.

Python puts the current directory first on sys.path for `python -c` and `python -m`, so these run from the repo root,
as a user in a fresh checkout would.
"""
import ast
import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDERS = ["kernels", "model", "eval", "synth", "components", "pipelines"]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_transformers_imports_from_the_repo_root():
    """transformers >= 5.25 imports the `kernels` distribution; our kernels/ folder must not answer for it."""
    r = _python("import kernels, transformers\nfrom transformers import DeepseekV32ForCausalLM\nprint(kernels.__file__)")
    assert r.returncode == 0, r.stderr[-2000:]
    if _installed("kernels"):
        assert not pathlib.Path(r.stdout.strip()).resolve().is_relative_to(ROOT / "kernels"), r.stdout


@pytest.mark.parametrize("name", FOLDERS)
def test_bare_names_are_never_our_folders(name):
    code = (f"import sys\ntry:\n    import {name} as m\nexcept ModuleNotFoundError as e:\n    print('missing', e)\n"
            f"else:\n    print('loaded', m.__file__ or list(m.__path__))\n"
            f"print('leaked', sorted(k for k, v in list(sys.modules.items()) if k == 'dsaforge.{name}'\n"
            f"      or str(getattr(v, '__file__', None) or '').startswith({str(ROOT / name)!r})))")
    r = _python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    first, leaked = r.stdout.strip().splitlines()
    if first.startswith("missing"):
        assert f"dsaforge.{name}" in first   # the error says which module was meant
    else:
        assert str(ROOT / name) not in first, first
    assert leaked == "leaked []", leaked    # no module of our folder was imported on the way


def test_dsaforge_names_still_import_from_the_repo_root():
    r = _python("import dsaforge.kernels, dsaforge.model, dsaforge.pipelines\n"
                "print(dsaforge.kernels.sparse_mla.__module__, dsaforge.pipelines.get_pipeline('end-to-end').__name__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["dsaforge.kernels.sparse_mla", "dsaforge.pipelines.end_to_end"]


def test_tests_import_only_the_dsaforge_namespace():
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert not offenders, offenders
