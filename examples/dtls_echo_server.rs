//! A DTLS 1.2 echo server: the crate's DTLS server library running a three-line application
//! (every record goes back to its sender).
//!
//! It shows the pieces working together on a real socket: stateless HMAC cookies, DSM admission
//! (peer slots, handshake budget, per-address quota, handshake and idle timeouts), session
//! resumption through the external cache, clean shutdown that keeps sessions resumable, and a
//! periodic stats line.
//!
//! Run it with no arguments to listen on 127.0.0.1:4433 with a fresh self-signed ECDSA P-256
//! certificate and an in-memory session cache:
//!
//! ```text
//! cargo run --release --example dtls_echo_server
//! echo hello | openssl s_client -dtls1_2 -connect 127.0.0.1:4433 -sess_out /tmp/s.pem
//! echo again | openssl s_client -dtls1_2 -connect 127.0.0.1:4433 -sess_in /tmp/s.pem   # Reused
//! ```
//!
//! With `--psk client1:000102...` it also accepts `s_client -psk 000102... -psk_identity client1
//! -cipher PSK-AES128-CCM8`. Ctrl-C or SIGTERM shuts every peer down with close_notify and exits.
//!
//! # A server farm: sessions shared through Redis
//!
//! Build with the `redis` feature. Every host points `--store` at the same Redis and reads the
//! same key file (`--store-key`, lines of `ID:HEX64`; the last key seals, older ones still open,
//! so keys rotate by appending a line). Sessions are AES-256-GCM sealed before they leave the
//! process; the CLI never stores them in plaintext. Two hosts on one machine:
//!
//! ```text
//! redis-server --port 6379 --save '' --appendonly no &
//! (umask 077; echo "1:$(openssl rand -hex 32)" > /tmp/farm.key)
//! cargo build --release --features redis --example dtls_echo_server
//! B=target/release/examples/dtls_echo_server
//! $B --listen 127.0.0.1:4433 --store redis://127.0.0.1:6379 --store-key /tmp/farm.key &
//! $B --listen 127.0.0.1:4434 --store redis://127.0.0.1:6379 --store-key /tmp/farm.key &
//! echo hi | openssl s_client -dtls1_2 -connect 127.0.0.1:4433 -sess_out /tmp/s.pem
//! echo hi | openssl s_client -dtls1_2 -connect 127.0.0.1:4434 -sess_in /tmp/s.pem    # Reused
//! ```
//!
//! (Give both hosts the same `--cert`/`--key` in a real farm; resumption itself does not need
//! it.) If Redis is down or slow, handshakes go on as full handshakes after at most the store's
//! millisecond timeouts, and a circuit breaker then skips Redis for a while.
//!
//! # Restarts without a handshake storm
//!
//! With the memory store, `--snapshot FILE --store-key KEYFILE` loads the sessions saved in
//! `FILE` at start (expired ones are dropped) and writes them back, encrypted, at a clean
//! shutdown (Ctrl-C or SIGTERM). A corrupt, truncated or foreign snapshot (another key file) is
//! refused with an error message, moved aside to `FILE.refused`, and the server starts with an
//! empty cache.
//!
//! The established associations go across the restart too (std driver): at SIGTERM the lean
//! peers are taken out without close_notify and saved, sealed, to `FILE.peers`; at start that
//! file is read (and deleted, so that it is used once) and each association is restored when its
//! client's next datagram arrives, so a client that kept it open goes on with no handshake.
//!
//! ```text
//! cargo run --example dtls_echo_server -- --snapshot /tmp/sessions.snap --store-key /tmp/farm.key
//! ```
//!
//! # Crash failover: associations shared through Redis
//!
//! With `--share-peers` every established association's record state goes to the store too
//! (sealed like the sessions), under sequence-number leases. When a host dies (even SIGKILL),
//! the host its client's datagrams reach next (same address through `SO_REUSEPORT` or a load
//! balancer) looks the state up on the first record and goes on with no handshake:
//!
//! ```text
//! F="--store redis://127.0.0.1:6379 --store-key /tmp/farm.key --cert c.pem --key k.pem --share-peers"
//! $B --listen 127.0.0.1:4433 $F &   # serves; kill -9 it, then:
//! $B --listen 127.0.0.1:4433 $F &   # takes the open associations over
//! ```
//!
//! # Metrics, drivers, I/O
//!
//! Built with the `metrics` feature, `--metrics 127.0.0.1:9100` serves the endpoint, DSM, cache
//! and store counters and the handshake duration histograms in the Prometheus text format
//! (`metrics-exporter-prometheus`'s HTTP listener; a loopback address unless
//! `--metrics-any-address`). Built with the `tokio` feature, `--driver tokio` runs the same
//! application on the tokio driver. `--io single` reads and sends one datagram per system call
//! instead of in batches (for comparison).
//!
//! ```text
//! cargo run --release --features metrics,tokio --example dtls_echo_server -- --metrics 127.0.0.1:9100 --driver tokio
//! curl -s 127.0.0.1:9100/metrics | grep handshakes
//! ```

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clap::{Parser, ValueEnum};
use openssl::pkey::PKey;
use openssl::x509::X509;
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::snapshot::{load_snapshot, save_snapshot};
use openssl_session_cache::{
    certificate_fingerprint, save_peers, store_from_url, take_peers, AppContext, Event, IoMode,
    KeyRing, MemoryStore, ServerConfig, SessionCache, SessionStore, SessionStoreAdmin, TicketKeys,
    UdpOptions, UdpServer,
};

