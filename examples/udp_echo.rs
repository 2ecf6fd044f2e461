//! A plain UDP echo server, no crypto: every datagram goes back to its sender. The floor the
//! DTLS server's CPU per echoed record is measured against (`scripts/record_bench.sh`): what
//! the kernel costs to receive and send a datagram, with the same waiting (`epoll` through mio)
//! and the same non-blocking reads until the socket is empty.
//!
//! ```text
//! cargo run --release --example udp_echo -- --listen 127.0.0.1:4500
//! ```

use std::io;
use std::net::SocketAddr;

use clap::Parser;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

/// A plain UDP echo server.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4500")]
    listen: SocketAddr,
}

fn run() -> io::Result<()> {
    let args = Args::parse();
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
