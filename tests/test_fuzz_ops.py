"""Property-based fuzzing (Hypothesis) of the five ops: the kernels against dlmom.reference.

Each op is fuzzed in a child process (``python tests/test_fuzz_ops.py <op>``), so that a crash in native code
(a segfault, an abort) fails that op's test here instead of killing the test run. The child draws shapes
(0 and odd sizes), dtypes, layouts (transposed, permuted, stride-0 expanded, sliced with a step, padded rows,
offset views, out sharing memory with an input), magnitudes (tiny, subnormal, near the dtype's maximum, mixed),
-inf masks, NaN / +inf, and every parameter (valid and not), then checks:
  - validity: the kernels and DLMOM_BACKEND=reference both return, or both raise ValueError naming the op;
    any other exception is a failure;
  - values: against dlmom.reference (bit for bit for kv_quant2 / kv_dequant2, else per-dtype tolerances),
    and properties that hold whatever the oracle says (finite results, probabilities that sum to 1, each
    element within half a quantisation step).

DLMOM_FUZZ_EXAMPLES (default 200) is the number of examples per op. The search is derandomised, so a run is
reproducible, and writes no example database. Long run: ``DLMOM_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz_ops.py``.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import dlmom
from dlmom import reference
from dlmom.op_types import QuantizedKV

OPS = ("soft_embed", "topk_packet", "ties_merge", "kv_quant2", "kv_dequant2")
EXAMPLES = int(os.environ.get("DLMOM_FUZZ_EXAMPLES", "200"))
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
F32_EPS = torch.finfo(torch.float32).eps


# ---- the pytest side: one child process per op ----

@pytest.mark.parametrize("op", OPS)
def test_fuzz(op, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DLMOM_BACKEND"}
    env["DLMOM_FUZZ_EXAMPLES"] = str(EXAMPLES)
    # -W error as pytest's filterwarnings; cwd a temporary folder, so nothing lands in the repository.
    cmd = [sys.executable, "-W", "error", os.path.abspath(__file__), op]
    timeout = 240 + 2 * EXAMPLES
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"fuzzing {op} ran past {timeout} s; its output:\n{out[-6000:]}")
    out = proc.stdout + proc.stderr
    how = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    assert proc.returncode == 0, f"fuzzing {op} failed ({how}); its output:\n{out[-12000:]}"
    assert f"fuzz {op}: {EXAMPLES} examples passed" in out, out[-3000:]


# ---- values and layouts ----

def subnormal_min(dtype):
    f = torch.finfo(dtype)
    return f.tiny * f.eps


def pool(dtype):
    """Interesting finite values of dtype: the same length for every dtype (specs hold indices into it)."""
    f = torch.finfo(dtype)
    return [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -3.0, 7.0, 0.1, -0.7, f.tiny, -f.tiny, subnormal_min(dtype),
            -3 * subnormal_min(dtype), f.max, -f.max, f.max / 2, -0.75 * f.max, 0.999 * f.max, 1000.0, -12.25,
            f.max / 3, 2.0 ** 12, 1.0 + f.eps]


POOL_LEN = len(pool(torch.float32))
KINDS = ("normal", "ints", "pool", "tiny", "huge", "mixed", "const")


@st.composite
def value_specs(draw, *, masks=False):
    """How to fill a tensor: a kind of values, a seed, optional -inf masks."""
    kind = draw(st.sampled_from(KINDS))
    items = draw(st.lists(st.integers(0, POOL_LEN - 1), min_size=1, max_size=24)) if kind == "pool" else None
    mask = draw(st.sampled_from([0.0, 0.0, 0.0, 0.3, 0.9, 1.0])) if masks else 0.0
    return dict(kind=kind, seed=draw(st.integers(0, 2 ** 16)), items=items, mask=mask)


def make_values(spec, shape, dtype):
    """A float64 tensor of ``shape`` whose values are exact in ``dtype`` (all finite, -inf where masked)."""
    g = torch.Generator().manual_seed(spec["seed"])
    n = math.prod(shape)
    f = torch.finfo(dtype)
    kind = spec["kind"]
    if kind == "normal":
        v = torch.randn(n, generator=g, dtype=torch.float64) * 3
    elif kind == "ints":
        v = torch.randint(-3, 4, (n,), generator=g).double()
    elif kind == "pool":
        p = torch.tensor(pool(dtype), dtype=torch.float64)
        idx = torch.tensor(spec["items"])
        v = p[idx.repeat(n // len(idx) + 1)[:n]] if n else p[:0]
    elif kind == "tiny":
        v = torch.randn(n, generator=g, dtype=torch.float64) * f.tiny
    elif kind == "huge":
        sign = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        v = sign * f.max * (0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64))
    elif kind == "mixed":  # random signs and exponents over the whole range of the dtype
        lo, hi = math.log2(subnormal_min(dtype)), math.log2(f.max)
        e = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
        v = (torch.randint(0, 2, (n,), generator=g).double() * 2 - 1) * torch.pow(2.0, e)
    else:
        v = torch.full((n,), float(torch.randn(1, generator=g, dtype=torch.float64)) * 5)
    v = v.clamp(-f.max, f.max).to(dtype).double()
    if spec["mask"] > 0 and n:
        v[torch.rand(n, generator=g) < spec["mask"]] = -math.inf
    return v.view(shape)


LAYOUTS = ("contig", "contig", "step", "rowpad", "T", "perm", "offset", "expand", "overlap")


@st.composite
def layouts(draw):
    return dict(layout=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 1000)))


def garbage(dtype):
    return math.nan if dtype.is_floating_point else (255 if dtype == torch.uint8 else -77)


def place(v: torch.Tensor, lay) -> torch.Tensor:
    """A tensor with the values of v (for "expand": of v's first slice along a dim) in the drawn layout; the
    memory around the view holds garbage, so a kernel that reads past the view shows."""
    layout, shape, dt = lay["layout"], tuple(v.shape), v.dtype
    if v.dim() == 0:
        return v.clone()
    if layout == "step":
        buf = torch.full((*shape[:-1], 2 * shape[-1] + 1), garbage(dt), dtype=dt)
        view = buf[..., 1::2]
    elif layout == "rowpad":
        buf = torch.full((*shape[:-1], shape[-1] + 3), garbage(dt), dtype=dt)
        view = buf[..., : shape[-1]]
    elif layout == "T" and v.dim() >= 2:
        view = torch.full((*shape[:-2], shape[-1], shape[-2]), garbage(dt), dtype=dt).transpose(-1, -2)
    elif layout == "perm" and v.dim() >= 2:
        perm = torch.randperm(v.dim(), generator=torch.Generator().manual_seed(lay["seed"])).tolist()
        inv = [perm.index(i) for i in range(v.dim())]
        view = torch.full([shape[p] for p in perm], garbage(dt), dtype=dt).permute(inv)
    elif layout == "offset":
        view = torch.full((v.numel() + 5,), garbage(dt), dtype=dt)[5:].view(shape)
    elif layout == "expand":
        dims = [d for d in range(v.dim()) if shape[d] > 1]
        if not dims:
            return v.clone()
        d = dims[lay["seed"] % len(dims)]
        return v.narrow(d, 0, 1).clone().expand(shape)  # stride 0 along d
    elif layout == "overlap" and v.dim() >= 2 and shape[-1] >= 2 and v.numel():
        # Rows that share elements: row stride n // 2 < n (an input only; its values come from v's first ones).
        strides, step = [1], max(1, shape[-1] // 2)
        for d in range(v.dim() - 2, -1, -1):
            strides.insert(0, step if d == v.dim() - 2 else strides[0] * shape[d + 1])
        need = sum((n - 1) * st for n, st in zip(shape, strides)) + 1
        return v.reshape(-1)[:need].clone().as_strided(shape, strides)
    else:
        return v.clone()
    view.copy_(v)
    return view


def describe(**tensors) -> str:
    parts = []
    for name, t in tensors.items():
        if name.startswith("_"):
            continue
        if isinstance(t, torch.Tensor):
            parts.append(f"{name}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} strides {t.stride()}")
        else:
            parts.append(f"{name}: {t!r}")
    return "; ".join(parts)


# ---- running both backends ----

def outcome(op, fn):
    """("ok", result) or ("ValueError", message). Any other exception propagates: a failure."""
    try:
        return "ok", fn()
    except ValueError as e:
        assert str(e).startswith(f"{op}: "), f"a ValueError that does not name {op}: {e}"
        return "ValueError", str(e)


def both(op, build, call):
    """The op on fresh inputs from build(), with the kernels and with DLMOM_BACKEND=reference: the two
    outcomes, which must agree on validity. Returns (inputs, kernel result, reference result) or None."""
    inputs = build()
    note(describe(**inputs))
    got = outcome(op, lambda: call(**inputs))
    os.environ["DLMOM_BACKEND"] = "reference"
    try:
        ref_inputs = build()
        want = outcome(op, lambda: call(**ref_inputs))
    finally:
        del os.environ["DLMOM_BACKEND"]
    assert got[0] == want[0], f"kernel: {got[0]} {got[1] if got[0] != 'ok' else ''}; " \
                              f"reference: {want[0]} {want[1] if want[0] != 'ok' else ''}"
    if got[0] != "ok":
        note(f"both raise: {got[1]}")
        COUNT["refused"] += 1
        return None
    return inputs, got[1], want[1]


def fuzz_settings(fn):
    return settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))(fn)


def same_nonfinite(a: torch.Tensor, b: torch.Tensor, what: str):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN at different places"
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    assert torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b]), f"{what}: inf at different places"


class Params:
    """Draws an example's parameters: all valid, or (about one example in four) exactly one field, the drawn
    ``bad``, from its invalid choices, so that most examples reach the values."""

    def __init__(self, data, bad_fields):
        self.data = data
        self.bad = data.draw(st.sampled_from([None] * (3 * len(bad_fields)) + list(bad_fields)), label="bad")

    def pick(self, name, valid, invalid=()):
        return self.data.draw(st.sampled_from(list(invalid) if self.bad == name else list(valid)), label=name)

    def draw(self, name, strategy):
        return self.data.draw(strategy, label=name)


COUNT = {"n": 0, "refused": 0}


def passed():
    COUNT["n"] += 1


# ---- soft_embed ----

@fuzz_settings
@given(st.data())
def fuzz_soft_embed(data):
    p = Params(data, ["k", "V", "bad_id", "ids_dtype", "weight_dtype", "scale", "out"])
    r = dict(
        batch=p.draw("batch", st.lists(st.sampled_from([0, 1, 2, 3, 5]), max_size=2)),
        k=p.pick("k", [1, 1, 2, 3, 5, 8], [0]),
        V=p.pick("V", [1, 2, 5, 17, 100], [0]),
        D=p.pick("D", [1, 3, 8, 33, 64, 0, 4099]),
        ids_dtype=p.pick("ids_dtype", [torch.int64, torch.int32], [torch.float32, torch.int16]),
        probs_dtype=p.pick("probs_dtype", FLOATS),
        weight_dtype=p.pick("weight_dtype", FLOATS, [torch.float64]),
        probs=p.draw("probs", value_specs()), weight=p.draw("weight", value_specs()),
        ids_seed=p.draw("ids_seed", st.integers(0, 1000)),
        bad_id=p.pick("bad_id", [None], [-1, "V"]),
        scale=p.pick("scale", [1.0, 1.0, 0.0, -2.5, 8.0, 45.254833995939045, 1e-30, 1e30, 3e38],
                     [math.nan, math.inf, "2"]),
        out=p.pick("out", ["none", "none", "fresh", "strided", "weight", "probs"], ["expand", "dtype", "shape"]),
        ids_layout=p.draw("ids_layout", layouts()), probs_layout=p.draw("probs_layout", layouts()),
        weight_layout=p.draw("weight_layout", layouts()))
    ids_shape = (*r["batch"], r["k"])

    def build():
        g = torch.Generator().manual_seed(r["ids_seed"])
        ids = torch.randint(0, max(r["V"], 1), ids_shape, generator=g)
        if ids.numel() and r["bad_id"] is not None:
            ids.view(-1)[int(torch.randint(0, ids.numel(), (1,), generator=g))] = -1 if r["bad_id"] == -1 else r["V"]
        ids = place(ids.to(r["ids_dtype"]), r["ids_layout"])
        probs = place(make_values(r["probs"], ids_shape, r["probs_dtype"]).to(r["probs_dtype"]), r["probs_layout"])
        wd = r["weight_dtype"] if r["weight_dtype"] in FLOATS else torch.float32  # values of a float dtype
        weight = place(make_values(r["weight"], (r["V"], r["D"]), wd).to(r["weight_dtype"]), r["weight_layout"])
        out_shape, wd = (*r["batch"], r["D"]), r["weight_dtype"]
        out = None
        if r["out"] == "fresh":
            out = torch.full(out_shape, garbage(wd), dtype=wd)
        elif r["out"] == "strided":
            out = place(torch.zeros(out_shape, dtype=wd), dict(layout="step", seed=0))
        elif r["out"] in ("weight", "probs"):  # the first elements of that input's storage, as out
            src = weight if r["out"] == "weight" else probs
            n = math.prod(out_shape)
            if src.dtype == wd and src.is_contiguous() and src.numel() >= n:
                out = src.reshape(-1)[:n].view(out_shape)
            else:
                out = torch.zeros(out_shape, dtype=wd)
        elif r["out"] == "expand" and math.prod(out_shape) > r["D"]:
            out = torch.zeros(r["D"], dtype=wd).expand(out_shape)
        elif r["out"] == "dtype":
            out = torch.zeros(out_shape, dtype=torch.float64)
        elif r["out"] == "shape":
            out = torch.zeros(*out_shape[:-1], r["D"] + 1, dtype=wd)
        # inputs as they are before the call (out may be one of them)
        return dict(ids=ids, probs=probs, weight=weight, scale=r["scale"], out=out,
                    _orig=(ids.clone(), probs.clone(), weight.clone()))

    res = both("soft_embed", build, lambda ids, probs, weight, scale, out, _orig: dlmom.soft_embed(
        ids, probs, weight, scale=scale, out=out))
    if res is None:
        return passed()
    inputs, got, want = res
    assert got.shape == want.shape == (*r["batch"], r["D"]) and got.dtype == want.dtype == r["weight_dtype"]
    if inputs["out"] is not None:
        assert got is inputs["out"], "soft_embed did not return out"
    ids0, probs0, weight0 = inputs["_orig"]
    check_soft_embed(got, ids0, probs0, weight0, r["scale"], "kernel")
    check_soft_embed(want, ids0, probs0, weight0, r["scale"], "reference")
    passed()


def check_soft_embed(got, ids, probs, weight, scale, who):
    """got against the float64 value: the error fp32 accumulation may make (k eps |scale| sum |p w|, plus
    fp32 underflow of the products) and the rounding to the output dtype."""
    dt = got.dtype
    rows = weight.double()[ids.long()]  # [..., k, D]
    p = probs.double().unsqueeze(-1)
    exact = scale * (p * rows).sum(-2)
    mag = abs(scale) * (p.abs() * rows.abs()).sum(-2)
    k = ids.shape[-1]
    f = torch.finfo(dt)
    bound = 4 * k * F32_EPS * mag + k * abs(scale) * 2.0 ** -126 + f.eps * exact.abs() + subnormal_min(dt)
    g = got.double()
    representable = exact.abs() <= f.max * (1 - f.eps)
    err = (g - exact).abs()
    ok = torch.where(representable, err <= bound, (g.abs() >= f.max * (1 - 2 * f.eps)) & (g * exact >= 0))
    bad = ~ok
    assert not bool(bad.any()), (f"soft_embed ({who}): {int(bad.sum())} values off, e.g. got {g[bad][:4].tolist()}"
                                 f" for {exact[bad][:4].tolist()} (bound {bound[bad][:4].tolist()})")


# ---- topk_packet ----

V_CHOICES = [1, 2, 3, 7, 64, 1000, 1025, 5000, 40000]


@fuzz_settings
@given(st.data())
def fuzz_topk_packet(data):
    p = Params(data, ["k", "poison", "temperature", "top_p"])
    r = dict(
        batch=p.draw("batch", st.lists(st.sampled_from([0, 1, 2, 3]), max_size=2)),
        V=p.pick("V", V_CHOICES[:5] * 6 + V_CHOICES[5:]),
        k=p.pick("k", [1, 2, 3, "V", "half"], [0, "V+1", 2.0, True]),
        dtype=p.pick("dtype", FLOATS), values=p.draw("values", value_specs(masks=True)),
        poison=p.pick("poison", [None], ["nan", "inf", "row-inf"]), poison_seed=p.draw("seed", st.integers(0, 1000)),
        temperature=p.pick("temperature", [1.0, 1.0, 0.0, 1e-45, 1e-40, 1e-30, 1e-60, 0.5, 2.0, 1e30],
                           [-1.0, math.nan, math.inf]),
        top_p=p.pick("top_p", [1.0, 1.0, 0.9, 0.5, 0.05, 1e-9], [0.0, 1.5, math.nan]),
        layout=p.draw("layout", layouts()))
    V = r["V"]
    k = {"V": V, "half": V // 2 + 1, "V+1": V + 1}.get(r["k"], r["k"]) if isinstance(r["k"], str) else r["k"]
    if p.bad != "k":
        k = min(k, V)
    shape = (*r["batch"], V)

    def build():
        x = make_values(r["values"], shape, r["dtype"])
        if x.numel() and r["values"]["mask"] < 1:  # a finite logit per row (an all -inf row is "poison")
            rows = x.view(-1, V)
            keep = torch.randint(0, V, (rows.shape[0],), generator=torch.Generator().manual_seed(r["poison_seed"]))
            fill = make_values(dict(r["values"], mask=0.0), (rows.shape[0], V), r["dtype"])
            rows[torch.arange(rows.shape[0]), keep] = fill[torch.arange(rows.shape[0]), keep]
        if x.numel() and r["poison"]:
            g = torch.Generator().manual_seed(r["poison_seed"])
            i = int(torch.randint(0, x.numel(), (1,), generator=g))
            if r["poison"] == "row-inf":
                x.view(-1, V)[i // V] = -math.inf
            else:
                x.view(-1)[i] = math.nan if r["poison"] == "nan" else math.inf
        return dict(logits=place(x.to(r["dtype"]), r["layout"]), k=k, temperature=r["temperature"], top_p=r["top_p"])

    res = both("topk_packet", build, lambda logits, k, temperature, top_p: dlmom.topk_packet(
        logits, k, temperature=temperature, top_p=top_p))
    if res is None:
        return passed()
    inputs, got, want = res
    x = inputs["logits"].reshape(-1, V).float()
    for name in ("ids", "probs", "entropy"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    ids, ref_ids = got.ids.reshape(-1, k), want.ids.reshape(-1, k)
    # the right logits (best first), then the right ids (ties: lower id first)
    assert torch.equal(x.gather(-1, ids), x.gather(-1, ref_ids)), "topk_packet: different top-k values"
    assert torch.equal(ids, ref_ids), "topk_packet: different ids"
    assert bool(torch.isfinite(x.gather(-1, ids[:, :1])).all()), "a -inf logit chosen first"
    torch.testing.assert_close(got.entropy, want.entropy, atol=1e-5, rtol=1e-5)
    assert bool(((got.entropy >= 0) & (got.entropy <= 1 + 1e-5)).all())
    probs, ref_probs = got.probs.reshape(-1, k), want.probs.reshape(-1, k)
    assert bool(torch.isfinite(probs).all()), "topk_packet: non-finite probabilities"
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]), atol=1e-5, rtol=1e-5)
    kept, ref_kept = probs > 0, ref_probs > 0
    assert bool((kept[:, 1:] <= kept[:, :-1]).all()), "kept entries are not a prefix"
    # Where the kept sets differ, the mass before the entry must be within rounding of top_p.
    fragile = (kept != ref_kept).any(-1)
    if bool(fragile.any()):
        t = float(torch.tensor(r["temperature"], dtype=torch.float32))
        vals = x.gather(-1, ref_ids).double()
        if t > 0:
            p = torch.softmax((vals - vals[:, :1]) / t, -1)
            before = p.cumsum(-1) - p
            near = ((before - r["top_p"]).abs() < 1e-5) & (kept != ref_kept)
            assert bool((near.any(-1) | ~fragile).all()), "topk_packet: top-p kept different entries"
        else:
            raise AssertionError("topk_packet: temperature 0 kept different entries")
    torch.testing.assert_close(probs[~fragile], ref_probs[~fragile], atol=1e-5, rtol=1e-5)
    passed()


# ---- ties_merge ----

@fuzz_settings
@given(st.data())
def fuzz_ties_merge(data):
    p = Params(data, ["E", "V", "poison", "theta", "elect", "weights", "dtype"])
    r = dict(
        E=p.pick("E", [1, 2, 3, 4, 5, 9], [0]),
        batch=p.draw("batch", st.lists(st.sampled_from([0, 1, 2, 3]), max_size=2)),
        V=p.pick("V", [1, 2, 3, 7, 33, 100] * 4 + [4097, 4097, 16385], [0]),
        dtype=p.pick("dtype", FLOATS, [torch.float64]),
        grid=p.draw("grid", st.booleans()), grid_exp=p.pick("grid_exp", [0, 0, -100, -10, 12, 40, 93]),
        values=p.draw("values", value_specs(masks=True)),
        poison=p.pick("poison", [None], ["nan", "inf", "big"]), poison_seed=p.draw("seed", st.integers(0, 1000)),
        theta=p.pick("theta", [0.0, 0.0, 0.25, 0.5, 1.0, 1e-30, 1e30], [-1.0, math.nan, math.inf]),
        elect=p.pick("elect", ["vote", "mass"], ["other"]),
        weights=p.pick("weights", [None, "pool"], ["negative", "nan", "shape"]),
        weight_items=p.draw("weight_items", st.lists(st.sampled_from(
            [0.0, 1.0, 0.5, 2.0, 0.25, 3.0, 2.0 ** -130, 1e-45, 1e-30, 3e38, 2.0 ** 120]), min_size=10, max_size=10)),
        weight_dtype=p.pick("weight_dtype", FLOATS), weight_layout=p.pick("weight_layout", ["contig", "step"]),
        layout=p.draw("layout", layouts()))
    E, V = r["E"], r["V"]
    shape = (E, *r["batch"], V)
    dt = r["dtype"]

    def build():
        if r["grid"]:  # k / 8 * 2^e: every row sum exact in fp32 in any order
            g = torch.Generator().manual_seed(r["values"]["seed"])
            e = max(min(r["grid_exp"], 12), -10) if dt == torch.float16 else r["grid_exp"]
            x = torch.randint(-64, 65, shape, generator=g).double() / 8 * 2.0 ** e
            if r["values"]["mask"] and x.numel():
                x[torch.rand(shape, generator=g) < r["values"]["mask"]] = -math.inf
        else:
            x = make_values(r["values"], shape, dt if dt in FLOATS else torch.float32)
        if x.numel() and r["poison"]:
            g = torch.Generator().manual_seed(r["poison_seed"])
            i = int(torch.randint(0, x.numel(), (1,), generator=g))
            x.view(-1)[i] = {"nan": math.nan, "inf": math.inf}.get(r["poison"], -(2.0 ** 97))
        w = None
        if r["weights"] is not None:
            n = E + 1 if r["weights"] == "shape" else E
            w = torch.tensor(r["weight_items"][:n], dtype=torch.float64)
            if r["weights"] == "negative" and n:
                w[0] = -1.0
            elif r["weights"] == "nan" and n:
                w[-1] = math.nan
            w = w.to(r["weight_dtype"])
            if r["weight_layout"] == "step":
                w = place(w, dict(layout="step", seed=0))
        return dict(logits=place(x.to(dt), r["layout"]), theta=r["theta"], elect=r["elect"], weights=w)

    res = both("ties_merge", build, lambda logits, theta, elect, weights: dlmom.ties_merge(
        logits, theta=theta, elect=elect, weights=weights))
    if res is None:
        return passed()
    inputs, got, want = res
    assert got.shape == want.shape == shape[1:] and got.dtype == want.dtype == torch.float32
    x = inputs["logits"].float().reshape(E, -1, V)
    masked = (x == -math.inf).any(0)  # [B, V]
    got2, want2 = got.reshape(-1, V), want.reshape(-1, V)
    assert bool((got2[masked] == -math.inf).all()) and bool((want2[masked] == -math.inf).all())
    assert bool(torch.isfinite(got2[~masked]).all()), "ties_merge: non-finite merge of unmasked tokens"
    assert bool(torch.isfinite(want2[~masked]).all()), "ties_merge (reference): non-finite merge"
    if r["grid"]:
        fragile = torch.zeros_like(masked)
    else:  # tokens at a rounding distance of the trim threshold or of a tied election may differ
        xd = x.double()
        fin = torch.isfinite(xd)
        mean = torch.where(fin, xd, 0.0).sum(-1, keepdim=True) / fin.sum(-1, keepdim=True).clamp(min=1)
        v = torch.where(fin, xd - mean, 0.0)
        slack = 1e-4 * (xd.abs().masked_fill(~fin, 0).amax(-1, keepdim=True) + abs(r["theta"]))
        near_theta = ((v.abs() - r["theta"]).abs() <= slack).any(0)
        w = reference.ties_weights(inputs["weights"], E, x.device).double().view(E, 1, 1)
        vt = torch.where(v.abs() >= r["theta"], v, 0.0)
        terms = w * (vt if r["elect"] == "mass" else torch.sign(vt))
        near_tie = terms.sum(0).abs() <= 1e-4 * terms.abs().sum(0)
        fragile = near_theta | near_tie
    keep = ~masked & ~fragile
    scale = x.abs().masked_fill(x == -math.inf, 0).amax(0).amax(-1, keepdim=True).expand_as(got2)  # [B, V]
    err = (got2 - want2).abs()
    bad = keep & (err > 1e-5 + 1e-5 * want2.abs() + 1e-5 * scale)
    assert not bool(bad.any()), f"ties_merge: {int(bad.sum())} tokens differ, e.g. {got2[bad][:4].tolist()} " \
                                f"vs {want2[bad][:4].tolist()}"
    passed()


# ---- kv_quant2 / kv_dequant2 ----

def kv_recipe(data):
    p = Params(data, ["axis", "group_size", "poison", "dtype"])
    ndim = p.draw("ndim", st.integers(1, 4))
    sizes = p.draw("sizes", st.lists(st.sampled_from([0, 1, 2, 3, 5, 8, 1, 2, 3, 5, 8]), min_size=ndim, max_size=ndim))
    if p.draw("big", st.integers(0, 24)) == 0:  # now and then 2^16+ elements: the kernels' parallel paths
        sizes = [2, 4, 130, 64][-ndim:]
    L_big = p.pick("L_big", [None, None, None, 33, 130, 257])
    axis = p.pick("axis", [-1, -1, -2, -2, "pos-1", "pos-2"], [5, True, "x", -3])
    a = {"pos-1": ndim - 1, "pos-2": ndim - 2}.get(axis, axis) if axis in ("pos-1", "pos-2") else axis
    if ndim == 1 and a in (-2, "pos-2"):
        a = -1
    if L_big and a in (-1, -2, ndim - 1, ndim - 2) and not isinstance(a, bool):
        sizes[a] = L_big
    return dict(shape=tuple(sizes), axis=a,
                group_size=p.pick("group_size", [1, 2, 3, 4, 5, 7, 8, 32, 128, 10 ** 6], [0, -1, 2.5, True]),
                dtype=p.pick("dtype", FLOATS, [torch.float64, torch.int32]), values=p.draw("values", value_specs()),
                poison=p.pick("poison", [None], ["nan", "inf", "-inf"]),
                poison_seed=p.draw("seed", st.integers(0, 1000)), layout=p.draw("layout", layouts()))


def kv_input(r):
    x = make_values(r["values"], r["shape"], r["dtype"] if r["dtype"] in FLOATS else torch.float16)
    if x.numel() and r["poison"]:
        i = int(torch.randint(0, x.numel(), (1,), generator=torch.Generator().manual_seed(r["poison_seed"])))
        x.view(-1)[i] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[r["poison"]]
    return place(x.to(r["dtype"]), r["layout"])


def same_quant(a: QuantizedKV, b: QuantizedKV):
    assert a.shape == b.shape and a.axis == b.axis and a.group_size == b.group_size
    for name in ("codes", "scale", "zero"):
        s, t = getattr(a, name), getattr(b, name)
        assert s.dtype == t.dtype and s.shape == t.shape, (name, s.dtype, t.dtype, s.shape, t.shape)
        assert torch.equal(s, t), f"kv_quant2: {name} differs from the reference"


def bits_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    """Equal values, NaN where the other is NaN (payloads aside)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b)), f"{what}: NaN at different places"
    assert torch.equal(a[~nan], b[~nan]), f"{what}: values differ from the reference"


