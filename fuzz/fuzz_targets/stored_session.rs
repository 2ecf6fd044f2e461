//! Stored session bytes, as a store hands them back: policy header, compact form, DER decode.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openssl_session_cache::fuzzing::stored_session(data);
});
