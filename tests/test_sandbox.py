"""The HumanEval sandbox (speccascade_fast.eval.sandbox) against programs that try to escape it.

Every attack is a "solution" to a tiny problem (``add(a, b)``, tests ``add(2, 3) == 5`` ...) that
answers correctly only if its attack worked, so a run scored "passed" means the sandbox failed.
Each must be scored as a failure (failed / timeout / killed), leave nothing on the host (no
file, no process, no connection) and leave the harness working. The suite needs bubblewrap
(``bwrap``; ``scripts/install.sh`` installs it) and is skipped, saying so, only when it is not
installed; the unsandboxed fallback's tests at the end run everywhere.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from speccascade_fast.eval import sandbox as sb
from speccascade_fast.eval.sandbox import (
    SandboxUnavailableError,
    bwrap_status,
    run_python,
)

BWRAP = shutil.which("bwrap") or (
    "/usr/bin/bwrap" if os.access("/usr/bin/bwrap", os.X_OK) else None)
needs_bwrap = pytest.mark.skipif(
    BWRAP is None, reason="bubblewrap (bwrap) is not installed; scripts/install.sh installs it")

PRELUDE = 'def add(a, b):\n    """a + b"""\n'
TESTS = ("def check(candidate):\n"
         "    assert candidate(2, 3) == 5\n"
         "    assert candidate(-1, 1) == 0\n"
         "    assert add(10, 5) == 15\n")

# Every attack starts with this: WIN marks success; the process name (comm, inherited by forks)
# carries a marker so the host can find any process of the attack that is left.
HEAD = """import os, sys
WIN = False
try:
    with open('/proc/self/comm', 'w') as _f:
        _f.write('@MARKER@')
except OSError:
    pass
"""
TAIL = """
def add(a, b):
    return a + b if WIN else a - b
"""


def _marker() -> str:
    return "sbx" + secrets.token_hex(6)


def _processes_with(marker: str) -> list[int]:
    """Host pids whose name or command line carries ``marker`` (any thread's name)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            names = [Path(f"/proc/{pid}/comm").read_bytes()]
            for tid in os.listdir(f"/proc/{pid}/task"):
                names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_bytes())
            names.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            continue
        if any(marker.encode() in n for n in names):
            found.append(int(pid))
    return found


def _tree(path: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(path.rglob("*")):
        try:
            out[str(p.relative_to(path))] = p.read_bytes() if p.is_file() else b"<dir>"
        except OSError:
            out[str(p.relative_to(path))] = b"<unreadable>"
    return out


@pytest.fixture
def host(tmp_path, monkeypatch):
    """The host side of an attack: a folder with a victim file and secrets, the harness's cwd
    and HOME inside it, a secret in the harness's environment, a listening TCP socket and an
    abstract unix socket, and the harness's temporary folders in a folder of their own."""
    d = tmp_path / "host"
    (d / "home").mkdir(parents=True)
    secret = "s3cret-" + secrets.token_hex(8)
    (d / "victim.txt").write_text("victim")
    (d / "secret.txt").write_text(secret)
    (d / "home" / "secret.txt").write_text(secret)
    harness_tmp = tmp_path / "harness-tmp"
    harness_tmp.mkdir()
    monkeypatch.chdir(d)
    monkeypatch.setenv("HOME", str(d / "home"))
    monkeypatch.setenv("SPECCASCADE_TEST_SECRET", secret)
    monkeypatch.setattr("tempfile.tempdir", str(harness_tmp))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    abstract = "speccascade-test-" + secrets.token_hex(6)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind("\0" + abstract)
    unix.listen(8)
    unix.setblocking(False)
    # a host process whose environment (/proc/<pid>/environ) holds the secret, like the harness
    # started with it would have
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              env=dict(os.environ))
    h = {"dir": d, "secret": secret, "port": tcp.getsockname()[1], "abstract": abstract,
         "tcp": tcp, "unix": unix, "harness_tmp": harness_tmp}
    yield h
    holder.kill()
    holder.wait()
    tcp.close()
    unix.close()


