"""Sandbox for every piece of untrusted code in task synthesis: tools, verifiers, reference solutions,
model-written code, and the tests of code-agent tasks.

Backend "bwrap" (bubblewrap, Debian package `bubblewrap`): new network, PID, IPC and UTS namespaces, and a root
filesystem built from an allow-list rather than the host's: the system's programs and shared libraries (/usr and
its merged-usr links), the Python interpreter and its libraries (the installation prefixes, read-only), a few
generated files in /etc (passwd, group, the loader cache), a fresh /dev and /proc, and one private writable
directory mounted at /tmp that holds the task's own files. Nothing else of the host exists inside: not the
project checkout, not the MLflow store, not other tasks' bundles, not /run or /var (so no host Unix socket can be
reached; a read-only bind would not stop `connect`), not home directories. CPU / address-space / process /
file-size limits are applied with `prlimit` inside the sandbox; a wall-clock timer and an output cap are
enforced from outside.

Why the limits are applied *inside* the sandbox, after the uid change: RLIMIT_NPROC does not apply to uid 0
(the kernel exempts INIT_USER), so when dsaforge runs as root the sandboxed process first drops to a
per-process unprivileged uid with `setpriv`; as an ordinary user bwrap creates a user namespace instead, and the
process limit is then counted inside that namespace only, not against the user's other processes.

Backend "unsafe-subprocess" runs the same command as a plain subprocess with the same rlimits but no
isolation; it exists for machines without bubblewrap and must be asked for by name.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from dsaforge.config import SandboxConfig


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here, and the unsafe fallback was not asked for."""


@dataclass
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool = False
    output_truncated: bool = False
    killed_by: Optional[str] = None      # "wall", "output", or the signal name that ended the process

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated

    def describe(self) -> str:
        if self.timed_out:
            return f"wall-clock limit reached after {self.wall_s:.1f}s"
        if self.output_truncated:
            return "output limit reached"
        if self.killed_by:
            return f"killed by {self.killed_by}"
        return f"exit code {self.returncode}"


# Signals that mean "a limit was hit" when they end the sandboxed process.
_LIMIT_SIGNALS = {signal.SIGXCPU: "SIGXCPU (cpu limit)", signal.SIGKILL: "SIGKILL", signal.SIGXFSZ: "SIGXFSZ (file size limit)",
                  signal.SIGSEGV: "SIGSEGV", signal.SIGABRT: "SIGABRT"}


# What the sandbox's root holds besides the interpreter: programs and shared libraries. On merged-usr systems
# /bin, /lib, ... are symlinks into /usr and are recreated as such.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# From /etc only what the dynamic loader and Python's startup read; passwd and group are generated.
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "hosts")
# Host paths that must never be inside a sandbox even if an interpreter prefix contains them.
_NEVER = ("/run", "/var/run", "/proc", "/sys", "/dev")


def _python_roots() -> list[str]:
    """The interpreter's installation prefixes (a venv, the base installation) and the interpreter's own folder."""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    roots.add(os.path.dirname(os.path.realpath(sys.executable)))
    return sorted(roots)


def _allowed_roots() -> list[str]:
    """Host directories bound read-only into the sandbox: the interpreter prefixes outside /usr, minus nested
    ones. A prefix of / or one that would expose a forbidden tree is refused (the sandbox would be the host)."""
    out: list[str] = []
    for r in _python_roots():
        if r == "/" or any(r == n or r.startswith(n + "/") for n in _NEVER):
            raise SandboxUnavailable(f"the Python installation at {r} cannot be isolated; install Python elsewhere")
        if r == "/usr" or r.startswith("/usr/"):
            continue
        if not any(r.startswith(o + "/") for o in out):
            out.append(r)
    return out

