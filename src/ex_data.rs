//! The crate's ex_data slots on `Ssl` and `SslContext`: each asked of OpenSSL once per process
//! (`SSL_get_ex_new_index`, `SSL_CTX_get_ex_new_index`, through rust-openssl's safe
//! `new_ex_index`) and kept; a failure to get one is OpenSSL's error, kept and returned to
//! every later caller.

/// Declares `fn $name() -> Result<Index<$owner, $value>, ErrorStack>`, the one index of
/// `$value` on `$owner` (`Ssl` or `SslContext`) for the process.
macro_rules! ex_data_index {
    ($(#[$attr:meta])* $vis:vis fn $name:ident() -> Index<$owner:ty, $value:ty>) => {
        $(#[$attr])*
        $vis fn $name() -> Result<
            ::openssl::ex_data::Index<$owner, $value>,
            ::openssl::error::ErrorStack,
        > {
            static INDEX: ::std::sync::OnceLock<
                Result<::openssl::ex_data::Index<$owner, $value>, ::openssl::error::ErrorStack>,
            > = ::std::sync::OnceLock::new();
            INDEX.get_or_init(<$owner>::new_ex_index).clone()
        }
    };
}

pub(crate) use ex_data_index;
