//! Counters through the `metrics` facade (feature `metrics`): each driver worker publishes the
//! deltas of the counters the crate keeps anyway (endpoint, DSM, I/O; the session cache and its
//! store from worker 0) every [`METRICS_EVERY`], and records each handshake's duration when its
//! `Connected` event passes. Nothing is added to the datagram path but that one histogram
//! sample per handshake.
//!
//! Handles are taken when a worker starts: install the recorder (an exporter) before starting
//! the server.
//!
//! The metrics (counters end in `_total`; the others are gauges but for the histogram):
//! - `dtls_endpoint_*`: every field of [`EndpointStats`], declared once in its table
//!   (server/stats.rs), which also writes the list into `EndpointStats`'s docs.
//! - The DSM: `dtls_dsm_stored_total`, `dtls_dsm_removed_total`, `dtls_dsm_no_space_total`,
//!   `dtls_dsm_handshake_timeouts_total`, `dtls_dsm_idle_evictions_total`,
//!   `dtls_dsm_quota_rejections_total`, `dtls_dsm_evicted_total`; gauges `dtls_dsm_handshakes`,
//!   `dtls_dsm_established`.
//! - The session cache (worker 0, set to the cache's own totals): `session_cache_hits_total` and
//!   `session_cache_misses_total` count every session a client offered, once, by how it ended
//!   (resumed, or a full handshake); `session_cache_lookups_total` counts only the lookups of a
//!   remote store started from the ClientHello callback without blocking (each of them also
//!   ends as a hit or a miss), and `session_cache_suspended_total` those of them that made the
//!   handshake wait. Then `session_cache_refused_total`, `session_cache_abandoned_total`,
//!   `session_cache_stale_total`, `session_cache_decoded_hits_total`,
//!   `session_cache_vetoed_total`, `session_cache_inserts_total`, `session_cache_expired_total`,
//!   `session_cache_evicted_capacity_total`, `session_cache_evicted_bytes_total`,
//!   `session_cache_removed_total`, `session_cache_decode_errors_total`,
//!   `session_cache_rejected_oversize_total`, `session_cache_store_errors_total` (see
//!   [`CacheStats`] for each); gauges `session_store_entries`, `session_store_bytes`,
//!   `session_cache_decoded_entries` (sessions held decoded beside the store).
//! - UDP I/O: `dtls_udp_recv_calls_total`, `dtls_udp_datagrams_received_total`,
//!   `dtls_udp_send_calls_total`, `dtls_udp_datagrams_sent_total`.
//! - The histogram [`HANDSHAKE_DURATION_METRIC`] (`dtls_handshake_duration_seconds`, label
//!   `kind`: `full` or `resumed`), for which [`HANDSHAKE_DURATION_BUCKETS`] are the buckets.

use std::time::{Duration, Instant};

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};

use super::endpoint::Endpoint;
use super::event::Event;
use super::io::IoStats;
use super::stats::{EndpointStats, Kind};
use crate::dsm::DsmStats;
use crate::CacheStats;

/// How often a worker publishes its counters' deltas.
pub(crate) const METRICS_EVERY: Duration = Duration::from_millis(200);

/// The handshake duration histogram (label `kind`: `full` or `resumed`), in seconds: from the
/// ClientHello whose cookie verified to the datagram that finished the handshake
/// ([`ConnectionInfo::handshake_time`](crate::ConnectionInfo::handshake_time)).
pub const HANDSHAKE_DURATION_METRIC: &str = "dtls_handshake_duration_seconds";

/// Bucket bounds for [`HANDSHAKE_DURATION_METRIC`], in seconds: 0.5 ms (a resumption on
/// loopback) to 5 s (a full handshake over a lossy path that needed retransmissions).
///
/// The `metrics` facade carries no buckets; an exporter that renders histograms as buckets
/// takes them at installation, such as `metrics-exporter-prometheus` (which renders a summary
/// otherwise):
///
/// ```no_run
/// use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
/// use openssl_session_cache::{HANDSHAKE_DURATION_BUCKETS, HANDSHAKE_DURATION_METRIC};
///
/// PrometheusBuilder::new()
///     .set_buckets_for_metric(
///         Matcher::Full(HANDSHAKE_DURATION_METRIC.into()),
///         HANDSHAKE_DURATION_BUCKETS,
///     )?
///     .install()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub const HANDSHAKE_DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Declares a list of counters kept in a struct of `u64` fields: their metric names, help
/// texts, handles, and the publishing of deltas between two snapshots.
macro_rules! counters {
    ($handles:ident, $stats:ty, $prefix:literal, [$($field:ident: $help:literal),* $(,)?]) => {
        struct $handles {
            $($field: Counter,)*
        }

        impl $handles {
            /// The metrics' names.
            #[cfg(test)]
            const NAMES: &'static [&'static str] =
                &[$(concat!($prefix, stringify!($field), "_total"),)*];

            fn new() -> Self {
                $(describe_counter!(concat!($prefix, stringify!($field), "_total"), $help);)*
                Self {
                    $($field: metrics::counter!(concat!($prefix, stringify!($field), "_total")),)*
                }
            }

            #[allow(dead_code)]
            fn publish(&self, last: &$stats, now: &$stats) {
                $(
                    let delta = now.$field.saturating_sub(last.$field);
                    if delta > 0 {
                        self.$field.increment(delta);
                    }
                )*
            }

            /// Sets each counter to its value in `now`: for counters kept in one place that
            /// several publishers see (the shared session cache), which must not add up.
            #[allow(dead_code)]
            fn publish_absolute(&self, now: &$stats) {
                $(self.$field.absolute(now.$field);)*
            }
        }
    };
}

