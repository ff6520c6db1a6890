"""The Dockerfiles install what the cluster runs from the locks (no Docker daemon in CI: what can be checked without
building is checked here; `make image` builds them where Docker exists).

Run: python -m pytest tests/core/test_images.py -q
"""
import re
import subprocess
from pathlib import Path

import pytest

import dsaforge
from dsaforge.config.sections import PipelineConfig

ROOT = Path(dsaforge.__file__).resolve().parent.parent
LOCKS = {"cuda.Dockerfile": ["requirements/cuda.lock"],
         "cpu.Dockerfile": ["requirements/cpu.lock", "requirements/torch-cpu.lock"]}


@pytest.mark.parametrize("name", list(LOCKS))
def test_dockerfile_installs_the_locks_and_every_package(name):
    text = (ROOT / "docker" / name).read_text()
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    copies = [c.split()[:-1] for c in re.findall(r"^COPY (.+)$", text, re.M)]
    sources = [s for c in copies for s in c]
    for src in sources:
        assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
        assert src.split("/")[0] not in ignored, f"{name}: COPY {src} is excluded by .dockerignore"
    for lock in LOCKS[name]:
        assert lock in sources and re.search(rf"--require-hashes --no-deps .*-r {lock}", text), lock
    # every folder setup.py installs as part of dsaforge is in the image
    roots = re.search(r"ROOTS = (\{.*?\})", (ROOT / "setup.py").read_text(), re.S).group(1)
    for folder in re.findall(r'": "(\w+)"', roots):
        assert folder in sources, f"{name} misses {folder}/"
    assert "bubblewrap" in text and "pip install --no-deps --no-build-isolation ." in text
    assert re.search(r"^USER 1000$", text, re.M)


def test_make_image_tags_what_the_config_names():
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert PipelineConfig().image == f"dsaforge:{version}"
    assert PipelineConfig().cpu_image == f"dsaforge-cpu:{version}"
    out = subprocess.run(["make", "-n", "image"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"-f docker/cuda.Dockerfile" in out and f"-t dsaforge:{version} ." in out
    assert f"-f docker/cpu.Dockerfile" in out and f"-t dsaforge-cpu:{version} ." in out
