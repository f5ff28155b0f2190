"""Run model-generated Python under bubblewrap, and decide pass/fail where it cannot reach.

Threat model and reasoning: docs/evaluation.md, "The HumanEval sandbox". In short:

**Isolation.** :func:`run_python` starts ``bwrap`` (bubblewrap) with new user, PID, network,
IPC, UTS and (where possible) cgroup namespaces, ``--die-with-parent``, ``--new-session``,
``--clearenv`` and a minimal ``PATH``. The sandbox sees only read-only binds of the Python
installation and the system libraries (``/usr/lib*``, ``/lib*``, ``/etc/ld.so.cache``), a fresh
``/proc`` and ``/dev`` (both read-only apart from the device nodes), and one writable
directory, ``/tmp``: a private tmpfs capped with ``--size`` (``tmp_mb``). Every process in it
runs as uid/gid 65534 with no capabilities, ``no_new_privs`` set and no way to create further
user namespaces. The uid is also unprivileged *on the host*: when the harness runs as root, the
sandbox gets a user namespace (made per run by a tiny helper) that maps its uid 65534 to host uid
65534, since a host-root uid would make ``RLIMIT_NPROC`` ineffective; otherwise bwrap's own user
namespace maps it to the harness's (non-root) uid.

**Limits** (on the process running the solution): address space ``memory_mb``, CPU seconds,
largest file ``file_mb``, ``nproc`` processes/threads (RLIMIT_NPROC, counted per sandbox),
``nofile`` open files, no core dumps; plus the wall-clock ``timeout_s``.

**No process outlives a run.** The judge (below) is PID 1 of the sandbox's PID namespace
(``--as-pid-1``). When it exits or is killed, the kernel kills every other process in the
namespace, whatever ``setsid``, double forks, ``start_new_session`` or ``multiprocessing`` did.
At the timeout the harness SIGKILLs the judge and bwrap, and waits until the judge is reaped.

**The verdict channel.** Two processes run inside the sandbox:

* the *judge* (trusted code: the harness's runner, the problem's prompt and its tests) is PID 1.
  It makes itself non-dumpable before anything untrusted exists, so the solution cannot ptrace
  it or open its ``/proc/1/{mem,fd,environ}``; as PID 1 it cannot be signalled from inside.
* the *solution* process runs the untrusted program (prompt + completion). It is forked by the
  judge with only its own pipes and the limits above, and it never holds the verdict pipe.

The judge executes the prompt and the tests itself and calls ``check(candidate)``, where
``candidate`` is a proxy that sends the arguments (plain data: JSON with tags for tuples, sets,
dicts with any keys, bytes, complex and big ints) to the solution process and decodes its answer
into plain built-in values (so an object with a rigged ``__eq__`` cannot cross). The judge
writes the verdict (with a per-run nonce) to a pipe that only it holds (fd >= 3, not stdio);
the harness reads it after the sandbox has gone. Nothing the solution prints, no exit status it
chooses (``sys.exit(0)``, ``os._exit(0)``) and no file it writes can say "passed": a run passes
only if the judge's ``check`` returned with every call answered and the solution process still
alive. Without tests (``tests=None``) the judge reports ``"completed"`` when the program ran to
its end and exited 0; that is not a verdict (a hostile program can fake it) and it is never
``"passed"``.

Without a usable ``bwrap``, :func:`run_python` raises :class:`SandboxUnavailableError` unless
``unsafe_local_exec=True``: then the same judge/solution pair runs as plain local processes
(resource limits, an audit hook against accidents, no isolation at all), and every result says
``sandbox="unsafe-local"``.
"""
from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: the command-line flag and Python keyword that allow running generated code without bwrap
UNSAFE_FLAG = "--unsafe-local-exec"
UNSAFE_KEYWORD = "unsafe_local_exec"
SANDBOX_BWRAP = "bwrap"
SANDBOX_UNSAFE = "unsafe-local"
#: the uid/gid every sandboxed process runs as (inside, and on the host when the harness is root)
SANDBOX_UID = 65534
TAIL_CHARS = 2000
#: the largest message the judge accepts from the solution process
MAX_MESSAGE = 16 << 20


class SandboxError(RuntimeError):
    """The sandbox itself failed (bwrap could not start the judge): not a verdict on a program."""


