"""Run generated Python in a separate, resource-limited process (never in the harness's own).

``run_python(source)`` writes ``source`` to ``solution.py`` in a fresh temporary directory and runs
``python -I -B runner.py`` there (isolated mode: no ``PYTHON*`` variables, no user site-packages,
no script directory on ``sys.path``) with a minimal environment, stdin from ``/dev/null`` and stdout
/ stderr sent to files (never pipes, so endless output cannot fill the harness's memory). Before it
executes the solution the runner

* sets ``RLIMIT_AS`` (address space, default 1 GiB: huge allocations raise MemoryError),
  ``RLIMIT_CPU`` (CPU seconds: busy loops get SIGXCPU/SIGKILL), ``RLIMIT_FSIZE`` (file size: endless
  printing gets SIGXFSZ) and ``RLIMIT_CORE = 0``;
* installs an audit hook (PEP 578) that raises ``PermissionError`` on every ``socket.*`` event
  (creating, connecting, binding, resolving), on starting processes (``subprocess``, ``os.system``,
  ``os.exec*``, ``os.spawn*``, ``os.posix_spawn``, ``os.fork``, ``pty``), on signalling other
  processes, on ``ctypes`` and on opening files for writing, deleting, renaming or changing
  permissions of paths outside the temporary directory.

Where the machine allows it (``unshare`` present and permitted), the child also runs in a new,
empty network namespace (``unshare --net``, or ``unshare -rn`` when not root): no interface but a
downed loopback, so even code that slipped past the audit hook cannot reach a network.

The parent waits at most ``timeout_s`` of wall time, then kills the child's whole process group
(SIGKILL). A run passes only if the process exits with status 0 **and** the runner wrote its random
nonce after the solution returned, so ``os._exit(0)`` or ``sys.exit(0)`` in generated code counts
as a failure.

This guards against accidents in model output (an infinite loop, a memory blow-up, a stray network
call, an ``rm``); audit hooks are not a security boundary against deliberately hostile code: run
untrusted evaluations in a container as well.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_RUNNER = r'''
import os, resource, sys, traceback
sys.dont_write_bytecode = True


def _limit(which, value):
    try:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass


_limit(resource.RLIMIT_AS, __MEM__)
_limit(resource.RLIMIT_FSIZE, __FSIZE__)
_limit(resource.RLIMIT_CORE, 0)
try:  # soft limit: SIGXCPU; one second later the hard limit: SIGKILL
    resource.setrlimit(resource.RLIMIT_CPU, (__CPU__, __CPU__ + 1))
except (ValueError, OSError):
    pass

with open("solution.py", encoding="utf-8") as _f:
    _SRC = _f.read()
_RESULT = open("result.txt", "w")
_ROOT = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BLOCKED = ("socket.", "ctypes.", "subprocess.", "os.system", "os.exec", "os.spawn",
            "os.posix_spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.pidfd",
            "pty.", "signal.pthread_kill", "webbrowser.", "urllib.Request", "http.client.",
            "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.", "os.putenv",
            "os.unsetenv", "os.setxattr", "os.removexattr", "os.chflags", "resource.setrlimit",
            "resource.prlimit")
_PATH_EVENTS = {"os.remove": 2, "os.rmdir": 1, "os.rename": 2, "os.chmod": 1, "os.chown": 1,
                "os.truncate": 1, "os.mkdir": 1, "os.link": 2, "os.symlink": 2, "os.utime": 1,
                "shutil.rmtree": 1, "shutil.move": 2, "shutil.copyfile": 2}


def _inside(path):
    if isinstance(path, int):
        return True
    try:
        p = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return p == _ROOT or p.startswith(_ROOT + os.sep)


def _hook(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1], args[2]
        writing = (isinstance(flags, int) and flags & _WRITE_FLAGS) or (
            isinstance(mode, str) and any(c in mode for c in "wax+"))
        if writing and not _inside(path):
            raise PermissionError("sandbox: writing outside the sandbox is not allowed")
    n = _PATH_EVENTS.get(event)
    if n and not all(_inside(a) for a in args[:n] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError("sandbox: " + event + " outside the sandbox is not allowed")


sys.addaudithook(_hook)
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(_SRC, "solution.py", "exec"), _globals)
except SystemExit as _e:
    sys.stderr.write("sandbox: the solution called exit(%r)\n" % (_e.code,))
    sys.stderr.flush()
    os._exit(3)
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
_RESULT.write("__NONCE__")
_RESULT.flush()
os._exit(0)
'''

TAIL_CHARS = 2000
_NETNS_PREFIX: list[str] | None = None


def network_isolation_prefix() -> list[str]:
    """The command prefix that runs a program in an empty network namespace, or ``[]`` when this
    machine does not allow it (probed once per process)."""
    global _NETNS_PREFIX
    if _NETNS_PREFIX is None:
        _NETNS_PREFIX = []
        exe = shutil.which("unshare")
        if exe and sys.platform.startswith("linux"):
            prefix = [exe, "--net"] if os.geteuid() == 0 else [exe, "-r", "-n"]
            try:
                ok = subprocess.run(prefix + ["true"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    timeout=10).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
            if ok:
                _NETNS_PREFIX = prefix
    return list(_NETNS_PREFIX)


@dataclass
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status`` is ``"passed"`` (exit 0 after the whole solution ran), ``"failed"`` (an exception,
    a non-zero exit, or ``exit()`` called by the solution), ``"timeout"`` (wall-time limit reached
    or CPU limit signal) or ``"killed"`` (any other signal, e.g. SIGXFSZ or SIGKILL on memory).
    ``stdout``/``stderr`` hold the last 2,000 characters of each stream.
    """

    status: str
    returncode: int | None
    wall_s: float
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * TAIL_CHARS))
            return f.read().decode("utf-8", "replace")[-TAIL_CHARS:]
    except OSError:
        return ""


