//! DTLS clients for the server's unit tests (the openssl crate's, over in-memory datagrams), and
//! one that asks for a connection ID.
#![cfg(test)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslSession, SslStream,
    SslVerifyMode,
};

use super::endpoint::Endpoint;
use super::pipe::DatagramPipe;

/// A loopback address with `port`.
pub(crate) fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An openssl-crate DTLS client over in-memory datagrams.
pub(crate) struct Client {
    pub(crate) addr: SocketAddr,
    pub(crate) stream: SslStream<DatagramPipe>,
    pub(crate) established: bool,
    pub(crate) received: Vec<Vec<u8>>,
}

impl Client {
    pub(crate) fn new(port: u16, session: Option<&SslSession>) -> Self {
        Self::with(port, session, |_| {})
    }

    /// A client whose context `tweak` changes (cipher list, PSK).
    pub(crate) fn with(
        port: u16,
        session: Option<&SslSession>,
        tweak: impl FnOnce(&mut SslContextBuilder),
    ) -> Self {
        let mut ctx = SslContext::builder(SslMethod::dtls_client()).unwrap();
        ctx.set_verify(SslVerifyMode::NONE);
        ctx.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
        tweak(&mut ctx);
        let ctx = ctx.build();
        let mut ssl = Ssl::new(&ctx).unwrap();
        ssl.set_mtu(1400).unwrap();
        ssl.set_connect_state();
        if let Some(s) = session {
            crate::ffi::set_client_session(&mut ssl, s).unwrap();
        }
        Self {
            addr: addr(port),
            stream: SslStream::new(ssl, DatagramPipe::new()).unwrap(),
            established: false,
            received: Vec::new(),
        }
    }