class SandboxUnavailableError(OSError):
    """No usable bubblewrap, and running generated code unsandboxed was not allowed."""


# ---------------------------------------------------------------------------------------------
# code that runs inside the sandbox (standard library only: the package is not visible there)

_CODEC = r'''
import json as _json, os as _os, struct as _struct


class ProtocolViolation(BaseException):
    """The other side broke the message protocol (BaseException: tests cannot swallow it)."""


def _enc(v, depth=0):
    if depth > 200:
        raise ValueError("value nested too deeply to send")
    if v is None or v is True or v is False:
        return v
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):
        v = int(v)
        return v if -10**15 < v < 10**15 else {"$": "int", "v": hex(v)}
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, list):
        return [_enc(x, depth + 1) for x in v]
    if isinstance(v, tuple):
        return {"$": "tuple", "v": [_enc(x, depth + 1) for x in v]}
    if isinstance(v, dict):
        return {"$": "dict", "v": [[_enc(k, depth + 1), _enc(x, depth + 1)]
                                   for k, x in dict.items(v)]}
    if isinstance(v, (set, frozenset)):
        kind = "frozenset" if isinstance(v, frozenset) else "set"
        return {"$": kind, "v": [_enc(x, depth + 1) for x in v]}
    if isinstance(v, (bytes, bytearray)):
        return {"$": "bytes", "v": bytes(v).hex()}
    if isinstance(v, complex):
        return {"$": "complex", "v": [v.real, v.imag]}
    raise TypeError("cannot pass a %s between the tests and the solution" % type(v).__name__)


def _hook(d):
    if set(d) != {"$", "v"}:
        raise ValueError("untagged object")
    kind, v = d["$"], d["v"]
    if kind == "tuple" and type(v) is list:
        return tuple(v)
    if kind == "dict" and type(v) is list and all(type(p) is list and len(p) == 2 for p in v):
        return {k: x for k, x in v}
    if kind == "set" and type(v) is list:
        return set(v)
    if kind == "frozenset" and type(v) is list:
        return frozenset(v)
    if kind == "bytes" and type(v) is str:
        return bytes.fromhex(v)
    if kind == "complex" and type(v) is list and len(v) == 2:
        return complex(float(v[0]), float(v[1]))
    if kind == "int" and type(v) is str:
        return int(v, 16)
    raise ValueError("unknown tag")


def _send(fd, obj):
    data = _json.dumps(_enc(obj), separators=(",", ":")).encode("utf-8")
    data = _struct.pack(">I", len(data)) + data
    while data:
        data = data[_os.write(fd, data):]


def _read_exact(fd, n):
    chunks, got = [], 0
    while got < n:
        b = _os.read(fd, min(n - got, 1 << 20))
        if not b:
            return None
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _recv(fd, limit):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    (n,) = _struct.unpack(">I", head)
    if n > limit:
        raise ProtocolViolation("message of %d bytes (limit %d)" % (n, limit))
    data = _read_exact(fd, n)
    if data is None:
        return None
    try:
        return _json.loads(data.decode("utf-8"), object_hook=_hook)
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError) as e:
        raise ProtocolViolation("malformed message: %s" % (e,)) from None
'''