@dataclass
class Sandbox:
    """`Sandbox(cfg).run([python, "job.py"], files={"job.py": src})` -> SandboxResult.

    `hide` lists host paths made invisible inside the sandbox (an empty file over a file, an empty tmpfs over a
    directory): the synthesis output directory (gold patches, answers) and, for code-agent tasks, the pristine
    copy of the module a bug was injected into.
    """
    cfg: SandboxConfig = field(default_factory=SandboxConfig)
    hide: Sequence[str] = ()
    uid_base: int = 60000          # root case: sandboxed processes run as uid_base + pid % 20000

    def __post_init__(self) -> None:
        self.backend = self.cfg.backend
        if self.backend == "bwrap":
            problem = bwrap_problem()
            if problem:
                raise SandboxUnavailable(
                    f"the bubblewrap sandbox is unavailable: {problem}. Install the Debian package `bubblewrap` "
                    "(apt-get install -y bubblewrap), or set synth.sandbox.backend=unsafe-subprocess to run "
                    "untrusted code without isolation (never on shared machines).")

    @property
    def python(self) -> str:
        return sys.executable

    def stdlib_python(self, script: str, *args: str) -> list[str]:
        """argv running `script` (a sandbox path) on the standard library alone: isolated mode without the `site`
        module, so no site-packages and none of their .pth hooks (about 14 ms of every start in a full
        environment, which a rollout pays on each tool call and verdict). For the harnesses that promise the
        standard library only (general and search environments, model-written families); a module beyond it is
        an ImportError inside the sandbox."""
        return [self.python, "-I", "-S", script, *args]

    # -- command construction ------------------------------------------------------------------------------------
    def _limits(self) -> list[str]:
        c = self.cfg
        mem = c.memory_mb * 1024 * 1024
        # --fsize caps each file written in the private directory (disk abuse); --core=0: no core dumps there.
        return ["prlimit", f"--as={mem}", f"--cpu={c.cpu_seconds}", f"--nproc={c.max_processes}",
                f"--fsize={max(mem, c.max_output_bytes)}", "--core=0", "--nofile=256", "--"]

    def _bwrap_argv(self, workdir: str, argv: Sequence[str]) -> list[str]:
        root = os.geteuid() == 0
        uid = self.uid_base + os.getpid() % 20000 if root else os.getuid()
        cmd = ["bwrap", "--dev", "/dev", "--proc", "/proc"]
        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                cmd += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                cmd += ["--ro-bind", d, d]
        cmd += ["--perms", "0755", "--dir", "/etc"]       # bwrap would make it 0700, closed to the sandbox uid
        for name in _ETC_FILES:
            if os.path.exists(f"/etc/{name}"):
                cmd += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
        etc = _identity_files(uid)
        cmd += ["--ro-bind", etc["passwd"], "/etc/passwd", "--ro-bind", etc["group"], "/etc/group"]
        cmd += ["--bind", workdir, "/tmp"]
        # The interpreter prefixes after /tmp: a venv made under /tmp stays visible over the private directory.
        # Parents are created world-traversable (bwrap would make them 0700 root-owned, closed to the sandbox uid),
        # those under /tmp too: a checkout under /tmp with its .venv is how a CI job often runs.
        made: set[str] = set()
        for r in _allowed_roots():
            parts = Path(r).parts
            for i in range(2, len(parts)):
                d = str(Path(*parts[:i]))
                if d not in made and not d.startswith("/usr") and d != "/tmp":
                    made.add(d)
                    cmd += ["--perms", "0755", "--dir", d]
            cmd += ["--ro-bind", r, r]
        for h in self.hide:
            if os.path.isdir(h):
                cmd += ["--tmpfs", h]
            elif os.path.exists(h):
                cmd += ["--ro-bind", _empty_file(), h]   # /dev/null would be a device node on a nodev mount
        cmd += ["--chdir", "/tmp",
                "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                "--die-with-parent", "--new-session"]
        if root:
            cmd += ["--", "setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "--no-new-privs",
                    "--inh-caps=-all", "--bounding-set=-all"]
        else:
            cmd += ["--unshare-user", "--cap-drop", "ALL"]
        return cmd + ["--"] + self._limits() + list(argv)

    def _env(self) -> dict[str, str]:
        path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"])
        return {"PATH": path, "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
                "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": "/tmp", "OPENBLAS_NUM_THREADS": "1",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    # -- running -------------------------------------------------------------------------------------------------
    def run(self, argv: Sequence[str], files: Optional[Mapping[str, str | bytes]] = None,
            workdir: Optional[str | Path] = None, stdin: Optional[str] = None,
            wall_seconds: Optional[float] = None) -> SandboxResult:
        """Run argv with `files` written into a fresh private directory (or into `workdir`, which is used as the
        private directory and kept). Paths in argv refer to the sandbox's view: the private directory is /tmp."""
        own = workdir is None
        wd = Path(tempfile.mkdtemp(prefix="dsaforge-sbx-")) if own else Path(workdir)
        try:
            for rel, data in (files or {}).items():
                p = wd / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data.encode() if isinstance(data, str) else data)
            return self._run_in(wd, argv, stdin, wall_seconds or self.cfg.wall_seconds)
        finally:
            if own:
                shutil.rmtree(wd, ignore_errors=True)

    def _run_in(self, wd: Path, argv: Sequence[str], stdin: Optional[str], wall: float) -> SandboxResult:
        if self.backend == "bwrap":
            if os.geteuid() == 0:
                uid = self.uid_base + os.getpid() % 20000
                for p in [wd, *wd.rglob("*")]:
                    os.lchown(p, uid, uid)
            cmd, cwd, preexec = self._bwrap_argv(str(wd), argv), None, None
        else:
            # Paths in argv name the sandbox's view (/tmp = the private dir); map those that exist there, and leave
            # host paths alone (an interpreter in a checkout under /tmp).
            def host(a: str) -> str:
                mapped = f"{wd}/{a[len('/tmp/'):]}"
                return mapped if a.startswith("/tmp/") and os.path.exists(mapped) else a
            cmd, cwd = self._limits() + [host(a) for a in argv], str(wd)
            preexec = None
        env = self._env()
        if self.backend != "bwrap":
            env["HOME"] = env["TMPDIR"] = str(wd)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec)
        cap = self.cfg.max_output_bytes
        out, err, over = bytearray(), bytearray(), threading.Event()

        def pump(stream, buf):
            # Read in chunks and stop keeping bytes past the cap: a process printing forever must not fill memory.
            while True:
                chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
                if not chunk:
                    break
                room = cap - len(out) - len(err)
                if room > 0:
                    buf += chunk[:room]
                if len(chunk) > max(room, 0):
                    over.set()
                    _kill(proc)
                    break

        threads = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
        for t in threads:
            t.start()
        if stdin is not None:
            try:
                proc.stdin.write(stdin.encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
        timed_out = not wait_exit(proc, wall)
        if timed_out:
            _kill(proc)
            proc.wait()
        for t in threads:
            t.join(timeout=5)
        rc = proc.returncode
        killed_by = None
        if timed_out:
            killed_by = "wall"
        elif over.is_set():
            killed_by = "output"
        elif rc < 0:
            killed_by = _LIMIT_SIGNALS.get(-rc, f"signal {-rc}")
        elif rc >= 128 and self.backend == "bwrap" and (rc - 128) in _LIMIT_SIGNALS:
            killed_by = _LIMIT_SIGNALS[rc - 128]   # bwrap reports a signalled child as 128 + signo
        return SandboxResult(rc, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - t0,
                             timed_out=timed_out, output_truncated=over.is_set(), killed_by=killed_by)

    def spawn(self, argv: Sequence[str], files: Optional[Mapping[str, str | bytes]] = None) -> SandboxProcess:
        """Start argv in a fresh private directory holding `files` and keep it running (see SandboxProcess)."""
        wd = Path(tempfile.mkdtemp(prefix="dsaforge-sbx-"))
        for rel, data in (files or {}).items():
            p = wd / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data.encode() if isinstance(data, str) else data)
        env = self._env()
        if self.backend == "bwrap":
            if os.geteuid() == 0:
                uid = self.uid_base + os.getpid() % 20000
                for p in [wd, *wd.rglob("*")]:
                    os.lchown(p, uid, uid)
            cmd, cwd = self._bwrap_argv(str(wd), argv), None
        else:
            cmd = self._limits() + [f"{wd}/{a[len('/tmp/'):]}" if a.startswith("/tmp/") and
                                    os.path.exists(f"{wd}/{a[len('/tmp/'):]}") else a for a in argv]
            cwd = str(wd)
            env["HOME"] = env["TMPDIR"] = str(wd)
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        return SandboxProcess(proc, wd, self.cfg.max_output_bytes)

    def run_python(self, source: str, files: Optional[Mapping[str, str | bytes]] = None,
                   stdin: Optional[str] = None, wall_seconds: Optional[float] = None) -> SandboxResult:
        files = dict(files or {})
        files["__main__.py"] = source
        return self.run([self.python, "-I", "/tmp/__main__.py"], files=files, stdin=stdin, wall_seconds=wall_seconds)


