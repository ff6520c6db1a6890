"""What every agent class provides to the generator and the gates, and the one way sandboxed helpers are run."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dsaforge.synth.sandbox import Sandbox
from dsaforge.synth.task import Verdict


@dataclass
class Candidate:
    """A proposed task before the gates: public prompt + tools, and the strings the prompt must not contain."""
    key: str
    family: str
    difficulty: int
    prompt: str
    tools: list[dict]
    leaks: list[str] = field(default_factory=list)
    seed: int = 0
    extra_gates: dict[str, bool] = field(default_factory=dict)   # class-specific acceptance checks, all must hold


@dataclass
class EnvDraft:
    env_id: str
    agent_class: str
    family: str
    dir: Path
    verifier_file: str
    candidates: list[Candidate]
    source: str = "procedural"


class AgentClass:
    """Base for the four agent classes. Subclasses implement build_env, reference, verify, reset_ok, attempts."""
    name: str = ""
    families: tuple[str, ...] = ()

    def build_env(self, env_id: str, family: str, seed: int, max_difficulty: int, env_dir: Path,
                  resources: dict) -> EnvDraft:
        raise NotImplementedError

    def reference(self, env_dir: Path, keys: list[str], sandbox: Sandbox) -> list[Any]:
        raise NotImplementedError

    def empty(self, key: str) -> Any:
        return {"answer": None}

    def verify(self, env_dir: Path, keys: list[str], submissions: list[Any], sandbox: Sandbox) -> list[Verdict]:
        raise NotImplementedError

    def reset_ok(self, env_dir: Path, keys: list[str], sandbox: Sandbox) -> bool:
        raise NotImplementedError

    def attempts(self, env_dir: Path, keys: list[str], k: int, seed: int, sandbox: Sandbox) -> list[list[Any]]:
        """k submissions per task from this class's built-in baseline solver."""
        raise NotImplementedError


class HarnessError(RuntimeError):
    pass


def run_harness(sandbox: Sandbox, harness: Path, env_dir: Path, job: dict, include: Optional[list[str]] = None,
                wall_seconds: Optional[float] = None, extra: Optional[dict[str, str | bytes]] = None,
                site: bool = False) -> list[dict]:
    """Copy the bundle (or the `include` subset) and a harness script into a fresh private directory, run the
    harness on `job` (stdin) and parse the JSON list it prints last. The harness runs on the standard library
    alone (`Sandbox.stdlib_python`) unless `site` (code under test may import installed packages)."""
    files: dict[str, str | bytes] = {"harness.py": harness.read_text()}
    for p in sorted(env_dir.rglob("*")):
        rel = str(p.relative_to(env_dir))
        if p.is_file() and (include is None or rel in include or rel.split("/")[0] in include):
            files[rel] = p.read_bytes()
    files.update(extra or {})
    argv = [sandbox.python, "-I", "/tmp/harness.py"] if site else sandbox.stdlib_python("/tmp/harness.py")
    res = sandbox.run(argv, files=files, stdin=json.dumps(job),
                      wall_seconds=wall_seconds)
    lines = res.stdout.strip().splitlines()
    if not res.ok or not lines:
        raise HarnessError(f"{harness.name} in the sandbox: {res.describe()}: {res.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def copy_source(module_file: str | Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(module_file, dest)