    /// Runs the client and returns what it wants to send.
    pub(crate) fn drive(&mut self) -> Vec<Vec<u8>> {
        if !self.established {
            match self.stream.do_handshake() {
                Ok(()) => self.established = true,
                Err(e) => assert_eq!(e.code(), ErrorCode::WANT_READ, "{e}"),
            }
        }
        if self.established {
            let mut buf = [0u8; 2048];
            loop {
                match self.stream.ssl_read(&mut buf) {
                    Ok(n) => self.received.push(buf[..n].to_vec()),
                    Err(e) if e.code() == ErrorCode::WANT_READ => break,
                    Err(e) if e.code() == ErrorCode::ZERO_RETURN => break,
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }
        self.stream.get_mut().take_outbound()
    }

    pub(crate) fn send(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.stream.ssl_write(data).unwrap();
        self.stream.get_mut().take_outbound()
    }
}

/// A DTLS client that asks for a connection ID (RFC 9146): an OpenSSL client, which knows
/// nothing of them, with the extension added through its custom-extension callbacks and its
/// epoch-1 records translated between OpenSSL's plain format and `tls12_cid` with the crate's
/// record layer (keys from the client's own `Ssl`). What a CID-capable client looks like on the
/// wire; an independent one (wolfSSL) is in the interop tests.
pub(crate) struct CidClient {
    pub(crate) client: Client,
    /// The connection ID the client asks the server to put in its records (may be empty).
    pub(crate) ours: Vec<u8>,
    /// The one the server gave (the client's records carry it).
    pub(crate) server_cid: Arc<parking_lot::Mutex<Option<Vec<u8>>>>,
    crypto: crate::server::record::protect::Crypto,
    /// What OpenSSL wrote while `inbound` drove it, not sent yet.
    pending: Vec<Vec<u8>>,
}

impl CidClient {
    pub(crate) fn new(port: u16, ours: &[u8], session: Option<&SslSession>) -> Self {
        use openssl::ssl::ExtensionContext;
        let server_cid: Arc<parking_lot::Mutex<Option<Vec<u8>>>> = Arc::default();
        let seen = Arc::clone(&server_cid);
        let offer = ours.to_vec();
        let client = Client::with(port, session, move |b| {
            b.add_custom_ext(
                54,
                ExtensionContext::DTLS_ONLY
                    | ExtensionContext::CLIENT_HELLO
                    | ExtensionContext::TLS1_2_SERVER_HELLO,
                move |_ssl, _ctx, _cert| {
                    let mut body = vec![offer.len() as u8];
                    body.extend_from_slice(&offer);
                    Ok(Some(body))
                },
                move |_ssl, _ctx, body, _cert| {
                    *seen.lock() = Some(body[1..].to_vec());
                    Ok(())
                },
            )
            .unwrap();
        });
        Self {
            client,
            ours: ours.to_vec(),
            server_cid,
            crypto: Default::default(),
            pending: Vec::new(),
        }
    }

    pub(crate) fn keys(&self) -> Option<crate::server::record::keys::RecordKeys> {
        crate::server::record::keys::RecordKeys::derive(self.client.stream.ssl()).ok()
    }

    /// What OpenSSL wrote, its epoch-1 records as `tls12_cid` records with the server's ID.
    pub(crate) fn outbound(&mut self, datagrams: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        use crate::server::record::protect::Framing;
        use crate::server::record::{records, u16_at, u48_at, RECORD_HEADER};
        let Some(server_cid) = self.server_cid.lock().clone() else {
            return datagrams;
        };
        datagrams
            .into_iter()
            .map(|d| {
                let mut out = Vec::new();
                for r in records(&d, 0) {
                    if u16_at(r, 3) != 1 {
                        out.extend_from_slice(r);
                        continue;
                    }
                    let keys = self.keys().expect("keys once epoch 1 is written");
                    let mut plain = Vec::new();
                    let seq = u48_at(r, 5);
                    let t = self
                        .crypto
                        .open(
                            keys.aead,
                            &keys.client,
                            Framing::Plain,
                            r[0],
                            1,
                            seq,
                            &r[RECORD_HEADER..],
                            &mut plain,
                        )
                        .unwrap();
                    self.crypto
                        .seal(
                            keys.aead,
                            &keys.client,
                            Framing::Cid(&server_cid),
                            t,
                            1,
                            seq,
                            None,
                            &plain,
                            &mut out,
                        )
                        .unwrap();
                }
                out
            })
            .collect()
    }

    /// A datagram from the server, its `tls12_cid` records (with our ID) as plain ones, each
    /// after what came before it was read (a resumption's ServerHello gives the keys).
    pub(crate) fn inbound(&mut self, datagram: Vec<u8>) {
        use crate::server::record::protect::{Framing, CONTENT_TLS12_CID};
        use crate::server::record::{records, u16_at, u48_at};
        let cid_len = self.ours.len();
        let mut out = Vec::new();
        for r in records(&datagram, cid_len) {
            if r[0] != CONTENT_TLS12_CID {
                out.extend_from_slice(r);
                continue;
            }
            if !out.is_empty() {
                self.client.stream.get_mut().push(std::mem::take(&mut out));
                let written = self.client.drive();
                self.pending.extend(written);
            }
            assert_eq!(&r[11..11 + cid_len], &self.ours[..], "our connection id");
            let keys = self.keys().unwrap();
            let mut plain = Vec::new();
            let seq = u48_at(r, 5);
            let t = self
                .crypto
                .open(
                    keys.aead,
                    &keys.server,
                    Framing::Cid(&self.ours),
                    r[0],
                    u16_at(r, 3) as u16,
                    seq,
                    &r[13 + cid_len..],
                    &mut plain,
                )
                .expect("the server's record opens");
            self.crypto
                .seal(
                    keys.aead,
                    &keys.server,
                    Framing::Plain,
                    t,
                    1,
                    seq,
                    Some(r[13 + cid_len..21 + cid_len].try_into().unwrap()),
                    &plain,
                    &mut out,
                )
                .unwrap();
        }
        self.client.stream.get_mut().push(out);
    }

    pub(crate) fn drive(&mut self) -> Vec<Vec<u8>> {
        let mut out = std::mem::take(&mut self.pending);
        out.extend(self.client.drive());
        self.outbound(out)
    }

    pub(crate) fn send(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        let out = self.client.send(data);
        self.outbound(out)
    }

    /// Runs the handshake (and what follows) with `ep`, the client at `from`.
    pub(crate) fn pump(&mut self, ep: &mut Endpoint, from: SocketAddr, now: Instant) {
        let mut out = self.drive();
        for _ in 0..20 {
            for d in out.drain(..) {
                ep.handle(now, from, &d);
            }
            let mut any = false;
            while let Some(t) = ep.poll_transmit() {
                assert_eq!(t.to, from, "answers go to where the client is");
                self.inbound(t.payload);
                any = true;
            }
            out = self.drive();
            if !any && out.is_empty() {
                return;
            }
        }
    }
}