# The solution process. argv: program fd, request fd, response fd.
_SOLUTION = _CODEC + r'''
import sys as _sys, traceback as _traceback


def _guard(root):
    """Unsandboxed runs only: an audit hook against accidents (not a security boundary)."""
    root = _os.path.realpath(root)
    blocked = ("socket.", "ctypes.", "subprocess.", "os.system", "os.exec", "os.spawn",
               "os.posix_spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg", "pty.",
               "webbrowser.", "urllib.Request", "shutil.rmtree")
    writes = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND
    paths = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.chmod": 1, "os.chown": 1,
             "os.truncate": 1, "os.mkdir": 1, "os.link": 2, "os.symlink": 2, "os.utime": 1}

    def inside(p):
        if isinstance(p, int):
            return True
        try:
            p = _os.path.realpath(_os.fsdecode(p))
        except (TypeError, ValueError):
            return False
        return p == root or p.startswith(root + _os.sep)

    def hook(event, args):
        if event.startswith(blocked):
            raise PermissionError("unsandboxed run: " + event + " is not allowed")
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            w = (isinstance(flags, int) and flags & writes) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if w and not inside(path):
                raise PermissionError("unsandboxed run: writing outside its folder")
        n = paths.get(event)
        if n and not all(inside(a) for a in args[:n]
                         if isinstance(a, (str, bytes, _os.PathLike))):
            raise PermissionError("unsandboxed run: " + event + " outside its folder")

    _sys.addaudithook(hook)


def _main():
    src_fd, req_fd, resp_fd = int(_sys.argv[1]), int(_sys.argv[2]), int(_sys.argv[3])
    program = _recv(src_fd, 1 << 30)
    _os.close(src_fd)
    if program["guard"]:
        _guard(program["root"])
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(program["source"], "solution.py", "exec"), g)
    except SystemExit as e:
        _send(resp_fd, {"error": "the solution called exit(%r) while loading" % (e.code,)})
        return 3
    except BaseException as e:
        _traceback.print_exc()
        _send(resp_fd, {"error": ("%s: %s" % (type(e).__name__, e))[:2000]})
        return 1
    _sys.stdout.flush()
    _send(resp_fd, {"ready": True})
    while True:
        msg = _recv(req_fd, 1 << 30)
        if msg is None or msg.get("op") == "exit":
            return 0
        try:
            fn = g[program["entry_point"]]
            result = fn(*msg["args"], **msg["kwargs"])
            answer = {"ok": result}
            _enc(answer)
        except BaseException as e:
            _traceback.print_exc()
            answer = {"raised": ("%s: %s" % (type(e).__name__, e))[:2000]}
        _sys.stdout.flush()
        _send(resp_fd, answer)


_code = _main()
try:
    _sys.stdout.flush()
    _sys.stderr.flush()
finally:
    _os._exit(_code)
'''


