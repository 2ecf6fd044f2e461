#!/usr/bin/env bash
# Issue 8's figures: the echo server on the memory store against the same server on Redis one
# round trip of ~1 ms away (a delay proxy adding 0.5 ms each way, no memory tier), 16 concurrent
# clients resuming, then 16 doing full handshakes; and an established peer's echo round trip
# (p50/p99) while Redis is healthy and while it is hung (SIGSTOP) under resumption load.
# Starts its own redis-server, proxy and servers on 127.0.0.1:46xx and stops them by PID.
#   bash scripts/farm_bench.sh          # SECONDS_EACH=5 CLIENTS=16
set -u
cd "$(dirname "$0")/.." || exit 1
CLIENTS=${CLIENTS:-16}
SECONDS_EACH=${SECONDS_EACH:-5}
cargo build --release --features redis --examples --quiet || exit 1
B=target/release/examples
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null; kill "$p" 2>/dev/null; done; rm -rf "$dir"; }
trap cleanup EXIT

redis-server --port 4640 --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null &
redis_pid=$!; pids+=($redis_pid)
$B/delay_proxy --target 127.0.0.1:4640 --each-way-us 500 > "$dir/proxy.out" &
pids+=($!)
(umask 077; echo "1:$(openssl rand -hex 32)" > "$dir/farm.key")
sleep 1
proxy=$(sed -n 's/^listening on //p' "$dir/proxy.out")
common=(--stats-interval 0 --max-peers 4096 --max-handshakes 1024 --per-ip 4096)
$B/dtls_echo_server --listen 127.0.0.1:4641 "${common[@]}" >/dev/null 2>&1 &
mem=$!; pids+=($mem)
$B/dtls_echo_server --listen 127.0.0.1:4642 "${common[@]}" --store "redis://$proxy" \
  --store-key "$dir/farm.key" --tier-entries 0 >/dev/null 2>&1 &
red=$!; pids+=($red)
sleep 1

load() { # port mode
  $B/dtls_load --server 127.0.0.1:$1 --clients $CLIENTS --mode $2 --duration $SECONDS_EACH 2>&1 | tail -1
}
rate() { echo "$1" | grep -oE "rate=[0-9]+" | cut -d= -f2; }

echo "## $CLIENTS concurrent clients, ${SECONDS_EACH} s each (Redis 1 ms round trip away, no tier)"
echo "| mode | memory store hs/s | redis store hs/s | ratio |"
echo "|---|---:|---:|---:|"
for mode in resumed full; do
  m=$(load 4641 $mode); r=$(load 4642 $mode)
  echo "    memory: $m" >&2; echo "    redis:  $r" >&2
  echo "| $mode | $(rate "$m") | $(rate "$r") | $(echo "scale=2; $(rate "$r")/$(rate "$m")" | bc) |"
done

echo
echo "## an established peer's echo on the redis-backed server, under $CLIENTS resuming clients"
probe() {
  $B/dtls_load --server 127.0.0.1:4642 --clients $CLIENTS --mode resumed --duration 8 >/dev/null 2>&1 &
  local lp=$!
  sleep 1
  $B/echo_probe --server 127.0.0.1:4642 --count 500 --interval-ms 10
  wait $lp
}
echo "Redis healthy: $(probe)"
kill -STOP $redis_pid
echo "Redis hung:    $(probe)"
kill -CONT $redis_pid
