//! Parsing a key file.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openssl_session_cache::fuzzing::key_file(data);
});