/// Declares gauges published as deltas, so that workers add up.
macro_rules! gauges {
    ($handles:ident, $stats:ty, $prefix:literal, [$($field:ident: $help:literal),* $(,)?]) => {
        struct $handles {
            $($field: Gauge,)*
        }

        impl $handles {
            /// The metrics' names.
            #[cfg(test)]
            const NAMES: &'static [&'static str] = &[$(concat!($prefix, stringify!($field)),)*];

            fn new() -> Self {
                $(describe_gauge!(concat!($prefix, stringify!($field)), $help);)*
                Self {
                    $($field: metrics::gauge!(concat!($prefix, stringify!($field))),)*
                }
            }

            #[allow(dead_code)]
            fn publish(&self, last: &$stats, now: &$stats) {
                $(
                    if now.$field != last.$field {
                        self.$field.increment(now.$field as f64 - last.$field as f64);
                    }
                )*
            }

            /// Sets each gauge to its value in `now` (one publisher for a shared source).
            #[allow(dead_code)]
            fn set_all(&self, now: &$stats) {
                $(self.$field.set(now.$field as f64);)*
            }
        }
    };
}

/// One handle per field of [`EndpointStats`], in the order of its table.
enum EndpointHandle {
    /// For a [`Kind::Counter`]: the deltas add up over workers.
    Counter(Counter),
    /// For a [`Kind::Gauge`]: the deltas add up over workers.
    Gauge(Gauge),
    /// For a [`Kind::Peak`]: this worker's own gauge (label `worker`), set.
    Peak(Gauge),
}

/// The endpoint's metrics, made from [`EndpointStats::FIELDS`]: every field is exported.
struct EndpointMetrics(Vec<EndpointHandle>);

impl EndpointMetrics {
    fn new(worker: usize) -> Self {
        let handles = EndpointStats::FIELDS.iter().map(|f| match f.kind {
            Kind::Counter => {
                describe_counter!(f.metric, f.help);
                EndpointHandle::Counter(metrics::counter!(f.metric))
            }
            Kind::Gauge => {
                describe_gauge!(f.metric, f.help);
                EndpointHandle::Gauge(metrics::gauge!(f.metric))
            }
            Kind::Peak => {
                describe_gauge!(f.metric, f.help);
                EndpointHandle::Peak(metrics::gauge!(f.metric, "worker" => worker.to_string()))
            }
        });
        Self(handles.collect())
    }

    /// Publishes what changed from `last` to `now`.
    fn publish(&self, last: &EndpointStats, now: &EndpointStats) {
        for (f, handle) in EndpointStats::FIELDS.iter().zip(&self.0) {
            let (was, is) = ((f.get)(last), (f.get)(now));
            match handle {
                EndpointHandle::Counter(c) => {
                    let delta = is.saturating_sub(was);
                    if delta > 0 {
                        c.increment(delta);
                    }
                }
                EndpointHandle::Gauge(g) => {
                    if is != was {
                        g.increment(is as f64 - was as f64);
                    }
                }
                EndpointHandle::Peak(g) => g.set(is as f64),
            }
        }
    }
}

counters!(DsmCounters, DsmStats, "dtls_dsm_", [
    stored: "Peers stored or moved to another state",
    removed: "Peers removed",
    no_space: "Peers refused: no slot, handshake budget or quota",
    handshake_timeouts: "Handshake slots reclaimed by the handshake timeout",
    idle_evictions: "Established peers freed by the idle sweep",
    quota_rejections: "Peers refused by the per-source quota",
    evicted: "Idle peers evicted to make room",
]);

gauges!(DsmGauges, DsmStats, "dtls_dsm_", [
    handshakes: "DSM slots in the handshake state now",
    established: "DSM slots in the established state now",
]);

counters!(CacheCounters, CacheStats, "session_cache_", [
    hits: "Sessions offered by clients that resumed (hits + misses: every session offered)",
    misses: "Sessions offered by clients that ended in a full handshake",
    refused: "Sessions handed to OpenSSL that it refused",
    lookups: "Remote store lookups started without blocking (each also a hit or a miss)",
    suspended: "Lookups that suspended the handshake until the store answered",
    abandoned: "Suspended lookups given up on",
    stale: "Stored sessions refused by today's policy",
    decoded_hits: "Hits served from the tier of decoded sessions",
    vetoed: "Stored sessions the application refused",
    inserts: "Sessions handed to the store",
    expired: "Entries found expired or purged",
    evicted_capacity: "Store entries evicted at the entry limit",
    evicted_bytes: "Store entries evicted at the byte limit",
    removed: "Store entries deleted on OpenSSL's remove callback",
    decode_errors: "Stored sessions OpenSSL could not decode",
    rejected_oversize: "Sessions not stored for their size",
    store_errors: "Store operations that failed",
]);

