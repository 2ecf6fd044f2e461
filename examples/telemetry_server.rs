//! A telemetry server for devices that authenticate with client certificates (mutual DTLS).
//!
//! Each device's state is kept under the common name (CN) of its certificate, as
//! [`ConnectionInfo::peer_certificate`] reports it (on a resumption too). A device sends
//! readings, one per record, and gets an `ack`; a background thread pushes a status line to every
//! connected device every 2 s through the server's handle ([`StopHandle::send`]), which hands
//! each line to the worker that holds the device. A worker that panics stops the server with
//! its message at once; Ctrl-C shuts every device down with close_notify.
//!
//! At start it makes a throwaway CA, a server certificate and one device certificate (CN
//! `device-1`) in `--pki` (default `/tmp/telemetry-pki`). Then:
//!
//! ```text
//! cargo run --example telemetry_server
//! D=/tmp/telemetry-pki
//! openssl s_client -dtls1_2 -connect 127.0.0.1:4433 -CAfile $D/ca.pem -cert $D/device.pem -key $D/device.key
//! ```
//!
//! Type a reading (`21.5`) and press enter; the pushed lines arrive every 2 s. Without `-cert`
//! the handshake is refused.

use std::collections::HashMap;
use std::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use openssl_session_cache::openssl::{
    asn1::Asn1Time, bn::BigNum, ec::EcGroup, ec::EcKey, error::ErrorStack, hash::MessageDigest,
    nid::Nid, pkey::PKey, pkey::Private, x509::extension::BasicConstraints, x509::X509Name,
    x509::X509,
};
use openssl_session_cache::{
    AppContext, Application, Event, SendError, ServerConfig, SessionCache, StopHandle, UdpOptions,
    UdpServer,
};
use signal_hook::consts::{SIGINT, SIGTERM};

/// Mutual-DTLS telemetry server with server push.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:4433")]
    listen: SocketAddr,
    /// Directory for the generated CA, server and device certificates.
    #[arg(long, default_value = "/tmp/telemetry-pki")]
    pki: PathBuf,
    /// Seconds between pushes to every device.
    #[arg(long, default_value_t = 2.0)]
    push_every: f64,
}

/// What the server knows of a device, by its certificate's CN; kept across its connections.
#[derive(Debug, Clone, Default)]
struct Device {
    /// Where it is connected now.
    online: Option<SocketAddr>,
    readings: u64,
    last: String,
}

type Devices = Arc<Mutex<HashMap<String, Device>>>;

/// One worker's application (one per worker thread): updates the devices it holds.
struct Telemetry {
    devices: Devices,
    names: HashMap<SocketAddr, String>,
}

impl Application for Telemetry {
    fn on_event(&mut self, ctx: &mut AppContext<'_>, event: Event) {
        let mut devices = self.devices.lock().unwrap();
        match event {
            Event::Connected { peer, info } => {
                // require_client_certificate: every peer has one from our CA (kept on resumption).
                let Some(cn) = info.peer_certificate.as_ref().and_then(common_name) else {
                    ctx.close(peer);
                    return;
                };
                let (worker, resumed) = (ctx.worker(), info.resumed);
                println!("{cn} connected from {peer} on worker {worker} (resumed: {resumed})");
                devices.entry(cn.clone()).or_default().online = Some(peer);
                self.names.insert(peer, cn);
            }
            Event::Data { peer, data } => {
                let Some(device) = self.names.get(&peer).and_then(|cn| devices.get_mut(cn)) else {
                    return;
                };
                device.readings += 1;
                device.last = String::from_utf8_lossy(&data).trim().to_owned();
                let _ = ctx.send(peer, format!("ack {}\n", device.readings).as_bytes());
            }
            // With a connection ID, a device keeps its association when its address changes.
            Event::Migrated { peer, previous } => {
                if let Some(cn) = self.names.remove(&previous) {
                    devices.entry(cn.clone()).or_default().online = Some(peer);
                    self.names.insert(peer, cn);
                }
            }
            Event::Closed { peer, reason } => {
                let Some(cn) = self.names.remove(&peer) else {
                    return;
                };
                println!("{cn} at {peer} closed: {reason:?}");
                // The device may have connected again (from another port) before this one ended.
                let device = devices.entry(cn).or_default();
                if device.online == Some(peer) {
                    device.online = None;
                }
            }
            _ => {}
        }
    }
}

fn common_name(cert: &X509) -> Option<String> {
    let entry = cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
    entry.data().to_string().ok()
}

/// Every `every`, a line to every connected device (from this thread, through the handle,
/// which hands it to the device's worker), until `stop` is dropped.
fn push_status(handle: StopHandle, devices: Devices, every: Duration, stop: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        let online: Vec<(String, Device)> = devices.lock().unwrap().clone().into_iter().collect();
        for (cn, device) in online {
            let Some(addr) = device.online else { continue };
            let line = format!(
                "{cn}: {} readings, last {:?}\n",
                device.readings, device.last
            );
            match handle.send(addr, line.as_bytes()) {
                Ok(()) | Err(SendError::UnknownPeer) => {} // it closed meanwhile
                Err(SendError::Stopped) => return,
                Err(e) => eprintln!("push to {cn}: {e}"),
            }
        }
    }
}

/// A fresh P-256 key and a certificate for `cn`, signed by `issuer` (none: a self-signed CA).
fn issue(
    cn: &str,
    serial: u32,
    issuer: Option<(&X509, &PKey<Private>)>,
) -> Result<(X509, PKey<Private>), ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut name = X509Name::builder()?;
    name.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    let name = name.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    b.set_serial_number(&*BigNum::from_u32(serial)?.to_asn1_integer()?)?;
    b.set_subject_name(&name)?;
    b.set_pubkey(&key)?;
    b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
    b.set_not_after(&*Asn1Time::days_from_now(30)?)?;
    if issuer.is_none() {
        b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    }
    let (issuer_name, signer) = issuer.map_or((&*name, &key), |(c, k)| (c.subject_name(), k));
    b.set_issuer_name(issuer_name)?;
    b.sign(signer, MessageDigest::sha256())?;
    Ok((b.build(), key))
}

