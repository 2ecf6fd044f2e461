//! DTLS 1.2 Connection IDs (RFC 9146) on stock OpenSSL: the `connection_id` extension, the
//! server's own connection IDs and their layout, and the steering of datagrams to the worker
//! that owns a connection ID.
//!
//! OpenSSL does not know the extension (type 54); it passes it to the custom-extension callbacks
//! the server registers (`SSL_CTX_add_custom_ext`). When a client offers it, the ServerHello
//! carries the server's connection ID for the client's records; the client's own (possibly
//! empty) connection ID goes in the server's records. The endpoint then frames the association's
//! protected records as `tls12_cid` records itself (the lean-peer record layer), translating the
//! two Finished messages for OpenSSL, which reads and writes them in the plain format.
//!
//! # Layout of the server's connection IDs
//! `[worker: 1 byte][host id: 0..=8 bytes][random: 6 bytes]`, the same length for every ID of a
//! server ([`CidLayout::len`]). The first byte is the index of the worker (the `SO_REUSEPORT`
//! socket) that holds the association: a classic BPF program on the sockets
//! (`SO_ATTACH_REUSEPORT_CBPF`) steers each `tls12_cid` datagram to that worker whatever its
//! source address, and other datagrams by the kernel's hash. The host id, when a farm sets one
//! ([`ServerConfigBuilder::connection_id_host`](crate::ServerConfigBuilder::connection_id_host)),
//! lets a CID-aware load balancer route the same way: in a `tls12_cid` record (content type 25)
//! the connection ID starts at byte 11 of the UDP payload, after type, version, epoch and
//! sequence number.

use std::fmt;

use openssl::ssl::{ExtensionContext, SslAlert, SslContextBuilder};

use super::config::PeerInfo;
use crate::Error;

/// The `connection_id` extension's type (RFC 9146).
pub(crate) const EXTENSION: u16 = 54;
/// The random part of the server's connection IDs.
const RANDOM_LEN: usize = 6;
/// The longest host id.
pub const MAX_CONNECTION_ID_HOST: usize = 8;
/// Where a `tls12_cid` record's connection ID starts.
pub(crate) const CID_OFFSET: usize = 11;

/// How the server's connection IDs are made: their length and host id.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct CidLayout {
    host: Vec<u8>,
}

impl fmt::Debug for CidLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CidLayout")
            .field("len", &self.len())
            .field("host", &hex::encode(&self.host))
            .finish()
    }
}

impl CidLayout {
    /// A layout with `host` as the host id (at most [`MAX_CONNECTION_ID_HOST`] bytes).
    pub(crate) fn new(host: &[u8]) -> Result<Self, Error> {
        if host.len() > MAX_CONNECTION_ID_HOST {
            return Err(Error::setting(
                "connection_id_host",
                format!(
                    "connection id host of {} bytes (at most {MAX_CONNECTION_ID_HOST})",
                    host.len()
                ),
            ));
        }
        Ok(Self {
            host: host.to_vec(),
        })
    }

    /// The length of every connection ID of the server.
    pub(crate) fn len(&self) -> usize {
        1 + self.host.len() + RANDOM_LEN
    }

    /// A fresh connection ID for an association held by worker `worker`.
    pub(crate) fn generate(&self, worker: u8) -> Result<Vec<u8>, Error> {
        let mut cid = Vec::with_capacity(self.len());
        cid.push(worker);
        cid.extend_from_slice(&self.host);
        let mut random = [0u8; RANDOM_LEN];
        openssl::rand::rand_bytes(&mut random)?;
        cid.extend_from_slice(&random);
        Ok(cid)
    }