counters!(IoCounters, IoStats, "dtls_udp_", [
    recv_calls: "Receive system calls (recvmmsg, recvfrom)",
    datagrams_received: "Datagrams received",
    send_calls: "Send system calls (sendto)",
    datagrams_sent: "Datagrams sent",
]);

gauges!(StoreGauges, CacheStats, "session_store_", [
    entries: "Entries in the session store now",
    bytes: "Bytes of session data in the session store now",
]);

gauges!(CacheGauges, CacheStats, "session_cache_", [
    decoded_entries: "Sessions held decoded beside the store (the decoded tier) now",
]);

/// One worker's metrics: its handles and the snapshots its last deltas were taken against.
pub(crate) struct Publisher {
    /// Worker 0 also publishes the shared session cache's counters.
    cache: bool,
    next: Instant,
    endpoint: (EndpointMetrics, EndpointStats),
    dsm: (DsmCounters, DsmGauges, DsmStats),
    io: (IoCounters, IoStats),
    cache_stats: (CacheCounters, StoreGauges, CacheStats),
    cache_gauges: CacheGauges,
    full: Histogram,
    resumed: Histogram,
}

impl Publisher {
    pub(crate) fn new(worker: usize, now: Instant) -> Self {
        describe_histogram!(
            HANDSHAKE_DURATION_METRIC,
            Unit::Seconds,
            "DTLS handshake duration, from the cookie-verified ClientHello to Connected"
        );
        Self {
            cache: worker == 0,
            next: now,
            endpoint: (EndpointMetrics::new(worker), EndpointStats::default()),
            dsm: (DsmCounters::new(), DsmGauges::new(), DsmStats::default()),
            io: (IoCounters::new(), IoStats::default()),
            cache_stats: (
                CacheCounters::new(),
                StoreGauges::new(),
                CacheStats::default(),
            ),
            cache_gauges: CacheGauges::new(),
            full: metrics::histogram!(HANDSHAKE_DURATION_METRIC, "kind" => "full"),
            resumed: metrics::histogram!(HANDSHAKE_DURATION_METRIC, "kind" => "resumed"),
        }
    }

    /// Records a handshake's duration.
    pub(crate) fn on_event(&self, event: &Event) {
        if let Event::Connected { info, .. } = event {
            let h = if info.resumed {
                &self.resumed
            } else {
                &self.full
            };
            h.record(info.handshake_time.as_secs_f64());
        }
    }

    /// Publishes if due; returns when it is due next.
    pub(crate) fn publish_if_due(
        &mut self,
        now: Instant,
        endpoint: &Endpoint,
        io: IoStats,
    ) -> Instant {
        if now >= self.next {
            self.publish(endpoint, io);
            self.next = now + METRICS_EVERY;
        }
        self.next
    }

    /// Publishes the deltas since the last time.
    pub(crate) fn publish(&mut self, endpoint: &Endpoint, io: IoStats) {
        self.io.0.publish(&self.io.1, &io);
        self.io.1 = io;
        let e = endpoint.stats();
        self.endpoint.0.publish(&self.endpoint.1, &e);
        self.endpoint.1 = e;
        let d = endpoint.dsm_stats();
        self.dsm.0.publish(&self.dsm.2, &d);
        self.dsm.1.publish(&self.dsm.2, &d);
        self.dsm.2 = d;
        if self.cache {
            let c = endpoint.config().session_cache().stats();
            // The cache is shared by every worker and every server built on it: its own counters
            // are the totals, so they are set, not added to.
            self.cache_stats.0.publish_absolute(&c);
            self.cache_stats.1.set_all(&c);
            self.cache_gauges.set_all(&c);
            self.cache_stats.2 = c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_docs_name_every_metric_but_the_endpoints_which_its_stats_docs_name() {
        let docs: String = include_str!("metrics.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .collect::<Vec<_>>()
            .join(" ");
        let names = [
            DsmCounters::NAMES,
            DsmGauges::NAMES,
            CacheCounters::NAMES,
            StoreGauges::NAMES,
            CacheGauges::NAMES,
            IoCounters::NAMES,
            &[HANDSHAKE_DURATION_METRIC],
        ];
        for name in names.concat() {
            assert!(
                docs.contains(&format!("`{name}`")),
                "{name} is not in the docs"
            );
        }
        assert!(docs.contains("`dtls_endpoint_*`"));
    }

    #[test]
    fn handshake_duration_buckets_rise() {
        assert!(HANDSHAKE_DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(HANDSHAKE_DURATION_BUCKETS[0] > 0.0);
    }
}
