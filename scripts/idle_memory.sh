#!/usr/bin/env bash
# Server memory per established idle DTLS peer, read from outside: the echo server in one
# process, examples/idle_clients.rs holding the connections in others (each from its own
# loopback address, 19 000 sockets at most per process), the server's VmRSS before and after.
# Every connection echoes once before it goes idle and is checked again at the end.
#
#   bash scripts/idle_memory.sh 19000            # lean peers, then the same with --lean-peers false
#   bash scripts/idle_memory.sh 100000 lean      # 100 000 peers, lean only
set -euo pipefail
cd "$(dirname "$0")/.."
peers=${1:-19000}
which=${2:-both}
cargo build --release --quiet --example dtls_echo_server --example idle_clients
per_process=19000

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

run() {
    local lean=$1
    local port=$((20000 + RANDOM % 20000))
    target/release/examples/dtls_echo_server --listen "127.0.0.1:$port" --lean-peers "$lean" \
        --max-peers $((peers + 1000)) --per-ip $((peers + 1000)) --max-handshakes 64 \
        --cache-entries $((peers + 1000)) --idle-timeout 36000 --stats-interval 0 \
        >/tmp/idle_memory_server.$$ 2>&1 &
    local spid=$!
    trap 'kill $spid 2>/dev/null || true' RETURN
    for _ in $(seq 50); do grep -q "listening on" /tmp/idle_memory_server.$$ && break; sleep 0.1; done
    local before
    before=$(rss_kib $spid)
    local left=$peers n=2 pids=() start
    start=$(date +%s)
    while [ "$left" -gt 0 ]; do
        local count=$((left < per_process ? left : per_process))
        # Each client holds its connections --hold seconds, then checks a sample of them.
        target/release/examples/idle_clients --server "127.0.0.1:$port" --bind "127.0.0.$n" \
            --peers "$count" --hold 30 --check 1000 >/tmp/idle_memory_client.$$.$n 2>&1 &
        pids+=($!)
        left=$((left - count))
        n=$((n + 1))
    done
    # Wait until every client holds its connections.
    while [ "$(cat /tmp/idle_memory_client.$$.* 2>/dev/null | grep -c '^held')" -lt ${#pids[@]} ]; do
        sleep 1
        for p in "${pids[@]}"; do
            if ! kill -0 "$p" 2>/dev/null && ! grep -q '^held' /tmp/idle_memory_client.$$.*; then
                cat /tmp/idle_memory_client.$$.*; exit 1
            fi
        done
    done
    local took=$(($(date +%s) - start))
    sleep 1
    local after
    after=$(rss_kib $spid)
    for p in "${pids[@]}"; do wait "$p"; done
    local checked
    checked=$(grep -h "still echo" /tmp/idle_memory_client.$$.* | awk '{ ok += $1; all += $3 } END { print ok " of " all }')
    awk -v b="$before" -v a="$after" -v n="$peers" -v l="$lean" -v t="$took" -v c="$checked" 'BEGIN {
        printf "lean-peers %-5s %7d peers (%d s): rss %d -> %d KiB: %.0f B (%.2f KiB) per idle peer; %s sampled connections still echo\n",
            l, n, t, b, a, (a - b) * 1024 / n, (a - b) / n, c }'
    rm -f /tmp/idle_memory_client.$$.* /tmp/idle_memory_server.$$
}

case $which in
    both) run true; run false ;;
    lean) run true ;;
    ssl) run false ;;
esac