    /// The connection ID of a `tls12_cid` datagram (its first record), if it is one of this
    /// layout's length.
    pub(crate) fn cid_of<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        let end = CID_OFFSET + self.len();
        (datagram.first() == Some(&super::record::protect::CONTENT_TLS12_CID)
            && datagram.len() >= end + 2)
            .then(|| &datagram[CID_OFFSET..end])
    }

    /// The classic BPF program for `SO_ATTACH_REUSEPORT_CBPF` on `workers` sockets: a datagram
    /// whose first byte is the tls12_cid type and which is long enough goes to the socket its
    /// connection ID's first byte names (if there is such a socket); any other gets a socket
    /// index past the group, so the kernel picks one by its hash.
    pub(crate) fn steering_program(&self, workers: usize) -> Vec<libc::sock_filter> {
        // BPF_LD|BPF_B|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_JMP|BPF_JGE|BPF_K, BPF_RET|BPF_A,
        // BPF_RET|BPF_K.
        const LD_B_ABS: u16 = 0x30;
        const LD_W_LEN: u16 = 0x80;
        const JEQ_K: u16 = 0x15;
        const JGE_K: u16 = 0x35;
        const RET_A: u16 = 0x16;
        const RET_K: u16 = 0x06;
        let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
        let min_len = (CID_OFFSET + self.len() + 2) as u32;
        let fallback = u32::MAX;
        vec![
            // A = datagram length; too short for a tls12_cid record: fall back.
            ins(LD_W_LEN, 0, 0, 0),
            ins(JGE_K, 0, 5, min_len),
            // A = first byte; not tls12_cid: fall back.
            ins(LD_B_ABS, 0, 0, 0),
            ins(
                JEQ_K,
                0,
                3,
                u32::from(super::record::protect::CONTENT_TLS12_CID),
            ),
            // A = the connection ID's first byte: the worker; none such: fall back.
            ins(LD_B_ABS, 0, 0, CID_OFFSET as u32),
            ins(JGE_K, 1, 0, workers as u32),
            ins(RET_A, 0, 0, 0),
            ins(RET_K, 0, 0, fallback),
        ]
    }
}

/// The body of the extension for `cid`: its length, then its bytes.
fn encode(cid: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(1 + cid.len());
    body.push(cid.len() as u8);
    body.extend_from_slice(cid);
    body
}

/// The connection ID an extension body carries, if it is well formed.
fn decode(body: &[u8]) -> Option<&[u8]> {
    let (&len, cid) = body.split_first()?;
    (cid.len() == usize::from(len)).then_some(cid)
}

/// Registers the `connection_id` extension on `ctx`: the ClientHello's is read into the
/// connection's [`PeerInfo`], and a ServerHello answering one carries a connection ID drawn
/// then from `layout` for the peer's worker (kept in its `PeerInfo`): a client that does not
/// offer the extension costs no random draw. Resumed handshakes negotiate again.
pub(crate) fn install(
    ctx: &mut SslContextBuilder,
    index: openssl::ex_data::Index<openssl::ssl::Ssl, PeerInfo>,
    layout: CidLayout,
) -> Result<(), Error> {
    let context = ExtensionContext::DTLS_ONLY
        | ExtensionContext::CLIENT_HELLO
        | ExtensionContext::TLS1_2_SERVER_HELLO;
    ctx.add_custom_ext(
        EXTENSION,
        context,
        move |ssl, _context, _cert| {
            // Called for the ServerHello only when the client sent the extension.
            let Some(info) = ssl.ex_data_mut(index) else {
                return Ok(None);
            };
            if info.cid.theirs.is_none() {
                return Ok(None);
            }
            if info.cid.ours.is_none() {
                // A failed draw (OpenSSL's DRBG) leaves the extension unanswered: the
                // handshake goes on without connection IDs.
                info.cid.ours = layout.generate(info.cid.worker).ok();
            }
            match &info.cid.ours {
                Some(ours) => {
                    info.cid.negotiated = true;
                    Ok(Some(encode(ours)))
                }
                None => Ok(None),
            }
        },
        move |ssl, _context, body, _cert| {
            let cid = decode(body).ok_or(SslAlert::DECODE_ERROR)?;
            if let Some(info) = ssl.ex_data_mut(index) {
                info.cid.theirs = Some(cid.to_vec());
                info.cid.negotiated = false;
            }
            Ok(())
        },
    )?;
    Ok(())
}

