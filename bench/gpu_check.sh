#!/usr/bin/env bash
# The first run of dlmom's CUDA kernels on a GPU, as one script for a fresh machine (issue #16): build for one
# architecture, `dlmom info`, the CUDA test cases, compute-sanitizer on each op, the op benchmarks on the GPU and
# a short generation with tiny random models. Every stage runs under `timeout`, writes its output to
# $OUT/<stage>.log and ends in a summary table (stage, rc, seconds) in $OUT/summary.txt; the benchmarks' JSON
# goes to bench/results/*-gpu.json and is copied to $OUT. Nothing is downloaded: a missing tool or package
# skips the stages that need it (shown as SKIP with the reason).
#
#   OUT=/tmp/gpucheck bash bench/gpu_check.sh          # on the GPU machine, from the repository root
#   GPU_CHECK_DRY=1 OUT=/tmp/gc bash bench/gpu_check.sh  # no GPU: the plumbing only (GPU stages SKIP)
#   bash bench/gpu_check.sh --prepare-site              # here: copy pytest & co. into .gpu-site/ (see below)
#
# Environment: OUT (default ./gpu-check-out), PYTHON (default .venv/bin/python if present, else python3),
# CUDA_ARCH (default 90: H100/H200), GPU_CHECK_DRY=1 (skip the GPU stages; also implied without a GPU),
# GPU_CHECK_BUILD=0 (use the dlmom already importable instead of building).
# .gpu-site/: pure-Python test packages (pytest, pluggy, iniconfig, packaging) put on PYTHONPATH when
# the machine's Python lacks them; `--prepare-site` fills it from this machine's Python. It is untracked, not
# ignored, so the device tool carries it with the working tree.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
SITE=$ROOT/.gpu-site

if [[ -x .venv/bin/python ]]; then PY=${PYTHON:-$ROOT/.venv/bin/python}; else PY=${PYTHON:-python3}; fi

if [[ "${1:-}" == "--prepare-site" ]]; then
  rm -rf "$SITE" && mkdir -p "$SITE"
  "$PY" - "$SITE" <<'EOF'
import importlib.metadata as md, pathlib, shutil, sys
site = pathlib.Path(sys.argv[1])
# Pure-Python distributions only (they run on any Python 3): the test runner, copied file by file from their
# RECORD (dist-info included). Not hypothesis: recent versions carry a compiled module (hypothesis._native)
# built for this machine's Python; the fuzz stage is skipped where the GPU machine lacks it.
for name in ["pytest", "pluggy", "iniconfig", "packaging", "exceptiongroup", "tomli", "typing_extensions"]:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    n = 0
    for f in dist.files or []:
        src = pathlib.Path(dist.locate_file(f))
        if f.parts[0] == ".." or "__pycache__" in f.parts or src.suffix == ".so" or not src.is_file():
            continue
        dst = site / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        n += 1
    print("copied", name, dist.version, n, "files")
EOF
  du -sh "$SITE"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
ARCH=${CUDA_ARCH:-90}
SUMMARY=$OUT/summary.tsv
: > "$SUMMARY"
T_START=$(date +%s)

log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

# stage NAME SECONDS CMD...: run CMD under timeout, output to $OUT/NAME.log, record rc and seconds. The
# whole script keeps to GPU_CHECK_BUDGET seconds (default 470): a stage gets at most what is left, and none
# starts with under 15 s left (SKIP), so the summary is always written in time.
BUDGET=${GPU_CHECK_BUDGET:-470}
DEADLINE=$(( T_START + BUDGET ))
stage() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( DEADLINE - t0 ))
  if (( left < 15 )); then skip "$name" "out of time (GPU_CHECK_BUDGET=${BUDGET}s)"; return 0; fi
  (( limit > left )) && limit=$left
  log "stage $name (timeout ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  [[ $rc -eq 124 || $rc -eq 137 ]] && echo "[gpu_check] TIMEOUT after ${limit}s" >> "$OUT/$name.log"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$SUMMARY"
  log "stage $name: rc=$rc in ${dt}s"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
  return 0
}
skip() {  # skip NAME REASON
  printf '%s\t%s\t%s\n' "$1" "SKIP" "0" >> "$SUMMARY"
  echo "SKIP: $2" > "$OUT/$1.log"
  log "stage $1: SKIP ($2)"
}