# The judge: PID 1 of the sandbox. argv: payload fd, verdict fd.
_JUDGE_BODY = r'''
import signal as _signal, subprocess as _subprocess, sys as _sys, traceback as _traceback

MAX = __MAX_MESSAGE__


def _nondumpable():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return False
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
        return False
    return libc.prctl(3, 0, 0, 0, 0) == 0  # PR_GET_DUMPABLE


class CandidateError(Exception):
    """The solution's function raised (the tests may catch this, as they could the original)."""


def _main():
    # PID 1 gets only the signals it has handlers for: drop Python's SIGINT handler, so that
    # nothing inside the sandbox can interrupt the judge (SIGKILL from the host still works)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    dumpable_off = _nondumpable()
    payload_fd, verdict_fd = int(_sys.argv[1]), int(_sys.argv[2])
    chunks = []
    while True:
        b = _os.read(payload_fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
    _os.close(payload_fd)
    cfg = _json.loads(b"".join(chunks).decode("utf-8"))
    del chunks

    def verdict(**kw):
        kw["nonce"] = cfg["nonce"]
        data = (_json.dumps(kw) + "\n").encode("utf-8")
        while data:
            data = data[_os.write(verdict_fd, data):]

    if cfg["require_nondumpable"] and not dumpable_off:
        verdict(event="error", detail="the judge could not make itself non-dumpable")
        return 1
    verdict(event="started")

    src_r, src_w = _os.pipe()
    req_r, req_w = _os.pipe()
    resp_r, resp_w = _os.pipe()
    limits = cfg["limits"]

    def preexec():
        import resource
        for name, (soft, hard) in limits.items():
            which = getattr(resource, name)
            try:
                resource.setrlimit(which, (soft, hard))
            except (ValueError, OSError):  # a lower hard limit already: keep it
                cur_hard = resource.getrlimit(which)[1]
                resource.setrlimit(which, (min(soft, cur_hard), cur_hard))

    env = {"PATH": "/usr/bin:/bin", "HOME": cfg["workdir"], "TMPDIR": cfg["workdir"],
           "LC_ALL": "C.UTF-8"}
    proc = _subprocess.Popen(
        [cfg["python"], "-I", "-B", "-c", cfg["solution_runner"], str(src_r), str(req_r),
         str(resp_w)],
        cwd=cfg["workdir"], env=env, stdin=_subprocess.DEVNULL, pass_fds=(src_r, req_r, resp_w),
        close_fds=True, preexec_fn=preexec,
    )
    for fd in (src_r, req_r, resp_w):
        _os.close(fd)
    try:
        _send(src_w, {"source": cfg["solution"], "entry_point": cfg["entry_point"],
                      "guard": cfg["guard"], "root": cfg["workdir"]})
    except OSError:
        pass
    _os.close(src_w)

    state = {"dead": False, "violation": None}

    def describe(rc):
        if rc is not None and rc < 0:
            try:
                name = _signal.Signals(-rc).name
            except ValueError:
                name = "signal %d" % -rc
            return "the solution process was killed by " + name
        return "the solution process exited with status %s" % (rc,)

    def gone():
        state["dead"] = True
        return ProtocolViolation(describe(proc.wait()))

    def receive():
        try:
            msg = _recv(resp_r, MAX)
        except ProtocolViolation as e:
            state["violation"] = str(e)
            raise
        if msg is None:
            raise gone()
        if not isinstance(msg, dict):
            state["violation"] = "malformed message from the solution process"
            raise ProtocolViolation(state["violation"])
        return msg

    def candidate(*args, **kwargs):
        if state["dead"] or state["violation"]:
            raise ProtocolViolation(state["violation"] or "the solution process is gone")
        try:
            _send(req_w, {"op": "call", "args": list(args), "kwargs": kwargs})
        except OSError:
            raise gone() from None
        msg = receive()
        if set(msg) == {"ok"}:
            return msg["ok"]
        if set(msg) == {"raised"} and isinstance(msg["raised"], str):
            raise CandidateError(msg["raised"][:2000])
        state["violation"] = "malformed answer from the solution process"
        raise ProtocolViolation(state["violation"])

    try:
        first = receive()
        if "error" in first:
            status, detail = "failed", str(first["error"])[:2000]
        elif first != {"ready": True}:
            status, detail = "failed", "malformed message from the solution process"
        elif cfg["tests"] is None:
            try:
                _send(req_w, {"op": "exit"})
            except OSError:
                pass
            rc = proc.wait()
            state["dead"] = True
            status, detail = ("completed", "") if rc == 0 else ("failed", describe(rc))
        else:
            g = {"__name__": "__judge__", "__builtins__": __builtins__}
            exec(compile(cfg["prelude"] + "\n" + cfg["tests"] + "\n", "tests.py", "exec"), g)
            g[cfg["entry_point"]] = candidate  # tests may call it by name, as in one program
            g[cfg["check"]](candidate)
            if state["violation"]:
                raise ProtocolViolation(state["violation"])
            if state["dead"] or proc.poll() is not None:
                state["dead"] = True
                raise ProtocolViolation(describe(proc.wait()) + " during the tests")
            status, detail = "passed", ""
    except ProtocolViolation as e:
        status, detail = "failed", str(e)
    except BaseException as e:
        _traceback.print_exc()
        status, detail = "failed", (("%s: %s" % (type(e).__name__, e)) if str(e)
                                    else type(e).__name__)[:2000]
    try:
        proc.kill()
    except OSError:
        pass
    rc = proc.wait()
    verdict(event="verdict", status=status, detail=detail,
            solution_returncode=rc if state["dead"] else None)
    return 0
'''

_JUDGE_TAIL = r'''
_code = _main()
try:
    _sys.stdout.flush()
    _sys.stderr.flush()
finally:
    _os._exit(_code)
'''


def _judge_source() -> str:
    return _CODEC + _JUDGE_BODY.replace("__MAX_MESSAGE__", str(MAX_MESSAGE)) + _JUDGE_TAIL


# ---------------------------------------------------------------------------------------------
# the harness side


@dataclass
class SandboxResult:
    """Outcome of one run.

    ``status``: ``"passed"`` (the judge's ``check`` returned: only with tests), ``"completed"``
    (no tests: the program ran to its end and exited 0 — not a verdict), ``"failed"`` (a test
    failed, the program raised or exited early, or it broke the protocol), ``"timeout"`` (the
    wall-clock limit, or the CPU limit's SIGXCPU) or ``"killed"`` (another signal, e.g. SIGXFSZ
    or SIGKILL). ``detail`` says why, in one line; ``stdout``/``stderr`` hold the last 2,000
    characters of each stream (the judge's and the solution's together). ``sandbox`` is
    ``"bwrap"`` or ``"unsafe-local"`` (no isolation at all).
    """

    status: str
    returncode: int | None
    wall_s: float
    stdout: str = ""
    stderr: str = ""
    detail: str = ""
    sandbox: str = SANDBOX_BWRAP

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


