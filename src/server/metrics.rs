//! Counters through the `metrics` facade (feature `metrics`): each driver worker publishes the
//! deltas of the counters the crate keeps anyway (endpoint, DSM, I/O; the session cache and its
//! store from worker 0) every [`METRICS_EVERY`], and records each handshake's duration when its
//! `Connected` event passes. Nothing is added to the datagram path but that one histogram
//! sample per handshake.
//!
//! Handles are taken when a worker starts: install the recorder (an exporter) before starting
//! the server.

use std::time::{Duration, Instant};

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};

use super::endpoint::{Endpoint, EndpointStats};
use super::event::Event;
use super::io::IoStats;
use crate::{CacheStats, DsmStats};

/// How often a worker publishes its counters' deltas.
pub(crate) const METRICS_EVERY: Duration = Duration::from_millis(200);

/// The handshake duration histogram (label `kind`: `full` or `resumed`).
pub const HANDSHAKE_DURATION_METRIC: &str = "dtls_handshake_duration_seconds";

/// Declares a list of counters kept in a struct of `u64` fields: their metric names, help
/// texts, handles, and the publishing of deltas between two snapshots.
macro_rules! counters {
    ($handles:ident, $stats:ty, $prefix:literal, [$($field:ident: $help:literal),* $(,)?]) => {
        struct $handles {
            $($field: Counter,)*
        }

        impl $handles {
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

counters!(EndpointCounters, EndpointStats, "dtls_endpoint_", [
    datagrams_in: "Datagrams handed to the endpoint",
    datagrams_out: "Datagrams the endpoint produced",
    hello_verify_requests: "HelloVerifyRequests sent without creating state",
    bad_cookies: "ClientHellos whose cookie did not verify",
    dropped_garbage: "Datagrams dropped as garbage",
    dropped_not_client_hello: "Datagrams from unknown peers that were not ClientHellos",
    dropped_fragmented: "Fragmented ClientHellos dropped",
    dropped_oversize: "Oversized datagrams dropped",
    dropped_bad_sequence: "ClientHellos with impossible sequence numbers dropped",
    dropped_no_space: "Cookie-valid ClientHellos the DSM refused (no slot, budget or quota)",
    dropped_invalid: "Datagrams for known peers discarded unread",
    dropped_events: "Data and Dropped events not queued for the application",
    dropped_parked: "Datagrams dropped for a parked peer with a full queue",
    handshakes: "Handshakes completed (full and resumed)",
    resumed: "Handshakes completed by resuming a cached session",
    failed: "Connections that failed",
    closed: "Peers closed by their close_notify",
    closed_locally: "Peers closed by the application",
    handshake_timeouts: "Handshakes freed by the handshake timeout",
    idle_closed: "Peers shut down as idle or evicted",
    records_received: "Application records received",
    bytes_received: "Application bytes received",
    records_sent: "Application records sent",
    bytes_sent: "Application bytes sent",
    send_queue_full: "Sends refused because the peer's queue was full",
    lookups_parked: "Handshakes parked while a remote store looked their session up",
    lookups_completed: "Parked handshakes that went on with the lookup's answer",
    lookups_timed_out: "Parked handshakes that went on without it (lookup timeout)",
]);

gauges!(EndpointGauges, EndpointStats, "dtls_endpoint_", [
    peers: "Peers with state now",
    handshaking: "Peers in the handshake now",
    parked: "Peers parked on a session lookup now",
]);

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
    hits: "Session lookups that resumed",
    misses: "Session lookups that ended in a full handshake",
    refused: "Sessions handed to OpenSSL that it refused",
    lookups: "Lookups started without blocking (ClientHello callback)",
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
    send_calls: "Send system calls (sendmsg, sendto)",
    datagrams_sent: "Datagrams sent",
]);

gauges!(StoreGauges, CacheStats, "session_store_", [
    entries: "Entries in the session store now",
    bytes: "Bytes of session data in the session store now",
]);

/// One worker's metrics: its handles and the snapshots its last deltas were taken against.
pub(crate) struct Publisher {
    /// Worker 0 also publishes the shared session cache's counters.
    cache: bool,
    next: Instant,
    endpoint: (EndpointCounters, EndpointGauges, EndpointStats),
    dsm: (DsmCounters, DsmGauges, DsmStats),
    io: (IoCounters, IoStats),
    cache_stats: (CacheCounters, StoreGauges, CacheStats),
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
            endpoint: (
                EndpointCounters::new(),
                EndpointGauges::new(),
                EndpointStats::default(),
            ),
            dsm: (DsmCounters::new(), DsmGauges::new(), DsmStats::default()),
            io: (IoCounters::new(), IoStats::default()),
            cache_stats: (
                CacheCounters::new(),
                StoreGauges::new(),
                CacheStats::default(),
            ),
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
        self.endpoint.0.publish(&self.endpoint.2, &e);
        self.endpoint.1.publish(&self.endpoint.2, &e);
        self.endpoint.2 = e;
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
            self.cache_stats.2 = c;
        }
    }
}
