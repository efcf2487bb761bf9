"""KV caches on real models: dlmom's KIVI-2 (+ MiniCache) against transformers' QuantizedCache, teacher-forced.

python bench/bench_kv.py [--models smollm2 qwen] [--methods quanto2 quanto4 hqq2 hqq4 kivi2 kivi2-minicache kivi2-minicache-all]
                         [--lengths 512 1024 2048 4096] [--eval-lengths 2048] [--steps 128] [--threads 2]
                         [--dtype bf16|fp32] [--text FILE | --text-commit REV] [--quick]

Protocol, per model (the reference is always transformers' DynamicCache, method "full"):

- bytes: the text's first max(--lengths) tokens are prefilled once with a DynamicCache; for every length N
  each method's cache is filled by replaying that prefill's per-layer keys and values [:N] through
  ``cache.update(k, v, layer)`` in layer order, which is what a prefill forward does; when every update hands
  back the states it got (checked; otherwise a warning and the JSON's replay_not_exact), the forward would have
  seen the same states in every layer and left the cache as the replay does. Bytes held: ``nbytes()`` for
  dlmom's caches; for QuantizedCache the storage of every plain tensor inside its quantised states (quanto's
  packed codes, scale and shift; hqq's packed codes and meta scale / zero), de-duplicated by storage, plus its
  full-precision residual keys / values. The fraction divides by the fp16 cache: 2 bytes per cached key / value
  element, whatever --dtype is. Right after a prefill QuantizedCache holds everything quantised (its residual
  starts empty), so decode_bytes_frac_<N> also gives the mean fraction over the decode steps below, when
  residual windows fill and flush.
- quality and latency at each --eval-lengths N: the full cache gets a real prefill of the first N tokens and
  every method's cache its replay (as above; prefill_<N> says "replayed"), unless one of the method's updates
  hands back other states than it got, in which case the method gets a prefill forward of its own ("forward").
  Then the next --steps tokens are fed one at a time to all caches in lock step (the order of the methods
  rotates every step so load drift on a shared machine hits them alike). Each step's next-token distribution is
  compared with the full cache's: top-1 agreement (argmax equal) and KL(full || method) in nats from float32
  log-softmax, both averaged over the steps. Latency is the wall time of each one-token forward; the ratio
  divides the method's median (and mean: re-quantisation spikes show there) by the full cache's, measured in
  the same steps.

Text: by default the project's own sources (python/dlmom/*.py, then csrc/**) as they were at --text-commit,
read with ``git show`` so edits in the work tree never change the benchmark; --text FILE takes any UTF-8 file.
Results: bench/results/kv-cpu.json (not written with --quick) and a table per model with the targets of
issue #5 marked met / missed.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import math
import os
import pathlib
import statistics
import subprocess
import time

import torch
import transformers
from transformers import DynamicCache, QuantizedCache

import dlmom
import dlmom.experts
from bench_common import print_table, write_results

REPO = pathlib.Path(__file__).resolve().parent.parent
TEXT_COMMIT = "e1b1553"  # the sources the published numbers were measured on
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", lambda: dlmom.loading.default_gguf_path()),
    "qwen": ("Qwen2.5-Coder-0.5B-Instruct",
             lambda: pathlib.Path("/root/.cache/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")),
}
# name: (bits, what it is, factory(model config, args) -> Cache). QuantizedCache is asked for the grouping
# KIVI uses for values (groups of --group channels of one token) on both keys and values, with KIVI's
# group and residual sizes: quanto axis 0 and hqq axis 1 both mean "consecutive elements of the head dim".
QC_BACKENDS = {"quanto": (0, "optimum-quanto backend"), "hqq": (1, "hqq backend (HQQ-optimised zero / scale)")}


def _quantized_cache(backend: str, nbits: int):
    """(bits, what it is, factory) of a transformers QuantizedCache row."""
    axis, what = QC_BACKENDS[backend]
    return (nbits, f"transformers QuantizedCache, {what}, {nbits} bits, per-token groups",
            lambda cfg, a: QuantizedCache(backend, cfg, nbits=nbits, axis_key=axis, axis_value=axis,
                                          q_group_size=a.group, residual_length=a.residual))


METHODS = {
    **{f"{backend}{nbits}": _quantized_cache(backend, nbits) for backend in QC_BACKENDS for nbits in (2, 4)},
    "kivi2": (2, "dlmom.KIVICache: keys per channel, values per token, 2 bits",
              lambda cfg, a: dlmom.KIVICache(group_size=a.group, residual_length=a.residual)),
    # config= lets the cache know the layer count (and so merge) from the first forward.
    "kivi2-minicache": (2, "dlmom.KIVICache(merge_layers=True): KIVI-2 + MiniCache merging from mid-depth, defaults",
                        lambda cfg, a: dlmom.KIVICache(group_size=a.group, residual_length=a.residual,
                                                       merge_layers=True, config=cfg)),
    "kivi2-minicache-all": (2, "KIVI-2 + MiniCache with merge_threshold=1: every token pair from mid-depth merged",
                            lambda cfg, a: dlmom.KIVICache(group_size=a.group, residual_length=a.residual,
                                                           merge_layers=True, merge_threshold=1.0, config=cfg)),
}
# Issue #5's targets: the most bytes (fraction of fp16), the least top-1 agreement, the most latency ratio, and
# whether the method must agree better than every QuantizedCache row of the same bits.
TARGETS = {"kivi2": dict(bytes=0.25, top1=0.95, latency=1.5, beat_qc=True),
           "kivi2-minicache": dict(bytes=0.15, top1=0.90, latency=1.5, beat_qc=False),
           "kivi2-minicache-all": dict(bytes=0.15, top1=0.90, latency=1.5, beat_qc=False)}


def source_text(commit: str) -> str:
    """python/dlmom/*.py then csrc/** (.h .cpp .cu .cuh) at ``commit``, each file after a '# file:' line."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True,
                                  timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as err:
            raise SystemExit(f"bench_kv: --text-commit {commit!r}: cannot read the sources with git ({err}); "
                             f"pass --text FILE instead") from None
    files = git("ls-tree", "-r", "--name-only", commit).split()
    py = sorted(f for f in files if f.startswith("python/dlmom/") and f.endswith(".py"))
    cc = sorted(f for f in files if f.startswith("csrc/") and f.endswith((".h", ".cpp", ".cu", ".cuh")))
    return "".join(f"# file: {f}\n{git('show', f'{commit}:{f}')}" for f in py + cc)


def _leaves(obj):
    """Plain tensors inside a quantised state: tuples, dicts and tensor subclasses (via __tensor_flatten__)."""
    if isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o)
    elif isinstance(obj, torch.Tensor):
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            yield obj
        else:
            names, _ = obj.__tensor_flatten__()
            for name in names:
                yield from _leaves(getattr(obj, name))


def held_bytes(cache) -> int:
    """Bytes a cache really holds (see the module docstring for how each kind is counted)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    storages = {}
    for layer in cache.layers:
        states = [layer.keys, layer.values, getattr(layer, "_quantized_keys", None),
                  getattr(layer, "_quantized_values", None)]
        for t in _leaves(states):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def fp16_bytes(cache: DynamicCache) -> int:
    return sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers)


def replay(cache, kv: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> bool:
    """Fill ``cache`` with the first n tokens of a prefill's per-layer states, in layer order, as a forward does.

    True when every ``update`` handed back the very states it got: a prefill forward with this cache would
    then have seen the same states in every layer, so it would have left the cache in the same state."""
    same = True
    for i, (k, v) in enumerate(kv):
        k, v = k[..., :n, :].clone(), v[..., :n, :].clone()
        out_k, out_v = cache.update(k, v, i)
        same = same and torch.equal(out_k, k) and torch.equal(out_v, v)
    return same


def new_cache(method: str, model, args):
    if method == "full":
        return DynamicCache(config=model.config)
    return METHODS[method][2](model.config, args)


def check_methods(methods: list[str], args) -> None:
    """Build every asked-for cache once, before any model loads: a method this dlmom cannot build stops the run."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    for m in methods:
        try:
            METHODS[m][2](cfg, args)
        except TypeError as err:
            raise SystemExit(f"bench_kv: method {m!r} cannot be built with this dlmom ({err}). "
                             f"It needs KIVICache(merge_layers=True) (KIVI-2 + MiniCache); leave it out with "
                             f"--methods {' '.join(x for x in methods if x != m)}") from None
        except ImportError as err:
            raise SystemExit(f"bench_kv: method {m!r} needs a package that is not installed: {err}. Install it or "
                             f"leave the method out with --methods") from None


@torch.inference_mode()
def evaluate(model, ids: torch.Tensor, n: int, steps: int, methods: list[str], args) -> dict:
    """Prefill n tokens per method, then `steps` teacher-forced tokens in lock step; quality and latency.

    The full cache gets a real prefill; each method's cache is filled by replaying its states, which is what a
    prefill forward would leave when the method's updates hand the states back unchanged (checked); a method
    that changes them gets a real prefill forward of its own."""
    caches = {"full": DynamicCache(config=model.config)}
    model(ids[:, :n], cache=caches["full"], logits_to_keep=1)
    kv = [(layer.keys, layer.values) for layer in caches["full"].layers]
    prefill = {"full": "forward"}
    for m in methods:
        caches[m] = new_cache(m, model, args)
        prefill[m] = "replayed"
        if not replay(caches[m], kv, n):
            caches[m] = new_cache(m, model, args)
            model(ids[:, :n], cache=caches[m], logits_to_keep=1)
            prefill[m] = "forward"
    del kv
    prefill_bytes = {m: held_bytes(c) for m, c in caches.items()}
    prefill_fp16 = fp16_bytes(caches["full"])
    order = list(caches)
    logits = {m: [] for m in order}
    times = {m: [] for m in order}
    held = {m: [] for m in order}  # bytes / fp16 bytes after every step: residual windows fill and flush
    for j in range(steps):
        token = ids[:, n + j:n + j + 1]
        for m in order[j % len(order):] + order[:j % len(order)]:
            t0 = time.perf_counter()
            out = model(token, cache=caches[m])
            times[m].append(time.perf_counter() - t0)
            logits[m].append(out.logits[0, -1].float())
        fp16 = fp16_bytes(caches["full"])
        for m in order:
            held[m].append(held_bytes(caches[m]) / fp16)
    ref = torch.stack(logits["full"]).log_softmax(-1)
    t_med, t_mean = statistics.median(times["full"]), statistics.fmean(times["full"])
    res = {}
    for m in order:
        lq = torch.stack(logits[m]).log_softmax(-1)
        res[m] = dict(top1=(lq.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                      kl=(ref.exp() * (ref - lq)).sum(-1).clamp_min(0).mean().item(),
                      step_ms=1e3 * statistics.median(times[m]), latency_ratio=statistics.median(times[m]) / t_med,
                      latency_ratio_mean=statistics.fmean(times[m]) / t_mean, prefill_bytes=prefill_bytes[m],
                      prefill_bytes_frac=prefill_bytes[m] / prefill_fp16,
                      decode_bytes_frac=statistics.fmean(held[m]), prefill=prefill[m])
    return res


def targets(method: str, row: dict, rows: list[dict], eval_lengths: list[int]) -> list[str]:
    """'met' / 'missed' lines for the issue's targets of ``method`` at each evaluated length."""
    goal = TARGETS.get(method)
    if goal is None:
        return []
    out = []
    for n in eval_lengths:
        b, a, lat = row.get(f"bytes_frac_{n}"), row[f"top1_{n}"], row[f"latency_ratio_{n}"]
        checks = [(f"bytes <= {goal['bytes']:.0%} of fp16 @{n}", b is not None and b <= goal["bytes"], b),
                  (f"top-1 >= {goal['top1']:.0%} @{n}", a >= goal["top1"], a),
                  (f"latency <= {goal['latency']}x @{n}", lat <= goal["latency"], lat)]
        if goal["beat_qc"]:
            bits = METHODS[method][0]
            qc = [r for r in rows if r["method"] in ("quanto2", "quanto4", "hqq2", "hqq4") and r["bits"] == bits]
            best = max((r[f"top1_{n}"] for r in qc), default=None)
            checks.append((f"top-1 > QuantizedCache {bits}-bit @{n}", None if best is None else a > best,
                           f"{a:.3f} vs {best:.3f}" if best is not None else "no QuantizedCache row of those bits"))
        for name, ok, val in checks:
            shown = f"{val:.3f}" if isinstance(val, float) else val
            out.append(f"{method}: {name}: {'not measured' if ok is None else 'met' if ok else 'MISSED'} ({shown})")
    return out


def run_model(key: str, args, ids_text: str) -> tuple[list[dict], list[str], dict]:
    name, path_fn = MODELS[key]
    path = path_fn()
    if path is None or not pathlib.Path(path).is_file():
        print(f"skip {name}: model file {path} not found")
        return [], [], {"skipped": f"model file {path} not found"}
    t0 = time.perf_counter()
    model, tok = dlmom.loading.load_pretrained(path, dtype=DTYPES[args.dtype])
    ids = tok(ids_text, return_tensors="pt").input_ids
    need = max(max(args.lengths), max(args.eval_lengths) + args.steps)
    if ids.shape[1] < need:
        raise ValueError(f"bench_kv: the text has {ids.shape[1]} {name} tokens, the settings need {need} "
                         f"(max(--lengths), max(--eval-lengths) + --steps)")
    print(f"{name}: loaded in {time.perf_counter() - t0:.0f} s, text {ids.shape[1]} tokens", flush=True)
    methods = args.methods
    with torch.inference_mode():
        full = DynamicCache(config=model.config)
        model(ids[:, :max(args.lengths)], cache=full, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in full.layers]
        full_bits = torch.finfo(DTYPES[args.dtype]).bits
        rows = {m: dict(model=name, method=m, bits=METHODS[m][0] if m in METHODS else full_bits)
                for m in ["full", *methods]}
        replayed, inexact = {}, []
        for n in sorted(args.lengths):
            ref = DynamicCache(config=model.config)
            replay(ref, kv, n)
            denom = fp16_bytes(ref)
            for m in rows:
                cache = new_cache(m, model, args)
                if not replay(cache, kv, n):
                    inexact.append(f"{m}@{n}")
                replayed[m, n] = held_bytes(cache)
                rows[m][f"bytes_frac_{n}"] = replayed[m, n] / denom
        del full, kv
    print(f"{name}: bytes at {sorted(args.lengths)} done", flush=True)
    for n in sorted(args.eval_lengths):
        t0 = time.perf_counter()
        res = evaluate(model, ids, n, args.steps, methods, args)
        for m, r in res.items():
            rows[m].update({f"prefill_{n}": r["prefill"], f"decode_bytes_frac_{n}": r["decode_bytes_frac"],
                            f"top1_{n}": r["top1"],
                            f"kl_nats_{n}": r["kl"], f"step_ms_{n}": r["step_ms"],
                            f"latency_ratio_{n}": r["latency_ratio"],
                            f"latency_ratio_mean_{n}": r["latency_ratio_mean"]})
            if (m, n) not in replayed or r["prefill"] == "forward":  # what a real prefill held
                rows[m][f"bytes_frac_{n}"] = r["prefill_bytes_frac"]
        print(f"{name}: {args.steps} steps at {n} in {time.perf_counter() - t0:.0f} s", flush=True)
    if inexact:
        print(f"WARNING {name}: the updates of {inexact} changed the states they were given, so their replayed "
              f"bytes_frac_* may differ from a prefill's (eval lengths use a prefill forward for them)")
    out = list(rows.values())
    lines = [line for r in out for line in targets(r["method"], r, out, args.eval_lengths)]
    info = {"file": str(path), "tokens_in_text": ids.shape[1], "layers": model.config.num_hidden_layers,
            "kv_heads": model.config.num_key_value_heads,
            "head_dim": getattr(model.config, "head_dim", None) or
            model.config.hidden_size // model.config.num_attention_heads,
            "replay_not_exact": inexact}
    return out, lines, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                    help="models to run; one whose file is missing is skipped with a message (default: all)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                    help="caches to compare with the full DynamicCache (always run); a method that cannot be built "
                         "stops the run before any model loads (default: all)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096],
                    help="cached tokens at which bytes are measured (default: 512 1024 2048 4096)")
    ap.add_argument("--eval-lengths", type=int, nargs="+", default=[2048],
                    help="context lengths at which agreement, KL and latency are measured (default: 2048)")
    ap.add_argument("--steps", type=int, default=128, help="teacher-forced one-token steps per eval length (128)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2; also set "
                                                           "OMP_NUM_THREADS to the same number)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                    help="model and cache dtype (default bf16: the full cache then is the fp16-sized baseline)")
    ap.add_argument("--group", type=int, default=32, help="quantisation group size of every method (default 32)")
    ap.add_argument("--residual", type=int, default=128,
                    help="full-precision residual length of every method (default 128)")
    ap.add_argument("--text", type=pathlib.Path, help="a UTF-8 text file to use instead of the project's sources")
    ap.add_argument("--text-commit", default=TEXT_COMMIT,
                    help=f"git revision whose sources are the default text (default {TEXT_COMMIT})")
    ap.add_argument("--quick", action="store_true",
                    help="development run: smollm2 only, lengths 256 512, eval at 512, 16 steps; writes no JSON")
    args = ap.parse_args()
    if args.quick:
        args.models, args.lengths, args.eval_lengths, args.steps = ["smollm2"], [256, 512], [512], 16
    for flag, vals in (("--lengths", args.lengths), ("--eval-lengths", args.eval_lengths),
                       ("--steps", [args.steps]), ("--threads", [args.threads])):
        if min(vals) < 1:
            raise ValueError(f"bench_kv: {flag} must be positive, got {vals}")
    torch.set_num_threads(args.threads)
    check_methods(args.methods, args)
    text = args.text.read_text(encoding="utf-8") if args.text else source_text(args.text_commit)
    text_desc = str(args.text) if args.text else f"python/dlmom/*.py + csrc/** at git {args.text_commit}"
    all_rows, all_lines, models = [], [], {}
    for key in args.models:
        rows, lines, info = run_model(key, args, text)
        models[MODELS[key][0]] = info
        if rows:
            print()
            print_table(rows)
            print("\n".join(lines))
        all_rows += rows
        all_lines += lines
    versions = {}
    for pkg in ("optimum-quanto", "hqq"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    settings = {"threads": args.threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "dtype": args.dtype,
                "transformers": transformers.__version__, **versions,
                "group_size": args.group, "residual_length": args.residual, "steps": args.steps,
                "lengths": sorted(args.lengths), "eval_lengths": sorted(args.eval_lengths),
                "text": text_desc, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "methods": {m: METHODS[m][1] for m in args.methods}, "models": models, "targets": all_lines,
                "top1_stderr_at_95pct": math.sqrt(0.95 * 0.05 / args.steps)}
    if args.quick:
        print("quick run: no JSON written")
    else:
        print("wrote", write_results("kv", "cpu", all_rows, extra={"settings": settings}))


if __name__ == "__main__":
    main()
