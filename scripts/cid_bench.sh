#!/usr/bin/env bash
# Connection IDs (issue 18), the figures of BENCHMARKS.md:
#  (a) the echo server's CPU per echoed record with a connection ID against without, same load:
#      16 associations of tests/interop/wolfssl_cid_client.c (wolfSSL, one process), each
#      echoing LINES lines one at a time, no moves; the server's CPU (all its threads' on-CPU
#      time from /proc/PID/task/*/schedstat, ns) from the moment every handshake is done to the
#      last echo, divided by the echoes. Modes: no CID, a CID both ways (client's 4 bytes),
#      the server's CID only (the client asks for an empty one); lines of ~13 bytes and of 1000.
#      RUNS rounds, each mode once per round in turn (the baseline in the same run); medians.
#  (b) address changes survived under load: the same 16 associations, each closing its socket
#      and going on over a new one every EVERY lines, MOVE_LINES lines each, against one and two
#      workers (with two, the new source port lands on either worker's socket and the server's
#      BPF program steers it by its connection ID).
# Needs the release echo server and the wolfSSL CID build (scripts/interop_peers.sh
# wolfssl_cid). Binds 127.0.0.1:4621-4622 only; stops what it started, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
LINES=${LINES:-4000}
MOVE_LINES=${MOVE_LINES:-2000}
EVERY=${EVERY:-4}
CLIENTS=${CLIENTS:-16}
# Line sizes for (a): 0 = as written ("cid a0 r0 l1", ~13 bytes), else padded to that many bytes.
SIZES=${SIZES:-0 1000}
# Which figures: a, b or both.
PARTS=${PARTS:-a b}
cargo build --release --example dtls_echo_server --quiet
bash scripts/interop_peers.sh wolfssl_cid >/dev/null
C=${INTEROP_DIR:-target/interop}/wolfssl-cid/cid_client
S=target/release/examples/dtls_echo_server

server_ns() { # the on-CPU time of all of process $1's threads, ns
    cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%.0f\n", s}'
}

# run PID PORT ARGS...: one gated load run; prints the server's ns and the client's summary.
run() {
    local pid=$1 port=$2
    shift 2
    local line s0 s1 load
    rm -f "$FIFO.in" "$FIFO.out"
    mkfifo "$FIFO.in" "$FIFO.out"
    "$C" -p "$port" -m "$CLIENTS" -q -g "$@" <"$FIFO.in" >"$FIFO.out" &
    load=$!
    exec 8>"$FIFO.in" 9<"$FIFO.out"
    while read -r line <&9; do
        [ "$line" = ready ] && break
    done
    s0=$(server_ns "$pid")
    echo go >&8
    while read -r line <&9; do
        case $line in summary*) break ;; esac
    done
    s1=$(server_ns "$pid")
    exec 8>&- 9<&-
    wait "$load" || true
    echo "server_ns=$((s1 - s0)) $line"
}

field() { # field NAME LINE
    echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"
}

FIFO=$(mktemp -u /tmp/cid_bench.XXXXXX)
$S --listen 127.0.0.1:4621 --stats-interval 0 --max-peers 4096 --per-ip 4096 >"$FIFO.s1" 2>&1 &
P1=$!
$S --listen 127.0.0.1:4622 --workers 2 --stats-interval 0 --max-peers 4096 --per-ip 4096 \
    >"$FIFO.s2" 2>&1 &
P2=$!
trap 'kill -INT $P1 $P2 2>/dev/null; wait $P1 $P2 2>/dev/null || true; rm -f "$FIFO".*' EXIT
sleep 1

if [[ " $PARTS " == *" a "* ]]; then
echo "# (a) CPU per echoed record, $CLIENTS associations x $LINES lines, one worker"
for round in $(seq "$RUNS"); do
    for size in $SIZES; do
        for mode in none both server-only; do
            case $mode in
            none) args=() ;;
            both) args=(-c 0a0b0c0d) ;;
            server-only) args=(-i) ;;
            esac
            out=$(run $P1 4621 -n "$LINES" -z "$size" "${args[@]}")
            echoed=$(field echoed "$out")
            ns=$(field server_ns "$out")
            ccpu=$(field echo_cpu_us "$out")
            wall=$(field echo_wall_ms "$out")
            printf 'round=%s size=%s mode=%s echoed=%s lost=%s server_ns_per_echo=%s client_ns_per_echo=%s echoes_per_s=%s\n' \
                "$round" "$size" "$mode" "$echoed" "$(field lost "$out")" "$((ns / echoed))" \
                "$((ccpu * 1000 / echoed))" "$(echo "$echoed * 1000 / $wall" | bc)" | tee -a "$FIFO.a"
        done
    done
done
echo "# (a) medians over $RUNS rounds: size mode server_ns_per_echo client_ns_per_echo echoes_per_s"
for size in $SIZES; do
    for mode in none both server-only; do
        m=()
        for f in server_ns_per_echo client_ns_per_echo echoes_per_s; do
            m+=("$(grep " size=$size mode=$mode " "$FIFO.a" | tr ' ' '\n' | sed -n "s/^$f=//p" |
                sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')")
        done
        echo "median size=$size mode=$mode ${m[*]}"
    done
done
fi

if [[ " $PARTS " == *" b "* ]]; then
    echo "# (b) moves under load: $CLIENTS associations x $MOVE_LINES lines, a new socket every $EVERY"
    echo "#     (and the same load without moves, in turn: what a move costs)"
    for w in 1 2; do
        port=$((4620 + w))
        pid=$([ "$w" = 1 ] && echo $P1 || echo $P2)
        for round in $(seq "$RUNS"); do
            out=$(run "$pid" "$port" -n "$MOVE_LINES" -k "$EVERY" -c 0a0b0c0d)
            still=$(run "$pid" "$port" -n "$MOVE_LINES" -c 0a0b0c0d)
            moving_ns=$(field server_ns "$out")
            still_ns=$(field server_ns "$still")
            moves=$(field moves "$out")
            echo "workers=$w round=$round $(echo "$out" | cut -d' ' -f2-)" \
                "server_ns_per_echo=$((moving_ns / $(field echoed "$out")))" \
                "without_moves_server_ns_per_echo=$((still_ns / $(field echoed "$still")))" \
                "server_ns_per_move=$(((moving_ns - still_ns) / moves))" \
                "client_ns_per_move=$((($(field echo_cpu_us "$out") - $(field echo_cpu_us "$still")) * 1000 / moves))" |
                tee -a "$FIFO.b$w"
        done
        for f in server_ns_per_echo without_moves_server_ns_per_echo server_ns_per_move client_ns_per_move; do
            echo "median workers=$w $f=$(tr ' ' '\n' <"$FIFO.b$w" | sed -n "s/^$f=//p" | sort -n |
                awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')"
        done
    done
fi
# The servers' own counts: only (b)'s moving runs move, so each server's migrations are their moves.
kill -INT $P1 $P2
wait $P1 $P2 || true
for w in 1 2; do
    echo "server workers=$w: $(grep 'endpoint: migrations' "$FIFO.s$w")"
done
