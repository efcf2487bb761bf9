"""Timing, bandwidth and result-file helpers shared by the bench_<op>.py scripts.

Results go to bench/results/<name>-<device>.json: {"device", "torch", "dlmom", "date", "command", "rows"},
rows being flat dicts with units in their keys (kernel_us, torch_us, speedup, gbps, ...).
"""
from __future__ import annotations

import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import torch

import dlmom

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_us(fn, *, device: str = "cpu", warmup: int = 3, min_time_s: float = 0.2, max_iters: int = 1000) -> float:
    """Median wall time of fn() in microseconds over repeated calls (at least 5, about min_time_s in all)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time_s and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def copy_gbps(device: str, nbytes: int = 256 << 20) -> float:
    """Achieved bandwidth of a plain tensor copy (read + write) on the device: the practical bound."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device=device)
    return 2 * nbytes / (us * 1e-6) / 1e9


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_results(name: str, device: str, rows: list[dict], *, extra: dict | None = None) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if device.startswith("cuda") else "cpu"
    path = RESULTS / f"{name}-{kind}.json"
    doc = {"device": device_name(device), "torch": torch.__version__,
           "dlmom": {"version": dlmom.__version__, "commit": git_commit()},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
           "backend": dlmom.backend_info()["ops"], **(extra or {}), "rows": rows}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    cells = [[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))
