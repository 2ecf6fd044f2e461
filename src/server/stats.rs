//! The endpoint's counters, [`EndpointStats`]: each field is declared once, in the table at
//! `endpoint_stats!`'s call, with its doc, its kind (a counter, a drop counter with the
//! [`DropReason`] it counts, a gauge, a peak) and the help text of its metric. The struct,
//! [`merge`](EndpointStats::merge), [`dropped`](EndpointStats::dropped), the counting of drops
//! by reason and the list of metrics `metrics.rs` exports all come from that one table, so a new
//! counter cannot be left out of any of them.

use super::event::DropReason;

/// How a field of [`EndpointStats`] adds up over workers and how it is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) enum Kind {
    /// Only grows; workers add up. A counter `dtls_endpoint_<field>_total`.
    Counter,
    /// A level now; workers add up. A gauge `dtls_endpoint_<field>`, published as each worker's
    /// changes.
    Gauge,
    /// The highest level one worker reached; of several workers, the highest. A gauge
    /// `dtls_endpoint_<field>` per worker (label `worker`).
    Peak,
}

/// One field of [`EndpointStats`] as the metrics see it.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct StatField {
    /// The metric's name.
    pub(crate) metric: &'static str,
    /// The metric's help text.
    pub(crate) help: &'static str,
    /// How it adds up and is exported.
    pub(crate) kind: Kind,
    /// Reads the field.
    pub(crate) get: fn(&EndpointStats) -> u64,
}

/// The [`Kind`] of a table entry.
macro_rules! kind {
    (counter) => {
        Kind::Counter
    };
    (drop) => {
        Kind::Counter
    };
    (gauge) => {
        Kind::Gauge
    };
    (peak) => {
        Kind::Peak
    };
}

/// The metric name of a table entry.
macro_rules! metric_name {
    (counter, $field:ident) => {
        concat!("dtls_endpoint_", stringify!($field), "_total")
    };
    (drop, $field:ident) => {
        concat!("dtls_endpoint_", stringify!($field), "_total")
    };
    (gauge, $field:ident) => {
        concat!("dtls_endpoint_", stringify!($field))
    };
    (peak, $field:ident) => {
        concat!("dtls_endpoint_", stringify!($field))
    };
}

/// What a table entry is in the list of metrics of the struct's docs.
macro_rules! metric_kind_doc {
    (counter) => {
        "counter"
    };
    (drop) => {
        "counter"
    };
    (gauge) => {
        "gauge"
    };
    (peak) => {
        "gauge, label `worker`"
    };
}

/// Merges one field of `other` into `this`: counters and gauges add, peaks take the larger.
macro_rules! merge_field {
    (peak, $this:expr, $other:expr) => {
        $this = $this.max($other)
    };
    ($kind:ident, $this:expr, $other:expr) => {
        $this += $other
    };
}

