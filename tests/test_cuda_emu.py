"""The CUDA kernels without a GPU: csrc/cuda/<op>.cu compiled as host C++ with the tests/cuda_emu harness (every
thread of a block a ucontext fiber, in an order shuffled between barriers; shared memory, __syncthreads, warp
shuffles, atomics and the cub block
primitives emulated; see tests/cuda_emu/cuda_emu.h) and run against a reference: soft_embed against an fp64 sum,
topk_packet against the CPU kernel (same ids, probs to 1e-6 and bit for bit at exact ties, entropy to 1e-5,
the device error record), ties_merge (to 1e-5) and kv_quant2 / kv_dequant2 (exactly) against theirs. This checks the kernels' logic (indexing, barriers, merges, tie order, the precision
of the sums), not the GPU's float rounding order or timing; tests/test_cuda_divergences.py runs on the GPU.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
CXX = shutil.which(os.environ.get("CXX", "g++"))
pytestmark = pytest.mark.skipif(CXX is None or not sys.platform.startswith("linux"),
                                reason="the emulation needs g++ and glibc's ucontext")


def build(tmp: pathlib.Path, ops: list[str], main: str, *cpu_sources: str) -> pathlib.Path:
    """csrc/cuda/<op>.cu of each op rewritten for the emulation, linked with tests/cuda_emu/<main> and the given
    CPU kernels (csrc/cpu/<name>)."""
    sources = []
    for op in ops:
        src = tmp / f"{op}_emu.cpp"
        subprocess.run([sys.executable, str(EMU / "emu_source.py"), str(ROOT / "csrc" / "cuda" / f"{op}.cu"),
                        str(src)], check=True)
        sources.append(str(src))
    exe = tmp / main.replace(".cpp", "")
    cmd = [CXX, "-std=c++17", "-O1", "-fopenmp", "-include", str(EMU / "cuda_emu.h"), "-I", str(EMU / "include"),
           "-I", str(ROOT / "csrc"), "-I", str(ROOT / "csrc" / "cuda"), *sources, str(EMU / main),
           *(str(ROOT / "csrc" / "cpu" / name) for name in cpu_sources), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"compiling the emulated {ops} failed:\n{done.stderr[-4000:]}"
    return exe


def run_cases(exe: pathlib.Path, at_least: int) -> list[str]:
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = done.stdout.splitlines()
    failed = [line for line in lines if not line.startswith("ok ")]
    assert done.returncode == 0 and not failed, "\n".join(failed) + done.stderr[-2000:]
    assert len(lines) >= at_least, done.stdout  # every case reported
    return lines


def test_soft_embed_emulated(tmp_path):
    lines = run_cases(build(tmp_path, ["soft_embed"], "soft_embed_main.cpp"), at_least=8)
    # The harness's own checks ran too: a divergent barrier is reported, shuffles sum right.
    assert any("divergent __syncthreads" in line for line in lines)


def test_topk_packet_emulated(tmp_path):
    lines = run_cases(build(tmp_path, ["topk_packet"], "topk_packet_main.cpp", "topk_packet.cpp"), at_least=10)
    assert any("exact ties top_p 0.8" in line and "keeps 40" in line for line in lines)


def test_ties_merge_and_kv_quant2_emulated(tmp_path):
    exe = build(tmp_path, ["ties_merge", "kv_quant2"], "ties_kv_main.cpp", "ties_merge.cpp", "kv_quant2.cpp")
    run_cases(exe, at_least=8)


def _without_barrier(tmp: pathlib.Path, op: str, marker: str) -> pathlib.Path:
    """A copy of csrc/cuda/<op>.cu whose ``__syncthreads();`` on the line holding ``marker`` (the line after
    it when the marker is a comment line) is removed; a fake source root with the rest of csrc linked."""
    root = tmp / "mutant"
    (root / "csrc" / "cuda").mkdir(parents=True)
    for entry in (ROOT / "csrc").iterdir():
        if entry.name != "cuda":
            (root / "csrc" / entry.name).symlink_to(entry)
    for entry in (ROOT / "csrc" / "cuda").iterdir():
        if entry.name != f"{op}.cu":
            (root / "csrc" / "cuda" / entry.name).symlink_to(entry)
    lines = (ROOT / "csrc" / "cuda" / f"{op}.cu").read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if marker in line)
    at = at if "__syncthreads();" in lines[at] else at + 1
    assert lines[at].strip() == "__syncthreads();", lines[at]
    lines[at] = lines[at].replace("__syncthreads();", ";  // removed by the mutation test")
    (root / "csrc" / "cuda" / f"{op}.cu").write_text("".join(lines))
    return root


def test_a_removed_barrier_is_caught(tmp_path, monkeypatch):
    # ties_merge's any-E kernel stages the row's means and weights in shared memory, then a barrier, then every
    # thread reads them. A copy without that barrier must fail the emulated cases (issue 16's mutation check).
    mutant = _without_barrier(tmp_path, "ties_merge", "weights_of_row<0>(a, E, b, s_w);  // a max over E")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", mutant)
    exe = build(tmp_path, ["ties_merge", "kv_quant2"], "ties_kv_main.cpp", "ties_merge.cpp", "kv_quant2.cpp")
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert done.returncode != 0 and any("generic kernel" in line for line in failed), done.stdout
