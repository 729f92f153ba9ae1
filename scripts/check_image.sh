#!/usr/bin/env bash
# Builds duet's image from a clean clone of this repository's HEAD (Containerfile) and
# checks it for real: one `docker run` of the default command serves /health, a chat
# completion and /dashboard; then the four roles of deploy/base (engine core, frontend,
# one prefill and one decode worker), each in its own container on a network of their
# own, started with the manifests' own args, pass the manifests' probes and serve a
# request through the prefill -> decode path. Tears everything down; exits non-zero on
# any failure, printing the containers' logs.
#
# Needs a container runtime with a running daemon (docker; DOCKER=podman should work but
# has not been tried) and python3, curl and git on the host. Not part of scripts/test.sh:
# CI has no container daemon. docs/deploy.md has a run's commands and figures. A dockerd
# started on a developer's machine leaves iptables' FORWARD policy at DROP with bridge
# netfilter on, which cuts tests/test_disagg_netns.py's bridge: docs/deploy.md says how
# to undo it.
#
# Usage: scripts/check_image.sh [docker build arguments...]
#   e.g. scripts/check_image.sh --build-arg BASE=local/debian-python:bookworm
# Environment: IMAGE (tag to build, default duet:check), DOCKER (default docker),
#   NO_BUILD=1 (check IMAGE as it is), KEEP_IMAGE=1 (keep what this built),
#   TIMEOUT (seconds for the roles to pass their probes, default 600).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DOCKER="${DOCKER:-docker}"
IMAGE="${IMAGE:-duet:check}"
TIMEOUT="${TIMEOUT:-600}"
MODEL=SmolLM2-135M-Instruct
TAG="duet-check-$$"
WORK="$(mktemp -d)"
API_KEY="check-$$-$RANDOM"
containers=()

say() { echo "[check_image $(date +%H:%M:%S)] $*"; }

teardown() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        for c in "${containers[@]}"; do
            echo "----- logs of $c (last 60 lines)"
            "$DOCKER" logs --tail 60 "$c" 2>&1 || true
        done
    fi
    for c in "${containers[@]}"; do "$DOCKER" rm -f "$c" >/dev/null 2>&1 || true; done
    "$DOCKER" network rm "$TAG" >/dev/null 2>&1 || true
    if [ "${NO_BUILD:-}" != 1 ] && [ "${KEEP_IMAGE:-}" != 1 ]; then
        "$DOCKER" rmi "$IMAGE" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    if [ "$rc" -eq 0 ]; then say "PASS"; else say "FAIL (exit $rc)"; fi
}
trap teardown EXIT

fail() {
    say "FAIL: $*"
    exit 1
}

# host port that `docker run -p 127.0.0.1::PORT` gave container $1's PORT $2
host_port() { "$DOCKER" port "$1" "$2/tcp" | head -n1 | sed 's/.*://'; }

# waits until http://127.0.0.1:$2$3 answers 200, failing if container $1 exits first
wait_ok() {
    local deadline=$((SECONDS + TIMEOUT))
    until curl -sf -o /dev/null "http://127.0.0.1:$2$3"; do
        [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$1")" = true ] || fail "$1 exited"
        [ "$SECONDS" -lt "$deadline" ] || fail "$1: $3 not 200 after ${TIMEOUT}s"
        sleep 2
    done
}

