//! Operations on the shared connection: each within its deadline, through the breaker, counted;
//! the lookup that travels, and the invalidations it publishes or receives.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use ::redis::aio::MultiplexedConnection;
use ::redis::{ErrorKind, RedisError, RedisResult, Value};

use super::breaker::Permit;
use super::cluster::parse_cluster_slots;
use super::runtime::Link;
use super::TOPOLOGY_MIN_TIMEOUT;
use super::{id_from_hex, invalidation, is_connection_failure, map_error, Shared};
use crate::error::StoreError;
use crate::stats::bump;
use crate::store::{LookupDone, LookupMode, MemoryStore, PutDone, SessionId, StoredSession};

/// Why an operation on the connection did not succeed.
pub(crate) enum RunError {
    /// The deadline passed.
    Timeout,
    /// No connection could be opened (refused, unreachable, TLS handshake or certificate
    /// verification failed, authentication refused).
    Connect(RedisError),
    /// Redis (or the connection to it) failed.
    Redis(RedisError),
}

impl RunError {
    /// Redis could not be reached or did not answer in time (as opposed to an error reply).
    pub(crate) fn is_unreachable(&self) -> bool {
        match self {
            Self::Timeout | Self::Connect(_) => true,
            Self::Redis(e) => is_connection_failure(e),
        }
    }
}

/// Where a command goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Route<'a> {
    /// To the master that holds this key (the server, for one server).
    Key(&'a [u8]),
    /// To any master (`PUBLISH`, `PING`).
    Any,
}

/// Runs `f` on `link`'s connection, connecting if needed, once more on a fresh connection if
/// the connection turns out dead (not on a timeout).
async fn attempt_on<T, F, Fut>(link: &Link, f: &F) -> Result<T, RunError>
where
    F: Fn(MultiplexedConnection) -> Fut,
    Fut: Future<Output = RedisResult<T>>,
{
    let mut retried = false;
    loop {
        let (generation, conn) = link.connection().await.map_err(RunError::Connect)?;
        match f(conn).await {
            Ok(v) => return Ok(v),
            Err(e) if is_dead_connection(&e) => {
                link.reset(generation);
                if retried {
                    return Err(RunError::Redis(e));
                }
                retried = true;
            }
            Err(e) => return Err(RunError::Redis(e)),
        }
    }
}

/// The connection itself failed (reset, closed): a fresh one may work.
fn is_dead_connection(e: &RedisError) -> bool {
    (e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()) && !e.is_timeout()
}

impl Shared {
    pub(crate) fn key_for(&self, id: &SessionId) -> String {
        format!("{}{}", self.prefix, id.to_hex())
    }

