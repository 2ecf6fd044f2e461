//! A plain UDP echo server, no crypto: every datagram goes back to its sender. The floor the
//! DTLS server's CPU per echoed record is measured against (`scripts/record_bench.sh`): what
//! the kernel costs to receive and send a datagram, with the same waiting (`epoll` through mio)
//! and the same non-blocking reads until the socket is empty.
//!
//! `--aead` adds the least any server protecting records with OpenSSL's EVP does per echo, and
//! nothing else: it seals each datagram's bytes as one AES-256-GCM record (13-byte header,
//! 8-byte explicit nonce, tag) and opens that record again, on two contexts keyed once at start
//! (no key schedule per record, no peer lookup, no replay window, no framing checks), then
//! echoes the datagram as it came. That is the EVP floor: a DTLS server's own work on top of it
//! is what `scripts/record_bench.sh` reports as "lean / EVP floor".
//!
//! ```text
//! cargo run --release --example udp_echo -- --listen 127.0.0.1:4500 [--aead]
//! ```

use std::io;
use std::net::SocketAddr;

use clap::Parser;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use openssl::error::ErrorStack;

/// A plain UDP echo server.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4500")]
    listen: SocketAddr,
    /// Also seal and open each datagram as an AES-256-GCM record through OpenSSL's EVP.
    #[arg(long)]
    aead: bool,
}

/// A sealing and an opening context keyed once, and the record counter the nonces come from.
struct Floor {
    seal: CipherCtx,
    open: CipherCtx,
    salt: [u8; 4],
    seq: u64,
    record: Vec<u8>,
    plain: Vec<u8>,
}

impl Floor {
    fn new() -> Result<Self, ErrorStack> {
        let cipher = Cipher::fetch(None, "AES-256-GCM", None)?;
        let mut key = [0u8; 32];
        openssl::rand::rand_bytes(&mut key)?;
        let mut seal = CipherCtx::new()?;
        seal.encrypt_init(Some(&cipher), Some(&key), None)?;
        let mut open = CipherCtx::new()?;
        open.decrypt_init(Some(&cipher), Some(&key), None)?;
        Ok(Self {
            seal,
            open,
            salt: [7; 4],
            seq: 0,
            record: Vec::with_capacity(2048),
            plain: Vec::with_capacity(2048),
        })
    }

    /// Seals `payload` as one record (as a DTLS 1.2 server frames one) and opens it again;
    /// `false` if it did not open.
    fn seal_and_open(&mut self, payload: &[u8]) -> Result<bool, ErrorStack> {
        self.seq += 1;
        let explicit = self.seq.to_be_bytes();
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&self.salt);
        nonce[4..].copy_from_slice(&explicit);
        let mut aad = [0u8; 13];
        aad[..8].copy_from_slice(&explicit);
        aad[8] = 23;
        aad[9..11].copy_from_slice(&[0xfe, 0xfd]);
        aad[11..].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        let r = &mut self.record;
        r.clear();
        r.push(23);
        r.extend_from_slice(&[0xfe, 0xfd]);
        r.extend_from_slice(&explicit);
        r.extend_from_slice(&((8 + payload.len() + 16) as u16).to_be_bytes());
        r.extend_from_slice(&explicit);
        let body = r.len();
        r.extend_from_slice(payload);
        self.seal.encrypt_init(None, None, Some(&nonce))?;
        self.seal.cipher_update(&aad, None)?;
        self.seal
            .cipher_update_inplace(&mut r[body..], payload.len())?;
        self.seal.cipher_final(&mut [])?;
        let mut tag = [0u8; 16];
        self.seal.tag(&mut tag)?;
        r.extend_from_slice(&tag);

        let (ciphertext, tag) = r[body..].split_at(payload.len());
        self.plain.resize(payload.len(), 0);
        self.open.decrypt_init(None, None, Some(&nonce))?;
        self.open.cipher_update(&aad, None)?;
        self.open
            .cipher_update(ciphertext, Some(&mut self.plain[..]))?;
        self.open.set_tag(tag)?;
        Ok(self.open.cipher_final(&mut []).is_ok() && self.plain == payload)
    }
}

fn run() -> io::Result<()> {
    let args = Args::parse();
    let mut floor = match args.aead {
        true => Some(Floor::new().map_err(io::Error::other)?),
        false => None,
    };
    let mut socket = UdpSocket::bind(args.listen)?;
    println!("listening on {}", socket.local_addr()?);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut socket, Token(0), Interest::READABLE)?;
    let mut events = Events::with_capacity(16);
    let mut buf = vec![0u8; 65536];
    loop {
        poll.poll(&mut events, None)?;
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(f) = floor.as_mut() {
                        if !f.seal_and_open(&buf[..n]).map_err(io::Error::other)? {
                            return Err(io::Error::other("a record sealed here did not open"));
                        }
                    }
                    // A full socket buffer drops the echo, as it would drop a DTLS record.
                    let _ = socket.send_to(&buf[..n], from);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
