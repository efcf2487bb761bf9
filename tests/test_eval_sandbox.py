"""The sandbox that runs HumanEval-style code: harmful completions (endless loops, unbounded allocation,
fork bombs, sockets, deleting files elsewhere) harm neither the run nor the machine, and each fails with
its reason; the seccomp filter holds without the audit hook."""
import os
import subprocess
import sys
import time

import pytest

from dlmom.evaluation import sandbox
from dlmom.evaluation.sandbox import Limits, run_program

FAST = Limits(timeout_s=3, memory_mb=256)


@pytest.fixture
def victim(tmp_path):
    """A file outside the sandbox's directory, which no program may delete or change."""
    path = tmp_path / "keep" / "victim.txt"
    path.parent.mkdir()
    path.write_text("precious")
    return path


def test_passing_and_failing_programs():
    assert run_program("def f(x):\n    return x + 1\nassert f(1) == 2\n", limits=FAST).passed
    out = run_program("assert 1 == 2, 'one is not two'\n", limits=FAST)
    assert not out.passed and out.reason == "AssertionError: one is not two"
    assert run_program("def f(:\n", limits=FAST).reason.startswith("SyntaxError")


def test_endless_loop_times_out():
    start = time.perf_counter()
    out = run_program("while True:\n    pass\n", limits=Limits(timeout_s=1))
    assert not out.passed and out.reason == "timeout: still running after 1 s"
    assert time.perf_counter() - start < 10


def test_unbounded_allocation_meets_the_memory_limit():
    out = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n", limits=FAST)
    assert not out.passed and out.reason == "memory limit (256 MiB): MemoryError"


FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n"


@pytest.mark.parametrize("source, reason", [
    (FORK_BOMB, "blocked by the sandbox: os.fork"),
    ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])\n", "blocked by the sandbox: subprocess.Popen"),
    ("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\n", "blocked by the sandbox: socket.__new__"),
    ("import os\nos.kill(1, 0)\n", "blocked by the sandbox: os.kill"),
    ("import ctypes\n", "blocked by the sandbox: import ctypes"),
    ("import sys\nsys.exit(0)\n", "SystemExit: exit(0) before the tests finished"),
    ("import os\nos._exit(0)\n", "exited with status 0 before the tests finished"),
])
def test_forbidden_or_early_exits_fail_with_their_reason(source, reason):
    before = _children()
    out = run_program(source, limits=FAST)
    assert not out.passed and out.reason.startswith(reason), out
    assert _children() == before  # nothing left running


def test_files_outside_the_directory_are_safe(victim):
    for source in (f"import os\nos.remove({str(victim)!r})\n",
                   f"import shutil\nshutil.rmtree({str(victim.parent)!r})\n",
                   f"open({str(victim)!r}, 'w').write('gone')\n",
                   f"import os\nos.rename({str(victim)!r}, 'stolen.txt')\n"):
        out = run_program(source, limits=FAST)
        assert not out.passed and "outside the working directory" in out.reason, (source, out)
    assert victim.read_text() == "precious"
    # Its own directory is its to use, and is gone afterwards.
    out = run_program("import os\nopen('notes.txt', 'w').write('x')\nos.remove('notes.txt')\nprint(os.getcwd())\n",
                      limits=FAST)
    assert out.passed, out


def test_clean_environment():
    os.environ["DLMOM_TEST_SECRET"] = "s3cret"
    try:
        out = run_program("import os\nassert 'DLMOM_TEST_SECRET' not in os.environ, 'leaked'\n"
                          "assert os.environ['HOME'] == os.getcwd()\n", limits=FAST)
    finally:
        del os.environ["DLMOM_TEST_SECRET"]
    assert out.passed, out


def test_kernel_filter_holds_without_the_audit_hook():
    """The seccomp layer alone (as code past the audit hook would meet it): no fork, no socket, no exec,
    no signal to another process; threads still run."""
    code = ("import os, socket, threading, sandbox_child as c\n"
            "assert c._seccomp() == 'seccomp'\n"
            "for f in (os.fork, socket.socket, lambda: os.execv('/bin/true', ['true']), lambda: os.kill(1, 0)):\n"
            "    try:\n        f()\n        raise SystemExit('allowed: ' + repr(f))\n"
            "    except PermissionError:\n        pass\n"
            "r = []\nt = threading.Thread(target=lambda: r.append(1))\nt.start(); t.join()\nassert r == [1]\n"
            "os.kill(os.getpid(), 0)\nprint('ok')\n")
    if sandbox.run_program("pass", limits=FAST).kernel != "seccomp":
        pytest.skip("no seccomp filter on this machine")
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(sandbox.__file__), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _children() -> set[int]:
    """Process ids whose parent is this process (the sandbox's children are reaped when it returns)."""
    me = str(os.getpid())
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        found.add(int(pid))
            except OSError:
                pass
    return found
