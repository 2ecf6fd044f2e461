//! Session tickets with keys derived from a shared key file: a ticket issued by one host resumes
//! on another (TLS 1.2, TLS 1.3, DTLS 1.2), a ticket of the previous epoch resumes and is renewed
//! under the current key, and one past the acceptance window is a full handshake. Time is a
//! `ManualClock`.

mod support;

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use openssl_session_cache::{KeyRing, ManualClock, SessionCache, TicketKeys, TicketStats};
use support::{client_ctx, connect, server_builder, Ctx, Proto, ServerClose};

const HOUR: Duration = Duration::from_secs(3600);

struct Host {
    keys: TicketKeys,
    cache: SessionCache,
    ctx: Ctx,
}

fn host(proto: Proto, ring: &KeyRing, clock: &Arc<ManualClock>) -> Host {
    let keys = TicketKeys::builder(ring.clone())
        .period(HOUR)
        .accept_for(2 * HOUR)
        .clock(clock.clone())
        .build()
        .unwrap();
    let cache = SessionCache::builder()
        .clock(clock.clone())
        .ticket_keys(keys.clone())
        .build()
        .unwrap();
    let mut b = server_builder(proto, false);
    cache.install(&mut b).unwrap();
    Host {
        keys,
        cache,
        ctx: Ctx {
            ctx: b.build(),
            proto,
        },
    }
}

fn counts(s: TicketStats) -> (u64, u64, u64, u64) {
    (s.issued, s.resumed, s.renewed, s.refused)
}

fn clock() -> Arc<ManualClock> {
    // Real wall time matters to OpenSSL's own session expiry; the ticket epochs follow the
    // injected clock, started at the top of the current hour.
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(now / 3600 * 3600),
    ))
}

#[test]
fn a_ticket_from_one_host_resumes_on_another() {
    for proto in [Proto::Tls12, Proto::Tls13, Proto::Dtls12] {
        let ring = KeyRing::new(1, [0x5a; 32]);
        let clock = clock();
        let (a, b) = (host(proto, &ring, &clock), host(proto, &ring, &clock));
        let client = client_ctx(proto, false);
        let first = connect(&a.ctx, &client, None, ServerClose::Clean);
        assert!(!first.server_reused);
        assert!(a.keys.stats().issued >= 1, "{proto:?}: no ticket issued");
        let second = connect(&b.ctx, &client, first.session.as_ref(), ServerClose::Clean);
        assert!(
            second.server_reused,
            "{proto:?}: host B did not resume A's ticket"
        );
        assert_eq!(b.keys.stats().resumed, 1, "{proto:?}: {:?}", b.keys.stats());
        // Resumed from the ticket, not from a store.
        let s = b.cache.stats();
        assert_eq!((s.hits, s.misses), (0, 0), "{proto:?}: {s:?}");
        // Another key file: B' cannot open it.
        let other = host(proto, &KeyRing::new(1, [0x33; 32]), &clock);
        let third = connect(
            &other.ctx,
            &client,
            first.session.as_ref(),
            ServerClose::Clean,
        );
        assert!(!third.server_reused, "{proto:?}");
        assert_eq!(other.keys.stats().refused, 1);
    }
}

#[test]
fn an_earlier_epoch_resumes_and_is_renewed_and_past_the_window_is_a_full_handshake() {
    for proto in [Proto::Tls12, Proto::Dtls12, Proto::Tls13] {
        let ring = KeyRing::new(1, [0x77; 32]);
        let clock = clock();
        let a = host(proto, &ring, &clock);
        let client = client_ctx(proto, false);
        let first = connect(&a.ctx, &client, None, ServerClose::Clean);
        let issued = a.keys.stats().issued;
        // Next epoch: still opens, and OpenSSL is asked for a fresh ticket.
        clock.advance(HOUR + Duration::from_secs(60));
        let renewed = connect(&a.ctx, &client, first.session.as_ref(), ServerClose::Clean);
        assert!(renewed.server_reused, "{proto:?}");
        let s = a.keys.stats();
        assert_eq!((s.resumed, s.renewed), (0, 1), "{proto:?}: {s:?}");
        assert!(s.issued > issued, "{proto:?}: no new ticket on renewal");
        // The renewed ticket is sealed under the current key: it resumes as current.
        let again = connect(
            &a.ctx,
            &client,
            renewed.session.as_ref(),
            ServerClose::Clean,
        );
        assert!(again.server_reused, "{proto:?}");
        assert_eq!(a.keys.stats().resumed, 1, "{proto:?}");
        // The first ticket's epoch ended 1 h after it began; past that plus 2 h it is refused.
        clock.advance(2 * HOUR);
        let late = connect(&a.ctx, &client, first.session.as_ref(), ServerClose::Clean);
        assert!(
            !late.server_reused,
            "{proto:?}: a ticket past its window resumed"
        );
        assert_eq!(counts(a.keys.stats()).3, 1, "{proto:?}");
    }
}

#[test]
fn with_tickets_on_the_store_keeps_tls12_sessions_of_clients_without_tickets_only() {
    use openssl::ssl::{SslContext, SslMethod, SslOptions, SslVerifyMode, SslVersion};
    let ring = KeyRing::new(1, [0x21; 32]);
    let clock = clock();
    // A TLS 1.2 client that does not take tickets: the server gives it a session id, stored.
    let a = host(Proto::Tls12, &ring, &clock);
    let mut b = SslContext::builder(SslMethod::tls()).unwrap();
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_options(SslOptions::NO_TICKET);
    let no_tickets = Ctx {
        ctx: b.build(),
        proto: Proto::Tls12,
    };
    let first = connect(&a.ctx, &no_tickets, None, ServerClose::Clean);
    assert_eq!(a.cache.stats().inserts, 1);
    assert!(
        connect(
            &a.ctx,
            &no_tickets,
            first.session.as_ref(),
            ServerClose::Clean
        )
        .server_reused
    );
    assert_eq!(a.cache.stats().hits, 1);
    // TLS 1.3 with tickets: the tickets carry the sessions, nothing is stored.
    let t13 = host(Proto::Tls13, &ring, &clock);
    connect(
        &t13.ctx,
        &client_ctx(Proto::Tls13, false),
        None,
        ServerClose::Clean,
    );
    assert_eq!(t13.cache.stats().inserts, 0);
    assert_eq!(t13.cache.stats().entries, 0);
}
