#!/usr/bin/env bash
# Server CPU per DTLS 1.2 handshake: this crate's echo server (1 and 2 workers) and
# `openssl s_server -dtls1_2 -no_ticket`, loaded by examples/dtls_load.rs (4 concurrent clients, 4 s each);
# CPU = utime + stime of the server process from /proc, divided by completed handshakes.
# Needs bc and the openssl CLI. Binds 127.0.0.1:4611-4613 only; stops what it started, by PID.
cd "$(dirname "$0")/.." && cargo build --release --examples --quiet || exit 1
B=target/release/examples
HZ=$(getconf CLK_TCK)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -keyout /tmp/bk.pem -out /tmp/bc.pem -days 30 -nodes -subj /CN=localhost 2>/dev/null
measure() { # name pid port mode
  local name=$1 pid=$2 port=$3 mode=$4
  read -r u0 s0 < <(awk '{print $14, $15}' /proc/$pid/stat)
  out=$($B/dtls_load --server 127.0.0.1:$port --clients 4 --mode $mode --reply none --duration 4 2>&1)
  read -r u1 s1 < <(awk '{print $14, $15}' /proc/$pid/stat)
  hs=$(echo "$out" | grep -oE "handshakes=[0-9]+" | tail -1 | cut -d= -f2)
  ticks=$(( (u1-u0) + (s1-s0) ))
  echo "$name $mode: handshakes=$hs server_cpu_s=$(echo "scale=2; $ticks/$HZ" | bc) us_per_hs=$( [ "${hs:-0}" -gt 0 ] && echo "scale=1; $ticks*1000000/$HZ/$hs" | bc || echo n/a)"
  echo "$out" | tail -3 | sed 's/^/    /'
}
$B/dtls_echo_server --listen 127.0.0.1:4611 --stats-interval 0 --max-peers 4096 --max-handshakes 1024 --per-ip 4096 >/dev/null 2>&1 & P1=$!
$B/dtls_echo_server --listen 127.0.0.1:4612 --workers 2 --stats-interval 0 --max-peers 4096 --max-handshakes 1024 --per-ip 4096 >/dev/null 2>&1 & P2=$!
openssl s_server -dtls1_2 -accept 4613 -cert /tmp/bc.pem -key /tmp/bk.pem -no_ticket -quiet < <(sleep 120) >/dev/null 2>&1 & P3=$!
sleep 1
for m in resumed full; do
  measure "echo_server_w1" $P1 4611 $m
  measure "echo_server_w2" $P2 4612 $m
  measure "s_server" $P3 4613 $m
done
kill -INT $P1 $P2; kill $P3
wait 2>/dev/null
