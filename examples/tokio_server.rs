//! The DTLS echo server on the tokio driver, in a few lines: every record goes back to its
//! sender; Ctrl-C shuts every peer down with close_notify (their sessions stay resumable).
//!
//! ```text
//! cargo run --release --features tokio --example tokio_server
//! echo hello | openssl s_client -dtls1_2 -connect 127.0.0.1:4433 -sess_out /tmp/s.pem
//! echo again | openssl s_client -dtls1_2 -connect 127.0.0.1:4433 -sess_in /tmp/s.pem   # Reused
//! ```
//!
//! `examples/dtls_echo_server.rs` has the flags (certificates, PSK, limits, stores, metrics,
//! `--driver tokio`).

use openssl_session_cache::{
    AppContext, Event, ServerConfig, SessionCache, TokioServer, UdpOptions,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = ServerConfig::builder(SessionCache::builder().build()?).build()?;
    let server = TokioServer::spawn(config, UdpOptions::new("127.0.0.1:4433".parse()?), || {
        |ctx: &mut AppContext<'_>, event: Event| {
            if let Event::Data { peer, data } = event {
                let _ = ctx.send(peer, &data);
            }
        }
    })?;
    println!("listening on {}", server.local_addr());
    tokio::signal::ctrl_c().await?;
    server.shutdown().await?;
    Ok(())
}