def _attack(body: str, host: dict, marker: str) -> str:
    src = HEAD + body + ("" if "\ndef add(" in body else TAIL)
    for key, value in (("@MARKER@", marker), ("@HOST_DIR@", str(host["dir"])),
                       ("@SECRET@", host["secret"]), ("@PORT@", str(host["port"])),
                       ("@ABSTRACT@", host["abstract"]),
                       ("@VICTIM@", str(host["dir"] / "victim.txt"))):
        src = src.replace(key, value)
    return src


def _run(source: str, **kw):
    kw.setdefault("timeout_s", 10.0)
    return run_python(source, tests=TESTS, entry_point="add", prelude=PRELUDE, **kw)


def _assert_contained(r, host: dict, marker: str, before: dict[str, bytes]) -> None:
    assert not r.passed, (r.status, r.detail, r.stdout, r.stderr)
    assert r.status in ("failed", "timeout", "killed"), r
    assert "KeyboardInterrupt" not in r.detail  # nothing inside can interrupt the judge
    assert r.sandbox == "bwrap"
    assert _processes_with(marker) == [], "a process of the attack outlived the run"
    assert _tree(host["dir"]) == before, "the attack changed the host folder"
    assert list(host["harness_tmp"].iterdir()) == [], "the run left files behind"
    for s in (host["tcp"], host["unix"]):
        with pytest.raises(BlockingIOError):
            s.accept()
    assert Path(os.__file__).is_file()  # the interpreter's own files are untouched


# ---------------------------------------------------------------------------------------------
# attacks: (id, body, run_python keyword arguments)

