#!/usr/bin/env bash
# Issue 9's figures, one run: (1) server CPU per resumed DTLS 1.2 handshake with a session ticket
# against session-id resumption from the memory store (one echo server each, 16 resuming
# clients, CPU from /proc); (2) resumed handshakes/s across two hosts (each connection on the other
# host than the last) with tickets from one key file, against two hosts sharing a Redis store one
# ~1 ms round trip away (delay proxy, no memory tier).
# Starts and stops (by PID) its own redis-server, proxy and servers on 127.0.0.1:4670-4679.
#   bash scripts/tickets_bench.sh      # SECONDS_EACH=5 CLIENTS=16
set -u
cd "$(dirname "$0")/.." || exit 1
CLIENTS=${CLIENTS:-16}
SECONDS_EACH=${SECONDS_EACH:-5}
cargo build --release --features redis --examples --quiet || exit 1
B=target/release/examples
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
(umask 077; echo "1:$(openssl rand -hex 32)" > "$dir/k")
common=(--stats-interval 0 --max-peers 4096 --max-handshakes 1024 --per-ip 4096)
serve() { # port flags... ; prints the pid
  $B/dtls_echo_server --listen 127.0.0.1:$1 "${common[@]}" "${@:2}" >/dev/null 2>&1 &
  pids+=($!)
}
rate() { echo "$1" | grep -oE "rate=[0-9]+" | cut -d= -f2; }
handshakes() { echo "$1" | grep -oE "handshakes=[0-9]+" | cut -d= -f2; }
cpu_ticks() { awk '{print $14 + $15}' /proc/$1/stat; }

echo "## server CPU per resumed handshake, $CLIENTS clients, ${SECONDS_EACH} s each"
echo "| resumption | us CPU / handshake | hs/s |"
echo "|---|---:|---:|"
for kind in session-id ticket; do
  if [ $kind = ticket ]; then
    serve 4670 --tickets --store-key "$dir/k"; flags=(--tickets)
  else
    serve 4670; flags=()
  fi
  pid=${pids[-1]}; sleep 0.7
  t0=$(cpu_ticks $pid)
  out=$($B/dtls_load --server 127.0.0.1:4670 --clients $CLIENTS --mode resumed --reply none \
    --duration $SECONDS_EACH "${flags[@]}" 2>&1 | tail -1)
  t1=$(cpu_ticks $pid)
  kill $pid; wait $pid 2>/dev/null
  echo "    $out" >&2
  echo "| $kind | $(echo "scale=1; ($t1 - $t0) * 10000 / $(handshakes "$out")" | bc) | $(rate "$out") |"
done

redis-server --port 4675 --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null &
pids+=($!)
$B/delay_proxy --target 127.0.0.1:4675 --each-way-us 500 > "$dir/proxy.out" &
pids+=($!)
sleep 1
proxy=$(sed -n 's/^listening on //p' "$dir/proxy.out")
echo
echo "## resumed handshakes/s across two hosts, $CLIENTS clients, ${SECONDS_EACH} s each"
echo "| farm | hs/s | resumed share |"
echo "|---|---:|---:|"
serve 4671 --tickets --store-key "$dir/k"; serve 4672 --tickets --store-key "$dir/k"
sleep 0.7
out=$($B/dtls_load --server 127.0.0.1:4671 --server 127.0.0.1:4672 --clients $CLIENTS \
  --mode resumed --duration $SECONDS_EACH --tickets 2>&1 | tail -1)
echo "    $out" >&2
r=$(echo "$out" | grep -oE "resumed=[0-9]+" | cut -d= -f2)
echo "| tickets, one key file | $(rate "$out") | $(echo "scale=3; $r / $(handshakes "$out")" | bc) |"
serve 4673 --store "redis://$proxy" --store-key "$dir/k" --tier-entries 0
serve 4674 --store "redis://$proxy" --store-key "$dir/k" --tier-entries 0
sleep 0.7
out=$($B/dtls_load --server 127.0.0.1:4673 --server 127.0.0.1:4674 --clients $CLIENTS \
  --mode resumed --duration $SECONDS_EACH 2>&1 | tail -1)
echo "    $out" >&2
r=$(echo "$out" | grep -oE "resumed=[0-9]+" | cut -d= -f2)
echo "| shared Redis, 1 ms away | $(rate "$out") | $(echo "scale=3; $r / $(handshakes "$out")" | bc) |"