def _interpreter(python: str | None) -> tuple[str, list[str]]:
    """The real interpreter binary and the folders to bind read-only for it."""
    exe = os.path.realpath(python or sys.executable)
    roots = {os.path.dirname(os.path.dirname(exe))}
    if python is None:
        roots.add(os.path.realpath(sys.base_prefix))
    out: list[str] = []
    for r in sorted(roots, key=len):
        if not any(r == o or r.startswith(o.rstrip("/") + "/") for o in out):
            out.append(r)
    return exe, out


def _system_binds() -> list[str]:
    args: list[str] = []
    for d in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    if os.path.isfile("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


_HELPER = r'''
import ctypes, os, sys
uid = int(sys.argv[1])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    sys.stderr.write("unshare(CLONE_NEWUSER): %s\n" % os.strerror(ctypes.get_errno()))
    sys.exit(1)
os.write(1, b"u")
if os.read(0, 1) != b"m":
    sys.exit(1)
# no further user namespaces below this one (the sandbox cannot rearrange its mounts)
with open("/proc/sys/user/max_user_namespaces", "w") as f:
    f.write("0")
os.write(1, b"k")
os.read(0, 1)
'''


def _read_byte(fd: int, timeout: float) -> bytes:
    r, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 1) if r else b""


def _root_userns(python: str) -> int:
    """An fd of a new user namespace owned by host uid 65534 that maps uids/gids 0 and 65534 to
    themselves, with no nested user namespaces allowed (harness running as root only)."""
    helper = subprocess.Popen(
        [python, "-I", "-S", "-B", "-c", _HELPER, str(SANDBOX_UID)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env={"PATH": os.defpath},
    )
    try:
        if _read_byte(helper.stdout.fileno(), 10) != b"u":
            helper.kill()
            raise SandboxError("could not create a user namespace for the sandbox: "
                               + helper.communicate()[1].decode("utf-8", "replace").strip())
        mapping = f"0 0 1\n{SANDBOX_UID} {SANDBOX_UID} 1\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{helper.pid}/{name}", "w") as f:
                f.write(mapping)
        os.write(helper.stdin.fileno(), b"m")
        if _read_byte(helper.stdout.fileno(), 10) != b"k":
            raise SandboxError("could not limit nested user namespaces in the sandbox")
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.kill()
        helper.wait()
        for f in (helper.stdin, helper.stdout, helper.stderr):
            f.close()


def _bwrap_command(bwrap: str, exe: str, roots: list[str], userns_fd: int | None, tmp_mb: int,
                   info_fd: int) -> list[str]:
    cmd = [bwrap]
    if userns_fd is not None:
        cmd += ["--userns", str(userns_fd), "--unshare-ipc", "--unshare-pid", "--unshare-net",
                "--unshare-uts", "--unshare-cgroup-try"]
    else:
        cmd += ["--unshare-all", "--unshare-user", "--disable-userns"]
    cmd += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
            "--die-with-parent", "--new-session", "--as-pid-1", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--info-fd", str(info_fd)]
    cmd += _system_binds()
    for r in roots:
        cmd += ["--ro-bind", r, r]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--perms", "0700", "--size", str(int(tmp_mb) << 20), "--tmpfs", "/tmp",
            "--remount-ro", "/", "--chdir", "/"]
    return cmd


_PROBE: dict[str, tuple[str | None, str]] = {}
_PROBE_LOCK = threading.Lock()


def bwrap_status(python: str | None = None) -> tuple[str | None, str]:
    """``(path to bwrap, "")`` when bubblewrap is installed and can build the sandbox on this
    machine, else ``(None, why not)``. Probed once per process (and interpreter)."""
    key = python or ""
    with _PROBE_LOCK:
        if key not in _PROBE:
            _PROBE[key] = _probe(python)
        return _PROBE[key]


