#!/usr/bin/env bash
# Server CPU per resumed DTLS 1.2 handshake under CLIENTS (default 4) concurrent clients, against
# its limit measured in the same run (issue 17): OpenSSL's in-process cost of a resumed handshake
# with its internal cache (`cargo bench --bench endpoint`, openssl_internal_cache) plus the
# kernel's cost of the datagrams a resumption with a cookie moves, taken as 2.5x the CPU a plain
# UDP echo server (examples/udp_echo.rs, no crypto) spends per echoed datagram under the same
# number of clients. The echo server runs with lean peers on and off, std driver, batched I/O.
#
# Server CPU = utime + stime of the server process from /proc, divided by the handshakes the
# server counted (its metrics).
#
# A second limit counts the whole exchange the load makes: OpenSSL alone doing it in process
# (openssl_cookie_close: the cookie, the resumption, the client's close_notify answered with the
# server's) plus the datagrams the server really moved per handshake (its metrics, in and out)
# at half the plain echo's CPU each. The issue's limit counts 5 datagrams and no close_notify;
# the load closes every connection, which moves 2 more. RUNS (default 3) rounds, each server once per round in turn.
# Needs bc, curl and the openssl CLI. Binds 127.0.0.1:4651-4655 only; stops what it started, by PID.
#
#   bash scripts/handshake_limit.sh          # CLIENTS=4 SECONDS_EACH=4 RUNS=3
set -u
cd "$(dirname "$0")/.." || exit 1
CLIENTS=${CLIENTS:-4}
SECONDS_EACH=${SECONDS_EACH:-4}
RUNS=${RUNS:-3}
cargo build --release --features metrics --examples --quiet || exit 1
B=${CARGO_TARGET_DIR:-target}/release/examples

echo "## in-process baseline: cargo bench --bench endpoint (interleaved, medians)"
bench=$(cargo bench --bench endpoint 2>/dev/null | grep " us")
echo "$bench"
base_us=$(echo "$bench" | awk '/openssl_internal_cache/ { print $3 }')
full_us=$(echo "$bench" | awk '$1 == "openssl_cookie_close" { print $5 }')

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
kticks() { awk '{ print $15 }' "/proc/$1/stat"; }
scrape() { curl -s "http://127.0.0.1:$1/metrics"; }
metric() { echo "$1" | awk -v n="$2" '$1 == n { print $2 }'; }

plain() { # µs of server CPU per echoed datagram, plain UDP
  $B/udp_echo --listen 127.0.0.1:4651 >/dev/null 2>&1 &
  local pid=$!
  sleep 0.5
  $B/record_load --server 127.0.0.1:4651 --clients "$CLIENTS" --size 100 \
      --duration "$SECONDS_EACH" --plain >/tmp/handshake_limit.$$ 2>&1 &
  local lpid=$!
  sleep 1
  local t0 s0 t1 s1
  t0=$(ticks $pid); s0=$(date +%s.%N)
  wait $lpid
  t1=$(ticks $pid); s1=$(date +%s.%N)
  kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null
  local rate; rate=$(grep -oE "rate=[0-9]+" /tmp/handshake_limit.$$ | cut -d= -f2)
  echo "scale=3; ($t1 - $t0) * 10000 / ($rate * ($s1 - $s0))" | bc
}

resumed() { # port mport flags...: µs of server CPU per resumed handshake, datagrams per
  # handshake, µs of it in the kernel (stime)
  local port=$1 mport=$2; shift 2
  $B/dtls_echo_server --listen 127.0.0.1:$port --metrics 127.0.0.1:$mport --stats-interval 0 \
    --max-peers 4096 --max-handshakes 1024 --per-ip 4096 "$@" >/dev/null 2>&1 &
  local pid=$!
  sleep 0.7
  local m0 m1 u0 u1 k0 k1
  m0=$(scrape $mport); u0=$(ticks $pid); k0=$(kticks $pid)
  $B/dtls_load --server 127.0.0.1:$port --clients $CLIENTS --mode resumed --reply none \
    --duration $SECONDS_EACH >/dev/null 2>&1
  u1=$(ticks $pid); k1=$(kticks $pid)
  sleep 0.3
  m1=$(scrape $mport)
  kill -INT $pid; wait $pid 2>/dev/null
  local hs; hs=$(( $(metric "$m1" dtls_endpoint_handshakes_total) - $(metric "$m0" dtls_endpoint_handshakes_total) ))
  local dg; dg=$(( $(metric "$m1" dtls_udp_datagrams_received_total) + $(metric "$m1" dtls_udp_datagrams_sent_total) \
      - $(metric "$m0" dtls_udp_datagrams_received_total) - $(metric "$m0" dtls_udp_datagrams_sent_total) ))
  echo "$(echo "scale=1; ($u1 - $u0) * 10000 / $hs" | bc) $(echo "scale=2; $dg / $hs" | bc)" \
    "$(echo "scale=1; ($k1 - $k0) * 10000 / $hs" | bc)"
}

echo
echo "$CLIENTS concurrent clients, resumed handshakes, ${SECONDS_EACH} s each; limit = baseline + 2.5 x plain"
echo "whole-exchange limit = openssl_cookie_close ($full_us µs) + datagrams/hs x plain / 2"
echo "| round | plain µs/datagram | limit µs | lean µs/hs | lean / limit | with Ssl µs/hs | Ssl / limit | lean / baseline | datagrams/hs (lean, Ssl) | kernel µs/hs (lean, Ssl) | whole-exchange limit µs | lean / it | Ssl / it |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"
for round in $(seq "$RUNS"); do
  p=$(plain)
  limit=$(echo "scale=1; $base_us + 2.5 * $p" | bc)
  read -r l ld lk < <(resumed 4652 4653)
  read -r s sd sk < <(resumed 4654 4655 --lean-peers false)
  whole=$(echo "scale=1; $full_us + $ld * $p / 2" | bc)
  printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s, %s | %s, %s | %s | %s | %s |\n" "$round" "$p" \
    "$limit" "$l" "$(echo "scale=2; $l / $limit" | bc)" "$s" "$(echo "scale=2; $s / $limit" | bc)" \
    "$(echo "scale=2; $l / $base_us" | bc)" "$ld" "$sd" "$lk" "$sk" "$whole" \
    "$(echo "scale=2; $l / $whole" | bc)" "$(echo "scale=2; $s / $whole" | bc)"
done
rm -f /tmp/handshake_limit.$$
