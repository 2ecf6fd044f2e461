//! Opening an envelope read from a hostile store.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openssl_session_cache::fuzzing::envelope_open(data);
});
