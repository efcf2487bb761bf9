"""Running model-written Python (a completion and its tests) in a separate, limited process.

What each run gets, and what it stops:

- a new process (``python -I -B``: no user site, no PYTHON* variables, no bytecode written) in a new
  session, with a clean environment (PATH, HOME and TMPDIR in its own directory, LANG) and stdin, stdout and
  stderr on /dev/null; its working directory is a new temporary directory, removed afterwards;
- a wall-clock limit (``Limits.timeout_s``): past it the whole process group is killed (SIGKILL), and
  RLIMIT_CPU stops a process that escaped the group;
- RLIMIT_AS (``memory_mb``): allocating beyond it raises MemoryError; RLIMIT_NPROC = 0, RLIMIT_FSIZE
  (``file_mb``) on files written, RLIMIT_CORE = 0; soft and hard limits alike, so the program cannot raise them;
- a seccomp filter (Linux x86_64 / aarch64, installed by the child before the program runs; it cannot be
  removed): no socket() (no network, no Unix sockets), no fork / vfork, clone only for threads, no exec, no
  ptrace, no signal to another process. This is the process limit that holds for root too: the kernel
  does not apply RLIMIT_NPROC to root, which runs these jobs on many machines;
- no network twice over: when ``unshare --user --map-root-user --net`` works here (tried once per process),
  the run is in its own network namespace, which has only a loopback that is down;
- an audit hook (sys.addaudithook) that refuses, with a message, what the filter refuses at the kernel
  level, and also importing ctypes / cffi and writing, deleting, renaming, linking or changing files
  outside the working directory. Whatever the hook refuses fails the run, even when the program caught it.

Limits, said plainly: files are guarded by the audit hook alone, a Python-level check; code in a C
extension module (only what the standard library and the installed packages already hold, since ctypes
is refused) can get past it, and files outside the working directory stay readable. Threads are allowed
(and count as processes for RLIMIT_NPROC, so a non-root program cannot start them). Where seccomp is not
available (another OS or architecture; ``Outcome.kernel`` says) processes and sockets are refused by the
hook and RLIMIT_NPROC alone. This contains the mistakes of a model (loops, big allocations, stray file or
network calls, fork loops); it is not a boundary against code written to escape: run untrusted code in a
container or VM.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per run: wall-clock seconds, address space and file size in MiB."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16

    def __post_init__(self):
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"Limits: timeout_s must be a number of seconds > 0, got {t!r}")
        for name, lo in (("memory_mb", 64), ("file_mb", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"Limits: {name} must be an integer >= {lo}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """``passed``; ``reason`` why not (None when it passed); ``network``: "namespace" or "audit hook";
    ``kernel``: "seccomp", or why the run had no seccomp filter ("" when the child reported nothing)."""

    passed: bool
    reason: str | None
    network: str
    kernel: str = ""


@functools.lru_cache(maxsize=None)
def network_isolation() -> str:
    """"namespace" when an unprivileged network namespace can be made here (unshare), else "audit hook"."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "audit hook"
    try:
        done = subprocess.run([unshare, "--user", "--map-root-user", "--net", "true"], capture_output=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "audit hook"
    return "namespace" if done.returncode == 0 else "audit hook"


def run_program(source: str, *, limits: Limits = Limits()) -> Outcome:
    """Run ``source`` as a Python program under ``limits`` (see the module docstring); it passes when it ends
    without an exception (a SystemExit, even with status 0, or an early os._exit counts as failing)."""
    network = network_isolation()
    with tempfile.TemporaryDirectory(prefix="dlmom-sandbox-") as root:
        work = os.path.join(root, "work")
        os.mkdir(work)
        with open(os.path.join(root, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        nonce = secrets.token_hex(16)
        read_end, write_end = os.pipe()  # the verdict comes on a pipe of its own, apart from anything the program prints
        settings = {"program": os.path.join(root, "program.py"), "work": work, "nonce": nonce,
                    "report_fd": write_end, "memory_mb": limits.memory_mb, "file_mb": limits.file_mb,
                    "cpu_s": int(limits.timeout_s) + 2}
        command = [sys.executable, "-I", "-B", _CHILD, json.dumps(settings)]
        if network == "namespace":
            command = [shutil.which("unshare"), "--user", "--map-root-user", "--net", "--", *command]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True, pass_fds=(write_end,),
                                    close_fds=True)
        except OSError as err:
            os.close(read_end)
            os.close(write_end)
            return Outcome(False, f"could not start the sandbox: {err}", network)
        os.close(write_end)
        try:
            proc.wait(timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read(65536).decode("utf-8", "replace")
        return Outcome(*_verdict(report, nonce, proc.returncode, timed_out, limits), network,
                       _field(report, nonce, "kernel"))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's session (itself and anything it started), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _report(report: str, nonce: str) -> dict | None:
    """The child's verdict line (the last line that starts with the nonce), as a dict."""
    lines = [line for line in report.splitlines() if line.startswith(nonce + " ")]
    return json.loads(lines[-1][len(nonce) + 1:]) if lines else None


def _field(report: str, nonce: str, key: str) -> str:
    return (_report(report, nonce) or {}).get(key, "")


def _verdict(report: str, nonce: str, returncode: int, timed_out: bool, limits: Limits) -> tuple[bool, str | None]:
    """(passed, reason) from the child's report line and how it ended."""
    if timed_out:
        return False, f"timeout: still running after {limits.timeout_s:g} s"
    result = _report(report, nonce)
    if result is None:
        if returncode < 0:
            return False, f"killed by {signal.Signals(-returncode).name}"
        return False, f"exited with status {returncode} before the tests finished"
    if result.get("passed"):
        return True, None
    kind, message = result.get("error", "Error"), result.get("message", "")
    if kind == "MemoryError":
        return False, f"memory limit ({limits.memory_mb} MiB): MemoryError"
    if kind == "SandboxViolation":
        return False, f"blocked by the sandbox: {message}"
    return False, f"{kind}: {message}"[:500] if message else kind