/// Writes a CA, and a device certificate it issued, to `args.pki`; starts the server (with a
/// server certificate from the CA) and the pusher, which stops when the sender is dropped.
fn start(args: &Args) -> Result<(UdpServer, Devices, mpsc::Sender<()>), Box<dyn Error>> {
    let (ca, ca_key) = issue("telemetry test CA", 1, None)?;
    let (server_cert, server_key) = issue("localhost", 2, Some((&ca, &ca_key)))?;
    let (device, device_key) = issue("device-1", 3, Some((&ca, &ca_key)))?;
    std::fs::create_dir_all(&args.pki)?;
    let key = device_key.private_key_to_pem_pkcs8()?;
    for (file, pem) in [
        ("ca.pem", ca.to_pem()?),
        ("device.pem", device.to_pem()?),
        ("device.key", key),
    ] {
        std::fs::write(args.pki.join(file), pem)?;
    }

    let config = ServerConfig::builder(SessionCache::builder().build()?)
        .certificate(server_cert, server_key)
        .trust_client_cas([ca])
        .require_client_certificate()
        .build()?;
    let mut options = UdpOptions::new(args.listen);
    options.workers = 2;
    let devices = Devices::default();
    let new_app = || Telemetry {
        devices: Arc::clone(&devices),
        names: HashMap::new(),
    };
    let server = UdpServer::spawn(config, options, new_app)?;
    let (stop, stopped) = mpsc::channel();
    let (handle, pushed) = (server.handle(), Arc::clone(&devices));
    let every = Duration::from_secs_f64(args.push_every);
    std::thread::spawn(move || push_status(handle, pushed, every, stopped));
    Ok((server, devices, stop))
}

fn run() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let (server, _devices, _stop_pushing) = start(&args)?;
    println!("listening on {}", server.local_addr());
    let handle = server.handle();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || signals.forever().next().map(|_| handle.shutdown()));
    // Returns at Ctrl-C, or as soon as a worker fails (its panic; the others are shut down).
    Ok(server.wait()?)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Read, Write};
    use std::net::UdpSocket;
    use std::time::Instant;

    use openssl_session_cache::openssl::ssl::{
        ErrorCode, Ssl, SslContext, SslFiletype, SslMethod, SslOptions, SslStream, SslVerifyMode,
    };

    use super::*;

    /// One datagram per read and write; a read times out as `WouldBlock`.
    struct Udp(UdpSocket);

    impl Read for Udp {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0
                .recv(buf)
                .map_err(|_| io::ErrorKind::WouldBlock.into())
        }
    }

    impl Write for Udp {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.send(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A device connecting to `server` with the certificate in `pki` (or none): the stream, or
    /// the handshake's error. Bounded: 5 s.
    fn device(
        server: SocketAddr,
        pki: &std::path::Path,
        cert: bool,
    ) -> Result<SslStream<Udp>, String> {
        let mut ctx = SslContext::builder(SslMethod::dtls_client()).unwrap();
        ctx.set_ca_file(pki.join("ca.pem")).unwrap();
        ctx.set_verify(SslVerifyMode::PEER);
        ctx.set_options(SslOptions::NO_QUERY_MTU);
        if cert {
            ctx.set_certificate_file(pki.join("device.pem"), SslFiletype::PEM)
                .unwrap();
            ctx.set_private_key_file(pki.join("device.key"), SslFiletype::PEM)
                .unwrap();
        }
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(server).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut ssl = Ssl::new(&ctx.build()).unwrap();
        ssl.set_mtu(1400).unwrap();
        ssl.set_connect_state();
        let mut stream = SslStream::new(ssl, Udp(socket)).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match stream.do_handshake() {
                Ok(()) => return Ok(stream),
                Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The next record (bounded: 5 s).
    fn read(stream: &mut SslStream<Udp>) -> String {
        let mut buf = [0u8; 2048];
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match stream.ssl_read(&mut buf) {
                Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
                Err(e) => panic!("device read: {e}"),
            }
        }
    }

    #[test]
    fn a_device_is_known_by_its_certificate_acked_and_pushed_to_and_one_without_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let args = Args {
            listen: "127.0.0.1:0".parse().unwrap(),
            pki: dir.path().to_owned(),
            push_every: 0.05,
        };
        let (server, devices, _stop) = start(&args).unwrap();
        let addr = server.local_addr();
        assert!(
            device(addr, dir.path(), false).is_err(),
            "no certificate, no handshake"
        );

        let mut d = device(addr, dir.path(), true).unwrap();
        d.ssl_write(b"21.5").unwrap();
        // Pushes may come before the ack; the ack and a push that saw the reading both come.
        let (mut acked, mut pushed) = (false, false);
        let end = Instant::now() + Duration::from_secs(10);
        while !(acked && pushed) {
            assert!(Instant::now() < end, "acked: {acked}, pushed: {pushed}");
            match read(&mut d).as_str() {
                "ack 1\n" => acked = true,
                "device-1: 1 readings, last \"21.5\"\n" => pushed = true,
                line => assert!(line.starts_with("device-1: 0 readings"), "{line:?}"),
            }
        }
        let known = devices.lock().unwrap()["device-1"].clone();
        assert_eq!(known.online, Some(d.get_ref().0.local_addr().unwrap()));
        server.shutdown().unwrap();
        assert_eq!(devices.lock().unwrap()["device-1"].online, None);
    }
}
