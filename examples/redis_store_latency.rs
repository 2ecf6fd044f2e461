//! What the Redis session store costs the caller and how long its lookups take to complete:
//! directly on loopback, over TLS (`rediss://`, a test CA made here) on loopback, and through a
//! proxy that adds a delay each way (Redis "1 ms away"), against the memory store; what a `put` costs (it only queues); and what a call costs while
//! Redis is hung (SIGSTOP): microseconds, with every lookup completed within its deadline.
//!
//! Starts its own `redis-server`s (plain and TLS-only) on free loopback ports and its own delay
//! proxy (all stopped on exit):
//!
//! ```text
//! cargo run --release --features redis --example redis_store_latency -- [--iterations N]
//! ```

#[cfg(not(feature = "redis"))]
fn main() {
    eprintln!("this example needs the `redis` feature: cargo run --features redis --example redis_store_latency");
}

#[cfg(feature = "redis")]
#[path = "../tests/support/delay_proxy.rs"]
mod delay_proxy;
#[cfg(feature = "redis")]
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

#[cfg(feature = "redis")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use clap::Parser;
    bench::run(&bench::Args::parse())
}

#[cfg(feature = "redis")]
mod bench {
    use std::sync::mpsc;
    use std::time::{Duration, Instant, SystemTime};

    use clap::Parser;
    use openssl_session_cache::{
        KeyRing, LookupDone, LookupMode, MemoryStore, RedisStore, SessionId, SessionStore,
        StoreError, StoredSession,
    };

    use crate::delay_proxy::DelayProxy;
    use crate::redis_server::{RedisServer, TestPki};

    /// Latency of the Redis session store.
    #[derive(Parser, Debug)]
    pub(crate) struct Args {
        /// Operations per measurement.
        #[arg(long, default_value_t = 5_000)]
        iterations: usize,
        /// Delay the proxy adds in each direction, in microseconds.
        #[arg(long, default_value_t = 500)]
        delay_us: u64,
        /// Lookups kept in flight for the throughput runs.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Session bytes (the compact stored form of a TLS 1.2 session is about 200).
        #[arg(long, default_value_t = 200)]
        session_bytes: usize,
    }

    type Done = mpsc::Sender<Result<Option<StoredSession>, StoreError>>;

