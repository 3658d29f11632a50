#!/usr/bin/env bash
# The seed's command line (vmlx serve MODEL --port 8000 --host 0.0.0.0 --max-tokens 8192
# --continuous-batching --enable-prefix-cache --enable-auto-tool-choice --tool-call-parser qwen3)
# run as `deltaserve serve` on a GGUF file, twice: the first start converts it into the cache,
# the second start reuses the converted directory.
#
# usage: bench/seed_command.sh MODEL.gguf
# env:   PORT (8000), HOST (0.0.0.0, as the seed), CACHE_DIR (a fresh temporary directory),
#        DELTASERVE (the command; default "deltaserve"), START_TIMEOUT seconds (600)
set -euo pipefail

GGUF=${1:?usage: bench/seed_command.sh MODEL.gguf}
PORT=${PORT:-8000}
HOST=${HOST:-0.0.0.0}
CACHE_DIR=${CACHE_DIR:-$(mktemp -d)}
DELTASERVE=${DELTASERVE:-deltaserve}
START_TIMEOUT=${START_TIMEOUT:-600}
PY=${PYTHON:-python3}

# lock files (dot files) are not conversions
entries() { find "$CACHE_DIR" -mindepth 1 -maxdepth 1 -not -name '.*' | wc -l; }
files() { find "$CACHE_DIR" -type f -not -name '.*' -printf '%p %T@\n' | sort; }

start_and_ask() {  # $1 = label; prints the seconds until the server answered a chat request
    local label=$1 log pid t0 t1
    log=$(mktemp)
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    $DELTASERVE serve "$GGUF" --port "$PORT" --host "$HOST" --max-tokens 8192 --continuous-batching \
        --enable-prefix-cache --enable-auto-tool-choice --tool-call-parser qwen3 \
        --cache-dir "$CACHE_DIR" >"$log" 2>&1 &
    pid=$!
    if ! "$PY" - "$PORT" "$START_TIMEOUT" <<'PYEOF'
import json, sys, time, urllib.request
port, timeout = sys.argv[1], float(sys.argv[2])
base = f"http://127.0.0.1:{port}"
deadline = time.time() + timeout
while True:
    try:
        urllib.request.urlopen(base + "/health", timeout=2)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("the server did not come up")
        time.sleep(0.5)
name = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}).encode()
req = urllib.request.Request(base + "/v1/chat/completions", body, {"content-type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=120))
print(f"  chat: finish_reason={reply['choices'][0]['finish_reason']} usage={reply['usage']['total_tokens']} tokens")
PYEOF
    then
        kill "$pid" 2>/dev/null || true
        cat "$log" >&2
        exit 1
    fi
    t1=$(date +%s.%N)
    kill -INT "$pid"
    wait "$pid" || true
    echo "== $label start: answered after $("$PY" -c "print(f'{$t1 - $t0:.1f}')") s; cache entries: $(entries)"
    grep -E "^deltaserve: (preparing|loading)" "$log" | sed 's/^/  /'
    rm -f "$log"
}

echo "cache: $CACHE_DIR (entries before: $(entries))"
start_and_ask first
first_entries=$(entries)
snapshot=$(files)
start_and_ask second
if [ "$(entries)" != "$first_entries" ] || [ "$(files)" != "$snapshot" ]; then
    echo "FAIL: the second start changed the cache (it converted again)" >&2
    exit 1
fi
echo "OK: converted on the first start, reused unchanged on the second"
