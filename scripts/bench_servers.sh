# Sourced by the benchmark scripts: one server at a time in its own process group.
# Needs PORT and OUT set; sets SERVER_PID. A server is ready when /health and /v1/models
# answer (duet's frontend lists models before its engine core is up; /health waits for it).

SERVER_PID=""

start_server() {  # start_server NAME COMMAND...: logs to $OUT/NAME-server.log
    local name="$1"; shift
    echo "[bench] starting $name: $*"
    setsid "$@" > "$OUT/$name-server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 900); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "[bench] $name exited during startup; see $OUT/$name-server.log" >&2
            exit 1
        fi
        curl -sf "http://127.0.0.1:$PORT/health" > /dev/null \
            && curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && return
        sleep 1
    done
    echo "[bench] $name not ready after 900 s" >&2
    exit 1
}

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