@fuzz_settings
@given(st.data())
def fuzz_kv_quant2(data):
    r = kv_recipe(data)
    out_dtype = data.draw(st.sampled_from([None, *FLOATS]), label="out_dtype")
    res = both("kv_quant2", lambda: dict(x=kv_input(r), group_size=r["group_size"], axis=r["axis"]),
               lambda x, group_size, axis: dlmom.kv_quant2(x, group_size=group_size, axis=axis))
    if res is None:
        return passed()
    inputs, got, want = res
    x = inputs["x"]
    same_quant(got, want)
    assert got.scale.dtype == x.dtype and bool(torch.isfinite(got.scale).all()) and bool((got.scale >= 0).all())
    deq = dlmom.kv_dequant2(got, dtype=out_dtype)
    bits_equal(deq, reference.kv_dequant2(want, dtype=out_dtype), "kv_dequant2")
    # Beyond the oracle: finite in x's dtype, each element within half a step of its value.
    back = dlmom.kv_dequant2(got)
    assert bool(torch.isfinite(back).all()), "kv_dequant2(kv_quant2(x)) is not finite"
    d32 = dlmom.kv_dequant2(got, dtype=torch.float32).double()
    R, L, C = reference.canonical_3d(x.shape, got.axis)
    group = torch.arange(L) // got.group_size  # (not repeat_interleave: group_size may be 10**6)
    s = got.scale.reshape(R, -(-L // got.group_size), C).double()[:, group]
    z = got.zero.reshape(R, -(-L // got.group_size), C).double()[:, group]
    x3 = x.double().reshape(R, L, C)
    err = (d32.reshape(R, L, C) - x3).abs()
    bound = s / 2 * (1 + 1e-3) + 4 * F32_EPS * (x3.abs() + z.abs()) + subnormal_min(torch.float32)
    assert bool((err <= bound).all()), f"kv_quant2: an element beyond half a step: {(err - bound).max().item()}"
    passed()


@fuzz_settings
@given(st.data())
def fuzz_kv_dequant2(data):
    r = kv_recipe(data)
    ndim = len(r["shape"])
    if r["dtype"] not in FLOATS or r["poison"] or r["axis"] not in (-1, -2, ndim - 1, ndim - 2) or \
            isinstance(r["axis"], bool) or not isinstance(r["group_size"], int) or isinstance(r["group_size"], bool) \
            or r["group_size"] < 1:
        r = dict(r, dtype=torch.float32, axis=-1, group_size=4, poison=None)  # a valid kv_quant2 to start from
    r["axis"] = -1 if r["axis"] in (-1, ndim - 1) else -2  # (the reference functions take only -1 / -2)
    p = Params(data, ["mutate", "dtype"])
    m = dict(
        source=p.pick("source", ["kernel", "reference"]),
        garbage=p.pick("garbage", [None, None, "scale", "zero", "codes", "both"]),
        garbage_seed=p.draw("garbage_seed", st.integers(0, 1000)),
        codes_layout=p.draw("codes_layout", layouts()), scale_layout=p.draw("scale_layout", layouts()),
        zero_layout=p.draw("zero_layout", layouts()),
        mutate=p.pick("mutate", [None], ["codes shape", "scale dtype", "zero dtype", "codes dtype", "axis",
                                         "group_size", "shape", "tuple", "zero shape"]),
        dtype=p.pick("dtype", [None, *FLOATS], [torch.int32, torch.float64]))

    def build():
        x = kv_input(r)
        q = (dlmom.kv_quant2 if m["source"] == "kernel" else reference.kv_quant2)(
            x.contiguous(), group_size=r["group_size"], axis=r["axis"])
        codes, scale, zero = q.codes, q.scale, q.zero
        g = torch.Generator().manual_seed(m["garbage_seed"])
        if m["garbage"] in ("scale", "both") and scale.numel():
            scale = make_values(dict(kind="mixed", seed=m["garbage_seed"], items=None, mask=0.0), scale.shape,
                                scale.dtype).to(scale.dtype)
            scale.view(-1)[0] = [math.inf, -math.inf, math.nan, -1.0][m["garbage_seed"] % 4]
        if m["garbage"] in ("zero", "both") and zero.numel():
            zero = make_values(dict(kind="huge", seed=m["garbage_seed"], items=None, mask=0.0), zero.shape,
                               zero.dtype).to(zero.dtype)
        if m["garbage"] == "codes" and codes.numel():
            codes = torch.randint(0, 256, codes.shape, generator=g, dtype=torch.int32).to(torch.uint8)
        q = q._replace(codes=place(codes, m["codes_layout"]), scale=place(scale, m["scale_layout"]),
                       zero=place(zero, m["zero_layout"]))
        mut = m["mutate"]
        if mut == "codes shape":
            q = q._replace(codes=torch.zeros(q.codes.numel() + 1, dtype=torch.uint8))
        elif mut == "scale dtype":
            q = q._replace(scale=q.scale.double())
        elif mut == "zero dtype":
            q = q._replace(zero=q.zero.to(torch.float16 if q.scale.dtype != torch.float16 else torch.float32))
        elif mut == "codes dtype":
            q = q._replace(codes=q.codes.to(torch.int16))
        elif mut == "axis":
            q = q._replace(axis=[0, 1, True, "x", -3][m["garbage_seed"] % 5])
        elif mut == "group_size":
            q = q._replace(group_size=[0, -2, 2.5, True, q.group_size + 1][m["garbage_seed"] % 5])
        elif mut == "shape":
            q = q._replace(shape=torch.Size([*q.shape[:-1], q.shape[-1] + 5]) if len(q.shape) else torch.Size([3]))
        elif mut == "zero shape":
            q = q._replace(zero=torch.zeros(q.zero.numel() + 1, dtype=q.zero.dtype))
        elif mut == "tuple":
            q = tuple(q)
        return dict(q=q, dtype=m["dtype"])

    res = both("kv_dequant2", build, lambda q, dtype: dlmom.kv_dequant2(q, dtype=dtype))
    if res is None:
        return passed()
    inputs, got, want = res
    assert got.shape == tuple(inputs["q"].shape)
    bits_equal(got, want, "kv_dequant2")
    passed()


FUZZERS = {"soft_embed": fuzz_soft_embed, "topk_packet": fuzz_topk_packet, "ties_merge": fuzz_ties_merge,
           "kv_quant2": fuzz_kv_quant2, "kv_dequant2": fuzz_kv_dequant2}


def main(op: str) -> None:
    if "DLMOM_BACKEND" in os.environ:
        raise SystemExit("unset DLMOM_BACKEND: the fuzzer compares both backends itself")
    start = time.perf_counter()
    FUZZERS[op]()
    print(f"fuzz {op}: {COUNT['n']} calls ({COUNT['refused']} inputs refused by both) in "
          f"{time.perf_counter() - start:.1f} s")
    # Hypothesis runs max_examples valid examples when it finds nothing (and shrinks when it does).
    print(f"fuzz {op}: {EXAMPLES} examples passed")


if __name__ == "__main__":
    main(sys.argv[1])
