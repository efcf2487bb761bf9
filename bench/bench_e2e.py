"""End to end: dlmom (each controller) against one expert alone and a text multi-agent pipeline, its scaling,
a profile of its overhead, and a two-tokenizer mixture (Qwen2.5-Coder + SmolLM2).

Sections (``--sections``, all by default):

- ``main``: every method answers the same prompts (one batch) with the same models and the same
  ``max_new_tokens`` (per agent for text-mas) on the embedded default, SmolLM2-135M-Instruct in three roles.
  Each method runs in its own process (a warm-up call first), so its peak memory is its own:
  ``peak_mem_bytes`` is the largest resident set sampled every 5 ms during the measured calls,
  ``maxrss_bytes`` the process's high-water mark including loading.
- ``scaling``: dlmom's step time and overhead against the number of experts (1-4; roles of one model
  sharing a batched forward, and separate model copies that do not), packet size k and batch size, one
  factor at a time, with the "latent" controller so every point takes the same steps (see e2e_scaling.py).
  Also drawn as a PNG (needs matplotlib; skipped with a printed line without it).
- ``profile``: cProfile of one dlmom run with the clock stopped inside the expert forwards; the three
  largest costs outside them (see e2e_profile.py).
- ``qwen``: dlmom-swir, each expert alone and text-mas on [Qwen2.5-Coder-0.5B-Instruct, SmolLM2-135M-Instruct]
  (different tokenizers: SmolLM2 is fed through the Text-Bridge), one process per method as in ``main``.
  Skipped with a printed line when the Qwen GGUF is missing.

Columns: ``wall_s``; ``expert_forward_s`` (time inside the models' forwards); ``overhead_fraction`` =
(wall - expert forward) / wall; ``tokens_generated`` (steps taken per prompt, latent ones included, summed
over prompts and agents); ``tokens_processed`` (prefill + decode positions over all experts, as the
engine's usage counts them: the router scores experts on the shared vocabulary from the preview steps
themselves, and a teacher-forced pass for bridged experts is counted in their prefill);
``bus_bytes`` (dlmom: packets on the bus plus Text-Bridge text; text-mas: answer text handed between
agents); ``correct``: the arithmetic prompts whose expected number appears in the answer (a loose check,
code tasks not scored); ``bridge_resyncs``: Text-Bridge re-encodings after a token merge across the
boundary. A dlmom method keeps one DLMoM instance for its warm-up and measured calls.

    python bench/bench_e2e.py                      # everything, writes bench/results/e2e-cpu.json + PNG
    python bench/bench_e2e.py --quick              # a few minutes' smoke run, written under /tmp
    python bench/bench_e2e.py --sections main --prompts 4 --max-new-tokens 16 \\
        --methods single-solver text-mas --no-write
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from e2e_common import PROMPTS, QWEN_GGUF  # noqa: E402

METHODS = ["dlmom-swir", "dlmom-swir-top1", "dlmom-explicit", "dlmom-latent", "single-planner", "single-solver",
           "single-checker", "text-mas"]
QWEN_METHODS = ["dlmom-swir", "single-qwen", "single-smollm2", "text-mas"]
SECTIONS = ("main", "scaling", "profile", "qwen")
# (full run, --quick) defaults of the size flags; a flag given on the command line wins over both.
SIZES = {"prompts": (len(PROMPTS), 4), "max_new_tokens": (64, 16), "repeats": (2, 1),
         "scaling_prompts": (4, 2), "scaling_tokens": (32, 8), "profile_prompts": (len(PROMPTS), 4),
         "profile_tokens": (64, 16), "qwen_prompts": (len(PROMPTS), 2), "qwen_max_new_tokens": (32, 8),
         "qwen_repeats": (1, 1)}
MAIN_SHOWN = ["method", "wall_s", "expert_forward_s", "overhead_fraction", "tokens_generated", "tokens_processed",
              "tokens_vs_text_mas", "latent_steps", "bus_bytes", "bus_kind", "peak_mem_bytes", "correct"]
SCALING_SHOWN = ["axis", "experts", "sharing", "top_k", "batch", "decode_steps", "wall_s", "step_s",
                 "overhead_step_ms", "overhead_fraction"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Sizes default to the full run's; --quick lowers the defaults shown "
                                            "after the slash.")

    def size(flag, help_text):
        full, quick = SIZES[flag.lstrip("-").replace("-", "_")]
        parser.add_argument(flag, type=int, default=None, help=f"{help_text} (default {full} / quick {quick})")

    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="development run: small sizes, results written under the temp folder unless --out-dir")
    size("--prompts", f"main: how many prompts (max {len(PROMPTS)})")
    size("--max-new-tokens", "main: token budget (per agent for text-mas)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="main: methods to run")
    size("--repeats", "main: measured calls per method; the fastest is kept")
    size("--scaling-prompts", "scaling: prompts at the default point (the batch axis sets its own)")
    size("--scaling-tokens", "scaling: token budget per point")
    size("--profile-prompts", "profile: prompts in the profiled dlmom run")
    size("--profile-tokens", "profile: token budget of the profiled run")
    size("--qwen-prompts", f"qwen: how many prompts (max {len(PROMPTS)})")
    size("--qwen-max-new-tokens", "qwen: token budget (Qwen runs ~5 tok/s at batch 1 on a CPU thread)")
    size("--qwen-repeats", "qwen: measured calls per method")
    parser.add_argument("--qwen-gguf", type=pathlib.Path, default=QWEN_GGUF, help="qwen: the Qwen2.5-Coder GGUF file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the experts' weights")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the experts run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, 2 spinning threads lose far more)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=None,
                        help="where e2e-<device>.json and e2e-scaling-<device>.png go (default bench/results)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--child", choices=sorted(set(METHODS + QWEN_METHODS)), help=argparse.SUPPRESS)
    parser.add_argument("--expert-set", choices=["default", "qwen"], default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.prompts = min(args.prompts, len(PROMPTS))
    args.qwen_prompts = min(args.qwen_prompts, len(PROMPTS))
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        parser.error(f"--sections must name some of {','.join(SECTIONS)}, got {unknown or 'none'}")
    if args.out_dir is None:
        args.out_dir = pathlib.Path(tempfile.gettempdir()) / "dlmom-bench-e2e" if args.quick else HERE / "results"
    return args


def child(args) -> dict:
    """One method's row, measured in this process."""
    import torch

    from e2e_common import load_experts, measure

    torch.set_num_threads(args.threads)
    experts = load_experts(args.expert_set, dtype=getattr(torch, args.dtype), device=args.device,
                           qwen_gguf=args.qwen_gguf)
    return measure(args.child, experts, args.prompts, args.max_new_tokens, args.repeats)


