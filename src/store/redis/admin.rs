//! The admin side: size, iteration and clearing, each a walk of the prefix with `SCAN` on a
//! blocking connection of its own (its own timeout, outside the circuit breaker), so an admin
//! call neither waits behind nor delays the lookups on the shared connection. In a cluster the
//! walk visits every master, on a connection to each.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use ::redis::{Client, Connection, ErrorKind, FromRedisValue, RedisError, RedisResult, Value};

use super::cluster::parse_cluster_slots;
use super::{id_from_hex, invalidation, map_error, RedisStore};
use crate::error::{Error, StoreError};
use crate::stats::bump;
use crate::store::{KeyRing, SessionId, SessionStoreAdmin, StoredSession};

/// How many keys one `SCAN` call asks for.
const SCAN_COUNT: usize = 256;

impl RedisStore {
    /// The session id a key of this store names.
    pub(super) fn id_from_key(&self, key: &[u8]) -> Option<SessionId> {
        id_from_hex(key.strip_prefix(self.shared.prefix.as_bytes())?)
    }

    /// Runs `f` on fresh blocking connections with the admin timeout: one to the server, or one
    /// to each master of a cluster (each holds its own share of the keys). Failures are counted
    /// in `admin_errors` only.
    fn admin_run<T>(
        &self,
        f: impl FnOnce(&mut [Connection]) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        if self.background.is_current() {
            return Err(StoreError::OwnThread);
        }
        let s = &self.shared;
        let result = self.admin_connections().and_then(|mut conns| f(&mut conns));
        result.map_err(|e| {
            bump(&s.counters.admin_errors);
            tracing::debug!(url = %s.url, error = %e, "redis session store admin call failed");
            map_error(&e)
        })
    }

    fn admin_connect(&self, client: &Client) -> RedisResult<Connection> {
        let timeout = self.shared.admin_timeout;
        let conn = client.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        Ok(conn)
    }

    /// The connections an admin call walks: the server, or every master of the cluster (read
    /// afresh with `CLUSTER SLOTS` from the first node of the list that answers).
    fn admin_connections(&self) -> RedisResult<Vec<Connection>> {
        let s = &self.shared;
        let Some(topology) = &s.topology else {
            return Ok(vec![self.admin_connect(&s.nodes[0])?]);
        };
        let mut last_error = None;
        for node in &s.nodes {
            let ranges = self.admin_connect(node).and_then(|mut c| {
                let reply: Value = ::redis::cmd("CLUSTER").arg("SLOTS").query(&mut c)?;
                parse_cluster_slots(&reply).ok_or_else(|| {
                    RedisError::from((
                        ErrorKind::UnexpectedReturnType,
                        "unexpected CLUSTER SLOTS reply",
                    ))
                })
            });
            match ranges {
                Ok(ranges) => {
                    topology.update(&ranges, |host, port| s.node_link(host, port));
                    return topology
                        .masters()
                        .iter()
                        .map(|(host, port)| self.admin_connect(&s.node_client(host, *port)?))
                        .collect();
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| RedisError::from((ErrorKind::Io, "no cluster node"))))
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

/// Runs `command` on each key of `keys` in pipelines of [`SCAN_COUNT`], collecting the replies
/// (one key per command, so a cluster node never sees keys of two slots in one command).
fn per_key<T: FromRedisValue>(
    conn: &mut Connection,
    command: &str,
    keys: &[Vec<u8>],
) -> RedisResult<Vec<T>> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(SCAN_COUNT) {
        let mut pipe = ::redis::pipe();
        for k in chunk {
            pipe.cmd(command).arg(k);
        }
        out.extend(pipe.query::<Vec<T>>(conn)?);
    }
    Ok(out)
}

/// Explicit admin calls, each a walk of the prefix with `SCAN` (O(keys in Redis)); nothing on a
/// handshake path or in [`CacheStats`](crate::CacheStats) calls them. They see what Redis holds:
/// writes still queued here are not counted until the writer has sent them
/// ([`RedisStore::flush`]).
impl SessionStoreAdmin for RedisStore {
    fn replace_key_ring(&self, ring: KeyRing) -> Result<bool, Error> {
        Self::replace_key_ring(self, ring).map(|()| true)
    }

    fn len(&self) -> Result<usize, StoreError> {
        self.admin_run(|conns| {
            conns
                .iter_mut()
                .map(|c| self.scan_keys(c).map(|k| k.len()))
                .sum()
        })
    }

    /// The session bytes in Redis, from each value's length less the envelope.
    fn bytes(&self) -> Result<usize, StoreError> {
        let overhead = self.shared.codec.overhead();
        self.admin_run(|conns| {
            let mut total = 0usize;
            for c in conns {
                let keys = self.scan_keys(c)?;
                let lens: Vec<usize> = per_key(c, "STRLEN", &keys)?;
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
        let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = self.admin_run(|conns| {
            let mut out = Vec::new();
            for c in conns {
                let keys = self.scan_keys(c)?;
                let values: Vec<Option<Vec<u8>>> = per_key(c, "GET", &keys)?;
                out.extend(keys.into_iter().zip(values));
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
        self.admin_run(|conns| {
            for c in conns.iter_mut() {
                let keys = self.scan_keys(c)?;
                per_key::<i64>(c, "UNLINK", &keys)?;
            }
            match conns.first_mut() {
                Some(c) => ::redis::cmd("PUBLISH")
                    .arg(&s.channel)
                    .arg(invalidation::ALL)
                    .exec(c),
                None => Ok(()),
            }
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
