"""Escape and abuse attempts against the synthesis sandbox: every one must be contained and reported."""
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dsaforge.config import SandboxConfig
from dsaforge.synth import sandbox as sbx
from dsaforge.synth.sandbox import Sandbox, SandboxUnavailable

pytestmark = pytest.mark.skipif(sbx.bwrap_problem() is not None, reason=f"bwrap unusable: {sbx.bwrap_problem()}")


@pytest.fixture(scope="module")
def box():
    return Sandbox(SandboxConfig(cpu_seconds=3, wall_seconds=6, memory_mb=256, max_processes=16,
                                 max_output_bytes=20_000))


def test_runs_python_and_returns_output(box):
    r = box.run_python("import sys; print('hello', sys.argv); print('err', file=sys.stderr)")
    assert r.ok and "hello" in r.stdout and "err" in r.stderr


def test_write_outside_private_dir_fails(box, tmp_path):
    target = tmp_path / "escape.txt"
    r = box.run_python(f"""
import os
results = []
for p in [{str(target)!r}, '/etc/dsaforge-escape', '/usr/dsaforge-escape', os.path.expanduser('~root/x')]:
    try:
        open(p, 'w').write('x'); results.append('WROTE ' + p)
    except OSError as e:
        results.append('blocked ' + type(e).__name__)
open('/tmp/inside.txt', 'w').write('fine')
print(results)
""")
    assert r.ok, r.stderr
    assert "WROTE" not in r.stdout and r.stdout.count("blocked") == 4
    assert not target.exists() and not os.path.exists("/etc/dsaforge-escape")


def test_private_dir_is_fresh_and_home_hidden(box):
    box.run_python("open('/tmp/leftover', 'w').write('x')")
    r = box.run_python("import os; print(sorted(os.listdir('/tmp')), os.listdir('/root') if os.path.isdir('/root') else '-')")
    assert "leftover" not in r.stdout
    assert ".ssh" not in r.stdout and ".bashrc" not in r.stdout


def test_hidden_paths_are_invisible():
    # Inside an allowed root (the interpreter's prefix), where `hide` matters: e.g. a code task's pristine module.
    secret = Path(tempfile.mkdtemp(dir=sys.prefix, prefix="dsaforge-hide-"))
    try:
        (secret / "gold.patch").write_text("the fix")
        (secret / "answer.txt").write_text("42")
        secret.chmod(0o755)
        (secret / "answer.txt").chmod(0o644)
        box = Sandbox(SandboxConfig(wall_seconds=5), hide=[str(secret)])
        r = box.run_python(f"import os; print(os.listdir({str(secret)!r}))")
        assert r.ok and r.stdout.strip() == "[]"
        box = Sandbox(SandboxConfig(wall_seconds=5), hide=[str(secret / "answer.txt")])
        r = box.run_python(f"print(repr(open({str(secret / 'answer.txt')!r}).read()))")
        assert r.ok and r.stdout.strip() == "''"
        r = Sandbox(SandboxConfig(wall_seconds=5)).run_python(f"print(open({str(secret / 'answer.txt')!r}).read())")
        assert r.stdout.strip() == "42"   # the control: visible when not hidden
    finally:
        shutil.rmtree(secret)


def test_network_is_unreachable(box):
    # A listener on the host's loopback must not be reachable either.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        r = box.run_python(f"""
import socket
out = []
for host in [('127.0.0.1', {port}), ('1.1.1.1', 80), ('10.0.0.1', 443)]:
    s = socket.socket(); s.settimeout(1)
    try:
        s.connect(host); out.append('CONNECTED')
    except OSError as e:
        out.append('blocked')
print(out)
""")
    finally:
        srv.close()
    assert r.ok, r.stderr
    assert "CONNECTED" not in r.stdout and r.stdout.count("blocked") == 3


def test_fork_bomb_is_contained(box):
    t0 = time.monotonic()
    r = box.run_python("""
import os
n = 0
while True:
    try:
        if os.fork() == 0:
            while True: pass
        n += 1
    except OSError:
        print('fork refused after', n, flush=True)
        break
