#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/fuzz_targets) with cargo-fuzz on the nightly toolchain.
#   bash scripts/fuzz.sh 60            # every target for 60 s each
#   bash scripts/fuzz.sh 600 endpoint  # one target for 10 minutes
# New inputs that widen coverage are added to fuzz/corpus/<target>/ (commit the useful ones after
# `cargo +nightly fuzz cmin <target>`); a crash is saved under fuzz/artifacts/<target>/ and the
# script stops with its reproduction command.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== $t for ${seconds}s"
    log=$(mktemp)
    if ! cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz target $t failed; reproduce with: cargo +nightly fuzz run $t fuzz/artifacts/$t/<file>"
        rm -f "$log"
        exit 1
    fi
    grep -E '^#[0-9]+ +DONE|^Done' "$log" || true
    rm -f "$log"
done
