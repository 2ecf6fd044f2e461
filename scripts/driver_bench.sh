#!/usr/bin/env bash
# Server CPU per resumed DTLS 1.2 handshake and handshakes/s under concurrent load, for the std
# and tokio drivers with batched and one-datagram UDP I/O, all in one run, against the baseline
# measured in the same run: OpenSSL's server side of a resumed handshake with its internal cache,
# in-process, no sockets (`cargo bench --bench endpoint`, which also gives the endpoint's own
# figure in-process: the same handshakes with the cookie exchange and close_notify, no sockets).
#
# Load: examples/dtls_load.rs, one thread driving CLIENTS (default 16) concurrent clients, each
# connection a resumption on a new source port (handshake + close_notify, --reply none).
# Server CPU = utime + stime of the server process from /proc, divided by the handshakes.
# System calls per datagram from the server's own counters (--metrics, scraped with curl).
# Needs bc, curl and the openssl CLI. Binds 127.0.0.1:4621-4628 only; stops what it started, by PID.
#
#   bash scripts/driver_bench.sh            # CLIENTS=16 SECONDS_EACH=4
set -u
cd "$(dirname "$0")/.." || exit 1
CLIENTS=${CLIENTS:-16}
SECONDS_EACH=${SECONDS_EACH:-4}
cargo build --release --features tokio,metrics --examples --quiet || exit 1
B=target/release/examples

echo "## in-process: cargo bench --bench endpoint (interleaved, medians)"
bench=$(cargo bench --bench endpoint 2>/dev/null | grep " us")
echo "$bench"
base_us=$(echo "$bench" | awk '/openssl_internal_cache/ { print $3 }')
ep_us=$(echo "$bench" | awk '/endpoint: cookie/ { print $6 }')
echo "baseline (OpenSSL internal cache, in-process): ${base_us} us; endpoint in-process: ${ep_us} us"

scrape() { curl -s "http://127.0.0.1:$1/metrics"; }
metric() { echo "$1" | awk -v n="$2" '$1 == n { print $2 }'; }

run_one() { # name port metrics_port flags...
  local name=$1 port=$2 mport=$3; shift 3
  $B/dtls_echo_server --listen 127.0.0.1:$port --metrics 127.0.0.1:$mport --stats-interval 0 \
    --max-peers 4096 --max-handshakes 1024 --per-ip 4096 "$@" >/dev/null 2>&1 &
  local pid=$!
  sleep 0.7
  local m0; m0=$(scrape $mport)
  read -r u0 s0 < <(awk '{print $14, $15}' /proc/$pid/stat)
  local out; out=$($B/dtls_load --server 127.0.0.1:$port --clients $CLIENTS --mode resumed \
    --reply none --duration $SECONDS_EACH 2>&1)
  read -r u1 s1 < <(awk '{print $14, $15}' /proc/$pid/stat)
  sleep 0.3
  local m1; m1=$(scrape $mport)
  kill -INT $pid; wait $pid 2>/dev/null
  local hs rate ccpu ticks
  hs=$(echo "$out" | grep -oE "handshakes=[0-9]+" | cut -d= -f2)
  rate=$(echo "$out" | grep -oE "rate=[0-9]+" | cut -d= -f2)
  ccpu=$(echo "$out" | grep -oE "client_cpu_us_per_hs=[0-9.]+" | cut -d= -f2)
  # The server's handshakes include the load's warm-up (one full handshake per client).
  local shs; shs=$(( $(metric "$m1" dtls_endpoint_handshakes_total) - $(metric "$m0" dtls_endpoint_handshakes_total) ))
  ticks=$(( (u1-u0) + (s1-s0) ))
  local us; us=$(echo "scale=1; $ticks*10000/$shs" | bc)
  local d; d() { echo "$(metric "$m1" "$1") - $(metric "$m0" "$1")" | bc; }
  local rc din sc dout
  rc=$(d dtls_udp_recv_calls_total); din=$(d dtls_udp_datagrams_received_total)
  sc=$(d dtls_udp_send_calls_total); dout=$(d dtls_udp_datagrams_sent_total)
  printf "| %-22s | %6s | %7s | %5s | %5s | %5s | %s |\n" "$name" "$us" \
    "$(echo "scale=2; $us/$base_us" | bc)" "$rate" \
    "$(echo "scale=2; $rc/$din" | bc)" "$(echo "scale=2; $sc/$dout" | bc)" "$ccpu"
  echo "    $out" >&2
}

echo
echo "$CLIENTS concurrent clients, resumed, ${SECONDS_EACH} s each"
echo "| server | server us CPU / resumed hs | x baseline | hs/s | recv calls / datagram | send calls / datagram | load's us CPU / hs |"
echo "|---|---:|---:|---:|---:|---:|---:|"
run_one "std, batched" 4621 4622 --driver std --io batched
run_one "std, one datagram" 4623 4624 --driver std --io single
run_one "tokio, batched" 4625 4626 --driver tokio --io batched
run_one "tokio, one datagram" 4627 4628 --driver tokio --io single
