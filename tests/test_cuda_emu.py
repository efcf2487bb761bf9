"""The CUDA kernels without a GPU: csrc/cuda/<op>.cu compiled as host C++ with the tests/cuda_emu harness (every
thread of a block a ucontext fiber, in an order shuffled between barriers; shared memory, __syncthreads, warp
shuffles, atomics and the cub block
primitives emulated; see tests/cuda_emu/cuda_emu.h) and run against a reference: soft_embed against an fp64 sum,
topk_packet against the CPU kernel (same ids, probs to 1e-6 and bit for bit at exact ties, entropy to 1e-5,
the device error record), ties_merge (to 1e-5) and kv_quant2 / kv_dequant2 (exactly) against theirs. This checks
the kernels' logic (indexing, barriers, merges, tie order, the precision of the sums), not the GPU's float
rounding order or timing; tests/test_cuda_divergences.py and tests/test_cuda_sizes.py run on the GPU.

Memory: every case runs twice, its buffers flush against an inaccessible page after their end (EMU_GUARD=after),
then before their start (EMU_GUARD=before; tests/cuda_emu/guard.h), so a kernel that reads or writes one element
out of bounds crashes the case; and every reinterpret_cast in the kernels is checked for alignment (a misaligned
float4 / uint4 access aborts, as it faults on a GPU). The mutation tests at the end show each check failing on a
kernel copy with the bug put in: a removed barrier, a bounds check off by one, an index off by one, a 16-byte load
without its alignment test.
"""
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
CXX = shutil.which(os.environ.get("CXX", "g++"))
pytestmark = pytest.mark.skipif(CXX is None or not sys.platform.startswith("linux"),
                                reason="the emulation needs g++ and glibc's ucontext")


def build(tmp: pathlib.Path, ops: list[str], main: str, *cpu_sources: str, root: pathlib.Path = ROOT) -> pathlib.Path:
    """csrc/cuda/<op>.cu of each op (under `root`) rewritten for the emulation, linked with tests/cuda_emu/<main>
    and the given CPU kernels (csrc/cpu/<name>)."""
    sources = []
    for op in ops:
        src = tmp / f"{op}_emu.cpp"
        subprocess.run([sys.executable, str(EMU / "emu_source.py"), str(root / "csrc" / "cuda" / f"{op}.cu"),
                        str(src)], check=True)
        sources.append(str(src))
    exe = tmp / main.replace(".cpp", "")
    cmd = [CXX, "-std=c++17", "-O1", "-fopenmp", "-include", str(EMU / "cuda_emu.h"), "-I", str(EMU / "include"),
           "-I", str(root / "csrc"), "-I", str(root / "csrc" / "cuda"), *sources, str(EMU / main),
           *(str(root / "csrc" / "cpu" / name) for name in cpu_sources), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"compiling the emulated {ops} failed:\n{done.stderr[-4000:]}"
    return exe


def run(exe: pathlib.Path, guard: str) -> subprocess.CompletedProcess:
    """The cases of exe with their buffers against guard pages on the side `guard` (after / before / off)."""
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "EMU_GUARD": guard})


def outcome(done: subprocess.CompletedProcess) -> str:
    """How a run ended, for a failure message: its exit status or the signal that killed it, and its stderr."""
    if done.returncode < 0:
        how = f"killed by {signal.Signals(-done.returncode).name}"
    else:
        how = f"exit status {done.returncode}"
    return f"{how}\n{done.stderr[-3000:]}"


def run_cases(exe: pathlib.Path, ops: list[str], at_least: int) -> list[str]:
    """Every case of exe passes with its buffers against guard pages after their end, then before their start."""
    lines = []
    for guard in ("after", "before"):
        done = run(exe, guard)
        lines = done.stdout.splitlines()
        failed = [line for line in lines if not line.startswith("ok ")]
        last = f"(the last case reported: {lines[-1]})" if lines else "(no case reported)"
        assert done.returncode == 0 and not failed, (
            f"emulated {'/'.join(ops)} with EMU_GUARD={guard}: " + "\n".join(failed) + f"\n{last}\n" + outcome(done))
        assert len(lines) >= at_least, done.stdout  # every case reported
    return lines


def test_soft_embed_emulated(tmp_path):
    lines = run_cases(build(tmp_path, ["soft_embed"], "soft_embed_main.cpp"), ["soft_embed"], at_least=8)
    # The harness's own checks ran too: a divergent barrier is reported, shuffles sum right.
    assert any("divergent __syncthreads" in line for line in lines)


def test_topk_packet_emulated(tmp_path):
    lines = run_cases(build(tmp_path, ["topk_packet"], "topk_packet_main.cpp", "topk_packet.cpp"), ["topk_packet"],
                      at_least=13)
    assert any("exact ties top_p 0.8" in line and "keeps 40" in line for line in lines)
    assert sum("(unaligned rows)" in line for line in lines) == 3