/// DTLS 1.2 echo server with an external session cache and a DTLS session manager.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:4433")]
    listen: SocketAddr,
    /// Server certificate (PEM); without it a self-signed ECDSA P-256 certificate is generated.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key for --cert (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Also accept PSK handshakes (PSK-AES128-CCM8 first) for IDENTITY with the hex key; repeat
    /// for more identities. Sessions of an identity no longer given (or given another key) do
    /// not resume, from a snapshot either.
    #[arg(long, value_name = "IDENTITY:HEXKEY")]
    psk: Vec<String>,
    /// Peer slots per worker (handshaking plus established).
    #[arg(long, default_value_t = 1024)]
    max_peers: usize,
    /// Peers that may be in the handshake at once, per worker.
    #[arg(long, default_value_t = 128)]
    max_handshakes: usize,
    /// Peer slots one source IP address may hold, per worker.
    #[arg(long, default_value_t = 64)]
    per_ip: usize,
    /// Sessions the cache keeps.
    #[arg(long, default_value_t = 10_000)]
    cache_entries: usize,
    /// Session lifetime in seconds.
    #[arg(long, default_value_t = 7200)]
    session_ttl: u64,
    /// Seconds of silence after which an established peer is shut down (its session stays).
    #[arg(long, default_value_t = 120)]
    idle_timeout: u64,
    /// Seconds a handshake may take before its slot is freed.
    #[arg(long, default_value_t = 10.0)]
    handshake_timeout: f64,
    /// Worker threads, each with its own SO_REUSEPORT socket, endpoint and DSM.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Seconds between stats lines (0 = never).
    #[arg(long, default_value_t = 10)]
    stats_interval: u64,
    /// Whether established AEAD peers give their OpenSSL `Ssl` up, their records protected by
    /// the endpoint (`--lean-peers false`: every peer keeps its `Ssl`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    lean_peers: bool,
    /// Where sessions are stored: `memory` (this process only) or `redis://IP:PORT[/DB]`
    /// (shared by every server using that Redis; needs --store-key and a build with
    /// `--features redis`).
    #[arg(long, default_value = "memory", value_name = "memory|redis://IP:PORT")]
    store: String,
    /// Key ring file (lines of `ID:HEX64`, e.g. `1:$(openssl rand -hex 32)`; the last key
    /// seals, the others still open). Encrypts sessions stored in Redis and in --snapshot;
    /// required with either.
    #[arg(long, value_name = "FILE")]
    store_key: Option<PathBuf>,
    /// Keep each established association's record state in the session store too, under
    /// sequence-number leases, so that another host sharing the store (a redis store) takes it
    /// over with no handshake when this one dies. Give every host the same --cert/--key.
    #[arg(long)]
    share_peers: bool,
    /// Sessions kept in memory in front of a redis store (0 = none).
    #[arg(long, default_value_t = 1024)]
    tier_entries: usize,
    /// Sessions kept decoded beside the store, so that resuming skips decoding (0 = none).
    #[arg(long, default_value_t = 1024)]
    decoded_entries: usize,
    /// Memory store only: load the sessions in this encrypted snapshot at start (if it exists;
    /// a corrupt or foreign one is refused, moved to FILE.refused, and the cache starts empty)
    /// and write them to it at clean shutdown (Ctrl-C, SIGTERM). Needs --store-key.
    #[arg(long, value_name = "FILE")]
    snapshot: Option<PathBuf>,
    /// Issue session tickets sealed with keys derived from --store-key (the same on every host
    /// reading the same file, rotating every --ticket-period hours; SIGHUP reloads the file).
    #[arg(long, requires = "store_key")]
    tickets: bool,
    /// Hours one ticket key seals new tickets before the next takes over.
    #[arg(long, default_value_t = 12.0)]
    ticket_period: f64,
    /// Serve Prometheus metrics (text format) over HTTP on this address, e.g. 127.0.0.1:9100
    /// (needs a build with `--features metrics`).
    #[arg(long, value_name = "IP:PORT")]
    metrics: Option<SocketAddr>,
    /// Allow --metrics on an address other than loopback.
    #[arg(long, requires = "metrics")]
    metrics_any_address: bool,
    /// Which driver runs the server (`tokio` needs a build with `--features tokio`).
    #[arg(long, value_enum, default_value_t = Driver::Std)]
    driver: Driver,
    /// UDP I/O: batched system calls, or one datagram per system call.
    #[arg(long, value_enum, default_value_t = Io::Batched)]
    io: Io,
}

