#!/usr/bin/env bash
# Runs the whole test suite under AddressSanitizer, with LeakSanitizer on (the default with ASan
# on Linux), on the nightly toolchain. Exits non-zero on any finding.
#   bash scripts/sanitize.sh                 # everything
#   bash scripts/sanitize.sh --test resumption
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Zsanitizer=address ${RUSTFLAGS:-}"
export RUSTDOCFLAGS="-Zsanitizer=address ${RUSTDOCFLAGS:-}"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export LSAN_OPTIONS="suppressions=$(pwd)/scripts/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
# A target dir of its own: sanitized and plain artifacts must not mix.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/asan}"
exec cargo +nightly test --target "$target" --all-features --lib --tests "$@"