def run_children(args, expert_set: str, methods: list[str], n: int, tokens: int, repeats: int) -> tuple[list, list]:
    """(rows, child command lines): one subprocess per method, then the ratios against text-mas."""
    rows, commands = [], []
    for method in methods:
        cmd = [sys.executable, __file__, "--child", method, "--expert-set", expert_set, "--prompts", str(n),
               "--max-new-tokens", str(tokens), "--repeats", str(repeats), "--dtype", args.dtype,
               "--device", args.device, "--threads", str(args.threads), "--qwen-gguf", str(args.qwen_gguf)]
        commands.append(" ".join(["python", os.path.relpath(__file__), *cmd[2:]]))
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench_e2e: {expert_set} {method} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{expert_set} {method}: {rows[-1]['wall_s']:.1f} s ({time.perf_counter() - start:.0f} s with loading)",
              file=sys.stderr)
    mas = next((r for r in rows if r["method"] == "text-mas"), None)
    for r in rows:
        r["tokens_vs_text_mas"] = round(r["tokens_processed"] / mas["tokens_processed"], 4) if mas else None
        r["wall_vs_text_mas"] = round(r["wall_s"] / mas["wall_s"], 4) if mas else None
    return rows, commands


def print_profile(prof: dict) -> None:
    from bench_common import print_table

    print(f"profile: dlmom ({prof['controller']}), {prof['prompts']} prompts x {prof['max_new_tokens']} tokens: "
          f"wall {prof['wall_s']:.2f} s, overhead {prof['overhead_s']:.2f} s ({100 * prof['overhead_fraction']:.1f}%); "
          f"profiled: wall {prof['profiled_wall_s']:.2f} s, outside the forwards {prof['profiled_overhead_s']:.2f} s")
    print_table([{k: c[k] for k in ("function", "via", "calls", "seconds", "share_of_wall")} for c in prof["largest3"]])


def versions() -> dict:
    import torch
    import transformers

    import dlmom

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "dlmom": dlmom.__version__}


