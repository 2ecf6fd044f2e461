//! One DTLS peer: its `Ssl` over an in-memory [`DatagramPipe`].

use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, Ssl, SslRef, SslStream};

use super::config::MAX_RECORD_PLAINTEXT;
use super::pipe::DatagramPipe;
use crate::{ffi, SessionCache};

/// What driving a peer produced, besides datagrams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The handshake finished.
    Established,
    /// One application record's plaintext.
    Data(Vec<u8>),
    /// The peer sent close_notify; the server answered with its own.
    Closed,
    /// The connection failed (bad record MAC, handshake failure, too many retransmissions).
    Failed,
    /// The handshake waits for a session lookup (`WANT_CLIENT_HELLO_CB`): drive it again once
    /// the lookup completed.
    Suspended,
}

/// A peer's connection.
pub(crate) struct Peer {
    stream: SslStream<DatagramPipe>,
    /// Tells this peer's datagrams from those of an earlier peer at the same address.
    pub(crate) id: u64,
    established: bool,
    /// The DTLS retransmission deadline, if a timer runs.
    pub(crate) deadline: Option<Instant>,
    /// The deadline of this peer's live entry in the endpoint's timer heap, if it has one.
    pub(crate) scheduled: Option<Instant>,
    /// Datagrams of this peer waiting for `poll_transmit`.
    pub(crate) queued: usize,
    /// The connection ended (failed, closed): nothing more is read or written.
    pub(crate) finished: bool,
    /// [`min_protected_body`] of the negotiated cipher, once OpenSSL chose it.
    min_body: Option<usize>,
}

