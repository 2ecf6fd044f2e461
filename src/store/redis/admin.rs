//! The admin side: size, iteration and clearing, each a walk of the prefix with `SCAN` on a
//! blocking connection of its own (its own timeout, outside the circuit breaker), so an admin
//! call neither waits behind nor delays the lookups on the shared connection.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use ::redis::{Connection, RedisResult};

use super::{bump, id_from_hex, invalidation, map_error, RedisStore};
use crate::error::StoreError;
use crate::store::{SessionId, SessionStoreAdmin, StoredSession};

/// How many keys one `SCAN` call asks for.
const SCAN_COUNT: usize = 256;

impl RedisStore {
    /// The session id a key of this store names.
    pub(super) fn id_from_key(&self, key: &[u8]) -> Option<SessionId> {
        id_from_hex(key.strip_prefix(self.shared.prefix.as_bytes())?)
    }

    /// Runs `f` on a fresh blocking connection with the admin timeout; failures are counted
    /// in `admin_errors` only.
    fn admin_run<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        if self.background.is_current() {
            return Err(StoreError::Unavailable(
                "redis admin call on the store's own background thread".into(),
            ));
        }
        let s = &self.shared;
        let result = s
            .client
            .get_connection_with_timeout(s.admin_timeout)
            .and_then(|mut conn| {
                conn.set_read_timeout(Some(s.admin_timeout))?;
                conn.set_write_timeout(Some(s.admin_timeout))?;
                f(&mut conn)
            });
        result.map_err(|e| {
            bump(&s.counters.admin_errors);
            tracing::debug!(url = %s.url, error = %e, "redis session store admin call failed");
            map_error(&e)
        })
    }

    /// All keys under the prefix (deduplicated: `SCAN` may return a key twice).
    fn scan_keys(&self, conn: &mut Connection) -> RedisResult<Vec<Vec<u8>>> {
        let mut seen = HashSet::new();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
                .cursor_arg(cursor)
                .arg("MATCH")
                .arg(&self.shared.pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query(conn)?;
            seen.extend(keys);
            if next == 0 {
                return Ok(seen.into_iter().collect());
            }
            cursor = next;
        }
    }
}

/// Explicit admin calls, each a walk of the prefix with `SCAN` (O(keys in Redis)); nothing on a
/// handshake path or in [`CacheStats`](crate::CacheStats) calls them. They see what Redis holds:
/// writes still queued here are not counted until the writer has sent them
/// ([`RedisStore::flush`]).
impl SessionStoreAdmin for RedisStore {
    fn len(&self) -> Result<usize, StoreError> {
        self.admin_run(|c| self.scan_keys(c).map(|k| k.len()))
    }

    /// The session bytes in Redis, from each value's length less the envelope.
    fn bytes(&self) -> Result<usize, StoreError> {
        let overhead = self.shared.codec.overhead();
        self.admin_run(|c| {
            let keys = self.scan_keys(c)?;
            let mut total = 0usize;
            for chunk in keys.chunks(SCAN_COUNT) {
                let mut pipe = ::redis::pipe();
                for k in chunk {
                    pipe.cmd("STRLEN").arg(k);
                }
                let lens: Vec<usize> = pipe.query(c)?;
                total += lens
                    .iter()
                    .map(|l| l.saturating_sub(overhead))
                    .sum::<usize>();
            }
            Ok(total)
        })
    }

    /// Values that do not open are skipped (and counted in `decrypt_failures`).
    fn for_each(&self, f: &mut dyn FnMut(&SessionId, &StoredSession)) -> Result<(), StoreError> {
        let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = self.admin_run(|c| {
            let keys = self.scan_keys(c)?;
            let mut out = Vec::with_capacity(keys.len());
            for chunk in keys.chunks(SCAN_COUNT) {
                let values: Vec<Option<Vec<u8>>> = ::redis::cmd("MGET").arg(chunk).query(c)?;
                out.extend(chunk.iter().cloned().zip(values));
            }
            Ok(out)
        })?;
        for (key, value) in entries {
            let (Some(id), Some(value)) = (self.id_from_key(&key), value) else {
                continue;
            };
            match self.shared.codec.decode(&id, &value) {
                Ok(s) => f(&id, &s),
                Err(_) => {
                    self.shared
                        .counters
                        .decrypt_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Drops the tier and the queued writes, unlinks every key under the prefix, and tells the
    /// other hosts to drop their tiers.
    fn clear(&self) -> Result<(), StoreError> {
        let s = &self.shared;
        if let Some(tier) = &s.tier {
            s.coherence.invalidate_all(tier);
        }
        s.queue.clear();
        self.admin_run(|c| {
            let keys = self.scan_keys(c)?;
            for chunk in keys.chunks(SCAN_COUNT) {
                ::redis::cmd("UNLINK").arg(chunk).exec(c)?;
            }
            ::redis::cmd("PUBLISH")
                .arg(&s.channel)
                .arg(invalidation::ALL)
                .exec(c)
        })
    }

    /// Redis expires its keys itself (`PX`); this purges the memory tier.
    fn purge_expired(&self, now: SystemTime, max: usize) -> Result<usize, StoreError> {
        match &self.shared.tier {
            Some(tier) => tier.purge_expired(now, max),
            None => Ok(0),
        }
    }
}