/// What one connection's handshake settled about connection IDs (in its [`PeerInfo`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct CidNegotiation {
    /// The worker holding the association: the first byte of the connection ID drawn for it.
    pub(crate) worker: u8,
    /// The connection ID the endpoint chose for the peer's records, drawn when the ServerHello
    /// answers the client's extension (none before, or with CID off).
    pub(crate) ours: Option<Vec<u8>>,
    /// The connection ID the client asked for in our records (`Some(empty)`: none, but it
    /// sends ours), if it offered the extension.
    pub(crate) theirs: Option<Vec<u8>>,
    /// The ServerHello carried ours: records of epoch 1 and later use the `tls12_cid` format.
    pub(crate) negotiated: bool,
}

impl CidNegotiation {
    /// The negotiated pair (ours, theirs), if the handshake settled on connection IDs.
    pub(crate) fn settled(&self) -> Option<(&[u8], &[u8])> {
        match (self.negotiated, &self.ours, &self.theirs) {
            (true, Some(ours), Some(theirs)) => Some((ours, theirs)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_have_the_documented_layout() {
        let layout = CidLayout::new(&[0xab, 0xcd]).unwrap();
        assert_eq!(layout.len(), 1 + 2 + RANDOM_LEN);
        let a = layout.generate(3).unwrap();
        let b = layout.generate(3).unwrap();
        assert_eq!(a.len(), layout.len());
        assert_eq!(&a[..3], &[3, 0xab, 0xcd]);
        assert_ne!(a, b, "random part");
        assert!(CidLayout::new(&[0; MAX_CONNECTION_ID_HOST + 1]).is_err());
    }

    #[test]
    fn extension_bodies_round_trip_and_malformed_ones_are_refused() {
        assert_eq!(decode(&encode(b"abc")), Some(&b"abc"[..]));
        assert_eq!(decode(&encode(b"")), Some(&b""[..]));
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[3, 1, 2]), None);
        assert_eq!(decode(&[1, 1, 2]), None);
    }

    /// Runs the steering program on `packet` (a tiny classic BPF interpreter for the
    /// instructions the program uses).
    fn run(program: &[libc::sock_filter], packet: &[u8]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = program[pc];
            pc += 1;
            match i.code {
                0x80 => a = packet.len() as u32,
                0x30 => a = u32::from(packet[i.k as usize]),
                0x15 => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                0x35 => pc += usize::from(if a >= i.k { i.jt } else { i.jf }),
                0x16 => return a,
                0x06 => return i.k,
                c => panic!("instruction {c:#x}"),
            }
        }
    }

    #[test]
    fn the_steering_program_sends_cid_records_to_their_worker_and_the_rest_to_the_hash() {
        let layout = CidLayout::new(&[]).unwrap();
        let program = layout.steering_program(4);
        let record = |first: u8, worker: u8, len: usize| {
            let mut d = vec![first, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9];
            d.push(worker);
            d.resize(len, 0x77);
            d
        };
        let long = CID_OFFSET + layout.len() + 2 + 30;
        for w in 0..4 {
            assert_eq!(run(&program, &record(25, w, long)), u32::from(w));
        }
        assert_eq!(
            run(&program, &record(25, 4, long)),
            u32::MAX,
            "no such worker"
        );
        assert_eq!(
            run(&program, &record(23, 1, long)),
            u32::MAX,
            "not tls12_cid"
        );
        assert_eq!(
            run(&program, &record(22, 1, long)),
            u32::MAX,
            "a ClientHello"
        );
        let short = CID_OFFSET + layout.len() + 1;
        assert_eq!(run(&program, &record(25, 1, short)), u32::MAX, "too short");
    }
}