class SandboxProcess:
    """A long-lived sandboxed process spoken to in JSON lines (one request, one reply): the code interpreter's live
    kernel. The sandbox's rlimits cover the process's whole life; `wall_seconds` bounds each reply, and a process
    that overruns it, writes a line over the output cap, or dies is killed and reports `alive = False`."""

    def __init__(self, proc: subprocess.Popen, workdir: Path, cap: int) -> None:
        import queue

        self.proc, self.workdir, self.cap, self.alive = proc, workdir, cap, True
        self._lines: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self._stderr = bytearray()

        def pump_out():
            while True:
                line = proc.stdout.readline(cap + 1)
                if not line:
                    self._lines.put(None)
                    return
                self._lines.put(line)

        def pump_err():
            while chunk := proc.stderr.read1(65536):
                self._stderr += chunk[: max(0, cap - len(self._stderr))]

        for f in (pump_out, pump_err):
            threading.Thread(target=f, daemon=True).start()

    def request(self, obj: Optional[dict], wall_seconds: float) -> dict:
        """Send one JSON request (None: send nothing, e.g. to read a greeting) and wait up to wall_seconds for the
        one-line JSON reply."""
        import queue

        if not self.alive:
            return {"error": "the sandboxed process is no longer running"}
        try:
            if obj is not None:
                self.proc.stdin.write((json.dumps(obj) + "\n").encode())
                self.proc.stdin.flush()
            line = self._lines.get(timeout=wall_seconds)
        except queue.Empty:
            self.close()
            return {"error": f"no reply within {wall_seconds:.0f}s; the process was stopped"}
        except (BrokenPipeError, OSError):
            line = None
        if line is None:
            self.close()
            return {"error": "the sandboxed process exited: " + self._stderr.decode(errors="replace").strip()[-300:]}
        if len(line) > self.cap:
            self.close()
            return {"error": "output limit reached; the process was stopped"}
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {"error": "unreadable reply: " + line[:200].decode(errors="replace")}

    def close(self) -> None:
        if self.alive:
            self.alive = False
            _kill(self.proc)
            wait_exit(self.proc, 10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "SandboxProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` seconds for proc to exit (and reap it); False if it is still running. Wakes when the
    process exits, through a pidfd: Popen.wait(timeout) polls with sleeps of up to 50 ms, which a verifier that
    runs for 20 ms pays on every call (on Linux before 5.3 or without pidfd_open it falls back to that)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if ready:
        proc.wait()
    return bool(ready)


def _kill(proc: subprocess.Popen) -> None:
    # The sandbox runs in its own session; killing the group takes bwrap, and with it (--die-with-parent, PID
    # namespace) every process inside.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_EMPTY: list[str] = []


def _remove(path: str) -> None:
    """Delete a file or directory this process made for its sandboxes (at exit; gone already is fine)."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def _empty_file() -> str:
    if not _EMPTY or not os.path.exists(_EMPTY[0]):
        fd, path = tempfile.mkstemp(prefix="dsaforge-sbx-empty-")
        os.close(fd)
        os.chmod(path, 0o444)
        _EMPTY[:] = [path]
        atexit.register(_remove, path)
    return _EMPTY[0]


_IDENTITY: dict[int, dict[str, str]] = {}


def _identity_files(uid: int) -> dict[str, str]:
    """A passwd and group naming only the sandbox user (some libraries look the current user up)."""
    files = _IDENTITY.get(uid)
    if files is None or not all(os.path.exists(p) for p in files.values()):
        d = tempfile.mkdtemp(prefix="dsaforge-sbx-etc-")
        files = {"passwd": os.path.join(d, "passwd"), "group": os.path.join(d, "group")}
        with open(files["passwd"], "w") as f:
            f.write(f"root:x:0:0:root:/root:/bin/false\nsandbox:x:{uid}:{uid}:sandbox:/tmp:/bin/false\n")
        with open(files["group"], "w") as f:
            f.write(f"root:x:0:\nsandbox:x:{uid}:\n")
        for p in files.values():
            os.chmod(p, 0o444)
        os.chmod(d, 0o755)
        _IDENTITY[uid] = files
        atexit.register(_remove, d)
    return files


_PROBE: dict[str, Optional[str]] = {}


def bwrap_problem() -> Optional[str]:
    """None when bubblewrap can start a sandbox here, else why not (cached per process)."""
    if "r" in _PROBE:
        return _PROBE["r"]
    exe = shutil.which("bwrap")
    if exe is None:
        _PROBE["r"] = "`bwrap` is not on PATH"
        return _PROBE["r"]
    for tool in ("prlimit", "setpriv") if os.geteuid() == 0 else ("prlimit",):
        if shutil.which(tool) is None:
            _PROBE["r"] = f"`{tool}` (util-linux) is not on PATH"
            return _PROBE["r"]
    probe = Sandbox.__new__(Sandbox)
    probe.cfg, probe.hide, probe.uid_base, probe.backend = SandboxConfig(), (), 60000, "bwrap"
    wd = tempfile.mkdtemp(prefix="dsaforge-sbx-probe-")
    try:
        if os.geteuid() == 0:
            os.chown(wd, 60000 + os.getpid() % 20000, 60000 + os.getpid() % 20000)
        r = subprocess.run(probe._bwrap_argv(wd, ["/bin/true"]), capture_output=True, text=True, timeout=30,
                           env=probe._env())
        _PROBE["r"] = None if r.returncode == 0 else f"bwrap failed: {r.stderr.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        _PROBE["r"] = f"bwrap failed: {e}"
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    return _PROBE["r"]