/// The driver that runs the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Driver {
    /// Worker threads (`UdpServer`).
    Std,
    /// tokio tasks (`TokioServer`).
    Tokio,
}

/// The UDP I/O mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Io {
    /// recvmmsg batches, sends after each batch.
    Batched,
    /// One recvfrom / sendto per datagram.
    Single,
}

/// Parses `IDENTITY:HEXKEY` (the key as an even number of hex digits, at least one byte).
fn parse_psk(spec: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    let (identity, key) = spec
        .split_once(':')
        .ok_or("--psk must be IDENTITY:HEXKEY")?;
    if identity.is_empty() {
        return Err("--psk identity is empty".into());
    }
    let key = hex::decode(key).map_err(|e| format!("--psk key is not hex: {e}"))?;
    if key.is_empty() {
        return Err("--psk key is empty".into());
    }
    Ok((identity.as_bytes().to_vec(), key))
}

/// The application: every record goes back to its sender. A full send queue drops the echo,
/// as a full socket buffer would.
fn echo(ctx: &mut AppContext<'_>, event: Event) {
    if let Event::Data { peer, data } = event {
        let _ = ctx.send(peer, &data);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let (store, snapshot) = open_store(&args)?;
    let mut cache = SessionCache::builder()
        .store(Arc::clone(&store))
        .decoded_entries(args.decoded_entries)
        .max_ttl(Duration::from_secs(args.session_ttl));
    let tickets = match (&args.store_key, args.tickets) {
        (Some(file), true) => {
            let lifetime = Duration::from_secs(args.session_ttl);
            let period = Duration::from_secs_f64(args.ticket_period * 3600.0);
            let keys = TicketKeys::builder(KeyRing::from_file(file)?)
                .period(period)
                .accept_for(lifetime.max(period) + period)
                .session_lifetime(lifetime)
                .build()?;
            cache = cache.ticket_keys(keys.clone());
            println!("session tickets on, keys derived from {}", file.display());
            Some(keys)
        }
        _ => None,
    };
    let cache = cache.build()?;
    let snapshot = snapshot.map(|(path, ring)| (path, Arc::new(Mutex::new(ring))));
    let reload = Reload {
        file: args.store_key.clone(),
        tickets,
        snapshot_ring: snapshot.as_ref().map(|(_, r)| Arc::clone(r)),
        store: Arc::clone(&store),
    };

    // A peer silent for two sweeper ticks is shut down: a tick of half the idle timeout frees
    // it after between one half and one whole idle timeout of silence.
    let dsm = DsmConfig::new(args.max_peers)
        .with_max_handshakes(args.max_handshakes)
        .with_max_per_source(args.per_ip)
        .with_handshake_timeout(Duration::from_secs_f64(args.handshake_timeout))
        .with_idle_tick(Duration::from_secs(args.idle_timeout.max(2) / 2));

    let mut builder = ServerConfig::builder(cache)
        .dsm(dsm)
        .lean_peers(args.lean_peers)
        .shared_peers(args.share_peers);
    if args.share_peers {
        println!(
            "established associations shared in the session store ({})",
            args.store
        );
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let cert = X509::from_pem(&fs::read(cert)?)?;
        let key = PKey::private_key_from_pem(&fs::read(key)?)?;
        println!("certificate sha256 {}", certificate_fingerprint(&cert)?);
        builder = builder.certificate(cert, key);
    }
    for spec in &args.psk {
        let (identity, key) = parse_psk(spec)?;
        builder = builder.psk(&identity, &key);
    }
    let config = builder.build()?;
    if args.cert.is_none() {
        if let Some(fp) = config.certificate_fingerprint() {
            println!("self-signed certificate sha256 {fp}");
        }
    }

    if let Some(addr) = args.metrics {
        serve_metrics(addr, args.metrics_any_address)?;
        println!("metrics on http://{addr}/metrics");
    }

    let mut options = UdpOptions::new(args.listen);
    options.workers = args.workers;
    options.stats_interval =
        (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval));
    options.io = match args.io {
        Io::Batched => IoMode::Batched,
        Io::Single => IoMode::Single,
    };
    let cache = config.session_cache().clone();
    match args.driver {
        Driver::Std => {
            // With a snapshot, established associations are carried across the restart too.
            let carry = snapshot
                .as_ref()
                .map(|(path, ring)| (peers_path(path), ring));
            let mut peers = Vec::new();
            if let Some((path, ring)) = &carry {
                let ring = ring.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match take_peers(path, &ring, SystemTime::now()) {
                    Ok(saved) => peers = saved,
                    Err(e) => {
                        eprintln!("error: saved peers at {} not restored: {e}", path.display())
                    }
                }
            }
            let restoring = peers.len();
            let server = UdpServer::spawn_restoring(config, options, peers, || echo)?;
            println!("listening on {}", server.local_addr());
            if let Some((path, _)) = &carry {
                println!("restoring {restoring} peers from {}", path.display());
            }
            let stop = server.handle();
            let counters = server.handle();
            let suspend = carry.is_some();
            handle_signals(
                move || {
                    if suspend {
                        stop.suspend();
                    } else {
                        stop.shutdown();
                    }
                },
                reload,
            )?;
            let peers = server.wait_peers()?;
            let s = counters.stats();
            println!(
                "endpoint: handshakes {} resumed {} restored {} restores refused {} suspended {}",
                s.handshakes, s.resumed, s.restored, s.restores_refused, s.suspended
            );
            println!(
                "endpoint: migrations {} refused (not newest) {} unknown connection id {} \
                 unopened {}",
                s.migrations, s.migrations_refused_old, s.dropped_unknown_cid, s.records_unopened
            );
            if args.share_peers {
                println!(
                    "endpoint: takeovers {} refused {} lookups {} lease writes {} failed {} \
                     records waiting for a lease {} (records in {} out {}, datagrams in {})",
                    s.takeovers,
                    s.takeovers_refused,
                    s.takeover_lookups,
                    s.lease_writes,
                    s.lease_writes_failed,
                    s.lease_waits,
                    s.records_received,
                    s.records_sent,
                    s.datagrams_in
                );
            }
            if let Some((path, ring)) = carry {
                let ring = ring.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let n = save_peers(&path, &peers, &ring)
                    .map_err(|e| format!("cannot write the saved peers {}: {e}", path.display()))?;
                println!("saved {n} peers to {}", path.display());
            }
        }
        Driver::Tokio => run_tokio(config, options, reload)?,
    }
    println!("stopped");
    let c = cache.stats();
    println!(
        "session cache: hits {} misses {} stale {} expired {} vetoed {}",
        c.hits, c.misses, c.stale, c.expired, c.vetoed
    );
    if let Some((path, ring)) = snapshot {
        let admin = store.admin().ok_or("the memory store has an admin side")?;
        let ring = ring.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let n = save_snapshot(admin, &path, &ring, SystemTime::now())
            .map_err(|e| format!("cannot write the snapshot {}: {e}", path.display()))?;
        println!("saved {n} sessions to snapshot {}", path.display());
    }
    Ok(())
}