ATTACKS = [
    ("write-absolute-path", """
for p in ('@HOST_DIR@/escaped.txt', '@HOST_DIR@/home/escaped.txt', '/escaped.txt',
          os.path.dirname(os.__file__) + '/escaped.txt'):
    try:
        with open(p, 'w') as f:
            f.write('x')
        WIN = True
    except OSError:
        pass
""", {}),
    ("delete-and-rename", """
for f in (lambda: os.remove('@VICTIM@'), lambda: os.rename('@VICTIM@', '/tmp/v'),
          lambda: os.remove(os.__file__), lambda: os.rename(os.__file__, '/tmp/os.py'),
          lambda: os.truncate('@VICTIM@', 0), lambda: os.chmod(os.__file__, 0o777)):
    try:
        f()
        WIN = True
    except OSError:
        pass
""", {}),
    ("dir-fd", """
for d in ('@HOST_DIR@', '/', '/usr/lib', os.path.dirname(os.__file__), '/tmp/..', '/proc/1/cwd'):
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        w = os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(w, b'x')
        WIN = True
    except OSError:
        pass
try:
    fd = os.open('/tmp', os.O_RDONLY | os.O_DIRECTORY)
    os.open('../../@HOST_DIR@/escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)
    WIN = True
except OSError:
    pass
""", {}),
    ("fifo-and-device", """
for p in ('@HOST_DIR@/fifo', '/fifo', os.path.dirname(os.__file__) + '/fifo', '/dev/fifo'):
    try:
        os.mkfifo(p)
        WIN = True
    except OSError:
        pass
try:
    os.mknod('/tmp/null', 0o666 | 0o020000, os.makedev(1, 3))
    WIN = True
except OSError:
    pass
""", {}),
    ("sqlite", """
import sqlite3
for p in ('@HOST_DIR@/escaped.sqlite', '/escaped.sqlite',
          'file:@HOST_DIR@/escaped2.sqlite?mode=rwc'):
    try:
        c = sqlite3.connect(p, uri=p.startswith('file:'))
        c.execute('create table t(x)')
        c.commit()
        WIN = True
    except Exception:
        pass
""", {}),
    ("symlinks", """
for target, path in (('@VICTIM@', '/tmp/link'), ('@HOST_DIR@', '/tmp/dirlink'),
                     ('/proc/1/root@HOST_DIR@', '/tmp/proclink')):
    try:
        os.symlink(target, path)
    except OSError:
        continue
    for p in (path, path + '/escaped.txt'):
        try:
            with open(p, 'w') as f:
                f.write('x')
            WIN = True
        except OSError:
            pass
    try:
        if open(path).read() == 'victim':
            WIN = True
    except OSError:
        pass
""", {}),
    ("proc", """
for p in ('/proc/1/root@HOST_DIR@/escaped.txt', '/proc/self/root@HOST_DIR@/escaped.txt',
          '/proc/1/cwd/escaped.txt', '/proc/sys/kernel/hostname', '/proc/sysrq-trigger',
          '/proc/sys/user/max_user_namespaces', '/proc/1/mem', '/proc/1/environ'):
    try:
        with open(p, 'w') as f:
            f.write('x')
        WIN = True
    except OSError:
        pass
for pid in os.listdir('/proc'):
    if pid.isdigit():
        for p in ('/proc/%s/root@HOST_DIR@' % pid, '/proc/%s/cwd/victim.txt' % pid):
            if os.path.exists(p):
                WIN = True
""", {}),
    ("read-host-secrets", """
cands = ['/etc/shadow', '/proc/1/root/etc/shadow', '@HOST_DIR@/secret.txt',
         '@HOST_DIR@/home/secret.txt', '/proc/1/cwd/secret.txt', '/proc/self/cwd/secret.txt',
         os.path.expanduser('~/secret.txt'), 'secret.txt', '../secret.txt', '/root/.bashrc']
for p in cands:
    try:
        data = open(p, 'rb').read()
        WIN = True
    except OSError:
        pass
for root, dirs, files in os.walk('/'):
    if root in ('/proc', '/usr', '/sys', '/dev') or root.startswith(sys.prefix):
        dirs[:] = []
        continue
    if 'secret.txt' in files:
        WIN = True
""", {}),
    ("harness-environment", """
secret = b'@SECRET@'
if any(secret.decode() in v for v in os.environ.values()) or 'SPECCASCADE_TEST_SECRET' in os.environ:
    WIN = True
for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [str(os.getppid()), 'self']:
    for name in ('environ', 'cmdline', 'mem', 'fd'):
        try:
            p = '/proc/%s/%s' % (pid, name)
            if name == 'fd':
                for fd in os.listdir(p):
                    if secret in open(p + '/' + fd, 'rb').read(1 << 20):
                        WIN = True
            elif secret in open(p, 'rb').read(1 << 20):
                WIN = True
        except (OSError, ValueError):
            pass
""", {}),
    ("privileges-and-in-process-guards", """
import ctypes, resource
libc = ctypes.CDLL(None, use_errno=True)
sys.addaudithook(lambda *a: None)
for f in (lambda: os.setuid(0), lambda: os.setgid(0), lambda: os.chroot('/tmp'),
          lambda: os.setgroups([0])):
    try:
        f()
        WIN = True
    except OSError:
        pass
for flag in (0x10000000, 0x00020000, 0x40000000, 0x20000000, 0x08000000):
    if libc.unshare(flag) == 0:  # user, mount, net, pid, ipc namespaces
        WIN = True
if libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0:
    WIN = True
if libc.ptrace(16, 1, None, None) == 0:  # PTRACE_ATTACH to the judge
    WIN = True
for which in (resource.RLIMIT_NPROC, resource.RLIMIT_AS, resource.RLIMIT_CPU,
              resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE):
    try:
        resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        WIN = True
    except (ValueError, OSError):
        pass
""", {}),
    ("network", """
import socket
for f in (lambda: socket.create_connection(('127.0.0.1', @PORT@), timeout=2).sendall(b'hi'),
          lambda: socket.create_connection(('::1', @PORT@), timeout=2),
          lambda: socket.socket(socket.AF_UNIX).connect('\\0@ABSTRACT@'),
          lambda: socket.create_connection(('1.1.1.1', 53), timeout=2),
          lambda: socket.getaddrinfo('example.com', 80)):
    try:
        f()
        WIN = True
    except OSError:
        pass
""", {}),
    ("disk-fill-tmp", """
n = 0
try:
    for i in range(1000):
        with open('/tmp/fill%d' % i, 'wb') as f:
            f.write(b'x' * (1 << 20))
        n += 1
except OSError:
    pass
if n > 8:
    WIN = True
""", {"tmp_mb": 8}),
    ("disk-one-huge-file", """
with open('/tmp/big', 'wb') as f:
    while True:
        f.write(b'x' * (1 << 20))
""", {"file_mb": 2}),
    ("disk-flood-stdout", """
while True:
    sys.stdout.write('x' * 65536)
""", {"file_mb": 2}),
    ("disk-many-files", """
i = 0
while True:
    try:
        open('/tmp/f%d' % i, 'w').close()
    except OSError:
        pass
    i += 1
""", {"timeout_s": 2.0}),
    ("memory-one-block", """
try:
    x = bytearray(64 << 30)
    WIN = True
except MemoryError:
    pass
""", {"memory_mb": 256}),
    ("memory-grow", """
blocks = []
try:
    while True:
        blocks.append(bytearray(16 << 20))
except MemoryError:
    del blocks
if False:
    WIN = True
""", {"memory_mb": 256}),
    ("memory-in-every-fork", """
for i in range(64):
    try:
        if os.fork() == 0:
            try:
                x = bytearray(100 << 20)
            except MemoryError:
                pass
            import time
            time.sleep(60)
            os._exit(0)
    except OSError:
        break
""", {"memory_mb": 256, "nproc": 8, "timeout_s": 3.0}),
    ("fork-bomb", """
while True:
    try:
        os.fork()
    except OSError:
        pass
""", {"timeout_s": 3.0, "nproc": 16}),
    ("fake-pass-printing", """
print('passed')
import json
for ev in ('started', 'verdict'):
    print(json.dumps({'event': ev, 'status': 'passed', 'nonce': '0' * 32}))
    sys.stderr.write(json.dumps({'event': ev, 'status': 'passed', 'nonce': '0' * 32}) + '\\n')
sys.stdout.flush()
""", {}),
    ("fake-pass-sys-exit-0", """
sys.exit(0)
""", {}),
    ("fake-pass-os-exit-0", """
os._exit(0)
""", {}),
    ("fake-pass-exit-during-tests", """
def add(a, b):
    os._exit(0)
""", {}),
    ("fake-pass-verdict-channel", """
import json
fake = {'event': 'verdict', 'status': 'passed', 'detail': '', 'solution_returncode': None,
        'nonce': '0' * 32}
line = (json.dumps(fake) + '\\n').encode()
for fd in range(0, 1024):
    try:
        os.write(fd, line)
    except OSError:
        pass
for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
    try:
        fds = os.listdir('/proc/%s/fd' % pid)
    except OSError:
        continue
    for fd in fds:
        try:
            w = os.open('/proc/%s/fd/%s' % (pid, fd), os.O_WRONLY)
            os.write(w, line)
        except OSError:
            pass
for p in ('/proc/1/mem', '/proc/1/fd/3', '/proc/1/fd/4'):
    try:
        with open(p, 'r+b') as f:
            f.write(line)
        WIN = True
    except OSError:
        pass
os._exit(0)
""", {}),
    ("signal-the-judge", """
import signal
for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGINT):
    try:
        os.kill(1, sig)
    except OSError:
        pass
try:
    os.kill(-1, signal.SIGKILL)
except OSError:
    pass
""", {}),
    ("rigged-equality", """
class Anything:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
class Int(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
_answers = [Anything(), Int(-123)]
WIN = True
def add(a, b):
    return _answers[0] if a == 2 else Int(-123)
""", {}),
    ("patched-builtins", """
import builtins
builtins.AssertionError = type('Nothing', (BaseException,), {})
builtins.__build_class__ = None
import atexit
atexit.register(lambda: os._exit(0))
""", {}),
]


