//! A DTLS 1.2 echo server on the crate's session cache and DTLS session manager.
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
//! -cipher PSK-AES128-CCM8`. Ctrl-C shuts every peer down with close_notify and exits.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use openssl::pkey::PKey;
use openssl::x509::X509;
use openssl_session_cache::{
    certificate_fingerprint, DsmConfig, ServerConfig, SessionCache, UdpOptions, UdpServer,
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
    /// Also accept PSK handshakes (PSK-AES128-CCM8 first) for IDENTITY with the hex key.
    #[arg(long, value_name = "IDENTITY:HEXKEY")]
    psk: Option<String>,
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
    /// Where sessions are stored: `memory`.
    #[arg(long, default_value = "memory")]
    store: String,
}

fn parse_psk(spec: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    let (identity, hex) = spec
        .split_once(':')
        .ok_or("--psk must be IDENTITY:HEXKEY")?;
    if hex.is_empty() || hex.len() % 2 != 0 {
        return Err("--psk key must be an even number of hex digits".into());
    }
    let key = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| "--psk key is not hex".to_string())?;
    Ok((identity.as_bytes().to_vec(), key))
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let cache = match args.store.as_str() {
        "memory" => SessionCache::builder()
            .max_entries(args.cache_entries)
            .max_ttl(Duration::from_secs(args.session_ttl))
            .build()?,
        other => {
            return Err(format!(
                "unknown --store {other:?}: only `memory` is available \
                 (redis://... comes with the `redis` feature)"
            )
            .into())
        }
    };

    // A peer silent for two sweeper ticks is shut down: a tick of half the idle timeout frees
    // it after between one half and one whole idle timeout of silence.
    let dsm = DsmConfig::new(args.max_peers)
        .with_max_handshakes(args.max_handshakes)
        .with_max_per_source(args.per_ip)
        .with_handshake_timeout(Duration::from_secs_f64(args.handshake_timeout))
        .with_idle_tick(Duration::from_secs(args.idle_timeout.max(2) / 2));

    let mut builder = ServerConfig::builder(cache).dsm(dsm);
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let cert = X509::from_pem(&fs::read(cert)?)?;
        let key = PKey::private_key_from_pem(&fs::read(key)?)?;
        println!("certificate sha256 {}", certificate_fingerprint(&cert)?);
        builder = builder.certificate(cert, key);
    }
    if let Some(spec) = &args.psk {
        let (identity, key) = parse_psk(spec)?;
        builder = builder.psk(&identity, &key);
    }
    let config = builder.build()?;
    if args.cert.is_none() {
        if let Some(fp) = config.certificate_fingerprint() {
            println!("self-signed certificate sha256 {fp}");
        }
    }

    let mut options = UdpOptions::new(args.listen);
    options.workers = args.workers;
    options.stats_interval =
        (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval));
    let server = UdpServer::spawn(config, options)?;
    println!("listening on {}", server.local_addr());

    let stop = server.stop_handle();
    ctrlc::set_handler(move || stop.stop())?;
    server.wait()?;
    println!("stopped");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