def write(args, sections: dict, durations: dict, commands: dict) -> pathlib.Path:
    """Write (or update: sections not run this time keep their stored block) e2e-<device>.json."""
    import torch

    import dlmom
    from bench_common import device_name, git_commit

    kind = "gpu" if args.device == "cuda" else "cpu"
    path = args.out_dir / f"e2e-{kind}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = " ".join(["bench_e2e.py", *sys.argv[1:]])
    doc.update({"device": device_name(args.device), "torch": torch.__version__,
                "dlmom": {"version": dlmom.__version__, "commit": git_commit()}, "date": now, "command": command,
                "backend": dlmom.backend_info()["ops"]})
    stamps = doc.setdefault("sections", {})
    for name, block in sections.items():
        stamps[name] = {"date": now, "commit": git_commit(), "command": command,
                        "duration_s": round(durations[name], 1),
                        "child_commands": commands.get(name, []),
                        "settings": {"threads": args.threads, "dtype": args.dtype, "device": args.device,
                                     "quick": args.quick, **versions(),
                                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}}
        if name == "main":  # the first table keeps its original top-level keys
            doc.update(block)
        else:
            doc[name] = block
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    import torch

    from bench_common import print_table

    torch.set_num_threads(args.threads)  # the device name in the results records the thread count
    dtype = getattr(torch, args.dtype)
    sections, durations, commands = {}, {}, {}
    began = time.perf_counter()

    if "main" in args.sections:
        start = time.perf_counter()
        rows, commands["main"] = run_children(args, "default", args.methods, args.prompts, args.max_new_tokens,
                                              args.repeats)
        durations["main"] = time.perf_counter() - start
        print_table([{k: r[k] for k in MAIN_SHOWN} for r in rows])
        sections["main"] = {
            "experts": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantised) in 3 roles: planner, solver, checker",
            "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats, "rows": rows}

    if "scaling" in args.sections:
        from e2e_scaling import CONTROLLER, scaling

        start = time.perf_counter()
        rows = scaling(prompts=args.scaling_prompts, max_new_tokens=args.scaling_tokens, repeats=args.repeats,
                       dtype=dtype, device=args.device, log=lambda line: print(line, file=sys.stderr))
        durations["scaling"] = time.perf_counter() - start
        print_table([{k: r[k] for k in SCALING_SHOWN} for r in rows])
        sections["scaling"] = {
            "controller": CONTROLLER, "prompts": args.scaling_prompts, "max_new_tokens": args.scaling_tokens,
            "note": "shared: roles of one SmolLM2 in one batched forward; separate: a model copy per expert, "
                    "one forward each. step_s = wall / decode steps (prefill in the wall).", "rows": rows}
        if not args.no_write:
            from bench_common import device_name
            from e2e_plot import plot_scaling

            kind = "gpu" if args.device == "cuda" else "cpu"
            png = plot_scaling(rows, args.out_dir / f"e2e-scaling-{kind}.png",
                               f"dlmom scaling, SmolLM2-135M roles, controller={CONTROLLER}, "
                               f"{args.scaling_tokens} tokens, {device_name(args.device)}")
            if png:
                print(f"wrote {png}")

    if "profile" in args.sections:
        from e2e_profile import profile

        start = time.perf_counter()
        sections["profile"] = profile(prompts=args.profile_prompts, max_new_tokens=args.profile_tokens, dtype=dtype,
                                      device=args.device)
        durations["profile"] = time.perf_counter() - start
        print_profile(sections["profile"])

    if "qwen" in args.sections:
        start = time.perf_counter()
        if not args.qwen_gguf.is_file():
            print(f"bench_e2e: qwen section skipped, no GGUF at {args.qwen_gguf} (see --qwen-gguf)")
            sections["qwen"] = {"skipped": f"no GGUF at {args.qwen_gguf}"}
        else:
            rows, commands["qwen"] = run_children(args, "qwen", QWEN_METHODS, args.qwen_prompts,
                                                  args.qwen_max_new_tokens, args.qwen_repeats)
            print_table([{k: r[k] for k in MAIN_SHOWN + ["bridge_resyncs"]} for r in rows])
            sections["qwen"] = {
                "experts": "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, primary vocabulary) + SmolLM2-135M-Instruct "
                           "(Text-Bridge), both in the solver role", "rows": rows}
        durations["qwen"] = time.perf_counter() - start

    print(f"bench_e2e: {', '.join(f'{k} {v:.0f} s' for k, v in durations.items())}; "
          f"total {time.perf_counter() - began:.0f} s", file=sys.stderr)
    if not args.no_write:
        print(f"wrote {write(args, sections, durations, commands)}")


if __name__ == "__main__":
    main()