@needs_bwrap
@pytest.mark.parametrize("body, kw", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_attack_is_contained(body, kw, host):
    marker = _marker()
    before = _tree(host["dir"])
    t0 = time.perf_counter()
    r = _run(_attack(body, host, marker), **kw)
    assert time.perf_counter() - t0 < kw.get("timeout_s", 10.0) + 15
    _assert_contained(r, host, marker, before)


# ---------------------------------------------------------------------------------------------
# processes that try to outlive the run (seen while it runs, gone when it returns)

OUTLIVE = {
    "fork": """
if os.fork() == 0:
    import time
    time.sleep(120)
    os._exit(0)
""",
    "setsid": """
if os.fork() == 0:
    os.setsid()
    import time
    time.sleep(120)
    os._exit(0)
""",
    "double-fork": """
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        import time
        time.sleep(120)
        os._exit(0)
    os._exit(0)
""",
    "new-session-subprocess": """
import subprocess
subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', '@MARKER@'],
                 start_new_session=True, stdin=subprocess.DEVNULL)
""",
    "multiprocessing": """
import multiprocessing, time
ctx = multiprocessing.get_context('fork')
p = ctx.Process(target=time.sleep, args=(120,))
p.start()
""",
    "exec-daemon": """
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(120)', '@MARKER@'])
    os._exit(0)
""",
}


@needs_bwrap
@pytest.mark.parametrize("end", ["verdict", "timeout"])
@pytest.mark.parametrize("kind", sorted(OUTLIVE))
def test_no_process_outlives_the_run(kind, end, host):
    marker = _marker()
    before = _tree(host["dir"])
    # the run ends by the judge's verdict (after a pause) or by the wall-clock limit
    wait = "import time\ntime.sleep(1.5)\n" if end == "verdict" else "while True:\n    pass\n"
    src = _attack(OUTLIVE[kind] + wait, host, marker)
    seen: list[int] = []
    box: dict = {}

    def go():
        box["r"] = _run(src, timeout_s=3.0)

    t = threading.Thread(target=go)
    t.start()
    end_at = time.monotonic() + 3.0
    while time.monotonic() < end_at and t.is_alive() and len(seen) < 2:
        seen = _processes_with(marker)
        time.sleep(0.05)
    t.join()
    assert len(seen) >= 2, "the control failed: the attack's processes were never seen"
    _assert_contained(box["r"], host, marker, before)


@needs_bwrap
def test_fork_bomb_is_bounded_by_nproc(host):
    marker = _marker()
    src = _attack("while True:\n    try:\n        os.fork()\n    except OSError:\n"
                  "        pass\n", host, marker)
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", _run(src, timeout_s=3.0, nproc=12)))
    t.start()
    most = 0
    while t.is_alive():
        most = max(most, len(_processes_with(marker)))
        time.sleep(0.05)
    t.join()
    assert 2 <= most <= 12  # (the judge does not carry the marker)
    _assert_contained(box["r"], host, marker, _tree(host["dir"]))


# ---------------------------------------------------------------------------------------------
# the sandbox itself: what it shows, what passes, and that it keeps working


@needs_bwrap
def test_sandbox_view(host):
    src = """import os, json, resource
info = {'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(), 'cwd': os.getcwd(),
        'root': sorted(os.listdir('/')), 'env': dict(os.environ), 'pids': sorted(
            int(p) for p in os.listdir('/proc') if p.isdigit()),
        'nproc': resource.getrlimit(resource.RLIMIT_NPROC),
        'nofile': resource.getrlimit(resource.RLIMIT_NOFILE),
        'caps': [l for l in open('/proc/self/status') if l.startswith(('CapEff', 'NoNewPrivs'))],
        'hostname': os.uname().nodename}
st = os.statvfs('/tmp')
info['tmp_bytes'] = st.f_blocks * st.f_frsize
print(json.dumps(info))
"""
    r = run_python(src, nproc=20, nofile=50, tmp_mb=4)
    assert r.status == "completed", r
    info = json.loads(r.stdout)
    assert info["uid"] == info["gid"] == 65534 and info["groups"] in ([], [65534])
    assert info["cwd"] == "/tmp" and info["hostname"] == "sandbox"
    python_roots = {r.split("/")[1] for r in sb._interpreter(None)[1]}
    assert set(info["root"]) <= {"usr", "lib", "lib64", "lib32", "etc", "proc", "dev",
                                 "tmp"} | python_roots
    assert "SPECCASCADE_TEST_SECRET" not in info["env"] and host["secret"] not in r.stdout
    assert set(info["env"]) <= {"PATH", "HOME", "TMPDIR", "LC_ALL"}
    assert info["pids"][0] == 1 and len(info["pids"]) == 2  # the judge and this process
    assert info["nproc"] == [20, 20] and info["nofile"] == [50, 50]
    assert "CapEff:\t0000000000000000\n" in info["caps"] and "NoNewPrivs:\t1\n" in info["caps"]
    assert info["tmp_bytes"] == 4 << 20


@needs_bwrap
def test_passing_and_failing_solutions():
    good = run_python(PRELUDE + "    return a + b\n", tests=TESTS, entry_point="add",
                      prelude=PRELUDE)
    assert good.passed and good.status == "passed" and good.sandbox == "bwrap", good
    wrong = run_python(PRELUDE + "    return a * b\n", tests=TESTS, entry_point="add",
                       prelude=PRELUDE)
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    raises = run_python(PRELUDE + "    raise KeyError('boom')\n", tests=TESTS,
                        entry_point="add", prelude=PRELUDE)
    assert raises.status == "failed" and "KeyError" in raises.detail
    assert "KeyError: 'boom'" in raises.stderr
    broken = run_python("def add(a, b:\n", tests=TESTS, entry_point="add", prelude=PRELUDE)
    assert broken.status == "failed" and "SyntaxError" in broken.detail
    loop = run_python(PRELUDE + "    while True:\n        pass\n", tests=TESTS,
                      entry_point="add", prelude=PRELUDE, timeout_s=1.5)
    assert loop.status == "timeout" and loop.wall_s < 5
    cpu = run_python(PRELUDE + "    while True:\n        pass\n", tests=TESTS,
                     entry_point="add", prelude=PRELUDE, timeout_s=10, cpu_s=1)
    assert cpu.status == "timeout" and "SIGXCPU" in cpu.detail
    # values cross as plain data, their types kept
    echo = ("def same(x):\n    return x\n")
    tests = ("def check(c):\n"
             "    for v in [None, True, 1, 2**200, -0.5, float('inf'), 'é', b'\\x00', (1, [2]),\n"
             "              {1: 'a', (2, 3): frozenset({4})}, {5}, 1j]:\n"
             "        r = c(v)\n"
             "        assert r == v and type(r) is type(v), (r, v)\n"
             "    assert c(float('nan')) != c(float('nan'))\n")
    assert run_python(echo, tests=tests, entry_point="same").passed
    unsendable = run_python("def same(x):\n    return object()\n", tests=tests,
                            entry_point="same")
    assert unsendable.status == "failed" and "cannot pass a object" in unsendable.detail


@needs_bwrap
def test_programs_without_tests_complete_or_fail():
    ok = run_python("print('hello')\n", timeout_s=5)
    assert ok.status == "completed" and not ok.passed and ok.stdout == "hello\n"
    assert ok.returncode == 0
    bad = run_python("assert 1 == 2\n", timeout_s=5)
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    for src in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
                "import socket\nsocket.create_connection(('example.com', 80))\n",
                "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'true'])\n",
                "x = bytearray(64 * 2**30)\n"):
        r = run_python(src, timeout_s=5, memory_mb=512)
        assert r.status == "failed", (src, r)


