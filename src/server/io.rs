//! UDP I/O for the drivers: batched (`recvmmsg` through `quinn-udp`, the transmits of a batch
//! sent after it, records to one peer coalesced into one datagram) or one datagram per system
//! call, over any socket that can say "would block" (mio's, tokio's).

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};

use super::cid::CidLayout;
use super::event::Transmit;
use crate::Error;

/// How a driver moves datagrams between its socket and its endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoMode {
    /// Up to [`quinn_udp::BATCH_SIZE`] datagrams per receive system call (`recvmmsg` on Linux,
    /// through `quinn-udp`; one per call where the platform has nothing better); every
    /// datagram of a batch is handled before anything is sent, and consecutive datagrams the
    /// batch produced for one peer are joined while they fit the MTU (DTLS allows several
    /// records in one datagram, RFC 6347 §4.1.1; OpenSSL already packs each handshake flight
    /// into one, so this joins what separate calls wrote, such as a reply and a close_notify).
    #[default]
    Batched,
    /// One `recvfrom` per datagram received and one `sendto` per record sent, each record sent
    /// before the next datagram is read: the plain loop, kept for comparison.
    Single,
}

/// A worker's UDP I/O counters, from [`UdpServer::io_stats`](crate::UdpServer::io_stats): how
/// many system calls moved how many datagrams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IoStats {
    /// Receive system calls (`recvmmsg`, `recvfrom`), the ones that found the socket empty
    /// included.
    pub recv_calls: u64,
    /// Datagrams received.
    pub datagrams_received: u64,
    /// Send system calls (`sendto`), refused ones included.
    pub send_calls: u64,
    /// Datagrams sent (in [`IoMode::Batched`] consecutive datagrams to one peer may have been
    /// joined into one).
    pub datagrams_sent: u64,
}

impl IoStats {
    /// Adds `other`'s counters to these (for summing workers).
    pub fn merge(&mut self, other: &Self) {
        self.recv_calls += other.recv_calls;
        self.datagrams_received += other.datagrams_received;
        self.send_calls += other.send_calls;
        self.datagrams_sent += other.datagrams_sent;
    }
}

/// The non-blocking sockets of `workers` workers (at least 1) on `listen`, all on one port (with
/// `SO_REUSEPORT` when there are several: port 0 picks one free port for all), and the address
/// they are bound to.
///
/// With connection IDs (`steering`), the sockets get the steering program that sends each
/// `tls12_cid` datagram to the worker its connection ID names (the worker index is the ID's
/// first byte, so at most 256 workers).
pub(crate) fn bind_workers(
    listen: SocketAddr,
    workers: usize,
    steering: Option<&CidLayout>,
) -> Result<(Vec<UdpSocket>, SocketAddr), Error> {
    if workers == 0 {
        return Err(Error::setting("workers", "workers must be at least 1"));
    }
    if steering.is_some() && workers > 256 {
        return Err(Error::setting(
            "workers",
            format!(
                "{workers} workers with connection ids (a connection id names one of at most 256)"
            ),
        ));
    }
    let reuse = workers > 1;
    let first = bind(listen, reuse)?;
    let local_addr = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(bind(local_addr, reuse)?);
    }
    if let (Some(layout), true) = (steering, reuse) {
        #[cfg(target_os = "linux")]
        crate::ffi::attach_reuseport_cbpf(&sockets[0], &layout.steering_program(workers))?;
        #[cfg(not(target_os = "linux"))]
        let _ = layout;
    }
    Ok((sockets, local_addr))
}