def _probe(python: str | None) -> tuple[str | None, str]:
    if not sys.platform.startswith("linux"):
        return None, "bubblewrap needs Linux"
    bwrap = shutil.which("bwrap") or next(
        (p for p in ("/usr/bin/bwrap", "/usr/local/bin/bwrap") if os.access(p, os.X_OK)), None)
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed (scripts/install.sh installs it)"
    try:
        r = _run(bwrap, "print('ok')", None, None, "", "check", timeout_s=30, cpu_s=30,
                 memory_mb=512, file_mb=1, tmp_mb=1, nproc=16, nofile=64, python=python)
    except (OSError, SandboxError, subprocess.SubprocessError) as e:
        return None, f"bubblewrap ({bwrap}) cannot build the sandbox here: {e}"
    if r.status != "completed" or r.stdout != "ok\n":
        return None, (f"bubblewrap ({bwrap}) cannot build the sandbox here: {r.status}, "
                      f"{r.detail or r.stderr.strip()[-300:]}")
    return bwrap, ""


def sandbox_mode(unsafe_local_exec: bool = False, python: str | None = None) -> str:
    """``"bwrap"`` when the sandbox works here; else ``"unsafe-local"`` if ``unsafe_local_exec``
    allows it; else :class:`SandboxUnavailableError` saying why and how to proceed."""
    path, why = bwrap_status(python)
    if path is not None:
        return SANDBOX_BWRAP
    if unsafe_local_exec:
        return SANDBOX_UNSAFE
    raise SandboxUnavailableError(
        f"refusing to run generated code without a sandbox: {why}. Install bubblewrap "
        f"(apt-get install bubblewrap, or scripts/install.sh; it needs Linux user namespaces), "
        f"or pass {UNSAFE_FLAG} ({UNSAFE_KEYWORD}=True in Python) to run it unsandboxed on "
        f"this machine"
    )


def _positive(name: str, value, *, integer: bool = True, allow_none: bool = False):
    if value is None and allow_none:
        return value
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else (
        isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or not value > 0 or value != value:
        kind = "an int >= 1" if integer else "a number > 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def run_python(
    source: str,
    *,
    tests: str | None = None,
    entry_point: str | None = None,
    prelude: str = "",
    check: str = "check",
    timeout_s: float = 10.0,
    cpu_s: int | None = None,
    memory_mb: int = 1024,
    file_mb: int = 16,
    tmp_mb: int = 64,
    nproc: int = 16,
    nofile: int = 64,
    python: str | None = None,
    unsafe_local_exec: bool = False,
) -> SandboxResult:
    """Run ``source`` (untrusted) in the sandbox; with ``tests``, decide whether it passes.

    Args:
        source: the untrusted program (for HumanEval: prompt + completion). It runs as
            ``__main__`` in the solution process, whose working folder is the sandbox's ``/tmp``.
        tests: trusted test code defining ``check(candidate)`` (HumanEval's ``test``); the judge
            runs ``prelude``, then ``tests``, then ``check(proxy of entry_point)``. ``None``: no
            verdict, the result is ``"completed"`` when the program ran to its end.
        entry_point: the function of ``source`` that ``candidate`` calls (needed with tests).
        prelude: trusted code run in the judge before the tests (HumanEval: the prompt, whose
            helpers such as ``poly`` the tests use).
        check: the name of the test function.
        timeout_s: wall-clock limit in seconds for the whole run.
        cpu_s: CPU seconds of the solution process (default ``ceil(timeout_s)``).
        memory_mb: address-space limit of each solution process, in MiB.
        file_mb: the largest file (its output included) it may write, in MiB.
        tmp_mb: size of the writable tmpfs (``/tmp``), in MiB.
        nproc: processes and threads of the sandbox's uid (RLIMIT_NPROC); with ``memory_mb``
            this bounds the memory a fork bomb can take (``nproc × memory_mb``).
        nofile: open files per process (RLIMIT_NOFILE).
        python: the interpreter (default: the harness's own, its installation bound read-only).
        unsafe_local_exec: without a usable bwrap, run unsandboxed instead of raising
            :class:`SandboxUnavailableError`.
    """
    if not isinstance(source, str):
        raise ValueError(f"source must be a str, got {type(source).__name__}")
    if tests is not None and not entry_point:
        raise ValueError("entry_point (the function the tests call) is needed with tests")
    _positive("timeout_s", timeout_s, integer=False)
    _positive("cpu_s", cpu_s, allow_none=True)
    for name, value in (("memory_mb", memory_mb), ("file_mb", file_mb), ("tmp_mb", tmp_mb),
                        ("nproc", nproc), ("nofile", nofile)):
        _positive(name, value)
    if nproc < 2:
        raise ValueError(f"nproc must be an int >= 2 (the judge and the solution), got {nproc}")
    if nofile < 16:
        raise ValueError(f"nofile must be an int >= 16 (the interpreter needs some), got {nofile}")
    cpu = int(cpu_s if cpu_s is not None else max(1, int(timeout_s + 0.999)))
    mode = sandbox_mode(unsafe_local_exec, python)
    bwrap = bwrap_status(python)[0] if mode == SANDBOX_BWRAP else None
    return _run(bwrap, source, tests, entry_point, prelude, check, timeout_s=timeout_s,
                cpu_s=cpu, memory_mb=memory_mb, file_mb=file_mb, tmp_mb=tmp_mb, nproc=nproc,
                nofile=nofile, python=python)


