#!/usr/bin/env bash
# Installs or builds the independent DTLS clients that tests/interop.rs runs against the server
# library, all under target/interop/ (or $INTEROP_DIR). Idempotent: a peer whose binary is
# already there is not rebuilt, so a rerun costs a few seconds.
#
#   openssl s_client   Debian's openssl (.ci/run installs it)
#   gnutls-cli         Debian's gnutls-bin
#   wolfSSL            examples/client/client, built from the source the wolfssl-sys crate ships
#   wolfSSL with CIDs  the same source built again with --enable-dtlscid (RFC 9146), under
#                      wolfssl-cid/: its example client (--cid) and tests/interop/wolfssl_cid_client.c,
#                      a small DTLS 1.2 client that changes its UDP socket under an association
#   Mbed TLS           programs/ssl/dtls_client and ssl_client2, built from the source the
#                      mbedtls-sys-auto crate ships
#   tinydtls           tests/dtls-client, built from the source the tinydtls-sys crate ships
#
# The crate sources come from crates.io through cargo: a throwaway project under
# target/interop/crates/ depends on the three -sys crates (pinned), `cargo fetch` brings them,
# and `cargo metadata` says where they are. Each is copied to target/interop/<peer>/src/ and
# built there; the registry's copy is never touched. C builds use at most 2 jobs, one at a time.
#
# Each step prints how long it took. Usage: scripts/interop_peers.sh [peer ...] (default: all
# of gnutls wolfssl wolfssl_cid mbedtls tinydtls).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${INTEROP_DIR:-$ROOT/target/interop}
mkdir -p "$OUT"
JOBS=2

WOLFSSL_SYS=5.3.0
MBEDTLS_SYS=2.28.15
TINYDTLS_SYS=0.2.0

step() {
    local name=$1
    shift
    local start=$SECONDS
    echo "interop_peers: $name ..."
    "$@"
    echo "interop_peers: $name done in $((SECONDS - start)) s"
}

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "interop_peers: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# The source directory of crate $1 (fetched once into the throwaway project).
crate_src() {
    local crate=$1
    local proj=$OUT/crates
    if [ ! -f "$proj/metadata.json" ]; then
        mkdir -p "$proj/src"
        cat >"$proj/Cargo.toml" <<EOF
[package]
name = "interop-peer-sources"
version = "0.0.0"
edition = "2021"
publish = false

# Its own workspace: not a member of the project's.
[workspace]

[dependencies]
wolfssl-sys = "=$WOLFSSL_SYS"
mbedtls-sys-auto = "=$MBEDTLS_SYS"
tinydtls-sys = "=$TINYDTLS_SYS"
EOF
        : >"$proj/src/lib.rs"
        cargo fetch --quiet --manifest-path "$proj/Cargo.toml"
        cargo metadata --quiet --format-version 1 --manifest-path "$proj/Cargo.toml" \
            >"$proj/metadata.json.tmp"
        mv "$proj/metadata.json.tmp" "$proj/metadata.json"
    fi
    # "manifest_path":".../<crate>-<version>/Cargo.toml" of the one package of that name.
    local manifest
    manifest=$(grep -o "\"manifest_path\":\"[^\"]*/$crate-[0-9][^\"/]*/Cargo.toml\"" "$proj/metadata.json" |
        head -1 | cut -d'"' -f4)
    [ -n "$manifest" ] || { echo "interop_peers: $crate not in $proj/metadata.json" >&2; return 1; }
    dirname "$manifest"
}

# Runs "$@" with its output in the log file $1; on failure, shows the log's tail.
logged() {
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        echo "interop_peers: failed: $* (in $(pwd)); the end of $log:" >&2
        tail -40 "$log" >&2
        return 1
    fi
}

# What a peer is built from: its build function's text and the crate versions. A build that is
# there but was made by another recipe is redone.
recipe() {
    { declare -f "$1"; echo "$WOLFSSL_SYS $MBEDTLS_SYS $TINYDTLS_SYS"; } | sha256sum | cut -d' ' -f1
}

# Whether peer $1's directory $2 holds the binaries $3... built by its current recipe.
built() {
    local peer=$1 dir=$2
    shift 2
    [ "$(cat "$dir/recipe" 2>/dev/null)" = "$(recipe "$peer")" ] || return 1
    for bin in "$@"; do
        [ -x "$dir/$bin" ] || return 1
    done
    echo "interop_peers: $peer: $* in $dir, up to date"
}

# Copies $1 (a source tree) to $2, fresh.
copy_tree() {
    rm -rf "$2"
    mkdir -p "$(dirname "$2")"
    cp -a "$1" "$2"
}

gnutls() {
    apt_install gnutls-bin
    gnutls-cli --version | head -1
}

wolfssl() {
    local dir=$OUT/wolfssl
    built wolfssl "$dir" client && return
    apt_install autoconf automake libtool make gcc
    local src
    src=$(crate_src wolfssl-sys)/wolfssl-src
    copy_tree "$src" "$dir/src"
    (
        cd "$dir/src"
        logged "$dir/autogen.log" ./autogen.sh
        # Static, so the example is one binary (not a libtool wrapper); DTLS 1.2 with PSK and
        # AES-CCM besides the default suites (WOLFSSL_STATIC_PSK: the plain PSK suites, such as
        # PSK-AES128-CCM-8, are compiled only with it); session cache on (the default) for -r.
        logged "$dir/configure.log" ./configure --enable-dtls --enable-psk --enable-aesccm \
            --enable-static --disable-shared --disable-crypttests --disable-benchmark \
            CPPFLAGS=-DWOLFSSL_STATIC_PSK
        logged "$dir/make.log" make -j$JOBS examples/client/client
    )
    cp "$dir/src/examples/client/client" "$dir/client.tmp"
    # The client changes to "its root", the first of ., .., ../.. ... holding certs/dh2048.pem.
    mkdir -p "$dir/root/certs"
    : >"$dir/root/certs/dh2048.pem"
    mv "$dir/client.tmp" "$dir/client"
    rm -rf "$dir/src"
    recipe wolfssl >"$dir/recipe"
}