""")
    assert "fork refused after" in r.stdout
    n = int(r.stdout.split("after")[1].split()[0])
    assert n < 16
    assert time.monotonic() - t0 < 15   # the spinning children are killed with the sandbox, not left behind


def test_memory_blowup_is_contained(box):
    r = box.run_python("x = bytearray(2 * 1024 ** 3)\nprint('allocated')")
    assert not r.ok and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_infinite_loop_hits_cpu_limit(box):
    r = box.run_python("while True: pass")
    assert not r.ok and (r.killed_by or "").startswith(("SIGXCPU", "SIGKILL", "wall"))


def test_sleeping_process_hits_wall_clock():
    box = Sandbox(SandboxConfig(cpu_seconds=5, wall_seconds=1.5))
    r = box.run_python("import time; time.sleep(60)")
    assert r.timed_out and r.killed_by == "wall" and r.wall_s < 10


def test_huge_output_is_truncated(box):
    r = box.run_python("while True: print('x' * 1000)")
    assert r.output_truncated and not r.ok
    assert len(r.stdout) + len(r.stderr) <= 20_000


def test_huge_file_is_capped(box):
    r = box.run_python("f = open('/tmp/big', 'wb')\nfor _ in range(1000): f.write(b'0' * 1024 * 1024)\nprint('done')")
    assert not r.ok and "done" not in r.stdout


def test_no_privileges_inside(box):
    r = box.run_python("import os; print(os.getuid(), open('/proc/self/status').read().split('CapEff:')[1].split()[0])")
    assert r.ok
    uid, capeff = r.stdout.split()
    assert int(capeff, 16) == 0
    if os.geteuid() == 0:
        assert uid != "0"


def test_refuses_without_bwrap_unless_unsafe(monkeypatch):
    monkeypatch.setattr(sbx, "_PROBE", {"r": "`bwrap` is not on PATH"})
    with pytest.raises(SandboxUnavailable, match="unsafe-subprocess"):
        Sandbox(SandboxConfig())
    unsafe = Sandbox(SandboxConfig(backend="unsafe-subprocess", wall_seconds=5))
    r = unsafe.run_python("print(40 + 2)")
    assert r.ok and r.stdout.strip() == "42"
    r = unsafe.run_python("while True: print('y' * 100)")
    assert r.output_truncated


# -- what the filesystem holds: an allow-list, not the host root -------------------------------------------------

@pytest.fixture
def host_dir():
    """A world-readable host directory outside /tmp (the host's /tmp is replaced by the private one anyway)."""
    d = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="dsaforge-host-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_host_unix_socket_is_unreachable(box, host_dir):
    path = host_dir / "service.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o777)
    srv.listen(1)
    try:
        r = box.run_python(f"""
import glob, socket
out = []
for p in [{str(path)!r}] + glob.glob('/run/**/*.sock', recursive=True) + glob.glob('/var/run/**/*.sock', recursive=True):
    s = socket.socket(socket.AF_UNIX); s.settimeout(1)
    try:
        s.connect(p); out.append('CONNECTED ' + p)
    except OSError as e:
        out.append('blocked')
print(out)
""")
    finally:
        srv.close()
    assert r.ok, r.stderr
    assert "CONNECTED" not in r.stdout and "blocked" in r.stdout


def test_another_tasks_bundle_is_invisible(box, host_dir):
    # An earlier run's synthesis output: bundles with hidden answers, world-readable on the host.
    hidden = host_dir / "synth" / "envs" / "general-x-00000" / "hidden"
    hidden.mkdir(parents=True)
    (hidden / "tasks.json").write_text('{"answer": 42}')
    for p in [host_dir / "synth", *(host_dir / "synth").rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    r = box.run_python(f"""
import os
p = {str(hidden / 'tasks.json')!r}
print('READ ' + open(p).read() if os.path.exists(p) else 'absent', os.path.exists({str(host_dir)!r}))
""")
    assert r.ok, r.stderr
    assert r.stdout.split() == ["absent", "False"]


def test_checkout_and_tracking_store_are_invisible(box):
    from dsaforge.tracking import default_tracking_uri

    checkout = Path(sbx.__file__).resolve().parents[1]          # where dsaforge runs from
    store = default_tracking_uri(Path.cwd() / ".dsaforge").removeprefix("sqlite:///")
    probes = [str(checkout / "pyproject.toml"), str(checkout / "synth" / "sandbox.py"), store,
              str(Path(store).parent), "/etc/shadow", "/etc/hostname", "/var/log", "/run", "/srv", "/mnt"]
    r = box.run_python(f"import os\nprint([p for p in {probes!r} if os.path.exists(p)])")
    assert r.ok, r.stderr
    assert r.stdout.strip() == "[]"
    # Home and install folders hold only the way to the interpreter (e.g. ~/.pyenv/versions/X), nothing else.
    way = {part for root in sbx._python_roots() for part in Path(root).parts}
    r = box.run_python("import os, json\nprint(json.dumps({d: os.listdir(d) for d in ['/root', '/home', '/opt', '/work']"
                       " if os.path.isdir(d)}))")
    assert r.ok, r.stderr
    listed = json.loads(r.stdout)
    assert all(set(names) <= way for names in listed.values()), listed


def test_interpreter_and_its_libraries_still_work(box):
    r = box.run_python("import sqlite3, json, ssl, ctypes, pwd, os; print(pwd.getpwuid(os.getuid()).pw_name, "
                       "sqlite3.connect(':memory:').execute('select 1').fetchone()[0])")
    assert r.ok, r.stderr
    assert r.stdout.split() == ["sandbox", "1"] or r.stdout.split()[1] == "1"


def test_stdlib_python_runs_the_standard_library_alone(box):
    """The harness interpreter skips `site`: the standard library imports, an installed package does not (the
    general and search harnesses promise the standard library only, and save the .pth hooks' start-up time)."""
    ok = box.run(box.stdlib_python("/tmp/a.py"), files={"a.py": "import json, sqlite3, ast; print(json.dumps(1))"})
    assert ok.ok and ok.stdout.strip() == "1", ok.stderr
    third_party = box.run(box.stdlib_python("/tmp/a.py"), files={"a.py": "import pydantic"})
    assert not third_party.ok and "ModuleNotFoundError" in third_party.stderr
    assert box.run_python("import pydantic").ok         # the full interpreter (code under test) still has them


def test_wait_exit_reaps_an_exited_process_and_times_out_on_a_running_one():
    import subprocess

    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    assert sbx.wait_exit(quick, 30) and quick.returncode == 0
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    t0 = time.monotonic()
    assert not sbx.wait_exit(slow, 0.2) and slow.returncode is None
    assert time.monotonic() - t0 < 10
    slow.kill()
    assert sbx.wait_exit(slow, 30) and slow.returncode == -9


def test_files_made_for_the_sandboxes_are_removed_at_exit():
    """The empty file and the passwd/group directory a process makes for its sandboxes do not outlive it."""
    import subprocess

    code = ("from dsaforge.synth import sandbox as s\n"
            "print(s._empty_file()); print(s._identity_files(1000)['passwd'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == 2 and all(p.startswith(tempfile.gettempdir()) for p in out)
    assert not any(os.path.exists(p) for p in out), out
    assert not os.path.exists(os.path.dirname(out[1]))