impl Drop for Peer {
    /// Freeing an `Ssl` whose handshake finished without close_notify makes OpenSSL delete its
    /// session (`ssl_clear_bad_session`). A peer's state can go for reasons that say nothing
    /// against the session (an unanswered retransmission, an idle timeout, a local decision), and
    /// OpenSSL already deleted it itself where one did (a fatal alert sent or received), so the
    /// session is always kept here.
    fn drop(&mut self) {
        SessionCache::keep_resumable(&mut self.stream);
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("id", &self.id)
            .field("established", &self.established)
            .field("deadline", &self.deadline)
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

/// The shortest body a protected DTLS 1.2 record of `cipher` can have: the explicit nonce plus
/// the tag for AEAD suites (AES-GCM and AES-CCM 8 + 16, AES-CCM8 8 + 8, ChaCha20-Poly1305
/// 0 + 16). OpenSSL 3.0 fails the connection on a shorter one instead of discarding it. For other
/// suites (CBC, run MAC-then-encrypt, where OpenSSL discards bad records itself) 0: no length
/// test applies.
pub(crate) fn min_protected_body(cipher: &str) -> usize {
    if cipher.contains("CHACHA20") || cipher.contains("CCM8") {
        16
    } else if cipher.contains("GCM") || cipher.contains("CCM") {
        24
    } else {
        0
    }
}

impl Peer {
    /// A server-side peer on `ssl` (already configured: MTU, ex_data), not yet fed.
    pub(crate) fn new(mut ssl: Ssl, id: u64) -> Result<Self, openssl::error::ErrorStack> {
        ssl.set_accept_state();
        Ok(Self {
            stream: SslStream::new(ssl, DatagramPipe::new())?,
            id,
            established: false,
            deadline: None,
            scheduled: None,
            queued: 0,
            finished: false,
            min_body: None,
        })
    }

    /// Whether the handshake has finished.
    pub(crate) fn is_established(&self) -> bool {
        self.established
    }

    /// The peer's `Ssl`.
    pub(crate) fn ssl(&self) -> &SslRef {
        self.stream.ssl()
    }

    /// Datagrams queued and not read by OpenSSL yet.
    pub(crate) fn inbound_len(&self) -> usize {
        self.stream.get_ref().inbound_len()
    }

    /// Queues one inbound datagram.
    pub(crate) fn push(&mut self, datagram: Vec<u8>) {
        self.stream.get_mut().push(datagram);
    }

    /// The shortest protected record body OpenSSL does not fail on, for the cipher negotiated
    /// so far (0 before the cipher is chosen).
    pub(crate) fn min_protected_body(&mut self) -> usize {
        if let Some(n) = self.min_body {
            return n;
        }
        let Some(cipher) = self.stream.ssl().current_cipher() else {
            return 0;
        };
        let n = min_protected_body(cipher.name());
        self.min_body = Some(n);
        n
    }

    /// Takes the datagrams OpenSSL wrote.
    pub(crate) fn take_outbound(&mut self) -> Vec<Vec<u8>> {
        let pipe = self.stream.get_mut();
        let out = pipe.take_outbound();
        pipe.free_empty_queues();
        out
    }

    /// Drops whatever OpenSSL wrote so far (the HelloVerifyRequest answering a reconstructed
    /// first ClientHello).
    pub(crate) fn discard_outbound(&mut self) {
        self.stream.get_mut().clear_outbound();
    }

    /// Runs the connection on everything queued: the handshake, then reading application
    /// records. Pushes what happened onto `progress`.
    pub(crate) fn drive(&mut self, now: Instant, progress: &mut Vec<Progress>) {
        if !self.finished {
            self.drive_inner(progress);
        }
        self.update_deadline(now);
        // An idle peer keeps no queue storage.
        self.stream.get_mut().free_empty_queues();
    }

    fn drive_inner(&mut self, progress: &mut Vec<Progress>) {
        if !self.established {
            match self.stream.do_handshake() {
                Ok(()) => {
                    self.established = true;
                    progress.push(Progress::Established);
                }
                Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                    return;
                }
                Err(e) if e.code() == ErrorCode::WANT_CLIENT_HELLO_CB => {
                    progress.push(Progress::Suspended);
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "dtls handshake failed");
                    self.finished = true;
                    progress.push(Progress::Failed);
                    return;
                }
            }
        }
        let mut buf = [0u8; MAX_RECORD_PLAINTEXT];
        let outcome = loop {
            match self.stream.ssl_read(&mut buf) {
                Ok(0) => continue,
                Ok(n) => progress.push(Progress::Data(buf[..n].to_vec())),
                Err(e) if e.code() == ErrorCode::WANT_READ => break None,
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                    // close_notify: answer with ours, which also keeps the session resumable.
                    let _ = self.stream.shutdown();
                    break Some(Progress::Closed);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "dtls read failed");
                    break Some(Progress::Failed);
                }
            }
        };
        if let Some(p) = outcome {
            self.finished = true;
            progress.push(p);
        }
    }

    /// Writes one application record. `Err` means the connection failed (it is finished then).
    /// The caller checks the length (at most [`MAX_RECORD_PLAINTEXT`]) and that the handshake
    /// finished.
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<(), ()> {
        if self.finished {
            return Err(());
        }
        match self.stream.ssl_write(data) {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "dtls write failed");
                self.finished = true;
                Err(())
            }
        }
    }

    /// Runs the DTLS retransmission timer if it expired; `Failed` after too many retransmissions.
    ///
    /// `SslStream` gives no `&mut SslRef` for `DTLSv1_handle_timeout`, so this re-drives the
    /// connection instead: OpenSSL's DTLS record read (`dtls1_read_bytes`) runs the expired timer
    /// itself, retransmitting the last flight, before it reports that nothing is queued.
    pub(crate) fn handle_timeout(&mut self, now: Instant, progress: &mut Vec<Progress>) {
        self.drive(now, progress);
    }

    fn update_deadline(&mut self, now: Instant) {
        self.deadline = if self.finished {
            None
        } else {
            ffi::dtls_get_timeout(self.stream.ssl()).map(|d| now + d.max(Duration::from_millis(1)))
        };
    }

    /// Sends close_notify (if the handshake finished) so that dropping the peer keeps its session
    /// resumable.
    pub(crate) fn close(&mut self) {
        if self.established && !self.finished {
            let _ = self.stream.shutdown();
        }
        self.finished = true;
        self.deadline = None;
    }
}
