"""The package imports without a GPU, reports what was built, and honours DLMOM_BACKEND."""
import os
import subprocess
import sys

import pytest
import torch

import dlmom
from dlmom import ops


def test_backend_info_reports_cpu_kernels():
    info = dlmom.backend_info()
    assert info["version"] == dlmom.__version__
    assert info["cpu_kernels"] is True, "dlmom._C was not built: the CPU kernels are always part of the build"
    assert info["cuda_available"] == torch.cuda.is_available()
    assert set(info["ops"]) == set(dlmom.OPS)
    for op, impl in info["ops"].items():
        assert impl["cpu"] == "cpu-kernel", op
        assert impl["cuda"] == ("cuda-kernel" if info["cuda_kernels_compiled"] else
                                "reference (CUDA kernels not compiled)"), op
    if info["cuda_kernels_compiled"]:
        assert info["cuda_architectures"], "a CUDA build lists its architectures"


def test_import_and_cpu_ops_work_without_gpu():
    # A fresh interpreter that cannot see any GPU still imports dlmom and runs a CPU kernel.
    code = ("import torch, dlmom; w = torch.randn(11, 4); e = dlmom.soft_embed(torch.tensor([[1]]), "
            "torch.ones(1, 1), w); assert torch.equal(e, w[1:2]); print(dlmom.backend_info()['cuda_available'])")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_reference_backend_is_forced_by_env(monkeypatch):
    monkeypatch.setenv("DLMOM_BACKEND", "reference")
    assert all(impl == {"cpu": "reference", "cuda": "reference"} for impl in dlmom.backend_info()["ops"].values())
    assert ops._kernels_for("topk_packet", torch.zeros(1)) is None


def test_unknown_backend_value_is_an_error(monkeypatch):
    monkeypatch.setenv("DLMOM_BACKEND", "fast")
    with pytest.raises(ValueError, match="DLMOM_BACKEND must be one of"):
        dlmom.topk_packet(torch.randn(2, 5), 1)


def test_kernel_errors_surface_as_value_error():
    # The binding checks again: a direct call with a wrong rank raises instead of crashing.
    mod = ops.native_module("cpu")
    x = torch.randn(4, 9)
    ids, probs, ent = torch.empty(4, 2, dtype=torch.int64), torch.empty(4, 2), torch.empty(4)
    with pytest.raises(ValueError, match="topk_packet"):
        mod.topk_packet(ops._view(x.view(-1)), 2, 1.0, 1.0, ops._view(ids), ops._view(probs), ops._view(ent))
