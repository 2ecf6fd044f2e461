#!/usr/bin/env bash
# Soak: the echo server on a Redis store for SECONDS under mixed load (resumed and full
# handshakes with echo, a ClientHello flood, garbage, half-open handshakes, idle churn) while
# Redis is restarted every 20 s. Samples the server's RSS, open file descriptors and counters
# every 5 s; at the end prints the RSS drift after warm-up (the first fifth of the run) and the
# legitimate handshakes that failed (goal: drift within 5 %, no failure).
#   bash scripts/soak.sh 300
#   SERVER_ARGS="--decoded-entries 16" bash scripts/soak.sh 600   # more echo server options
# Binds 127.0.0.1:4660-4662; stops what it started, by PID.
set -u
cd "$(dirname "$0")/.." || exit 1
SECONDS_TOTAL=${1:-300}
cargo build --release --features redis,metrics --examples --quiet || exit 1
B=target/release/examples
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
start_redis() {
  redis-server --port 4660 --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null &
  redis_pid=$!
}
start_redis
(umask 077; echo "1:$(openssl rand -hex 32)" > "$dir/k")
sleep 0.5
RUST_LOG=info,openssl_session_cache::server::peer=debug $B/dtls_echo_server --listen 127.0.0.1:4661 --metrics 127.0.0.1:4662 --stats-interval 0 \
  --store redis://127.0.0.1:4660 --store-key "$dir/k" --idle-timeout 4 --handshake-timeout 2 \
  --max-peers 4096 --max-handshakes 256 --per-ip 4096 ${SERVER_ARGS:-} >"$dir/server.log" 2>&1 &
server=$!; pids+=($server)
sleep 1
$B/dtls_load --server 127.0.0.1:4661 --clients 8 --mode resumed --duration "$SECONDS_TOTAL" >"$dir/resumed.out" 2>&1 &
pids+=($!)
$B/dtls_load --server 127.0.0.1:4661 --clients 2 --mode full --duration "$SECONDS_TOTAL" >"$dir/full.out" 2>&1 &
pids+=($!)
$B/soak_noise --server 127.0.0.1:4661 --duration "$SECONDS_TOTAL" --rate 20 >"$dir/noise.out" 2>&1 &
pids+=($!)
metric() { curl -s http://127.0.0.1:4662/metrics | awk -v n="$1" '$1 == n { print $2 }'; }
echo "| t (s) | RSS (KiB) | fds | handshakes | resumed | failed | dropped | peers | decoded tier |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
warm=$(( SECONDS_TOTAL / 5 )); rss_warm=""; t=0
while [ $t -lt "$SECONDS_TOTAL" ]; do
  sleep 5; t=$((t + 5))
  if [ $((t % 20)) -eq 0 ]; then kill -9 $redis_pid; wait $redis_pid 2>/dev/null; start_redis; fi
  rss=$(awk '/VmRSS/ {print $2}' /proc/$server/status)
  fds=$(ls /proc/$server/fd | wc -l)
  echo "| $t | $rss | $fds | $(metric dtls_endpoint_handshakes_total) | $(metric dtls_endpoint_resumed_total) | $(metric dtls_endpoint_failed_total) | $(metric dtls_endpoint_dropped_garbage_total) | $(metric dtls_endpoint_peers) | $(metric session_cache_decoded_entries) |"
  if [ -z "$rss_warm" ] && [ $t -ge "$warm" ]; then rss_warm=$rss; fi
done
wait "${pids[@]:1}" 2>/dev/null
kill -9 $redis_pid 2>/dev/null
echo
echo "resumed load: $(tail -1 "$dir/resumed.out")"
echo "full load:    $(tail -1 "$dir/full.out")"
echo "noise:        $(tail -1 "$dir/noise.out")"
echo "why connections failed (first three per load; the server's side of each):"
grep -h '^client ' "$dir/resumed.out" "$dir/full.out" || true
grep -E 'handshake failed|read failed|write failed' "$dir/server.log" | head -10 || true
echo "RSS after warm-up ${rss_warm} KiB, at the end ${rss} KiB: drift $(echo "scale=1; ($rss - $rss_warm) * 100 / $rss_warm" | bc) %"
