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
    """A bare import yields the installed package of that name, or a stand-in that is no package of ours: no file,
    no submodules, and every attribute fails naming the dsaforge module meant."""
    code = (f"import sys\nimport {name} as m\n"
            f"print('file', getattr(m, '__file__', None) or getattr(m, '__path__', None))\n"
            f"try:\n    m.no_such_attribute\nexcept AttributeError as e:\n    print('attr', e)\n"
            f"try:\n    import {name}.no_such_module\nexcept ImportError as e:\n    print('sub', e)\n"
            f"print('leaked', sorted(k for k, v in list(sys.modules.items()) if k == 'dsaforge.{name}'\n"
            f"      or str(getattr(v, '__file__', None) or '').startswith({str(ROOT / name)!r})))")
    r = _python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    assert str(ROOT / name) not in lines["file"], lines
    if not _installed(name):
        assert lines["file"] == "None" and f"dsaforge.{name}" in lines["attr"], lines
        assert "is not a package" in lines["sub"], lines
    assert lines["leaked"] == "[]", lines    # no module of our folder was imported on the way


def test_transformers_probes_see_no_package_behind_a_stand_in():
    """transformers finds a package with find_spec, then imports it for its version; a stand-in must read as absent
    (as a namespace package on sys.path would), not crash the import of transformers."""
    r = _python("from transformers.utils.import_utils import _is_package_available\n"
                "print(_is_package_available('model', return_version=True))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "(False, 'N/A')", r.stdout


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
