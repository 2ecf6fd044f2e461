//! A store from a command-line URL (`--store redis://…`), for the echo server.

use std::path::Path;
use std::sync::Arc;

use crate::error::Error;
use crate::store::SessionStore;

/// Builds the shared store named by `url`, sealing values with the keys in `key_file`, with a
/// memory tier of `tier_entries` sessions in front (0 for none).
///
/// `url` is one of (use IP addresses: names are resolved outside the operation deadline):
///
/// - `redis://[user:password@]host:port[/db]`, one server;
/// - `rediss://…`, one server over TLS, its certificate verified against the system's roots;
/// - `redis+cluster://[user:password@]host:port,host:port,…` (or `rediss+cluster://`), a Redis
///   Cluster reached through the listed nodes.
///
/// The store uses the default prefix, deadline (50 ms), write queue, invalidation and breaker of
/// [`RedisStore::builder`][redis-builder]: its lookups never block ([`SessionStore::is_remote`] is
/// true) and its writes are write-behind. For a private CA, build the store with
/// [`RedisStoreBuilder::ca_file`][redis-ca-file] instead.
///
/// # Errors
/// [`Error::InvalidUrl`] if the scheme is not `redis://` (the memory store is the caller's
/// business) or the crate was built without the `redis` feature; [`Error::InvalidSetting`] if
/// `key_file` is `None` (sessions are never stored in plaintext from here); the errors of
/// [`KeyRing::from_file`](crate::KeyRing::from_file) and
/// [`RedisStoreBuilder::build`][redis-build] (feature `redis`).
///
#[cfg_attr(
    feature = "redis",
    doc = "[redis-builder]: crate::RedisStore::builder\n[redis-ca-file]: crate::RedisStoreBuilder::ca_file\n[redis-build]: crate::RedisStoreBuilder::build"
)]
#[cfg_attr(
    not(feature = "redis"),
    doc = "[redis-builder]: crate#crate-features\n[redis-ca-file]: crate#crate-features\n[redis-build]: crate#crate-features"
)]
pub fn store_from_url(
    url: &str,
    key_file: Option<&Path>,
    tier_entries: usize,
) -> Result<Arc<dyn SessionStore>, Error> {
    const SCHEMES: [&str; 6] = [
        "redis://",
        "rediss://",
        "redis+cluster://",
        "rediss+cluster://",
        "redis+unix://",
        "unix://",
    ];
    if !SCHEMES.iter().any(|s| url.starts_with(s)) {
        return Err(Error::InvalidUrl {
            url: format!("{url:?}"),
            reason: "unsupported store url: expected redis://host:port, rediss://host:port or \
                     redis+cluster://host:port,host:port"
                .into(),
        });
    }
    build(url, key_file, tier_entries)
}

#[cfg(feature = "redis")]
fn build(
    url: &str,
    key_file: Option<&Path>,
    tier_entries: usize,
) -> Result<Arc<dyn SessionStore>, Error> {
    let key_file = key_file.ok_or_else(|| {
        Error::setting(
            "key_file",
            "a redis store needs a key file to encrypt sessions at rest (--store-key FILE, \
             lines of ID:HEX64; the last key seals)",
        )
    })?;
    let ring = crate::store::KeyRing::from_file(key_file)?;
    let store = crate::store::RedisStore::builder(url)
        .key_ring(ring)
        .tier_entries(tier_entries)
        .build()?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "redis"))]
fn build(
    _url: &str,
    _key_file: Option<&Path>,
    _tier_entries: usize,
) -> Result<Arc<dyn SessionStore>, Error> {
    Err(Error::InvalidUrl {
        // The scheme only: the rest may hold a password.
        url: format!("{}://…", _url.split("://").next().unwrap_or_default()),
        reason: "this build has no redis store: rebuild with `--features redis`".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_other_schemes_and_missing_key_file() {
        let err = store_from_url("memory", None, 0).unwrap_err().to_string();
        assert!(err.contains("unsupported store url"), "{err}");
        let err = store_from_url("redis://127.0.0.1:1", None, 0)
            .unwrap_err()
            .to_string();
        if cfg!(feature = "redis") {
            assert!(err.contains("key file"), "{err}");
        } else {
            assert!(err.contains("--features redis"), "{err}");
        }
    }

    #[cfg(feature = "redis")]
    #[test]
    fn builds_from_a_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        crate::store::KeyRing::generate()
            .unwrap()
            .write_file(&path)
            .unwrap();
        let store = store_from_url("redis://127.0.0.1:1", Some(&path), 16).unwrap();
        assert!(format!("{store:?}").contains("RedisStore"));
        assert!(store.is_remote());
        for url in [
            "rediss://127.0.0.1:1",
            "redis+cluster://127.0.0.1:1,127.0.0.1:2",
            "rediss+cluster://127.0.0.1:1,127.0.0.1:2",
        ] {
            let store = store_from_url(url, Some(&path), 16).unwrap();
            assert!(store.is_remote(), "{url}");
        }
        let err = store_from_url("rediss://127.0.0.1:1/#insecure", Some(&path), 16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be turned off"), "{err}");
    }
}