/// A non-blocking UDP socket on `addr` (with `SO_REUSEPORT` for several workers).
fn bind(addr: SocketAddr, reuse_port: bool) -> Result<UdpSocket, Error> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // A bigger receive buffer rides out bursts (floods, many handshakes); best effort.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A non-blocking UDP socket a driver reads and writes (`Err(WouldBlock)` when it cannot).
pub(crate) trait DatagramSocket: AsFd {
    /// One `recvfrom`.
    fn recv_one(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
    /// One `sendto`.
    fn send_one(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize>;
    /// Runs `f`, an operation on the raw socket, as a read (`write` false) or a write; tokio's
    /// socket needs to learn of a `WouldBlock` to clear its readiness.
    fn raw_io<R>(&self, write: bool, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        let _ = write;
        f()
    }
}

impl DatagramSocket for mio::net::UdpSocket {
    fn recv_one(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.recv_from(buf)
    }

    fn send_one(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.send_to(buf, to)
    }
}

#[cfg(feature = "tokio")]
impl DatagramSocket for tokio::net::UdpSocket {
    fn recv_one(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.try_recv_from(buf)
    }

    fn send_one(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.try_send_to(buf, to)
    }

    fn raw_io<R>(&self, write: bool, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        let interest = if write {
            tokio::io::Interest::WRITABLE
        } else {
            tokio::io::Interest::READABLE
        };
        self.try_io(interest, f)
    }
}

/// The control messages `quinn-udp` turns on for every datagram received that the endpoint
/// never reads: the ToS byte (ECN), the destination address (`IP_PKTINFO`; replies go out by
/// `sendto` without a source, so the kernel's route picks it) and a receive timestamp
/// (`SO_TIMESTAMPNS`, which also makes the kernel timestamp every packet it receives). GRO is
/// kept: it joins datagrams the endpoint does read.
#[cfg(target_os = "linux")]
const UNREAD_CONTROL_MESSAGES: [(libc::c_int, libc::c_int); 5] = [
    (libc::IPPROTO_IP, libc::IP_RECVTOS),
    (libc::IPPROTO_IP, libc::IP_PKTINFO),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
];

/// Turns [`UNREAD_CONTROL_MESSAGES`] off on `socket`, so that receiving a datagram costs the
/// kernel no control message to build and copy out. Best effort: an option the socket's
/// family does not have is refused, and changes nothing.
fn quiet_control_messages<S: AsFd>(socket: &S) {
    #[cfg(target_os = "linux")]
    for (level, name) in UNREAD_CONTROL_MESSAGES {
        let _ = crate::ffi::set_int_sockopt(socket, level, name, 0);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// Receive slot size: larger than any UDP datagram (oversized ones are seen whole and dropped
/// by the endpoint), and than what GRO may hand over in one slot.
const SLOT: usize = 65536;

/// One socket's datagram I/O state: receive buffers and the datagrams waiting to be sent.
pub(crate) struct UdpIo {
    mode: IoMode,
    state: UdpSocketState,
    /// `slots` receive buffers of [`SLOT`] bytes (pages are touched only when used).
    buf: Vec<u8>,
    meta: Vec<RecvMeta>,
    /// Datagrams to send, in order; the front one may have been refused with `WouldBlock`.
    out: VecDeque<Transmit>,
    /// The largest datagram records are coalesced into (the endpoint's MTU).
    mtu: usize,
    /// System calls made and datagrams moved.
    stats: IoStats,
}

impl std::fmt::Debug for UdpIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpIo")
            .field("mode", &self.mode)
            .field("queued", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl UdpIo {
    /// I/O state for `socket` (made non-blocking), coalescing up to `mtu` bytes per datagram.
    pub(crate) fn new<S: AsFd>(socket: &S, mode: IoMode, mtu: usize) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(socket))?;
        quiet_control_messages(socket);
        let slots = match mode {
            IoMode::Batched => quinn_udp::BATCH_SIZE,
            IoMode::Single => 1,
        };
        Ok(Self {
            mode,
            state,
            buf: vec![0; slots * SLOT],
            meta: vec![RecvMeta::default(); slots],
            out: VecDeque::new(),
            mtu,
            stats: IoStats::default(),
        })
    }

    pub(crate) fn mode(&self) -> IoMode {
        self.mode
    }

    /// The system calls made and the datagrams they moved, so far.
    pub(crate) fn stats(&self) -> IoStats {
        self.stats
    }

    /// One receive system call: hands each datagram it returned to `f` with its source.
    /// Returns how many, or the error (`WouldBlock` when the socket is empty).
    pub(crate) fn recv<S: DatagramSocket>(
        &mut self,
        socket: &S,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        self.stats.recv_calls += 1;
        if self.mode == IoMode::Single {
            let (n, from) = socket.raw_io(false, || socket.recv_one(&mut self.buf))?;
            f(from, &self.buf[..n]);
            self.stats.datagrams_received += 1;
            return Ok(1);
        }
        let state = &self.state;
        let meta = &mut self.meta;
        // The receive buffers as slices, on the stack (no allocation per system call).
        let mut chunks = self.buf.chunks_mut(SLOT);
        let mut slices: [IoSliceMut<'_>; quinn_udp::BATCH_SIZE] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
        let n = socket.raw_io(false, || {
            state.recv(UdpSockRef::from(socket), &mut slices, meta)
        })?;
        let mut datagrams = 0;
        for (i, m) in self.meta[..n].iter().enumerate() {
            let slot = &self.buf[i * SLOT..i * SLOT + m.len];
            // GRO may have joined several datagrams of one source, `stride` bytes each.
            let stride = if m.stride == 0 {
                m.len.max(1)
            } else {
                m.stride
            };
            for d in slot.chunks(stride) {
                datagrams += 1;
                f(m.addr, d);
            }
        }
        self.stats.datagrams_received += datagrams as u64;
        Ok(datagrams)
    }

    /// Queues a datagram; in batched mode appended to the last queued one when that goes to the
    /// same peer and both fit in the MTU together.
    pub(crate) fn queue(&mut self, t: Transmit) {
        if self.mode == IoMode::Batched {
            if let Some(last) = self.out.back_mut() {
                if last.to == t.to && last.payload.len() + t.payload.len() <= self.mtu {
                    last.payload.extend_from_slice(&t.payload);
                    return;
                }
            }
        }
        self.out.push_back(t);
    }

    /// Sends what is queued; `false` if the socket would block (the rest waits). One `sendto`
    /// per datagram in either mode: each goes to its own peer, and the endpoint sets no ECN,
    /// source address or segment size, so `quinn-udp`'s `sendmsg` would only add the control
    /// message it always builds (an `IP_TOS` of 0) for the kernel to parse.
    pub(crate) fn flush<S: DatagramSocket>(&mut self, socket: &S) -> bool {
        while let Some(t) = self.out.front() {
            self.stats.send_calls += 1;
            let sent = socket
                .raw_io(true, || socket.send_one(&t.payload, t.to))
                .map(drop);
            match sent {
                Ok(()) => self.stats.datagrams_sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => tracing::debug!(to = %t.to, error = %e, "send failed"),
            }
            self.out.pop_front();
        }
        true
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn receiving_asks_the_kernel_for_no_control_message_the_endpoint_does_not_read() {
        let std_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        std_socket.set_nonblocking(true).unwrap();
        let socket = mio::net::UdpSocket::from_std(std_socket);
        let (level, name) = (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS);
        // quinn-udp turns them on ...
        UdpSocketState::new(UdpSockRef::from(&socket)).unwrap();
        assert_eq!(crate::ffi::int_sockopt(&socket, level, name).unwrap(), 1);
        // ... and the endpoint's I/O state turns them off again.
        let mut io = UdpIo::new(&socket, IoMode::Batched, 1400).unwrap();
        for (level, name) in [
            (libc::IPPROTO_IP, libc::IP_RECVTOS),
            (libc::IPPROTO_IP, libc::IP_PKTINFO),
            (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
        ] {
            assert_eq!(
                crate::ffi::int_sockopt(&socket, level, name).unwrap(),
                0,
                "{name}"
            );
        }
        // Datagrams still arrive, whole and from their source, batched.
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = socket.local_addr().unwrap();
        peer.send_to(b"one", to).unwrap();
        peer.send_to(b"two!", to).unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 2 && std::time::Instant::now() < deadline {
            match io.recv(&socket, |from, d| got.push((from, d.to_vec()))) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let from = peer.local_addr().unwrap();
        assert_eq!(got, vec![(from, b"one".to_vec()), (from, b"two!".to_vec())]);
    }
}