/// Runs the server on the tokio driver until Ctrl-C or SIGTERM.
#[cfg(feature = "tokio")]
fn run_tokio(
    config: Arc<ServerConfig>,
    options: UdpOptions,
    reload: Reload,
) -> Result<(), Box<dyn std::error::Error>> {
    use openssl_session_cache::TokioServer;
    let rt = if options.workers > 1 {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.workers)
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        let server = TokioServer::spawn(config, options, || echo)?;
        println!("listening on {} (tokio)", server.local_addr());
        let stop = server.handle();
        handle_signals(move || stop.shutdown(), reload)?;
        server.wait().await?;
        Ok(())
    })
}

#[cfg(not(feature = "tokio"))]
fn run_tokio(
    _: Arc<ServerConfig>,
    _: UdpOptions,
    _: Reload,
) -> Result<(), Box<dyn std::error::Error>> {
    Err("--driver tokio needs a build with `--features tokio`".into())
}

/// Installs the Prometheus exporter with its HTTP listener on `addr` (loopback unless
/// `any_address`); the handshake duration histograms get the library's buckets
/// (`HANDSHAKE_DURATION_BUCKETS`, 0.5 ms to 5 s).
#[cfg(feature = "metrics")]
fn serve_metrics(addr: SocketAddr, any_address: bool) -> Result<(), Box<dyn std::error::Error>> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use openssl_session_cache::{HANDSHAKE_DURATION_BUCKETS, HANDSHAKE_DURATION_METRIC};
    if !addr.ip().is_loopback() && !any_address {
        return Err(format!(
            "--metrics {addr} is not a loopback address; add --metrics-any-address to serve it there"
        )
        .into());
    }
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(HANDSHAKE_DURATION_METRIC.into()),
            HANDSHAKE_DURATION_BUCKETS,
        )?
        .install()?;
    Ok(())
}