# wolfSSL with DTLS 1.2 Connection IDs: the library (static, headers kept) and the example client
# of the build above plus --enable-dtlscid, then our own client compiled against it, again when
# its source changes.
wolfssl_cid() {
    local dir=$OUT/wolfssl-cid
    if ! { built wolfssl_cid "$dir" client && [ -f "$dir/lib/libwolfssl.a" ]; }; then
        apt_install autoconf automake libtool make gcc
        local src
        src=$(crate_src wolfssl-sys)/wolfssl-src
        copy_tree "$src" "$dir/src"
        (
            cd "$dir/src"
            logged "$dir/autogen.log" ./autogen.sh
            logged "$dir/configure.log" ./configure --enable-dtls --enable-dtlscid --enable-psk \
                --enable-aesccm --enable-static --disable-shared --disable-crypttests \
                --disable-benchmark CPPFLAGS=-DWOLFSSL_STATIC_PSK
            grep -q '^#define WOLFSSL_DTLS_CID' wolfssl/options.h ||
                { echo "interop_peers: configure left WOLFSSL_DTLS_CID out" >&2; exit 1; }
            logged "$dir/make.log" make -j$JOBS examples/client/client
        )
        rm -rf "$dir/include" "$dir/lib"
        mkdir -p "$dir/include" "$dir/lib" "$dir/root/certs"
        # The headers (options.h is configure's) and the static library our client links.
        (cd "$dir/src" && find wolfssl -name '*.h' -exec cp --parents {} "$dir/include/" \;)
        cp "$dir/src/src/.libs/libwolfssl.a" "$dir/lib/"
        : >"$dir/root/certs/dh2048.pem"
        cp "$dir/src/examples/client/client" "$dir/client"
        rm -rf "$dir/src" "$dir/cid_client"
        recipe wolfssl_cid >"$dir/recipe"
    fi
    local c=$ROOT/tests/interop/wolfssl_cid_client.c
    local sum
    sum=$(cat "$c" "$dir/recipe" | sha256sum | cut -d' ' -f1)
    if [ -x "$dir/cid_client" ] && [ "$(cat "$dir/cid_client.sum" 2>/dev/null)" = "$sum" ]; then
        echo "interop_peers: wolfssl_cid: cid_client up to date"
        return
    fi
    logged "$dir/cid_client.log" gcc -O2 -Wall -Wextra -Werror -I"$dir/include" -o "$dir/cid_client.tmp" \
        "$c" "$dir/lib/libwolfssl.a" -lm -lpthread
    mv "$dir/cid_client.tmp" "$dir/cid_client"
    echo "$sum" >"$dir/cid_client.sum"
}

mbedtls() {
    local dir=$OUT/mbedtls
    built mbedtls "$dir" dtls_client ssl_client2 && return
    apt_install make gcc
    local src
    src=$(crate_src mbedtls-sys-auto)/vendor
    copy_tree "$src" "$dir/src"
    (
        cd "$dir/src"
        # dtls_client.c connects to [::1]:4433, fixed; make it 127.0.0.1 (its FORCE_IPV4) and
        # let the port come from DTLS_PORT.
        sed -i -e 's|^//#define FORCE_IPV4|#define FORCE_IPV4|' \
            -e 's|^#define SERVER_PORT "4433"|#define SERVER_PORT (getenv("DTLS_PORT") ? getenv("DTLS_PORT") : "4433")|' \
            programs/ssl/dtls_client.c
        grep -q '^#define FORCE_IPV4' programs/ssl/dtls_client.c
        grep -q 'getenv("DTLS_PORT")' programs/ssl/dtls_client.c
        logged "$dir/make-lib.log" make -j$JOBS lib
        logged "$dir/make-programs.log" make -j$JOBS -C programs ssl/dtls_client ssl/ssl_client2
    )
    cp "$dir/src/programs/ssl/dtls_client" "$dir/dtls_client"
    cp "$dir/src/programs/ssl/ssl_client2" "$dir/ssl_client2"
    rm -rf "$dir/src"
    recipe mbedtls >"$dir/recipe"
}

tinydtls() {
    local dir=$OUT/tinydtls
    built tinydtls "$dir" dtls-client && return
    apt_install autoconf automake make gcc
    local src
    src=$(crate_src tinydtls-sys)/src/tinydtls
    copy_tree "$src" "$dir/src"
    (
        cd "$dir/src"
        logged "$dir/autogen.log" ./autogen.sh
        logged "$dir/configure.log" ./configure
        logged "$dir/make.log" make -j$JOBS
    )
    cp "$dir/src/tests/dtls-client" "$dir/dtls-client"
    rm -rf "$dir/src"
    recipe tinydtls >"$dir/recipe"
}

peers=("$@")
[ ${#peers[@]} -gt 0 ] || peers=(gnutls wolfssl wolfssl_cid mbedtls tinydtls)
total=$SECONDS
for peer in "${peers[@]}"; do
    step "$peer" "$peer"
done
echo "interop_peers: all done in $((SECONDS - total)) s"
