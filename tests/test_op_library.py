"""The ops as torch.library custom ops: torch.compile(fullgraph=True), torch.export, opcheck, the eager fast
path, and the device-side error records (read on the CPU here: no GPU on most machines)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dlmom
from dlmom import op_library as lib
from dlmom import ops

torch.manual_seed(0)


def _inputs():
    g = torch.Generator().manual_seed(1)
    V, D = 37, 19
    weight = torch.randn(V, D, generator=g)
    ids = torch.randint(0, V, (3, 5), generator=g)
    probs = torch.softmax(torch.randn(3, 5, generator=g), -1)
    logits = torch.randn(3, 2, 41, generator=g)  # [E, B, V]
    weights = torch.rand(3, 2, generator=g)
    x = torch.randn(2, 3, 11, 7, generator=g)
    return ids, probs, weight, logits, weights, x


def _all_ops(ids, probs, weight, logits, weights, x):
    e = dlmom.soft_embed(ids, probs, weight, scale=1.5)
    packet = dlmom.topk_packet(logits[0], 4, temperature=0.7, top_p=0.9)
    merged = dlmom.ties_merge(logits, theta=0.1, elect="mass", weights=weights)
    merged1 = dlmom.ties_merge(logits, weights=weights[:, 0])
    q = dlmom.kv_quant2(x, group_size=4, axis=-2)
    back = dlmom.kv_dequant2(q)
    return e, packet.ids, packet.probs, packet.entropy, merged, merged1, q.codes, q.scale, q.zero, back


def test_compile_fullgraph_matches_eager():
    inputs = _inputs()
    eager = _all_ops(*inputs)
    compiled = torch.compile(_all_ops, fullgraph=True, backend="inductor")(*inputs)
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_export_holds_the_ops():
    class Step(torch.nn.Module):
        def forward(self, ids, probs, weight, logits, weights, x):
            return _all_ops(ids, probs, weight, logits, weights, x)

    inputs = _inputs()
    program = torch.export.export(Step(), inputs)
    called = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    for name in ("soft_embed", "topk_packet", "ties_merge", "kv_quant2", "kv_dequant2"):
        assert f"dlmom.{name}.default" in called
    for a, b in zip(_all_ops(*inputs), program.module()(*inputs)):
        assert torch.equal(a, b)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every other element of a wider tensor)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("contiguous", [True, False])
def test_opcheck(contiguous):
    ids, probs, weight, logits, weights, x = _inputs()
    f = (lambda t: t) if contiguous else _strided
    x3 = x.reshape(6, 11, 7)
    codes, scale, zero = torch.ops.dlmom.kv_quant2(x3, 4)
    cases = [
        (torch.ops.dlmom.soft_embed, (f(ids), f(probs), f(weight), 1.5)),
        (torch.ops.dlmom.topk_packet, (f(logits[0]), 4, 0.7, 0.9)),
        (torch.ops.dlmom.ties_merge, (f(logits), f(weights), 0.1, True)),
        (torch.ops.dlmom.ties_merge, (f(logits), None, 0.0, False)),
        (torch.ops.dlmom.ties_merge, (f(logits.half()), f(weights[:, 0].bfloat16()), 0.0, False)),
        (torch.ops.dlmom.kv_quant2, (f(x3), 4)),
        (torch.ops.dlmom.kv_quant2, (f(x3.bfloat16()), 3)),
        (torch.ops.dlmom.kv_dequant2, (f(codes), f(scale), f(zero), 4, 11, torch.float16)),
    ]
    for op, args in cases:
        if not contiguous:
            assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args)
        torch.library.opcheck(op, args)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_modes_see_the_op_and_get_the_fast_path_result():
    ids, probs, weight, logits, weights, x = _inputs()
    fast = _all_ops(ids, probs, weight, logits, weights, x)
    with _Recorder() as rec:
        seen = _all_ops(ids, probs, weight, logits, weights, x)
    for name in ("soft_embed", "topk_packet", "ties_merge", "kv_quant2", "kv_dequant2"):
        assert f"dlmom.{name}.default" in rec.names
    for a, b in zip(fast, seen):
        assert torch.equal(a, b)


def test_fast_path_only_for_plain_eager_tensors():
    t = torch.ones(2)
    assert lib.eager(t, None)
    assert lib.eager(torch.nn.Parameter(t, requires_grad=False))
    assert not lib.eager(torch.ones(2, requires_grad=True))
    with torch.no_grad():
        assert lib.eager(torch.ones(2, requires_grad=True))
    with _Recorder():
        assert not lib.eager(t)


def test_cpu_value_errors_raise_at_once():
    ids, probs, weight, logits, weights, x = _inputs()
    logits[1, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="ties_merge: logits must be finite or -inf, got NaN or \\+inf"):
        torch.ops.dlmom.ties_merge(logits, None, 0.0, False)
    weights[2, 1] = -1.0
    with pytest.raises(ValueError, match=r"weights must be finite and >= 0, got \[\[.*\], \[.*-1\.0\]\]"):
        dlmom.ties_merge(torch.randn(3, 2, 5), weights=weights)
    ids[2, 4] = 37
    with pytest.raises(ValueError, match=r"soft_embed: ids must be in \[0, V=37\), got 37 at \[2, 4\]"):
        torch.ops.dlmom.soft_embed(ids, probs, weight, 1.0)


@pytest.mark.parametrize("record, message", [
    ((1, 70000, 50257, 0), r"soft_embed: ids must be in \[0, V=50257\), got 70000"),
    ((2, 3, 0, 0), "topk_packet: logits must be finite or -inf with .*; row 3 holds NaN, \\+inf or only -inf"),
    ((3, 1, 2, 0), r"ties_merge: logits must be -inf or finite with \|x\| <= 2\^96 .* row 2 of expert 1"),
    ((3, 1, 2, 1), r"ties_merge: logits must be finite or -inf, got NaN or \+inf \(in row 2 of expert 1\)"),
    ((4, 0, 5, 0xBF800000), r"ties_merge: weights must be finite and >= 0, got -1.0 at \[0, 5\]"),
    ((5, 2, 1, 4), "kv_quant2: x must be finite, got NaN or inf"),
])
def test_pending_device_errors_raise_once(monkeypatch, record, message):
    # A status buffer as a CUDA kernel leaves it (here on the CPU): read, raised with its message, cleared.
    buf = torch.tensor(record, dtype=torch.int64)
    monkeypatch.setattr(lib, "_status_buffers", {torch.device("cpu"): buf})
    with pytest.raises(ValueError, match=message):
        ops.raise_pending_errors()
    assert buf.tolist() == [0, 0, 0, 0]
    ops.raise_pending_errors()  # nothing left
    ops.raise_pending_errors("cpu")  # CPU kernels raise at once: never anything pending


def test_strict_mode_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("DLMOM_STRICT_OPS", raising=False)
    assert not lib.strict_ops()
    monkeypatch.setenv("DLMOM_STRICT_OPS", "0")
    assert not lib.strict_ops()
    monkeypatch.setenv("DLMOM_STRICT_OPS", "1")
    assert lib.strict_ops()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_value_errors_are_deferred_then_raised(monkeypatch):
    monkeypatch.delenv("DLMOM_STRICT_OPS", raising=False)
    logits = torch.randn(2, 50, device="cuda")
    logits[1, 7] = float("nan")
    dlmom.topk_packet(logits, 3)  # no sync, no error yet
    with pytest.raises(ValueError, match="row 1 holds NaN"):
        ops.raise_pending_errors("cuda")
    ops.raise_pending_errors("cuda")
    monkeypatch.setenv("DLMOM_STRICT_OPS", "1")
    with pytest.raises(ValueError, match="row 1 holds NaN"):
        dlmom.topk_packet(logits, 3)