def test_ties_merge_and_kv_quant2_emulated(tmp_path):
    exe = build(tmp_path, ["ties_merge", "kv_quant2"], "ties_kv_main.cpp", "ties_merge.cpp", "kv_quant2.cpp")
    lines = run_cases(exe, ["ties_merge", "kv_quant2"], at_least=11)
    assert sum("unaligned rows" in line for line in lines) == 2


def _mutant(tmp: pathlib.Path, op: str, old: str, new: str) -> pathlib.Path:
    """A fake source root: csrc/cuda/<op>.cu with `old` (found exactly once) replaced by `new`, the rest of csrc
    linked."""
    root = tmp / "mutant"
    (root / "csrc" / "cuda").mkdir(parents=True)
    for entry in (ROOT / "csrc").iterdir():
        if entry.name != "cuda":
            (root / "csrc" / entry.name).symlink_to(entry)
    for entry in (ROOT / "csrc" / "cuda").iterdir():
        if entry.name != f"{op}.cu":
            (root / "csrc" / "cuda" / entry.name).symlink_to(entry)
    text = (ROOT / "csrc" / "cuda" / f"{op}.cu").read_text()
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in csrc/cuda/{op}.cu"
    (root / "csrc" / "cuda" / f"{op}.cu").write_text(text.replace(old, new))
    return root


def _without_barrier(tmp: pathlib.Path, op: str, marker: str) -> pathlib.Path:
    """A copy of csrc/cuda/<op>.cu whose ``__syncthreads();`` on the line holding ``marker`` (the line after
    it when the marker is a comment line) is removed."""
    lines = (ROOT / "csrc" / "cuda" / f"{op}.cu").read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if marker in line)
    at = at if "__syncthreads();" in lines[at] else at + 1
    assert lines[at].strip() == "__syncthreads();", lines[at]
    return _mutant(tmp, op, lines[at - 1] + lines[at],
                   lines[at - 1] + lines[at].replace("__syncthreads();", ";  // removed by the mutation test"))


def test_a_removed_barrier_is_caught(tmp_path):
    # ties_merge's any-E kernel stages the row's means and weights in shared memory, then a barrier, then every
    # thread reads them. A copy without that barrier must fail the emulated cases (issue 16's mutation check).
    mutant = _without_barrier(tmp_path, "ties_merge", "weights_of_row<0>(a, E, b, s_w);  // a max over E")
    exe = build(tmp_path, ["ties_merge", "kv_quant2"], "ties_kv_main.cpp", "ties_merge.cpp", "kv_quant2.cpp",
                root=mutant)
    done = run(exe, "after")
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert done.returncode != 0 and any("generic kernel" in line for line in failed), done.stdout


# soft_embed stages a row's packet in shared memory, `n` entries per tile: threads below n read ids / probs.
@pytest.mark.parametrize("guard, old, new, where", [
    # A bounds check off by one: thread n reads ids[b, k], one element past the last row's end.
    ("after", "if (threadIdx.x < n) {", "if (threadIdx.x <= n) {", "past the end of"),
    # An index off by one: thread 0 reads ids[b, -1], one element before the first row's start.
    ("before", "load_id(row_ids, i0 + threadIdx.x);", "load_id(row_ids, i0 + threadIdx.x - 1);",
     "before the start of"),
], ids=["read past the end", "read before the start"])
def test_an_out_of_bounds_read_is_caught(tmp_path, guard, old, new, where):
    mutant = _mutant(tmp_path, "soft_embed", old, new)
    exe = build(tmp_path, ["soft_embed"], "soft_embed_main.cpp", root=mutant)
    done = run(exe, guard)
    assert done.returncode == -signal.SIGSEGV, outcome(done)
    assert f"bytes {where} a guarded buffer" in done.stderr, done.stderr
    assert "in kernel soft_embed_kernel launched at" in done.stderr and "soft_embed.cu" in done.stderr, done.stderr


def test_a_misaligned_vector_load_is_caught(tmp_path):
    # topk_partial loads 8 logits with 16-byte loads only when the segment starts on a 16-byte boundary. Without
    # that test a bf16 row of odd length (row 1 of [2, 4999] starts 14 bytes past one) is read with a misaligned
    # uint4 load: a fault on the GPU, an abort naming the kernel in the emulation.
    mutant = _mutant(tmp_path, "topk_packet", "nvalid == kItems && (reinterpret_cast<uintptr_t>(x) & 15u) == 0",
                     "nvalid == kItems")
    exe = build(tmp_path, ["topk_packet"], "topk_packet_main.cpp", "topk_packet.cpp", root=mutant)
    done = run(exe, "after")
    assert done.returncode == -signal.SIGABRT, outcome(done)
    assert "misaligned 16-byte access" in done.stderr and "in kernel topk_partial<T> launched at" in done.stderr
    assert "topk_packet.cu" in done.stderr, done.stderr