# a role's args in deploy/base/$1.yaml: the items of its `args:` list, comments dropped
role_args() {
    awk '/^ *args: *$/ {inside = 1; next}
         inside && /^ *- / {sub(/^ *- /, ""); sub(/ +#.*$/, ""); print; next}
         inside {exit}' "$ROOT/deploy/base/$1.yaml"
}

# POST a chat completion to port $1 with bearer key $2; prints the reply's content
chat() {
    local reply
    reply="$(curl -sf --max-time 300 "http://127.0.0.1:$1/v1/chat/completions" \
        -H "Authorization: Bearer $2" -H 'Content-Type: application/json' \
        -d "{\"model\": \"$MODEL\", \"max_tokens\": 16, \"temperature\": 0,
             \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of Japan?\"}]}")" \
        || fail "chat completion on port $1 failed"
    python3 -c '
import json, sys
reply = json.loads(sys.argv[1])
content = reply["choices"][0]["message"]["content"]
assert reply["usage"]["completion_tokens"] >= 1 and content, reply
print(content)' "$reply" || fail "chat completion returned no tokens: $reply"
}

if [ "${NO_BUILD:-}" != 1 ]; then
    say "cloning HEAD ($(git -C "$ROOT" rev-parse --short HEAD)) into a clean tree"
    [ -z "$(git -C "$ROOT" status --porcelain)" ] || say "note: uncommitted changes are not in the image"
    git clone -q "$ROOT" "$WORK/src"
    git -C "$WORK/src" checkout -q "$(git -C "$ROOT" rev-parse HEAD)"
    say "building $IMAGE"
    start=$SECONDS
    "$DOCKER" build -t "$IMAGE" -f "$WORK/src/Containerfile" "$@" "$WORK/src"
    say "built in $((SECONDS - start))s"
fi
say "image $IMAGE: $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"

# 1. the image's default command: a colocated server on 8000, no API key
say "docker run $IMAGE (default command)"
containers+=("$TAG-serve")
"$DOCKER" run -d --name "$TAG-serve" -p 127.0.0.1::8000 "$IMAGE" >/dev/null
port="$(host_port "$TAG-serve" 8000)"
start=$SECONDS
wait_ok "$TAG-serve" "$port" /health
say "/health 200 after $((SECONDS - start))s (first start: kernels compiled, model loaded)"
answer="$(chat "$port" none)"
say "chat completion: $answer"
page="$(curl -sf "http://127.0.0.1:$port/dashboard")" || fail "/dashboard not 200"
grep -q "<title>duet dashboard" <<<"$page" || fail "/dashboard is not the dashboard page"
for asset in $(grep -oE '(src|href)="/dashboard/[^"]*"' <<<"$page" | cut -d'"' -f2); do
    curl -sf -o /dev/null "http://127.0.0.1:$port$asset" || fail "$asset not 200"
done
curl -sf -o /dev/null "http://127.0.0.1:$port/dashboard/stats" || fail "/dashboard/stats not 200"
say "/dashboard, its assets and /dashboard/stats 200"
"$DOCKER" rm -f "$TAG-serve" >/dev/null

# 2. deploy/base's roles, one container each, as the manifests run them: the keys
# directory mounted read-only at /etc/duet/keys (frontends without server.key_secret),
# the API key in DUET_API_KEY where the manifest sets it, `duet-core` the core's name
say "deploy/base roles on network $TAG"
mkdir -p "$WORK/keys" "$WORK/frontend-keys"
"$DOCKER" run --rm --user "$(id -u):$(id -g)" -v "$WORK/keys:/keys" "$IMAGE" keys /keys >/dev/null
cp "$WORK"/keys/{server.key,client.key,client.key_secret} "$WORK/frontend-keys/"
"$DOCKER" network create "$TAG" >/dev/null
for role in core prefill decode frontend; do
    manifest="$ROOT/deploy/base/$role.yaml"
    grep -q '^ *command: \[duet\]$' "$manifest" || fail "$manifest: command is not [duet]"
    mapfile -t args < <(role_args "$role")
    [ "${#args[@]}" -gt 0 ] || fail "$manifest: no args found"
    keys="$WORK/keys"
    [ "$role" != frontend ] || keys="$WORK/frontend-keys"
    env=(-e DUET_CURVE_KEYS=/etc/duet/keys)
    if grep -q 'secretKeyRef: {name: duet-api-key' "$manifest"; then
        env+=(-e "DUET_API_KEY=$API_KEY")
    fi
    ports=(-p 127.0.0.1::8000)
    case "$role" in prefill | decode) ports=(-p 127.0.0.1::8001) ;; esac
    alias=()
    [ "$role" != core ] || alias=(--network-alias duet-core)
    containers+=("$TAG-$role")
    say "  duet-$role: duet ${args[*]}"
    "$DOCKER" run -d --name "$TAG-$role" --network "$TAG" "${alias[@]}" "${env[@]}" \
        "${ports[@]}" -v "$keys:/etc/duet/keys:ro" "$IMAGE" "${args[@]}" >/dev/null
done
start=$SECONDS
for role in core prefill decode; do
    probe_port=8000
    case "$role" in prefill | decode) probe_port=8001 ;; esac
    wait_ok "$TAG-$role" "$(host_port "$TAG-$role" "$probe_port")" /health
    say "  duet-$role /health ($probe_port) 200 after $((SECONDS - start))s"
done
fport="$(host_port "$TAG-frontend" 8000)"
wait_ok "$TAG-frontend" "$fport" /health
wait_ok "$TAG-frontend" "$fport" /version
say "  duet-frontend /health and /version 200 after $((SECONDS - start))s"
answer="$(chat "$fport" "$API_KEY")"
say "chat completion through duet-frontend: $answer"
curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$fport/v1/models" | grep -q 401 \
    || fail "the frontend answers without its API key"
metrics="$(curl -sf "http://127.0.0.1:$fport/metrics")" || fail "/metrics not 200"
stats="$(curl -sf -H "Authorization: Bearer $API_KEY" "http://127.0.0.1:$fport/dashboard/stats")" \
    || fail "/dashboard/stats not 200 with the key"
pd="$(python3 -c '
import json, re, sys
metrics, stats = sys.argv[1], json.loads(sys.argv[2])
def value(name, labels=""):
    found = re.search(rf"^{name}{{[^}}]*{labels}[^}}]*}} (\S+)$", metrics, re.M)
    assert found, f"{name} {labels} not in /metrics"
    return float(found.group(1))
assert value("duet:num_workers", "role=\"prefill\"") == 1
assert value("duet:num_workers", "role=\"decode\"") == 1
moved = value("duet:kv_transfer_bytes_total")
assert moved > 0, "no KV moved prefill -> decode"
roles = sorted(w["role"] for w in stats["workers"])
assert roles == ["decode", "prefill"], roles
print(f"1 prefill + 1 decode worker joined; {moved:.0f} bytes of KV moved prefill -> decode")
' "$metrics" "$stats")" || fail "the request did not go through 1 prefill + 1 decode worker"
say "$pd"