# ---- environment ----
export PYTHONUNBUFFERED=1 DLMOM_STRICT_OPS=1
[[ -d /usr/local/cuda/bin ]] && export PATH="$PATH:/usr/local/cuda/bin"
has_mod() { "$PY" -c "import $1" > /dev/null 2>&1; }
# .gpu-site only where the machine's Python has no pytest of its own (it would shadow that one).
if [[ -d "$SITE" ]] && ! has_mod pytest; then export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE"; fi
GPU=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1 && GPU=1
DRY=${GPU_CHECK_DRY:-0}
# (GPU_CHECK_FORCE=1 runs the GPU stages without a GPU: only to test this script's plumbing; they fail.)
[[ $GPU -eq 0 && "${GPU_CHECK_FORCE:-0}" != "1" ]] && DRY=1
log "python: $PY; GPU: $GPU; dry: $DRY; out: $OUT"

stage env 60 bash -c '
  echo "== date"; date -u
  echo "== git"; git log --oneline -1 2>/dev/null; git status --short 2>/dev/null | head -20
  echo "== nvidia-smi"; nvidia-smi 2>&1 | head -25
  echo "== nvcc"; nvcc --version 2>&1 | tail -2
  echo "== compute-sanitizer"; command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>&1 | head -2
  echo "== cmake / ninja"; cmake --version | head -1; ninja --version
  echo "== python"; '"$PY"' -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\")"
  echo "== modules"; for m in pytest hypothesis numpy transformers tokenizers tqdm gguf accelerate pybind11 scikit_build_core; do '"$PY"' -c "import $m; print(\"$m\", getattr($m, \"__version__\", \"?\"))" 2>/dev/null || echo "$m MISSING"; done'

# ---- build: the extension for one architecture, in place (no pip, no network) ----
if [[ "${GPU_CHECK_BUILD:-1}" == "1" ]]; then
  if [[ $DRY -eq 1 ]]; then
    # No GPU: configure only (proves cmake finds nvcc, pybind11 and OpenMP with these flags); keep the
    # extension this machine already has.
    stage build 300 cmake -S . -B build/gpu-check -G Ninja -DDLMOM_INPLACE=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
      -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')"
  else
    stage build 240 bash -c "cmake -S . -B build/gpu-check -G Ninja -DDLMOM_INPLACE=ON \
        -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DPython_EXECUTABLE=\$('$PY' -c 'import sys; print(sys.executable)') \
      && cmake --build build/gpu-check -j \$(nproc) && ls -la python/dlmom/*.so"
    export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

stage info 60 "$PY" -m dlmom info
stage info_json 60 "$PY" -c "import dlmom, json; print(dlmom.__file__); print(json.dumps(dlmom.backend_info(), indent=1))"

# ---- the scripts the GPU stages run (written to $OUT, so they come back with the logs) ----
cat > "$OUT/ops_once.py" <<'EOF'
"""Each dlmom op once on CUDA (small shapes), for compute-sanitizer; a value error would raise here."""
import torch

import dlmom
from dlmom import ops

dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
W = torch.randn(1000, 96, device=dev, generator=g, dtype=torch.bfloat16)
ids = torch.randint(0, 1000, (3, 50), device=dev, generator=g)
p = torch.softmax(torch.randn(3, 50, device=dev, generator=g), -1)
dlmom.soft_embed(ids, p, W)
x = torch.randn(3, 9001, device=dev, generator=g)
dlmom.topk_packet(x, 50, temperature=0.7, top_p=0.9)            # shared-memory merge of the segments
dlmom.topk_packet(x[:1], 3000, top_p=0.5)                       # whole-segment sorts, the rank merge, tiles
dlmom.topk_packet(x.half()[:, :7], 7)                           # one short, unaligned segment
dlmom.topk_packet(x.bfloat16()[:, 1:], 50)                      # rows 2, 4, 6 bytes off 16: scalar loads
dlmom.ties_merge(torch.randn(3, 2, 5004, device=dev, generator=g).bfloat16()[..., 1:])  # unaligned rows
dlmom.ties_merge(torch.randn(3, 2, 5003, device=dev, generator=g), theta=0.5)
dlmom.ties_merge(torch.randn(9, 2, 777, device=dev, generator=g), elect="mass",
                 weights=torch.rand(9, 2, device=dev, generator=g))  # E > 8: the generic kernel
q = dlmom.kv_quant2(torch.randn(2, 8, 67, 64, device=dev, generator=g, dtype=torch.float16), group_size=32, axis=-2)
dlmom.kv_dequant2(q)
ops.raise_pending_errors()
torch.cuda.synchronize()
print("ops_once: ok")
EOF
cat > "$OUT/e2e_tiny.py" <<'EOF'
"""Three tiny random Llamas (tests/tiny_models.py) through DLMoM on the GPU: greedy explicit decoding must equal
transformers' generate, and the latent controllers with KIVI caches must run and count usage."""
import sys, time

import torch

sys.path.insert(0, "tests")
from tiny_models import llama, tokenizer  # noqa: E402

from dlmom import DLMoM, DLMoMConfig  # noqa: E402

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
tok = tokenizer("bytes", 300)
models = [llama(tok, seed=s).to(dev) for s in range(3)]
prompt = "What is 7 * 8? Then add 15."
moe = DLMoM([(models[0], tok)], config=DLMoMConfig(controller="explicit"))
got = moe.generate([prompt], max_new_tokens=16)[0].text
enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                              return_dict=True).to(dev)
out = models[0].generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
want = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)  # transformers' own greedy
print("explicit == hf generate:", got == want)
assert got == want, (got, want)
# kivi with a short residual: prompts of ~30 tokens get quantised key / value blocks (kv_quant2 runs).
for controller, kv in [("latent", {}), ("swir", dict(kv="kivi", kv_group_size=8, kv_residual_length=8))]:
    cfg = DLMoMConfig(controller=controller, top_k=8, **kv)
    moe = DLMoM([(m, tok) for m in models], config=cfg)
    t0 = time.perf_counter()
    res = moe.generate([prompt, "Write a function that sums a list."], max_new_tokens=24, seed=0)
    torch.cuda.synchronize() if dev == "cuda" else None
    print(controller, kv, f"{time.perf_counter() - t0:.2f}s", [(r.usage["tokens"], round(r.usage["wall_s"], 3))
                                                                for r in res], [r.text[:30] for r in res])
print("e2e_tiny: ok")
EOF

SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
SAN_FILTER=()  # only dlmom's kernels are instrumented (their mangled names hold "dlmom"): not torch's
[[ -n "$SAN" ]] && "$SAN" --help 2>&1 | grep -q -- "--kernel-name" && SAN_FILTER=(--kernel-name kns=dlmom)
sanitize() {  # sanitize TOOL
  stage "sanitizer_$1" 90 "$SAN" --tool "$1" "${SAN_FILTER[@]}" --error-exitcode 9 --print-limit 20 \
    "$PY" "$OUT/ops_once.py"
}
pytest_file() {  # pytest_file FILE SECONDS [-k SELECTION]
  local f=$1 limit=$2; shift 2
  # CUDA_LAUNCH_BLOCKING: a kernel fault surfaces at its own launch, not as a later op's sticky error.
  [[ -f tests/$f.py ]] && stage "tests_${f#test_}" "$limit" env CUDA_LAUNCH_BLOCKING=1 \
    "$PY" -m pytest -q -p no:cacheprovider "tests/$f.py" "$@"
}
# tests/test_cuda_sizes.py without CUDA_LAUNCH_BLOCKING: its side-stream case needs launches that return while
# the stream's producer still runs (it skips itself under CUDA_LAUNCH_BLOCKING=1). About 10 GiB of GPU memory.
sizes_tests() {  # sizes_tests SECONDS
  [[ -f tests/test_cuda_sizes.py ]] && stage tests_cuda_sizes "$1" "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_cuda_sizes.py
}

