#!/usr/bin/env bash
# Benchmarks duet's optional features against duet without them, in one run on one machine:
# each variant is served alone, measured with the same client, seed and workload as its
# baseline, and the ratios go into docs/benchmarks.md. Groups (ONLY picks some):
#   c16    random 256/128 at concurrency 16, --dtype DTYPE: base, then 4 LoRA adapters mixed,
#          a json_schema on every request, --async-scheduling, --quantization int8, and 5
#          open dashboards polling /dashboard/stats once a second (frontend CPU compared)
#   c1     the same at concurrency 1: base, --async-scheduling, --quantization int8
#   spec   copy-heavy chats at concurrency 1, float32: without and with n-gram speculation;
#          and random 256/128 at concurrency 16 (nothing to match), the same two
#   pd     1 prefill + 1 decode worker on shared prefixes (prefix-repetition): the KV bytes
#          moved with the decode side's prefix cache consulted (the default) and without
#          any prefix cache (--no-enable-prefix-caching: every block moves, as before issue
#          11's item 4)
#   lora   c16's base and 4-LoRA pair alone, twice in turn (not in the default set)
# HEAVY: takes both cores for ~15 minutes; run it alone. Knobs: PORT, OUT, SEED_BASE, DTYPE
# (auto), ONLY (a space-separated subset of the groups; a run of other than the default set
# writes its own section of docs/benchmarks.md), VENV (.venv; another one is used as it is,
# without scripts/install.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-8021}"
OUT="${OUT:-bench_results/features-$(date +%Y%m%d-%H%M%S)}"
SEED_BASE="${SEED_BASE:-$(date +%s)}"
DTYPE="${DTYPE:-auto}"
DEFAULT_GROUPS="c16 c1 spec pd"
ONLY="${ONLY:-$DEFAULT_GROUPS}"
VENV="${VENV:-.venv}"
BENCH=("$VENV/bin/duet" bench serve --base-url "http://127.0.0.1:$PORT" --disable-tqdm)
RANDOM_256_128=(--dataset-name random --input-len 256 --output-len 128 --ignore-eos --temperature 0)
RANDOM_C16=("${RANDOM_256_128[@]}" --num-prompts 48 --max-concurrency 16 --num-warmups 8)
RANDOM_C1=("${RANDOM_256_128[@]}" --num-prompts 8 --max-concurrency 1 --num-warmups 2)
COPY_C1=(--dataset-name repeat --endpoint /v1/chat/completions --temperature 0
         --max-concurrency 1 --num-prompts 8 --output-len 160 --num-warmups 2)
NGRAM='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
SHARED_PREFIXES=(--dataset-name prefix-repetition --prefix-len 512 --suffix-len 64 --num-prefixes 4
                 --output-len 64 --num-prompts 48 --max-concurrency 16 --ignore-eos --temperature 0)
DASHBOARDS=()

# shellcheck source=scripts/bench_servers.sh
source scripts/bench_servers.sh
trap stop_server EXIT