@needs_bwrap
def test_humaneval_canonical_solution_passes_and_wrong_fails():
    from speccascade_fast.eval.tasks import get_task
    from speccascade_fast.eval.tasks.humaneval import read_problems, solution_program

    problems = read_problems()
    # 32 and 38: the tests use the prompt's helpers; 33: the tests call the function by name
    for tid in ("HumanEval/0", "HumanEval/32", "HumanEval/33", "HumanEval/38", "HumanEval/72"):
        p = problems[tid]
        good = run_python(solution_program(p, p["canonical_solution"]), tests=p["test"],
                          entry_point=p["entry_point"], prelude=p["prompt"], timeout_s=20)
        assert good.passed, (tid, good)
    task = get_task("humaneval", timeout_s=10)
    ex = task.examples(1)[0]
    problem = problems["HumanEval/0"]
    assert ex.id == "HumanEval/0" and task.build_prompt(ex) == problem["prompt"]
    scored = task.score(ex, task.postprocess(ex, problem["canonical_solution"] + "\ndef junk():"))
    assert scored["score"] == 1.0 and scored["status"] == "passed"
    assert scored["sandbox"] == "bwrap"
    assert task.score(ex, "    return True\n")["score"] == 0.0
    # a completion that prints a pass and exits 0 before the tests: a failure
    assert task.score(ex, "    pass\nprint('passed')\nimport os\nos._exit(0)\n")["score"] == 0.0
    # redefining the prompt's helpers does not change the judge's copy
    p32 = problems["HumanEval/32"]
    rigged = "    return 0.0\ndef poly(xs, x):\n    return 0.0\n"
    r = run_python(solution_program(p32, rigged), tests=p32["test"], entry_point="find_zero",
                   prelude=p32["prompt"])
    assert r.status == "failed"
    # chat mode: the fenced block is appended after the prompt and replaces the stub
    full = problem["prompt"] + problem["canonical_solution"]
    pred = task.postprocess(ex, f"Sure!\n```python\n{full}```\nDone.", chat=True)
    assert task.score(ex, pred)["score"] == 1.0


