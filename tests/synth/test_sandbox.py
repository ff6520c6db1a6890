"""Escape and abuse attempts against the synthesis sandbox: every one must be contained and reported."""
import os
import shutil
import socket
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
    # Outside /tmp on purpose: the host's /tmp is replaced by the private directory anyway.
    secret = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        (secret / "gold.patch").write_text("the fix")
        (secret / "answer.txt").write_text("42")
        secret.chmod(0o755)
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