/// Declares [`EndpointStats`] from its table: one entry per field,
/// `kind field: "metric help"` after the field's doc, where `kind` is `counter`, `drop(Reason)`
/// (a counter of the datagrams dropped for [`DropReason`]`::Reason`), `gauge` or `peak`.
macro_rules! endpoint_stats {
    (
        $(#[$attr:meta])*
        pub struct EndpointStats {
            $(
                $(#[doc = $doc:literal])*
                $kind:ident $(($reason:ident))? $field:ident: $help:literal,
            )*
        }
    ) => {
        $(#[$attr])*
        ///
        /// With the feature `metrics`, the drivers export every field through the `metrics`
        /// facade (see also `HANDSHAKE_DURATION_METRIC`):
        #[doc = concat!($("\n- `", metric_name!($kind, $field), "` (", metric_kind_doc!($kind), "): ", $help, ".",)*)]
        pub struct EndpointStats {
            $(
                $(#[doc = $doc])*
                pub $field: u64,
            )*
        }

        impl EndpointStats {
            /// Every field, in declaration order, with its metric.
            #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
            pub(crate) const FIELDS: &'static [StatField] = &[
                $(StatField {
                    metric: metric_name!($kind, $field),
                    help: $help,
                    kind: kind!($kind),
                    get: |s: &Self| s.$field,
                },)*
            ];

            /// Adds `other`'s counters to these (for summing workers); gauges add up too, except
            /// `max_handshaking`, which takes the larger.
            pub fn merge(&mut self, other: &Self) {
                $(merge_field!($kind, self.$field, other.$field);)*
            }

            /// All dropped datagrams.
            pub fn dropped(&self) -> u64 {
                self.drop_counts().map(|(_, n)| n).sum()
            }

            /// Each drop counter, with the reason it counts.
            fn drop_counts(&self) -> impl Iterator<Item = (DropReason, u64)> {
                [$($((DropReason::$reason, self.$field),)?)*].into_iter()
            }

            /// Counts one datagram dropped for `reason` (each reason has one counter: a reason
            /// without one, or with two, does not compile).
            pub(crate) fn count_drop(&mut self, reason: DropReason) {
                match reason {
                    $($(DropReason::$reason => self.$field += 1,)?)*
                }
            }

            /// Stats with only the `i`th field (of [`FIELDS`](Self::FIELDS)) set, to 1.
            #[cfg(test)]
            fn only(i: usize) -> Self {
                let mut s = Self::default();
                let mut n = 0;
                $(
                    if n == i {
                        s.$field = 1;
                    }
                    n += 1;
                )*
                let _ = n;
                s
            }
        }
    };
}

endpoint_stats! {
    /// The endpoint's counters, from [`Endpoint::stats`](crate::Endpoint::stats).
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    #[non_exhaustive]
    pub struct EndpointStats {
        /// Datagrams handed to [`Endpoint::handle`](crate::Endpoint::handle).
        counter datagrams_in: "Datagrams handed to the endpoint",
        /// Datagrams produced for [`Endpoint::poll_transmit`](crate::Endpoint::poll_transmit).
        counter datagrams_out: "Datagrams the endpoint produced",
        /// HelloVerifyRequests sent without creating state.
        counter hello_verify_requests: "HelloVerifyRequests sent without creating state",
        /// ClientHellos with a cookie that did not verify (answered with a fresh HelloVerifyRequest).
        counter bad_cookies: "ClientHellos whose cookie did not verify",
        /// Datagrams dropped as garbage.
        drop(Garbage) dropped_garbage: "Datagrams dropped as garbage",
        /// Datagrams from unknown peers that were not ClientHellos.
        drop(NotClientHello) dropped_not_client_hello:
            "Datagrams from unknown peers that were not ClientHellos",
        /// Fragmented ClientHellos dropped.
        drop(Fragmented) dropped_fragmented: "Fragmented ClientHellos dropped",
        /// Oversized datagrams dropped.
        drop(Oversize) dropped_oversize: "Oversized datagrams dropped",
        /// ClientHellos with impossible sequence numbers dropped.
        drop(BadSequence) dropped_bad_sequence:
            "ClientHellos with impossible sequence numbers dropped",
        /// Cookie-valid ClientHellos refused by the DSM (no slot, budget or quota).
        drop(NoSpace) dropped_no_space:
            "Cookie-valid ClientHellos the DSM refused (no slot, budget or quota)",
        /// Datagrams for known peers discarded unread ([`DropReason::Invalid`]).
        drop(Invalid) dropped_invalid: "Datagrams for known peers discarded unread",
        /// Data and Dropped events not queued because
        /// [`Endpoint::poll_event`](crate::Endpoint::poll_event) was not called.
        counter dropped_events: "Data and Dropped events not queued for the application",
        /// Handshakes completed (full and resumed).
        counter handshakes: "Handshakes completed (full and resumed)",
        /// Of those, resumed.
        counter resumed: "Handshakes completed by resuming a cached session",
        /// Connections that failed.
        counter failed: "Connections that failed",
        /// Peers closed by their close_notify.
        counter closed: "Peers closed by their close_notify",
        /// Peers closed by the application ([`Endpoint::close`](crate::Endpoint::close)).
        counter closed_locally: "Peers closed by the application",
        /// Handshakes freed by the handshake timeout.
        counter handshake_timeouts: "Handshakes freed by the handshake timeout",
        /// Peers shut down as idle or evicted.
        counter idle_closed: "Peers shut down as idle or evicted",
        /// Application records received.
        counter records_received: "Application records received",
        /// Application bytes received.
        counter bytes_received: "Application bytes received",
        /// Application records sent ([`Endpoint::send`](crate::Endpoint::send)).
        counter records_sent: "Application records sent",
        /// Application bytes sent.
        counter bytes_sent: "Application bytes sent",
        /// Sends refused with [`SendError::QueueFull`](crate::SendError::QueueFull).
        counter send_queue_full: "Sends refused because the peer's queue was full",
        /// Calls of [`Endpoint::handle_timeout`](crate::Endpoint::handle_timeout).
        counter timeouts_handled: "Calls of the endpoint's handle_timeout (timers, wakes)",
        /// Peers now.
        gauge peers: "Peers with state now",
        /// Peers now in the handshake.
        gauge handshaking: "Peers in the handshake now",
        /// The most peers ever in the handshake at once.
        peak max_handshaking: "The most peers one worker held in the handshake at once",
        /// Handshakes suspended while a remote store looked their session up (parked peers).
        counter lookups_parked:
            "Handshakes parked while a remote store looked their session up",
        /// Of those, the ones that went on because the lookup completed.
        counter lookups_completed: "Parked handshakes that went on with the lookup's answer",
        /// Of those, the ones that went on without it: the lookup took longer than
        /// [`lookup_timeout`](crate::ServerConfigBuilder::lookup_timeout) (a full handshake follows).
        counter lookups_timed_out:
            "Parked handshakes that went on without it (lookup timeout)",
        /// Datagrams dropped because a parked peer already had
        /// [`parked_datagrams`](crate::ServerConfigBuilder::parked_datagrams) waiting.
        drop(Parked) dropped_parked: "Datagrams dropped for a parked peer with a full queue",
        /// Peers parked now.
        gauge parked: "Peers parked on a session lookup now",
        /// Datagrams of handshaking peers dropped because they held only records over the
        /// handshake's buffering budget ([`DropReason::OverBudget`]).
        drop(OverBudget) dropped_over_budget:
            "Datagrams of handshaking peers dropped for records over the handshake's budget",
        /// Records for lean peers that did not open under the peer's key (forged, corrupted,
        /// too short), each discarded silently (RFC 6347 §4.1.2.7).
        counter records_unopened: "Records for lean peers that did not authenticate",
        /// Records for lean peers whose sequence number was seen already or is older than the
        /// replay window (RFC 6347 §4.1.2.6), each discarded.
        counter records_replayed: "Records for lean peers discarded as replays",
        /// Established peers whose records the endpoint protects itself, their `Ssl` freed.
        gauge lean: "Established peers whose records the endpoint protects itself now",
        /// Times a lean peer's kept final flight was sent again, answering the client's
        /// retransmitted Finished.
        counter final_flights_resent: "Final flights sent again to a client that missed one",
        /// Lean peers whose count of records that did not open reached the AEAD's integrity
        /// limit for one key (RFC 9147 §4.5.3: 2^7 for AES-CCM8, 2^23.5 for AES-CCM, 2^36 for
        /// the others); logged, the peer is kept.
        counter integrity_limits_passed:
            "Lean peers whose failed openings reached the AEAD's integrity limit",
        /// `tls12_cid` datagrams whose connection ID is no peer's
        /// ([`DropReason::UnknownConnectionId`]).
        drop(UnknownConnectionId) dropped_unknown_cid:
            "Datagrams with a connection ID that is no peer's",
        /// Peers with a connection ID that moved to a new address ([`Event::Migrated`](crate::Event::Migrated)).
        counter migrations: "Peers with a connection ID that moved to a new address",
        /// Records from a new address that opened under a peer's connection ID but were not newer
        /// than every record before (RFC 9146 §6): taken, the peer left where it was.
        counter migrations_refused_old:
            "Records from a new address that authenticated but were not the newest",
        /// Lean peers taken out to be carried across a restart
        /// ([`Endpoint::suspend_all`](crate::Endpoint::suspend_all)).
        counter suspended: "Peers taken out to be carried across a restart",
        /// Saved peers restored ([`Endpoint::restore`](crate::Endpoint::restore)).
        counter restored: "Saved peers restored",
        /// Saved peers refused (expired, of another server identity, address taken, no slot).
        counter restores_refused: "Saved peers refused",
        /// Writes of shared peers' state to the store (`shared_peers`: a lease extension, a
        /// read mark, a peer's first state).
        counter lease_writes: "Writes of shared peers' state to the store",
        /// Such writes the store did not confirm (failed, timed out, breaker open).
        counter lease_writes_failed: "Writes of shared peers' state the store did not confirm",
        /// Shared peers this host lost to another: a conditional write of the state found
        /// another host's version (or none) in the store, so the peer was freed here with no
        /// close_notify and its stored state left alone ([`CloseReason::LeaseLost`](crate::CloseReason::LeaseLost)).
        counter leases_lost: "Shared peers lost to another host's write of their state",
        /// Records of shared peers not written (dropped, as UDP may drop them) because the
        /// lease extension covering their sequence number had not reached the store yet.
        counter lease_waits: "Records of shared peers dropped waiting for a lease",
        /// Store lookups of a peer's shared state started by a record with an unknown
        /// connection ID or from an unknown address (a takeover from a host that died).
        counter takeover_lookups: "Lookups of shared peer state for a takeover",
        /// Peers taken over from the store (a record opened under the state found).
        counter takeovers: "Peers taken over from the shared store",
        /// Shared states found but refused: sealed under another key ring or tampered,
        /// expired, of another server identity, or the record that asked did not open.
        counter takeovers_refused: "Shared peer states refused",
        /// Renegotiations refused (a ClientHello on an established lean association, answered
        /// with a no_renegotiation warning as OpenSSL does).
        counter renegotiations_refused: "Renegotiations refused",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn dropped_sums_every_drop_counter() {
        let s = EndpointStats {
            dropped_garbage: 1,
            dropped_not_client_hello: 2,
            dropped_fragmented: 4,
            dropped_oversize: 8,
            dropped_bad_sequence: 16,
            dropped_no_space: 32,
            dropped_invalid: 64,
            dropped_parked: 128,
            dropped_over_budget: 256,
            dropped_unknown_cid: 512,
            ..EndpointStats::default()
        };
        assert_eq!(s.dropped(), 1023);
    }

    #[test]
    fn every_drop_reason_counts_in_exactly_one_counter_that_dropped_sums() {
        let reasons = [
            DropReason::Garbage,
            DropReason::NotClientHello,
            DropReason::Fragmented,
            DropReason::Oversize,
            DropReason::BadSequence,
            DropReason::NoSpace,
            DropReason::Invalid,
            DropReason::Parked,
            DropReason::OverBudget,
            DropReason::UnknownConnectionId,
        ];
        let mut seen = HashSet::new();
        for reason in reasons {
            let mut s = EndpointStats::default();
            s.count_drop(reason);
            assert_eq!(s.dropped(), 1, "{reason:?}");
            let set: Vec<_> = EndpointStats::FIELDS
                .iter()
                .filter(|f| (f.get)(&s) != 0)
                .map(|f| f.metric)
                .collect();
            assert_eq!(set.len(), 1, "{reason:?}: {set:?}");
            assert!(seen.insert(set[0]), "{reason:?} shares {}", set[0]);
            assert_eq!(
                s.drop_counts()
                    .filter(|&(r, n)| r == reason && n == 1)
                    .count(),
                1
            );
        }
        let counters = EndpointStats::default().drop_counts().count();
        assert_eq!(counters, reasons.len());
    }

    #[test]
    fn every_field_has_one_exported_metric_of_its_own() {
        // Every field is a u64, so the struct's size counts them independently of the table.
        assert_eq!(
            EndpointStats::FIELDS.len() * std::mem::size_of::<u64>(),
            std::mem::size_of::<EndpointStats>()
        );
        let names: HashSet<_> = EndpointStats::FIELDS.iter().map(|f| f.metric).collect();
        assert_eq!(
            names.len(),
            EndpointStats::FIELDS.len(),
            "a name is used twice"
        );
        for (i, field) in EndpointStats::FIELDS.iter().enumerate() {
            // Merged into empty stats, each field on its own reaches the one metric that reads it.
            let mut merged = EndpointStats::default();
            merged.merge(&EndpointStats::only(i));
            let reading: Vec<_> = EndpointStats::FIELDS
                .iter()
                .filter(|f| (f.get)(&merged) == 1)
                .map(|f| f.metric)
                .collect();
            assert_eq!(reading, vec![field.metric]);
            let expected = match field.kind {
                Kind::Counter => field.metric.ends_with("_total"),
                Kind::Gauge | Kind::Peak => !field.metric.ends_with("_total"),
            };
            assert!(expected, "{} is a {:?}", field.metric, field.kind);
            assert!(field.metric.starts_with("dtls_endpoint_"));
            assert!(!field.help.is_empty());
        }
        assert!(names.contains("dtls_endpoint_dropped_over_budget_total"));
        assert!(names.contains("dtls_endpoint_timeouts_handled_total"));
    }

    #[test]
    fn merge_adds_counters_and_gauges_and_keeps_the_larger_peak() {
        let mut a = EndpointStats {
            datagrams_in: 3,
            peers: 2,
            max_handshaking: 5,
            dropped_over_budget: 1,
            ..EndpointStats::default()
        };
        let b = EndpointStats {
            datagrams_in: 4,
            peers: 1,
            max_handshaking: 3,
            dropped_over_budget: 2,
            ..EndpointStats::default()
        };
        a.merge(&b);
        assert_eq!(
            (
                a.datagrams_in,
                a.peers,
                a.max_handshaking,
                a.dropped_over_budget
            ),
            (7, 3, 5, 3)
        );
        let mut c = EndpointStats::default();
        c.merge(&a);
        assert_eq!(c, a);
    }
}