    /// Runs `f` on the connection for `route`, connecting if needed: the server's, or in a
    /// cluster that of the master holding the key (reading the slot map first if it is not
    /// known, and once more if the master answers `MOVED`), or for [`Route::Any`] the first
    /// master that answers. A connection that turns out dead (Redis restarted, the connection
    /// was reset: not a timeout) is forgotten and `f` runs once more on a fresh one. Re-running
    /// is safe for every command used here: `SET`/`DEL`/`PUBLISH` are idempotent for this
    /// purpose, and a `GETDEL` whose reply was lost only loses the session (at most once, never
    /// twice).
    pub(crate) async fn attempt<T, F, Fut>(&self, route: Route<'_>, f: F) -> Result<T, RunError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(topology) = &self.topology else {
            return attempt_on(&self.link, &f).await;
        };
        match route {
            Route::Key(key) => {
                let mut refreshed = false;
                loop {
                    let link = match topology.link_for(key) {
                        Some(link) => link,
                        None if !refreshed => {
                            refreshed = true;
                            let _ = self.refresh_topology().await;
                            continue;
                        }
                        None => {
                            return Err(RunError::Connect(RedisError::from((
                                ErrorKind::ClusterConnectionNotFound,
                                "no known master holds the key's slot",
                            ))))
                        }
                    };
                    match attempt_on(&link, &f).await {
                        Err(RunError::Redis(e)) if e.redirect_node().is_some() && !refreshed => {
                            // The slot moved (a failover, a resharding): read the map again.
                            refreshed = true;
                            let _ = self.refresh_topology().await;
                        }
                        r => return r,
                    }
                }
            }
            Route::Any => {
                let mut last = None;
                for link in topology.candidates() {
                    match attempt_on(&link, &f).await {
                        Err(e) if e.is_unreachable() => last = Some(e),
                        r => return r,
                    }
                }
                Err(last.unwrap_or_else(|| {
                    RunError::Connect(RedisError::from((
                        ErrorKind::ClusterConnectionNotFound,
                        "no cluster node",
                    )))
                }))
            }
        }
    }

    /// [`attempt`](Self::attempt) within `deadline`.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        deadline: Instant,
        route: Route<'_>,
        f: F,
    ) -> Result<T, RunError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        match tokio::time::timeout_at(deadline.into(), self.attempt(route, f)).await {
            Ok(r) => r,
            Err(_) => Err(RunError::Timeout),
        }
    }

    /// Reads a cluster's slot map (`CLUSTER SLOTS`) from the first node that answers, within
    /// the operation deadline (at least 1 s); a no-op for one server. Concurrent callers share
    /// one read.
    pub(crate) async fn refresh_topology(&self) -> Result<(), StoreError> {
        let Some(topology) = &self.topology else {
            return Ok(());
        };
        let seen = topology.refreshes();
        let _one_at_a_time = topology.refreshing.lock().await;
        if topology.refreshes() != seen {
            return Ok(()); // read while this caller waited
        }
        let deadline = Instant::now() + self.op_timeout.max(TOPOLOGY_MIN_TIMEOUT);
        let slots = |mut conn: MultiplexedConnection| async move {
            ::redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut conn)
                .await
        };
        let mut last = StoreError::Unavailable("redis: no cluster node to ask".into());
        for link in topology.candidates() {
            let asked = tokio::time::timeout_at(deadline.into(), attempt_on(&link, &slots)).await;
            let reply = match asked {
                Ok(Ok(reply)) => reply,
                Ok(Err(RunError::Connect(e))) => {
                    last = StoreError::Unavailable(format!(
                        "redis: cannot connect to {}: {e}",
                        self.url
                    ));
                    continue;
                }
                Ok(Err(RunError::Redis(e))) => {
                    last = map_error(&e);
                    continue;
                }
                Ok(Err(RunError::Timeout)) | Err(_) => return Err(StoreError::Timeout),
            };
            let Some(ranges) = parse_cluster_slots(&reply) else {
                last = StoreError::Backend("redis: unexpected CLUSTER SLOTS reply".into());
                continue;
            };
            topology.update(&ranges, |host, port| self.node_link(host, port));
            return Ok(());
        }
        Err(last)
    }

    /// Reports an operation's outcome to the breaker and the counters, and maps its error.
    pub(crate) fn settle<T>(
        &self,
        permit: Permit,
        outcome: Result<T, RunError>,
    ) -> Result<T, StoreError> {
        let c = &self.counters;
        match outcome {
            Ok(v) => {
                permit.success();
                Ok(v)
            }
            Err(RunError::Timeout) => {
                bump(&c.redis_errors);
                bump(&c.timeouts);
                self.failed(permit, "deadline passed");
                Err(StoreError::Timeout)
            }
            Err(RunError::Connect(e)) => {
                bump(&c.redis_errors);
                if e.is_timeout() {
                    bump(&c.timeouts);
                }
                let why = format!("cannot connect to {}: {e}", self.url);
                self.failed(permit, &why);
                tracing::debug!(error = %why, "redis session store operation failed");
                Err(StoreError::Unavailable(format!("redis: {why}")))
            }
            Err(RunError::Redis(e)) => {
                bump(&c.redis_errors);
                if is_connection_failure(&e) {
                    if e.is_timeout() {
                        bump(&c.timeouts);
                    }
                    self.failed(permit, &e.to_string());
                } else {
                    // Redis answered (with an error): it is up.
                    permit.success();
                }
                tracing::debug!(url = %self.url, error = %e, "redis session store operation failed");
                Err(map_error(&e))
            }
        }
    }

    fn failed(&self, permit: Permit, why: &str) {
        let breaker = Arc::clone(permit.breaker());
        if permit.failure(Instant::now()) {
            bump(&self.counters.breaker_opens);
            // The connection is as dead as the operation that failed: the probe after the
            // back-off must open a fresh one.
            match &self.topology {
                Some(t) => t.reset_link_of(&breaker),
                None => self.link.reset_any(),
            }
            tracing::warn!(url = %self.url, error = why, "redis session store: circuit breaker open");
        }
    }

    /// Opens a value read from Redis; a failure is counted and, if `drop_bad` and the value does
    /// not name a key this ring lacks (another host may be ahead in a key rotation), the value
    /// is deleted (write-behind).
    pub(crate) fn decode_or_drop(
        &self,
        id: &SessionId,
        value: &[u8],
        drop_bad: bool,
    ) -> Result<StoredSession, StoreError> {
        match self.codec.decode(id, value) {
            Ok(s) => Ok(s),
            Err(e) => {
                bump(&self.counters.decrypt_failures);
                tracing::warn!(id = %id.to_hex(), error = %e, "redis session store: undecryptable value");
                // A peer state is never deleted blindly (only `remove_if` removes one).
                if drop_bad && !id.is_peer_state() && !self.codec.is_foreign(value) {
                    self.queue_remove(*id);
                }
                Err(e)
            }
        }
    }

    /// Drops this host's tier copy of `id`, so that no Redis read in flight puts it back.
    pub(crate) fn drop_from_tier(&self, id: SessionId) {
        if let Some(tier) = &self.tier {
            self.coherence.invalidate(tier, id);
        }
    }

    /// A lookup that travels: the command and the decode within `deadline`, then the tier (for
    /// a get) or an invalidation (for a take that found something), then `done`.
    pub(crate) async fn remote_lookup(
        self: Arc<Self>,
        id: SessionId,
        key: String,
        mode: LookupMode,
        permit: Permit,
        deadline: Instant,
        done: LookupDone,
    ) {
        let mark = self.coherence.mark();
        let command = match mode {
            LookupMode::Get => "GET",
            LookupMode::Take => "GETDEL",
        };
        let timed = tokio::time::timeout_at(deadline.into(), async {
            let (value, conn) = self
                .attempt(Route::Key(key.as_bytes()), |mut conn| {
                    let key = &key;
                    async move {
                        let v: Option<Vec<u8>> = ::redis::cmd(command)
                            .arg(key)
                            .query_async(&mut conn)
                            .await?;
                        Ok((v, conn))
                    }
                })
                .await?;
            let opened = value
                .map(|v| self.decode_or_drop(&id, &v, mode == LookupMode::Get))
                .map(|r| (r, conn));
            Ok::<_, RunError>(opened)
        })
        .await;
        let outcome = timed.unwrap_or(Err(RunError::Timeout));
        let result = match self.settle(permit, outcome) {
            Err(e) => Err(e),
            Ok(None) => Ok(None),
            Ok(Some((opened, conn))) => {
                if mode == LookupMode::Take {
                    // Gone from Redis: tell the other hosts' tiers, without waiting for it.
                    self.publish(conn, id);
                }
                match opened {
                    Ok(session) => {
                        if let (LookupMode::Get, Some(tier), false) =
                            (mode, &self.tier, id.is_peer_state())
                        {
                            self.coherence.fill(mark, tier, id, session.clone());
                        }
                        Ok(Some(session))
                    }
                    Err(e) => Err(e),
                }
            }
        };
        // No lock is held here: `done` may run the cache's code.
        done.complete(result);
    }

    /// What a confirmed write sends: the key, the sealed value (the session's bytes are dropped
    /// here) and the milliseconds it has left; an already expired session is refused.
    fn sealed_for_put(
        &self,
        id: &SessionId,
        session: StoredSession,
    ) -> Result<(String, Vec<u8>, u64), StoreError> {
        let ttl_ms = session
            .expires_at_millis()
            .saturating_sub(crate::clock::unix_millis(std::time::SystemTime::now()));
        if ttl_ms == 0 {
            return Err(StoreError::Unavailable("value already expired".into()));
        }
        let value = self.codec.encode(id, &session)?;
        Ok((self.key_for(id), value, ttl_ms))
    }

    /// `SET key value PX ttl` of a sealed `session`, straight to Redis (no queue, no tier),
    /// within `deadline`; `done` learns whether Redis acknowledged it.
    pub(crate) async fn remote_put(
        self: Arc<Self>,
        id: SessionId,
        session: StoredSession,
        permit: Permit,
        deadline: Instant,
        done: PutDone,
    ) {
        let (key, value, ttl_ms) = match self.sealed_for_put(&id, session) {
            Ok(sealed) => sealed,
            Err(e) => {
                drop(permit);
                return done.complete(Err(e));
            }
        };
        let set = ::redis::cmd("SET")
            .arg(&key)
            .arg(value)
            .arg("PX")
            .arg(ttl_ms)
            .clone();
        let outcome = self
            .run(deadline, Route::Key(key.as_bytes()), |mut conn| {
                let set = set.clone();
                async move { set.exec_async(&mut conn).await }
            })
            .await;
        let result = self.settle(permit, outcome);
        done.complete(result);
    }

    /// `put_if`'s script: `SET` only if the value's clear version (its first 8 bytes) is one
    /// of `ARGV[3..]`; 1 if it wrote, 0 if not.
    const PUT_IF: &'static str = "local v = redis.call('GET', KEYS[1]) \
        if not v then return 0 end \
        local held = string.sub(v, 1, 8) \
        for i = 3, #ARGV do \
          if held == ARGV[i] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end \
        end \
        return 0";
    /// `remove_if`'s script: `DEL` only if the clear version is one of `ARGV`.
    const REMOVE_IF: &'static str = "local v = redis.call('GET', KEYS[1]) \
        if not v then return 0 end \
        local held = string.sub(v, 1, 8) \
        for i = 1, #ARGV do \
          if held == ARGV[i] then return redis.call('DEL', KEYS[1]) end \
        end \
        return 0";

    /// `put_if`'s write: [`remote_put`](Self::remote_put) without `expect`, otherwise the
    /// script (one atomic step in Redis); `done` completes with [`StoreError::Conflict`] if
    /// the script wrote nothing.
    pub(crate) async fn remote_put_if(
        self: Arc<Self>,
        id: SessionId,
        session: StoredSession,
        expect: Vec<u64>,
        permit: Permit,
        deadline: Instant,
        done: PutDone,
    ) {
        let (key, value, ttl_ms) = match self.sealed_for_put(&id, session) {
            Ok(sealed) => sealed,
            Err(e) => {
                drop(permit);
                return done.complete(Err(e));
            }
        };
        let mut eval = ::redis::cmd("EVAL");
        eval.arg(Self::PUT_IF)
            .arg(1)
            .arg(&key)
            .arg(value)
            .arg(ttl_ms);
        for v in &expect {
            eval.arg(&v.to_be_bytes()[..]);
        }
        let outcome = self
            .run(deadline, Route::Key(key.as_bytes()), |mut conn| {
                let eval = eval.clone();
                async move { eval.query_async::<i64>(&mut conn).await }
            })
            .await;
        let result = match self.settle(permit, outcome) {
            Ok(1) => Ok(()),
            Ok(_) => Err(StoreError::Conflict),
            Err(e) => Err(e),
        };
        done.complete(result);
    }

    /// `remove_if`'s removal, the script within `deadline`; the outcome is only logged.
    pub(crate) async fn remote_remove_if(
        self: Arc<Self>,
        id: SessionId,
        expect: Vec<u64>,
        permit: Permit,
        deadline: Instant,
    ) {
        let key = self.key_for(&id);
        let mut eval = ::redis::cmd("EVAL");
        eval.arg(Self::REMOVE_IF).arg(1).arg(&key);
        for v in &expect {
            eval.arg(&v.to_be_bytes()[..]);
        }
        let outcome = self
            .run(deadline, Route::Key(key.as_bytes()), |mut conn| {
                let eval = eval.clone();
                async move { eval.query_async::<i64>(&mut conn).await }
            })
            .await;
        if let Err(e) = self.settle(permit, outcome) {
            tracing::debug!(error = %e, "redis session store: conditional removal failed");
        }
    }

    /// Publishes the invalidation of `id` on `conn`, on a task of its own.
    fn publish(self: &Arc<Self>, mut conn: MultiplexedConnection, id: SessionId) {
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let sent = tokio::time::timeout(
                shared.op_timeout,
                ::redis::cmd("PUBLISH")
                    .arg(&shared.channel)
                    .arg(id.to_hex())
                    .exec_async(&mut conn),
            )
            .await;
            if matches!(sent, Ok(Ok(()))) {
                bump(&shared.counters.invalidations_sent);
            } else {
                tracing::debug!(url = %shared.url, "redis session store: invalidation not published");
            }
        });
    }

    /// An invalidation from the channel.
    pub(crate) fn on_invalidation(&self, tier: &MemoryStore, payload: &[u8]) {
        bump(&self.counters.invalidations_received);
        if payload == invalidation::ALL {
            self.coherence.invalidate_all(tier);
        } else if let Some(id) = id_from_hex(payload) {
            self.coherence.invalidate(tier, id);
        }
    }
}
