//! See `openssl_session_cache::fuzzing::lean_record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openssl_session_cache::fuzzing::lean_record(data);
});