def _memfd(data: bytes) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("speccascade-judge", os.MFD_CLOEXEC)
    else:  # pragma: no cover - non-Linux (unsafe local runs only)
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run(bwrap: str | None, source: str, tests: str | None, entry_point: str | None,
         prelude: str, check: str, *, timeout_s: float, cpu_s: int, memory_mb: int,
         file_mb: int, tmp_mb: int, nproc: int, nofile: int,
         python: str | None) -> SandboxResult:
    exe, roots = _interpreter(python)
    sandboxed = bwrap is not None
    nonce = secrets.token_hex(16)
    limits = {
        "RLIMIT_AS": [memory_mb << 20] * 2,
        "RLIMIT_CPU": [cpu_s, cpu_s + 1],  # soft: SIGXCPU; a second later: SIGKILL
        "RLIMIT_FSIZE": [file_mb << 20] * 2,
        "RLIMIT_CORE": [0, 0],
        "RLIMIT_NOFILE": [nofile] * 2,
    }
    if sandboxed:  # per sandbox; unsandboxed it would count every process of the user
        limits["RLIMIT_NPROC"] = [nproc] * 2
    with tempfile.TemporaryDirectory(prefix="speccascade-sandbox-",
                                     ignore_cleanup_errors=True) as d:
        host = Path(d)
        workdir = "/tmp" if sandboxed else str(host / "work")
        if not sandboxed:
            os.mkdir(workdir, 0o700)
        cfg = {
            "nonce": nonce, "solution": source, "tests": tests, "entry_point": entry_point,
            "prelude": prelude, "check": check, "limits": limits, "workdir": workdir,
            "python": exe, "solution_runner": _SOLUTION, "guard": not sandboxed,
            "require_nondumpable": sandboxed,
        }
        payload_fd = _memfd(json.dumps(cfg).encode("utf-8"))
        verdict_r, verdict_w = os.pipe()
        info_r, info_w = os.pipe()
        userns_fd = None
        judge = [exe, "-I", "-S", "-B", "-c", _judge_source(), str(payload_fd), str(verdict_w)]
        fds = [payload_fd, verdict_w]
        kwargs: dict = {}
        try:
            if sandboxed:
                if os.geteuid() == 0:
                    userns_fd = _root_userns(exe)
                    fds.append(userns_fd)
                    kwargs = {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}
                fds.append(info_w)
                cmd = _bwrap_command(bwrap, exe, roots, userns_fd, tmp_mb, info_w) + ["--"] + judge
                env = {"PATH": os.defpath}
            else:
                cmd = judge
                env = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir,
                       "LC_ALL": "C.UTF-8"}
            t0 = time.perf_counter()
            with open(host / "stdout.txt", "wb") as out, open(host / "stderr.txt", "wb") as err:
                proc = subprocess.Popen(
                    cmd, cwd="/" if sandboxed else workdir, env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, pass_fds=fds, start_new_session=True, **kwargs)
        finally:
            for fd in (payload_fd, verdict_w, info_w, userns_fd):
                if fd is not None:
                    os.close(fd)
        bwrap_fd = _pidfd(proc.pid)  # (not reaped before we are done: the pid stays ours)
        judge_fd = bwrap_fd
        timed_out = False
        try:
            if sandboxed:
                judge_fd = _judge_pidfd(info_r, proc, deadline=t0 + timeout_s)
            timed_out = not _wait_exit(proc, bwrap_fd, t0 + timeout_s)
        finally:
            _kill(proc, bwrap_fd, judge_fd, sandboxed)
            os.close(info_r)
        wall = time.perf_counter() - t0
        events = _read_verdicts(verdict_r, nonce)
        stdout, stderr = _tail(host / "stdout.txt"), _tail(host / "stderr.txt")
    started = any(e.get("event") == "started" for e in events)
    final = next((e for e in reversed(events) if e.get("event") == "verdict"), None)
    error = next((e for e in events if e.get("event") == "error"), None)
    mode = SANDBOX_BWRAP if sandboxed else SANDBOX_UNSAFE
    rc = proc.returncode
    if error is not None:
        raise SandboxError(f"the sandbox's judge refused to run: {error.get('detail')}")
    if timed_out:
        return SandboxResult("timeout", rc, wall, stdout, stderr,
                             f"wall-clock limit of {timeout_s:g} s reached", mode)
    if not started:
        raise SandboxError(
            f"the sandbox did not start (exit status {rc}): {stderr.strip()[-500:]}")
    if final is None:
        return SandboxResult("killed", rc, wall, stdout, stderr,
                             "the judge ended without a verdict", mode)
    status = final.get("status")
    detail = str(final.get("detail") or "")
    src = final.get("solution_returncode")
    if status == "failed" and isinstance(src, int) and src < 0:
        status = "timeout" if -src == signal.SIGXCPU else "killed"
    if status not in ("passed", "completed", "failed", "timeout", "killed"):
        status, detail = "failed", f"unknown verdict {status!r}"
    return SandboxResult(status, src if isinstance(src, int) else rc, wall, stdout, stderr,
                         detail, mode)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # pragma: no cover - Linux < 5.3, or not Linux
        return None