@needs_bwrap
def test_harness_keeps_going_after_attacks(host):
    """After the attacks above (and a fork bomb here), ordinary runs still pass."""
    marker = _marker()
    _run(_attack("while True:\n    try:\n        os.fork()\n    except OSError:\n"
                 "        pass\n", host, marker), timeout_s=2.0)
    for _ in range(3):
        r = run_python(PRELUDE + "    return a + b\n", tests=TESTS, entry_point="add",
                       prelude=PRELUDE)
        assert r.passed, r
    assert _processes_with(marker) == []


@needs_bwrap
def test_bwrap_probe_and_argument_checks():
    path, why = bwrap_status()
    assert path is not None, why
    for kw, name in (({"timeout_s": 0}, "timeout_s"), ({"memory_mb": -1}, "memory_mb"),
                     ({"nproc": 1}, "nproc"), ({"nofile": 3}, "nofile"),
                     ({"tmp_mb": 0}, "tmp_mb"), ({"tests": "x"}, "entry_point")):
        with pytest.raises(ValueError, match=name):
            run_python("pass", **kw)


# ---------------------------------------------------------------------------------------------
# without bubblewrap (runs everywhere)


def test_refuses_without_bwrap_unless_unsafe_local_exec(monkeypatch):
    monkeypatch.setattr(sb, "_PROBE", {"": (None, "bubblewrap (bwrap) is not installed")})
    with pytest.raises(SandboxUnavailableError, match="--unsafe-local-exec") as e:
        run_python("print(1)")
    assert "unsafe_local_exec=True" in str(e.value) and "not installed" in str(e.value)
    assert isinstance(e.value, OSError)  # the CLI reports it as one line
    r = run_python(PRELUDE + "    return a + b\n", tests=TESTS, entry_point="add",
                   prelude=PRELUDE, unsafe_local_exec=True)
    assert r.passed and r.sandbox == "unsafe-local", r
    r = run_python("import os\nos._exit(0)\n", tests=TESTS, entry_point="add", prelude=PRELUDE,
                   unsafe_local_exec=True)
    assert r.status == "failed" and r.sandbox == "unsafe-local"
    # the accident guard of unsandboxed runs
    r = run_python(f"open('/tmp/speccascade-unsafe-escape-{os.getpid()}', 'w')\n",
                   unsafe_local_exec=True)
    assert r.status == "failed" and "writing outside" in r.stderr
    assert not os.path.exists(f"/tmp/speccascade-unsafe-escape-{os.getpid()}")


def test_humaneval_task_refuses_without_bwrap(monkeypatch):
    from speccascade_fast.eval.tasks import get_task

    monkeypatch.setattr(sb, "_PROBE", {"": (None, "bubblewrap (bwrap) is not installed")})
    task = get_task("humaneval")
    with pytest.raises(SandboxUnavailableError, match="--unsafe-local-exec"):
        task.check_runnable()
    task.unsafe_local_exec = True
    assert task.check_runnable() == "unsafe-local"
    ex = task.examples(1)[0]
    scored = task.score(ex, ex.data["canonical_solution"])
    assert scored["passed"] and scored["sandbox"] == "unsafe-local"
    with pytest.raises(ValueError, match="timeout_s"):
        get_task("humaneval", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        get_task("humaneval", memory_mb=1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
