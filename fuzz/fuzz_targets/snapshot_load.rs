//! See `openssl_session_cache::fuzzing::snapshot_load`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openssl_session_cache::fuzzing::snapshot_load(data);
});
