"""End to end: dlmom (each controller) against one expert alone and a text multi-agent pipeline.

Every method answers the same prompts (one batch) with the same models and the same ``max_new_tokens``
(per agent for text-mas) on the embedded default, SmolLM2-135M-Instruct in three roles. Each method runs
in its own process (a warm-up call first), so its peak memory is its own: ``peak_mem_bytes`` is the
largest resident set sampled every 5 ms during the measured call, ``maxrss_bytes`` the process's
high-water mark including loading.

Columns: ``wall_s``; ``expert_forward_s`` (time inside the models' forwards); ``overhead_fraction`` =
(wall - expert forward) / wall; ``tokens_generated`` (steps taken per prompt, latent ones included, summed
over prompts and agents); ``tokens_processed`` (prefill + decode positions over all experts, as the
engine's usage counts them: the router scores experts on the shared vocabulary from the preview steps
themselves, and a teacher-forced pass for bridged experts is counted in their prefill);
``bus_bytes`` (dlmom: packets on the bus; text-mas: answer text handed between agents); ``correct``: the
arithmetic prompts whose expected number appears in the answer (a loose check, code tasks not scored).

    python bench/bench_e2e.py                      # 20 prompts x 64 tokens, every method
    python bench/bench_e2e.py --prompts 4 --max-new-tokens 16 --methods single text-mas --no-write
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import threading
import time

# (prompt, expected number or None for code tasks)
PROMPTS = [
    ("A shop sells pencils at 3 dollars each. Tom buys 7 pencils. How many dollars does he pay?", 21),
    ("Sara has 45 apples and gives away 17. How many apples does she have left?", 28),
    ("A train travels 60 km per hour for 3 hours. How many km does it travel?", 180),
    ("There are 4 boxes with 12 eggs in each box. How many eggs are there in total?", 48),
    ("A book costs 15 dollars. Anna pays with a 50 dollar bill. How much change does she get?", 35),
    ("Ben reads 8 pages a day. How many pages does he read in 2 weeks?", 112),
    ("A class has 30 students and 2/5 of them are girls. How many girls are in the class?", 12),
    ("Mia saves 25 dollars a month. How many dollars has she saved after 6 months?", 150),
    ("A rectangle is 9 cm long and 4 cm wide. What is its area in square cm?", 36),
    ("Tim had 100 marbles, lost 23, then found 14. How many marbles does he have now?", 91),
    ("A baker makes 96 cookies and packs them in bags of 8. How many bags does he fill?", 12),
    ("What is 17 multiplied by 6, plus 10?", 112),
    ("Write a Python function that returns the largest number in a list.", None),
    ("Write a Python function that reverses a string.", None),
    ("Write a Python function that checks whether a number is prime.", None),
    ("Write a Python function that counts the vowels in a string.", None),
    ("Write a Python function that returns the sum of the even numbers in a list.", None),
    ("Write a Python function that computes the factorial of n.", None),
    ("What does this Python code print: x = [1, 2, 3]; print(sum(x) * 2)?", 12),
    ("Write a Python function that returns the n-th Fibonacci number.", None),
]
METHODS = ["dlmom-swir", "dlmom-explicit", "dlmom-latent", "single-planner", "single-solver", "single-checker",
           "text-mas"]


def _correct(text: str, expected: int | None) -> bool:
    return expected is not None and str(expected) in re.findall(r"\d+", text.replace(",", ""))


def child(method: str, n: int, max_new_tokens: int, dtype: str, threads: int, repeats: int) -> dict:
    """Run one method in this process and return its row (the fastest of ``repeats`` measured calls)."""
    import psutil
    import torch

    torch.set_num_threads(threads)

    from dlmom import DLMoMConfig
    from dlmom.baselines import run
    from dlmom.experts import DEFAULT_ROLES, default_experts

    experts = default_experts(dtype=getattr(torch, dtype))
    roles = list(DEFAULT_ROLES)
    prompts = [p for p, _ in PROMPTS[:n]]
    if method.startswith("dlmom-"):
        kind, kwargs = "dlmom", dict(config=DLMoMConfig(controller=method.split("-", 1)[1]), seed=0)
    elif method.startswith("single-"):
        kind, kwargs = "single", dict(expert=roles.index(method.split("-", 1)[1]))
    else:
        kind, kwargs = method, {}
    run(kind, experts, prompts[:1], max_new_tokens=2, **kwargs)  # warm-up: first-call costs out of the timing

    proc = psutil.Process()
    peak, done = [proc.memory_info().rss], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    loaded = proc.memory_info().rss
    sampler.start()
    runs = [run(kind, experts, prompts, max_new_tokens=max_new_tokens, **kwargs) for _ in range(repeats)]
    done.set()
    sampler.join()

    walls = [r[0].usage["wall_s"] for r in runs]
    results = runs[walls.index(min(walls))]
    usage = results[0].usage  # the whole batch's
    prefill = sum(e["prefill_tokens"] for e in usage["experts"])
    decode = sum(e["decode_tokens"] for e in usage["experts"])
    generated = sum(len(r.trace) for r in results) if kind == "dlmom" else usage["generated_tokens"]
    wall, forward = usage["wall_s"], usage["expert_forward_s"]
    return {
        "method": method, "prompts": n, "max_new_tokens": max_new_tokens, "threads": threads, "repeats": repeats,
        "wall_s": round(wall, 3), "wall_s_slowest": round(max(walls), 3),
        "expert_forward_s": round(forward, 3), "overhead_fraction": round((wall - forward) / wall, 4),
        "tokens_generated": generated, "tokens_processed": prefill + decode, "prefill_tokens": prefill,
        "decode_tokens": decode, "latent_steps": usage["latent_steps"],
        "bus_bytes": usage["bus_bytes"], "bus_kind": {"dlmom": "packets", "text-mas": "text"}.get(kind, "-"),
        "peak_mem_bytes": peak[0], "loaded_rss_bytes": loaded,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "correct": sum(_correct(r.text, e) for r, (_, e) in zip(results, PROMPTS[:n])),
        "scored": sum(e is not None for _, e in PROMPTS[:n]),
        "first_answer": results[0].text[:80],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many prompts (max {len(PROMPTS)})")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="token budget (per agent for text-mas)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, 2 spinning threads lose far more)")
    parser.add_argument("--repeats", type=int, default=2, help="measured calls per method; the fastest is kept")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = max(1, min(args.prompts, len(PROMPTS)))
    if args.child:
        print(json.dumps(child(args.child, n, args.max_new_tokens, args.dtype, args.threads, args.repeats)))
        return

    import torch
    from bench_common import print_table, write_results

    torch.set_num_threads(args.threads)  # the device name in the results records the thread count

    rows = []
    for method in args.methods:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", method, "--prompts", str(n),
                               "--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype,
                               "--threads", str(args.threads), "--repeats", str(args.repeats)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench_e2e: {method} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{method}: {rows[-1]['wall_s']:.1f} s ({time.perf_counter() - start:.0f} s with loading)",
              file=sys.stderr)
    mas = next((r for r in rows if r["method"] == "text-mas"), None)
    for r in rows:
        r["tokens_vs_text_mas"] = round(r["tokens_processed"] / mas["tokens_processed"], 4) if mas else None
        r["wall_vs_text_mas"] = round(r["wall_s"] / mas["wall_s"], 4) if mas else None
    shown = ["method", "wall_s", "expert_forward_s", "overhead_fraction", "tokens_generated", "tokens_processed",
             "tokens_vs_text_mas", "latent_steps", "bus_bytes", "bus_kind", "peak_mem_bytes", "correct"]
    print_table([{k: r[k] for k in shown} for r in rows])
    if not args.no_write:
        path = write_results("e2e", "cpu", rows, extra={
            "experts": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised) in 3 roles: planner, solver, checker",
            "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