def _judge_pidfd(info_r: int, proc: subprocess.Popen, deadline: float) -> int | None:
    """A pidfd of the sandbox's PID 1 (the judge; its host pid from bwrap's --info-fd), or None
    when it has already gone. A pidfd, not a pid, so that a late kill cannot hit a reused pid."""
    data = b""
    while time.perf_counter() < deadline:
        r, _, _ = select.select([info_r], [], [], min(deadline - time.perf_counter(), 0.5))
        if not r:
            if proc.poll() is not None:
                return None
            continue
        chunk = os.read(info_r, 4096)
        if not chunk:
            return None
        data += chunk
        try:
            pid = int(json.loads(data)["child-pid"])
        except (ValueError, KeyError, TypeError):
            continue
        fd = _pidfd(pid)
        # bwrap (not reaped yet) has one child, the judge: if that pid's parent is not bwrap,
        # the judge has been reaped already and the pid may be someone else's
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            ppid = None
        if ppid != proc.pid:
            if fd is not None:
                os.close(fd)
            return None
        return fd
    return None


def _wait_exit(proc: subprocess.Popen, pidfd: int | None, deadline: float) -> bool:
    """Whether ``proc`` exited before ``deadline`` (without reaping it when a pidfd exists)."""
    left = max(0.0, deadline - time.perf_counter())
    if pidfd is None:  # pragma: no cover - no pidfd
        try:
            proc.wait(timeout=left)
            return True
        except subprocess.TimeoutExpired:
            return False
    r, _, _ = select.select([pidfd], [], [], left)
    return bool(r)


def _signal(pidfd: int | None, proc: subprocess.Popen | None = None) -> None:
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        elif proc is not None:
            proc.kill()  # (Popen never signals a process it has reaped)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(proc: subprocess.Popen, bwrap_fd: int | None, judge_fd: int | None,
          sandboxed: bool) -> None:
    """End the run: SIGKILL the judge (PID 1 of the sandbox: the kernel then kills the whole
    PID namespace) and bwrap, then wait until the judge has exited, and reap bwrap."""
    try:
        if sandboxed:
            _signal(judge_fd)
        else:  # no PID namespace: the process group is the best there is (the leader is not
            try:  # reaped yet, so its pid cannot have been reused)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _signal(bwrap_fd, proc)
        if judge_fd is not None:
            select.select([judge_fd], [], [], 10.0)
        proc.wait()
    finally:
        for fd in {bwrap_fd, judge_fd} - {None}:
            os.close(fd)


def _read_verdicts(fd: int, nonce: str) -> list[dict]:
    """The judge's messages (one JSON object a line, with this run's nonce)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) < (1 << 20):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    events = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("nonce") == nonce:
            events.append(e)
    return events