# ---- the stages, most important first (the budget may cut the tail) ----
if [[ $DRY -eq 1 ]]; then
  # No GPU: the plumbing of the same invocations (CUDA cases skip themselves), and the e2e script on the CPU.
  if has_mod pytest; then
    pytest_file test_cuda_divergences 120
    sizes_tests 120
  else
    skip tests "pytest is not importable"
  fi
  skip sanitizer "no GPU (dry run)"
  if has_mod transformers && has_mod tokenizers; then stage e2e 120 "$PY" "$OUT/e2e_tiny.py" cpu
  else skip e2e "transformers / tokenizers are not importable"; fi
  skip bench "no GPU (dry run)"
else
  if has_mod pytest; then
    pytest_file test_cuda_divergences 60            # whole: its CPU twins are cheap
    pytest_file test_topk_packet 90 -k cuda          # -k cuda: the device == "cuda" parameters
    sizes_tests 100                                  # > 2^31 elements, B > 65535, a side stream, threads
  else
    skip tests "pytest is not importable (bench/gpu_check.sh --prepare-site fills .gpu-site/ on a machine with it)"
  fi
  if [[ -n "$SAN" ]]; then sanitize memcheck; else stage ops_once 60 env CUDA_LAUNCH_BLOCKING=1 "$PY" "$OUT/ops_once.py"; skip sanitizer "compute-sanitizer not found"; fi
  if has_mod pytest; then
    for f in test_soft_embed test_ties_merge test_kv_quant2 test_op_library; do pytest_file $f 60 -k cuda; done
  fi
  if has_mod transformers && has_mod tokenizers; then stage e2e 90 "$PY" "$OUT/e2e_tiny.py" cuda
  else skip e2e "transformers / tokenizers are not importable"; fi
  stage bench_topk_packet 45 "$PY" bench/bench_topk_packet.py --device cuda --batch 1 32 --k 50 --min-time 0.05
  stage bench_soft_embed 45 "$PY" bench/bench_soft_embed.py --device cuda --batch 1 32 --k 50 --dim 896 4096
  stage bench_ties_merge 45 "$PY" bench/bench_ties_merge.py --device cuda --E 3 --B 1 32 --min-time 0.05
  stage bench_kv_quant2 45 "$PY" bench/bench_kv_quant2.py --device cuda --heads 8 --tokens 2048 --no-reference
  cp bench/results/*-gpu.json "$OUT/" 2>/dev/null
  if [[ -n "$SAN" ]]; then sanitize racecheck; sanitize synccheck; fi
  # (tests/test_fuzz_ops.py fuzzes the CPU kernels only: nothing for the GPU there.)
fi

# ---- summary ----
{
  printf '%-28s %6s %8s\n' stage rc seconds
  while IFS=$'\t' read -r name rc dt; do printf '%-28s %6s %8s\n' "$name" "$rc" "$dt"; done < "$SUMMARY"
  printf '%-28s %6s %8s\n' total "" "$(( $(date +%s) - T_START ))"
} | tee "$OUT/summary.txt"
# rc: 0 when every stage that ran passed (SKIP does not count), else 1.
awk -F'\t' '$2 != "0" && $2 != "SKIP" {bad=1} END {exit bad}' "$SUMMARY"