    fn id(i: usize) -> SessionId {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&(i as u64).to_be_bytes());
        SessionId::new(&b).expect("32 bytes")
    }

    fn done(tx: &Done) -> LookupDone {
        let tx = tx.clone();
        LookupDone::new(move |r| {
            let _ = tx.send(r);
        })
    }

    fn report(name: &str, mut samples: Vec<Duration>) {
        let n = samples.len();
        samples.sort_unstable();
        let mean = samples.iter().sum::<Duration>() / n as u32;
        let p = |q: f64| samples[((n as f64 * q) as usize).min(n - 1)];
        println!(
            "{name:<50} n={n:<6} mean {mean:>9.1?}  p50 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}",
            p(0.50),
            p(0.99),
            samples[n - 1]
        );
    }

    /// Each lookup waited for before the next: (call time, completion time).
    fn sequential(
        store: &dyn SessionStore,
        n: usize,
        expect_hit: bool,
    ) -> (Vec<Duration>, Vec<Duration>) {
        let (tx, rx) = mpsc::channel();
        let mut calls = Vec::with_capacity(n);
        let mut completions = Vec::with_capacity(n);
        let mut errors = 0;
        let mut last_error = None;
        for i in 0..n {
            let t = Instant::now();
            store.lookup(id(i), LookupMode::Get, done(&tx));
            calls.push(t.elapsed());
            let r = rx.recv().expect("completed");
            completions.push(t.elapsed());
            match r {
                Ok(found) => assert_eq!(found.is_some(), expect_hit, "lookup {i}"),
                // Past the deadline on a loaded machine: counted, shown after the figures.
                Err(e) => {
                    errors += 1;
                    last_error = Some(e);
                }
            }
        }
        if errors > 0 {
            println!("  ({errors} of {n} lookups failed, the last with: {last_error:?})");
        }
        (calls, completions)
    }

    /// Blocking `get`s, each a hit.
    fn blocking_gets(store: &dyn SessionStore, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|i| {
                let t = Instant::now();
                assert!(store.get(&id(i)).expect("get ok").is_some(), "get {i}");
                t.elapsed()
            })
            .collect()
    }

    /// Lookups/s with `window` in flight at once.
    fn throughput(store: &dyn SessionStore, n: usize, window: usize) -> f64 {
        let (tx, rx) = mpsc::channel();
        let t = Instant::now();
        let mut started = 0;
        while started < window.min(n) {
            store.lookup(id(started), LookupMode::Get, done(&tx));
            started += 1;
        }
        for _ in 0..n {
            let r = rx.recv().expect("completed");
            assert!(matches!(r, Ok(Some(_))), "{r:?}");
            if started < n {
                store.lookup(id(started), LookupMode::Get, done(&tx));
                started += 1;
            }
        }
        n as f64 / t.elapsed().as_secs_f64()
    }

    pub(crate) fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
        let n = args.iterations;
        let mut server = RedisServer::start();
        let proxy = DelayProxy::start(([127, 0, 0, 1], server.port()).into());
        proxy.set_delay(Duration::from_micros(args.delay_us));
        let ring = KeyRing::generate()?;
        let op_timeout = Duration::from_millis(50);
        let build = |url: String, tier: usize| {
            RedisStore::builder(url)
                .key_ring(ring.clone())
                .tier_entries(tier)
                .op_timeout(op_timeout)
                .write_queue(n.max(4096))
                .breaker(3, Duration::from_secs(60))
                .build()
        };
        let session = || {
            StoredSession::new(
                vec![0x5a; args.session_bytes],
                SystemTime::now() + Duration::from_secs(600),
            )
        };
        println!(
            "{}-byte sessions, redis-server on loopback, proxy adds {} us each way, \
             deadline {op_timeout:?}\n",
            args.session_bytes, args.delay_us
        );

        let pki = TestPki::new();
        let tls_server = RedisServer::start_tls(&pki.write_server("server", [127, 0, 0, 1].into()));
        let memory = MemoryStore::builder().build()?;
        let direct = build(server.url(), 0)?;
        let far = build(proxy.url(), 0)?;
        let tls = RedisStore::builder(tls_server.url())
            .ca_file(&pki.ca)
            .key_ring(ring.clone())
            .tier_entries(0)
            .op_timeout(op_timeout)
            .write_queue(n.max(4096))
            .breaker(3, Duration::from_secs(60))
            .build()?;
        // The first TLS connection of a freshly started server can take longer than the
        // deadline (its TLS context warms up); check until it connects.
        let t = Instant::now();
        let mut tries = 1;
        while let Err(e) = tls.check() {
            if tries == 10 {
                return Err(e.into());
            }
            tries += 1;
        }
        println!(
            "tls store connected after {tries} check(s), {:.1?}",
            t.elapsed()
        );
        // Connect before measuring (a connection set-up is not a lookup).
        direct.check()?;
        far.check()?;
        for (name, store) in [("plain", &direct), ("tls", &tls)] {
            let mut puts = Vec::with_capacity(n);
            for i in 0..n {
                if name == "plain" {
                    memory.put(id(i), session())?;
                }
                let t = Instant::now();
                store.put(id(i), session())?;
                puts.push(t.elapsed());
            }
            let t = Instant::now();
            assert!(store.flush(Duration::from_secs(60)), "writes drained");
            let drained = t.elapsed();
            report(
                &format!("redis {name}: put call (seal later, queue now)"),
                puts,
            );
            println!(
                "{:<50} {n} puts written in {drained:.1?} after the last call ({:.0}/s)",
                format!("redis {name}: background writer"),
                n as f64 / drained.as_secs_f64().max(1e-9)
            );
        }

        let (calls, done_at) = sequential(&memory, n, true);
        report("memory lookup: call (completes inline)", calls);
        report("memory lookup: completion", done_at);
        let (calls, done_at) = sequential(&direct, n, true);
        report("redis direct: lookup call", calls);
        report("redis direct: lookup completion (GET + open)", done_at);
        report("redis direct: blocking get", blocking_gets(&direct, n));
        let (calls, done_at) = sequential(&tls, n, true);
        report("redis tls: lookup call", calls);
        report("redis tls: lookup completion (GET + open)", done_at);
        report("redis tls: blocking get", blocking_gets(&tls, n));
        let (calls, done_at) = sequential(&far, n, true);
        report("redis via proxy: lookup call", calls);
        report("redis via proxy: lookup completion (GET + open)", done_at);

        let w = args.in_flight;
        println!();
        for (name, store) in [
            ("memory", &memory as &dyn SessionStore),
            ("redis direct", &direct),
            ("redis tls", &tls),
            ("redis via proxy", &far),
        ] {
            for window in [16, w] {
                println!(
                    "{:<50} {:>10.0} lookups/s",
                    format!("throughput, {name}, {window} in flight"),
                    throughput(store, n, window)
                );
            }
        }
        println!("\nfar store: {:?}\n", far.stats());

        // Redis hung (SIGSTOP): no call waits for it; lookups complete within the deadline.
        let hung = build(server.url(), 0)?;
        assert!(hung.get(&id(0))?.is_some()); // connected
        server.pause();
        let (tx, rx) = mpsc::channel();
        let mut calls = Vec::with_capacity(n);
        let mut put_calls = Vec::with_capacity(n);
        let mut started = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            let sent = tx.clone();
            hung.lookup(
                id(i),
                LookupMode::Get,
                LookupDone::new(move |r| {
                    let _ = sent.send((i, r, Instant::now()));
                }),
            );
            calls.push(t.elapsed());
            started.push(t);
            let t = Instant::now();
            let _ = hung.put(id(n + i), session());
            put_calls.push(t.elapsed());
        }
        let mut completions = vec![Duration::ZERO; n];
        for _ in 0..n {
            let (i, r, at) = rx.recv_timeout(Duration::from_secs(10))?;
            assert!(r.is_err(), "a lookup succeeded with Redis hung");
            completions[i] = at - started[i];
        }
        server.resume();
        report("redis hung: lookup call", calls);
        report("redis hung: put call", put_calls);
        report("redis hung: lookup completion (all errors)", completions);
        println!("\nhung store: {:?}", hung.stats());
        Ok(())
    }
}
