#!/usr/bin/env bash
# Server CPU per echoed record under CLIENTS (default 16) closed-loop clients sending SIZE-byte
# (default 100) records over established connections, against a plain UDP echo server (no
# crypto: the kernel's datagram cost, the floor) on the same load, against the same echo server
# doing one EVP AES-256-GCM seal and open per datagram and nothing else (`udp_echo --aead`: the
# EVP floor, what any server protecting records with OpenSSL's EVP pays at least), and against
# the same DTLS server with lean peers off. RUNS (default 3) alternating rounds; the medians are
# the figures.
#
# Server CPU = utime + stime of the server process from /proc/PID/stat over the measured
# seconds (the load connects first), divided by the echoes the load counted. The load
# (examples/record_load.rs, one thread, mio) prints its own CPU per echo too.
# Binds 127.0.0.1:4641-4644 only; stops what it started, by PID.
#
#   bash scripts/record_bench.sh            # CLIENTS=16 SIZE=100 SECONDS_EACH=5 RUNS=3
set -u
cd "$(dirname "$0")/.." || exit 1
CLIENTS=${CLIENTS:-16}
SIZE=${SIZE:-100}
SECONDS_EACH=${SECONDS_EACH:-5}
RUNS=${RUNS:-3}
cargo build --release --examples --quiet || exit 1
B=${CARGO_TARGET_DIR:-target}/release/examples

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

measure() { # name port server-command...
  local name=$1 port=$2; shift 2
  "$@" >/dev/null 2>&1 &
  local pid=$!
  sleep 0.7
  local plain=""
  [ "$name" = plain ] || [ "$name" = floor ] && plain="--plain"
  # The load connects first; the server's CPU is read around the measured seconds only, which
  # the load announces by its start (connect takes well under the settle time below).
  $B/record_load --server 127.0.0.1:$port --clients "$CLIENTS" --size "$SIZE" \
      --duration "$SECONDS_EACH" $plain >/tmp/record_bench.$$ 2>&1 &
  local lpid=$!
  sleep 1.5
  local t0; t0=$(ticks $pid)
  local s0; s0=$(date +%s.%N)
  wait $lpid
  local t1; t1=$(ticks $pid)
  local s1; s1=$(date +%s.%N)
  kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null
  local out; out=$(cat /tmp/record_bench.$$)
  local rate; rate=$(echo "$out" | grep -oE "rate=[0-9]+" | cut -d= -f2)
  local lcpu; lcpu=$(echo "$out" | grep -oE "load_cpu_us_per_echo=[0-9.]+" | cut -d= -f2)
  # Echoes during the window the server's ticks cover: the load's rate times that window.
  local window; window=$(echo "$s1 - $s0" | bc)
  local us; us=$(echo "scale=3; ($t1 - $t0) * 10000 / ($rate * $window)" | bc)
  echo "$name $us $rate $lcpu"
}

echo "| round | plain UDP echo µs/echo | EVP floor µs/echo | floor / plain | DTLS lean µs/echo | lean / plain | lean / floor | DTLS with Ssl µs/echo | Ssl / plain | echoes/s plain, floor, lean, Ssl | load µs/echo (plain, floor, lean, Ssl) |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
for round in $(seq "$RUNS"); do
  read -r _ pu pr pl < <(measure plain 4641 $B/udp_echo --listen 127.0.0.1:4641)
  read -r _ fu fr fl < <(measure floor 4644 $B/udp_echo --listen 127.0.0.1:4644 --aead)
  read -r _ lu lr ll < <(measure lean 4642 $B/dtls_echo_server --listen 127.0.0.1:4642 \
      --stats-interval 0 --max-peers 4096 --per-ip 4096)
  read -r _ su sr sl < <(measure ssl 4643 $B/dtls_echo_server --listen 127.0.0.1:4643 \
      --stats-interval 0 --max-peers 4096 --per-ip 4096 --lean-peers false)
  printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s, %s, %s, %s | %s, %s, %s, %s |\n" \
    "$round" "$pu" "$fu" "$(echo "scale=2; $fu/$pu" | bc)" "$lu" \
    "$(echo "scale=2; $lu/$pu" | bc)" "$(echo "scale=2; $lu/$fu" | bc)" \
    "$su" "$(echo "scale=2; $su/$pu" | bc)" \
    "$pr" "$fr" "$lr" "$sr" "$pl" "$fl" "$ll" "$sl"
done
rm -f /tmp/record_bench.$$
