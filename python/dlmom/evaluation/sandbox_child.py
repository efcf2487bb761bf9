"""The sandbox's child process (run as a script by dlmom.evaluation.sandbox, in ``python -I``; imports
nothing of dlmom): set the limits, install the seccomp filter and the audit hook, run the program, write the
verdict.

argv[1] is JSON: program (path), work (the working directory), nonce, report_fd, memory_mb, file_mb, cpu_s.
The verdict is one line "<nonce> <json>" on report_fd: {"passed": true} or {"passed": false, "error": the
exception's type name, "message": ...}, with "kernel": "seccomp" or why there is no seccomp filter. Any attempt the hook refused fails the run, even when the program
caught the exception.
"""
import json
import os
import resource
import sys

_PROCESS_EVENTS = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.startfile",
                   "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn"}
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate", "os.chmod",
                "os.chown", "os.mkdir", "os.utime", "os.chflags", "os.lchflags", "os.setxattr",
                "os.removexattr", "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.copyfile", "shutil.copytree",
                "shutil.move", "shutil.copymode", "shutil.copystat", "shutil.chown"}
_NATIVE_MODULES = {"ctypes", "_ctypes", "cffi", "_cffi_backend"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


# seccomp: syscall numbers per architecture (AUDIT_ARCH_* value): the kernel-level part of the sandbox.
_SYSCALLS = {
    0xC000003E: dict(socket=41, clone=56, fork=57, vfork=58, execve=59, kill=62, ptrace=101, tkill=200, tgkill=234,
                     process_vm_writev=311, execveat=322, pidfd_send_signal=424, clone3=435),  # x86_64
    0xC00000B7: dict(socket=198, clone=220, execve=221, kill=129, ptrace=117, tkill=130, tgkill=131,
                     process_vm_writev=271, execveat=281, pidfd_send_signal=424, clone3=435),  # aarch64
}
_DENIED = ("socket", "fork", "vfork", "execve", "execveat", "ptrace", "process_vm_writev", "pidfd_send_signal")
_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ..., BPF_RET|K
_ALLOW, _EPERM, _ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
_CLONE_THREAD = 0x00010000


def _seccomp_program(arch: int, pid: int) -> list[tuple[int, int, int, int]]:
    """A BPF filter: no sockets, no new processes (clone only for threads; clone3 answers ENOSYS so the C
    library falls back to clone), no exec, no ptrace, signals only to this process."""
    calls = _SYSCALLS[arch]
    prog = [(_LD, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, _EPERM),  # another ABI: refuse everything
            (_LD, 0, 0, 0), (_JGE, 0, 1, 0x40000000), (_RET, 0, 0, _EPERM)]  # x32 syscalls on x86_64
    for name in _DENIED:
        if name in calls:
            prog += [(_JEQ, 0, 1, calls[name]), (_RET, 0, 0, _EPERM)]
    prog += [(_JEQ, 0, 1, calls["clone3"]), (_RET, 0, 0, _ENOSYS)]
    prog += [(_JEQ, 0, 4, calls["clone"]), (_LD, 0, 0, 16), (_JSET, 0, 1, _CLONE_THREAD), (_RET, 0, 0, _ALLOW),
             (_RET, 0, 0, _EPERM)]
    for name in ("kill", "tkill", "tgkill"):  # first argument: a process (thread) id; this one's is its pid
        prog += [(_JEQ, 0, 4, calls[name]), (_LD, 0, 0, 16), (_JEQ, 0, 1, pid), (_RET, 0, 0, _ALLOW),
                 (_RET, 0, 0, _EPERM)]
    return prog + [(_RET, 0, 0, _ALLOW)]


def _seccomp() -> str:
    """Install the filter in this process (and what it may start); "seccomp" or why not."""
    import ctypes
    import platform

    arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(platform.machine())
    if arch is None:
        return f"no seccomp (architecture {platform.machine()})"

    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Instruction))]

    code = _seccomp_program(arch, os.getpid())
    filters = (Instruction * len(code))(*[Instruction(*i) for i in code])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return f"no seccomp (prctl: errno {ctypes.get_errno()})"
    if libc.prctl(22, 2, ctypes.byref(Program(len(code), filters)), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        return f"no seccomp (prctl: errno {ctypes.get_errno()})"
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # the program's own import of ctypes then meets the audit hook
    return "seccomp"


class SandboxViolation(BaseException):
    """Raised by the audit hook; a BaseException, so ``except Exception`` in the program does not hide it."""


def _limits(settings: dict) -> None:
    mb = 1024 * 1024
    for which, value in ((resource.RLIMIT_AS, settings["memory_mb"] * mb), (resource.RLIMIT_NPROC, 0),
                         (resource.RLIMIT_FSIZE, settings["file_mb"] * mb), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_CPU, settings["cpu_s"])):
        resource.setrlimit(which, (value, value))  # soft = hard: the program cannot raise them again


def _hook(work: str, violations: list):
    inside = os.path.realpath(work) + os.sep

    def outside(path) -> bool:
        if isinstance(path, int):  # a descriptor already opened (its opening was checked)
            return False
        path = os.fsdecode(os.fspath(path))
        return not (os.path.realpath(path) + os.sep).startswith(inside)

    def refuse(what: str):
        violations.append(what)
        raise SandboxViolation(what)

    def hook(event: str, args: tuple):
        if event in _PROCESS_EVENTS:
            refuse(f"{event} (no new processes or signals)")
        elif event.startswith("socket."):
            refuse(f"{event} (no network)")
        elif event.startswith("ctypes.") or (event == "import" and args[0].split(".")[0] in _NATIVE_MODULES):
            refuse(f"{event} {args[0] if event == 'import' else ''} (no native calls)".replace("  ", " "))
        elif event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or bool(flags & _WRITE_FLAGS)
            if writes and path is not None and outside(path):
                refuse(f"writing {path!r}, outside the working directory")
        elif event in _PATH_EVENTS:
            for path in args:
                if isinstance(path, (str, bytes, os.PathLike)) and outside(path):
                    refuse(f"{event} on {path!r}, outside the working directory")

    return hook


def main() -> None:
    settings = json.loads(sys.argv[1])
    report = os.fdopen(settings["report_fd"], "w", encoding="utf-8")
    _limits(settings)
    with open(settings["program"], encoding="utf-8") as f:
        source = f.read()
    kernel = _seccomp()
    violations: list[str] = []
    os.chdir(settings["work"])
    sys.addaudithook(_hook(settings["work"], violations))
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__sandbox__", "__builtins__": __builtins__})
        verdict = {"passed": True}
    except SystemExit as err:
        verdict = {"passed": False, "error": "SystemExit", "message": f"exit({err.code!r}) before the tests finished"}
    except BaseException as err:  # noqa: BLE001 - every failure of the program is its verdict
        verdict = {"passed": False, "error": type(err).__name__, "message": str(err)[:400]}
    if violations:
        verdict = {"passed": False, "error": "SandboxViolation", "message": violations[0]}
    verdict["kernel"] = kernel
    report.write(f"{settings['nonce']} {json.dumps(verdict)}\n")
    report.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