#[cfg(not(feature = "metrics"))]
fn serve_metrics(_: SocketAddr, _: bool) -> Result<(), Box<dyn std::error::Error>> {
    Err("--metrics needs a build with `--features metrics`".into())
}

/// What SIGHUP reloads.
struct Reload {
    file: Option<PathBuf>,
    tickets: Option<TicketKeys>,
    snapshot_ring: Option<Arc<Mutex<KeyRing>>>,
    /// The session store, whose envelope keys come from the same file (Redis).
    store: Arc<dyn SessionStore>,
}

impl Reload {
    /// Reads the key file again: the ticket keys and the snapshot's ring take the new keys
    /// (tickets and sessions sealed under keys still in the file keep opening); a file that does
    /// not parse changes nothing and says why.
    fn run(&self) {
        let Some(file) = &self.file else {
            println!("SIGHUP: no key file to reload");
            return;
        };
        match KeyRing::from_file(file) {
            Ok(ring) => {
                if let Some(t) = &self.tickets {
                    t.replace_ring(ring.clone());
                }
                if let Some(r) = &self.snapshot_ring {
                    *r.lock().unwrap_or_else(|e| e.into_inner()) = ring.clone();
                }
                if let Some(admin) = self.store.admin() {
                    if let Err(e) = admin.replace_key_ring(ring.clone()) {
                        eprintln!("error: the session store refused the new keys: {e}");
                    }
                }
                println!(
                    "reloaded key file {}: {} keys, active key {}",
                    file.display(),
                    ring.key_ids().len(),
                    ring.active_key_id()
                );
            }
            Err(e) => eprintln!(
                "error: key file {} refused on reload: {e}; keeping the old keys",
                file.display()
            ),
        }
    }
}