frontend_cpu_seconds() {  # CPU time of the processes listening on PORT (the frontends)
    local total=0 pid
    for pid in $(ss -ltnpH "sport = :$PORT" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
        total=$(awk -v t="$total" '{print t + ($14 + $15) / 100}' "/proc/$pid/stat")
    done
    echo "$total"
}

open_dashboards() {  # open_dashboards N: N pollers of /dashboard/stats, once a second each
    local i
    for i in $(seq "$1"); do
        (while true; do curl -s "http://127.0.0.1:$PORT/dashboard/stats" > /dev/null; sleep 1; done) &
        DASHBOARDS+=($!)
    done
}

measure() {  # measure NAME SEED_OFFSET SERVER_ARGS... --bench BENCH_ARGS...
    local name="$1" seed=$((SEED_BASE + $2)); shift 2
    local server=()
    while [ "$1" != --bench ]; do server+=("$1"); shift; done
    shift
    start_server "$name" "$VENV/bin/duet" serve --host 127.0.0.1 --port "$PORT" \
        --disable-log-requests "${server[@]}"
    [ "${name#dash}" != "$name" ] && open_dashboards 5
    echo "[features] $name: bench"
    local cpu_before
    cpu_before=$(frontend_cpu_seconds)
    "${BENCH[@]}" --seed "$seed" --save-result "$OUT/$name.json" "$@" | tee "$OUT/$name.txt"
    awk -v a="$cpu_before" -v b="$(frontend_cpu_seconds)" 'BEGIN {print b - a}' > "$OUT/$name.cpu"
    curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/$name.metrics"
    [ ${#DASHBOARDS[@]} -gt 0 ] && kill "${DASHBOARDS[@]}" 2>/dev/null
    DASHBOARDS=()
    stop_server
}

wants() { [[ " $ONLY " == *" $1 "* ]]; }

[ "$VENV" = .venv ] && scripts/install.sh
mkdir -p "$OUT"
echo "[features] results in $OUT, seeds from $SEED_BASE"
modules=()
for i in 0 1 2 3; do modules+=("a$i=$OUT/adapters/a$i"); done
lora_pair() {  # lora_pair SUFFIX: base, then 4 adapters mixed, at c16
    measure "base-c16$1" 1 --dtype "$DTYPE" --bench "${RANDOM_C16[@]}"
    measure "lora4-c16$1" 1 --dtype "$DTYPE" --enable-lora --max-loras 4 \
        --lora-modules "${modules[@]}" --bench "${RANDOM_C16[@]}" --lora-modules a0 a1 a2 a3
}
if wants c16 || wants lora; then
    "$VENV/bin/python" scripts/make_lora_adapters.py "$OUT/adapters" --count 4
fi
if wants lora; then
    lora_pair ""
    lora_pair -2
fi
if wants c16; then
    wants lora || lora_pair ""
    measure json-c16 1 --dtype "$DTYPE" --bench "${RANDOM_C16[@]}" --structured-output json_schema
    measure async-c16 1 --dtype "$DTYPE" --async-scheduling --bench "${RANDOM_C16[@]}"
    measure int8-c16 1 --dtype "$DTYPE" --quantization int8 --bench "${RANDOM_C16[@]}"
    measure dash5-c16 1 --dtype "$DTYPE" --bench "${RANDOM_C16[@]}"
fi
if wants c1; then
    measure base-c1 2 --dtype "$DTYPE" --bench "${RANDOM_C1[@]}"
    measure async-c1 2 --dtype "$DTYPE" --async-scheduling --bench "${RANDOM_C1[@]}"
    measure int8-c1 2 --dtype "$DTYPE" --quantization int8 --bench "${RANDOM_C1[@]}"
fi
if wants spec; then
    measure fp32-copy-c1 3 --dtype float32 --bench "${COPY_C1[@]}"
    measure spec-copy-c1 3 --dtype float32 --speculative-config "$NGRAM" --bench "${COPY_C1[@]}"
    measure fp32-random-c16 4 --dtype float32 --bench "${RANDOM_C16[@]}"
    measure spec-random-c16 4 --dtype float32 --speculative-config "$NGRAM" \
        --bench "${RANDOM_C16[@]}"
fi
if wants pd; then
    measure pd-nocache 5 --dtype "$DTYPE" --prefill-workers 1 --decode-workers 1 \
        --no-enable-prefix-caching --bench "${SHARED_PREFIXES[@]}"
    measure pd-reuse 5 --dtype "$DTYPE" --prefill-workers 1 --decode-workers 1 \
        --bench "${SHARED_PREFIXES[@]}"
fi

"$VENV/bin/python" - "$OUT" docs/benchmarks.md "$DTYPE" "$ONLY" "$DEFAULT_GROUPS" <<'EOF'
import json, os, re, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, "scripts")
from doc_section import write_section

out, doc, dtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
only, default_groups = sys.argv[4].split(), sys.argv[5].split()
PAIRS = [  # (variant, baseline, what differs)
    ("lora4-c16", "base-c16", "4 LoRA adapters mixed (c16)"),
    ("lora4-c16-2", "base-c16-2", "4 LoRA adapters mixed (c16, again)"),
    ("json-c16", "base-c16", "json_schema on every request (c16)"),
    ("async-c16", "base-c16", "--async-scheduling (c16)"),
    ("int8-c16", "base-c16", "--quantization int8 (c16)"),
    ("dash5-c16", "base-c16", "5 open dashboards (c16)"),
    ("async-c1", "base-c1", "--async-scheduling (c1)"),
    ("int8-c1", "base-c1", "--quantization int8 (c1)"),
    ("spec-copy-c1", "fp32-copy-c1", "n-gram speculation, copy-heavy chats (c1, fp32)"),
    ("spec-random-c16", "fp32-random-c16", "n-gram speculation, random prompts (c16, fp32)"),
    ("pd-reuse", "pd-nocache", "1P+1D, shared prefixes: prefix caches vs none"),
]
ROWS = [("output tok/s", "output_throughput"), ("TPOT p50 ms", ("tpot", "median")),
        ("TTFT p50 ms", ("ttft", "median")), ("ITL p50 ms", ("itl", "median")),
        ("frontend CPU s / 1k tokens", None)]

def value(result, key):
    return result[key[0]][key[1]] if isinstance(key, tuple) else result[key]

lines = ["| compared | metric | without | with | with/without |", "|---|---|---:|---:|---:|"]
for variant, base, what in PAIRS:
    if not (out / f"{variant}.json").exists():
        continue
    mine, theirs = (json.loads((out / f"{n}.json").read_text()) for n in (variant, base))
    for label, key in ROWS:
        if label == "frontend CPU s / 1k tokens":
            a, b = (float((out / f"{n}.cpu").read_text()) * 1000 / r["total_output_tokens"]
                    for n, r in ((base, theirs), (variant, mine)))
        else:
            a, b = value(theirs, key), value(mine, key)
        if a is None or b is None:
            continue
        ratio = f"{b / a:.2f}" if a else "—"
        lines.append(f"| {what} | {label} | {a:.2f} | {b:.2f} | {ratio} |")
metrics = out / "spec-copy-c1.metrics"
if metrics.exists():
    text = metrics.read_text()
    def total(name):
        return sum(float(m) for m in re.findall(rf"^duet:{name}_total\{{[^}}]*\}} (\S+)$", text, re.M))
    drafted, accepted = total("spec_decode_num_draft_tokens"), total("spec_decode_num_accepted_tokens")
    if drafted:
        lines.append(f"\nCopy-heavy run: {accepted:.0f} of {drafted:.0f} draft tokens accepted "
                     f"({accepted / drafted:.0%}).")
moved = {}
for name in ("pd-nocache", "pd-reuse"):
    path = out / f"{name}.metrics"
    found = path.exists() and re.search(r"^duet:kv_transfer_bytes_total(?:\{[^}]*\})? (\S+)$",
                                        path.read_text(), re.M)
    if found:
        moved[name] = float(found.group(1))
if len(moved) == 2 and moved["pd-nocache"]:
    lines.append(f"\nKV moved prefill -> decode (`duet:kv_transfer_bytes_total`): "
                 f"{moved['pd-nocache'] / 1e6:.1f} MB without prefix caches, "
                 f"{moved['pd-reuse'] / 1e6:.1f} MB with the decode side's consulted "
                 f"({moved['pd-reuse'] / moved['pd-nocache']:.2f}x).")
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
            if line.startswith("model name")), "?")
flags = sorted(set(re.findall(r"\b(avx512\w*|avx2|amx\w*)\b", open("/proc/cpuinfo").read())))
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
marker, groups = "compare_features", ""
if only != default_groups:
    marker, groups = f"compare_features-{'-'.join(only)}", f" (groups: {', '.join(only)})"
write_section(doc, marker, [
    f"## duet's features vs duet without them{groups} — {time.strftime('%Y-%m-%d')}",
    "",
    f"SmolLM2-135M-Instruct, `--dtype {dtype}` unless marked fp32, {os.cpu_count()} × {cpu} "
    f"(flags: {' '.join(flags)}), duet {rev}. Written by `scripts/compare_features.sh`; raw "
    f"results in `{out}`. Each pair ran in the same invocation with the same seed and workload.",
    "",
    *lines,
])
print(f"[features] wrote {doc}")
EOF