def run_python(
    source: str,
    *,
    timeout_s: float = 10.0,
    cpu_s: int | None = None,
    memory_mb: int = 1024,
    file_mb: int = 16,
    python: str = sys.executable,
    isolate_network: bool = True,
) -> SandboxResult:
    """Run ``source`` as a Python program in a limited subprocess; see the module docstring.

    Args:
        source: the whole program (for HumanEval: prompt + completion + tests + ``check(f)``).
        timeout_s: wall-clock limit in seconds; the process group is killed when it is reached.
        cpu_s: CPU-time limit in seconds (default: ``ceil(timeout_s)``).
        memory_mb: address-space limit in MiB.
        file_mb: largest file (including captured stdout/stderr) the program may write, in MiB.
        python: the interpreter to run (default: the harness's own).
        isolate_network: run in an empty network namespace when the machine allows it.
    """
    cpu = int(cpu_s if cpu_s is not None else max(1, int(timeout_s + 0.999)))
    nonce = secrets.token_hex(16)
    runner = (
        _RUNNER.replace("__MEM__", str(int(memory_mb) << 20))
        .replace("__FSIZE__", str(int(file_mb) << 20))
        .replace("__CPU__", str(cpu))
        .replace("__NONCE__", nonce)
    )
    prefix = network_isolation_prefix() if isolate_network else []
    tmp = tempfile.TemporaryDirectory(prefix="speccascade-sandbox-", ignore_cleanup_errors=True)
    with tmp as d:
        root = Path(d)
        (root / "solution.py").write_text(source, encoding="utf-8")
        (root / "runner.py").write_text(runner, encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": d, "TMPDIR": d, "LC_ALL": "C.UTF-8",
               "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": ""}
        t0 = time.perf_counter()
        with open(root / "stdout.txt", "wb") as out, open(root / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(
                [*prefix, python, "-I", "-B", "runner.py"], cwd=d, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # The group may hold children the solution managed to start; kill them all.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        wall = time.perf_counter() - t0
        rc = proc.returncode
        try:
            ok = (root / "result.txt").read_text() == nonce
        except OSError:
            ok = False
        if timed_out:
            status = "timeout"
        elif rc == 0 and ok:
            status = "passed"
        elif rc is not None and rc < 0:
            status = "timeout" if -rc in (signal.SIGXCPU,) else "killed"
        else:
            status = "failed"
        return SandboxResult(
            status, rc, wall, _tail(root / "stdout.txt"), _tail(root / "stderr.txt"))