/// SIGINT and SIGTERM stop the server (peers get close_notify); SIGHUP reloads the key file.
fn handle_signals(
    stop: impl Fn() + Send + 'static,
    reload: Reload,
) -> Result<(), Box<dyn std::error::Error>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    reload.run();
                } else {
                    stop();
                }
            }
        })?;
    Ok(())
}

/// Where the established associations are saved beside a snapshot.
fn peers_path(snapshot: &std::path::Path) -> PathBuf {
    let mut name = snapshot.as_os_str().to_owned();
    name.push(".peers");
    PathBuf::from(name)
}

/// Where to save a snapshot at shutdown, and the key ring that seals it.
type SnapshotTarget = Option<(PathBuf, KeyRing)>;

/// The session store the flags ask for, and the snapshot to save at shutdown.
fn open_store(
    args: &Args,
) -> Result<(Arc<dyn SessionStore>, SnapshotTarget), Box<dyn std::error::Error>> {
    if args.store != "memory" {
        if args.snapshot.is_some() {
            return Err("--snapshot works with the memory store only \
                        (a redis store is shared and outlives the server already)"
                .into());
        }
        // store_from_url refuses unknown schemes, a build without the `redis` feature (saying
        // to rebuild with it) and a missing key file.
        let store = store_from_url(&args.store, args.store_key.as_deref(), args.tier_entries)
            .map_err(|e| format!("--store {}: {e}", args.store))?;
        println!("session store {}", args.store);
        return Ok((store, None));
    }

    let memory = Arc::new(
        MemoryStore::builder()
            .max_entries(args.cache_entries)
            .build()?,
    );
    let Some(path) = &args.snapshot else {
        return Ok((memory, None));
    };
    let key_file = args.store_key.as_deref().ok_or(
        "--snapshot needs --store-key FILE: the snapshot is encrypted \
         (create one with: echo \"1:$(openssl rand -hex 32)\" > FILE)",
    )?;
    let ring = KeyRing::from_file(key_file)?;
    load_at_start(&*memory, path, &ring);
    Ok((memory, Some((path.clone(), ring))))
}

/// Loads the snapshot at `path` if there is one; a refused snapshot leaves the store empty and
/// the server starts anyway.
fn load_at_start(store: &dyn SessionStoreAdmin, path: &Path, ring: &KeyRing) {
    if !path.exists() {
        println!(
            "no snapshot at {} yet: starting with an empty session cache",
            path.display()
        );
        return;
    }
    match load_snapshot(store, path, ring, SystemTime::now()) {
        Ok(n) => println!("loaded {n} sessions from snapshot {}", path.display()),
        Err(e) => {
            // Keep the refused file for inspection (it may only need the right key file)
            // instead of overwriting it at shutdown.
            let mut aside = path.as_os_str().to_owned();
            aside.push(".refused");
            let kept = match fs::rename(path, &aside) {
                Ok(()) => format!("moved to {}", Path::new(&aside).display()),
                Err(err) => format!("could not be moved aside: {err}"),
            };
            eprintln!("error: {e}; the file was {kept}; starting with an empty session cache");
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_spec_is_identity_and_hex_key() {
        assert_eq!(
            parse_psk("client1:00ff10").unwrap(),
            (b"client1".to_vec(), vec![0x00, 0xff, 0x10])
        );
        assert_eq!(parse_psk("id:ABcd").unwrap().1, vec![0xab, 0xcd]);
    }

    #[test]
    fn psk_spec_refuses_what_is_not_hex() {
        // `u8::from_str_radix` took "+f" as a digit pair, and slicing at byte offsets panicked
        // on multi-byte characters.
        for bad in [
            "id:+f+f",
            "id:-f",
            "id:0x12",
            "id:abc",
            "id:",
            "id:é1",
            "id:ééé",
            "id:12 34",
            "noseparator",
            ":00ff",
        ] {
            assert!(parse_psk(bad).is_err(), "{bad:?} accepted");
        }
    }
}
