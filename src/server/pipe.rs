//! An in-memory datagram stream, the transport of every `Ssl` the endpoint drives.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

/// An in-memory datagram stream for an [`SslStream`](openssl::ssl::SslStream): one
/// [`read`](Read::read) hands out one whole queued datagram, one [`write`](Write::write) is one
/// outgoing datagram, and nothing ever blocks.
///
/// The endpoint runs each peer's `Ssl` over one: datagrams from the socket are
/// [`push`](Self::push)ed, the datagrams OpenSSL wrote are [`take_outbound`](Self::take_outbound)n and sent. Tests
/// and benches drive DTLS clients the same way, moving datagrams between two streams by hand, so
/// a handshake runs in lockstep with no socket and no thread:
///
/// ```
/// use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod};
/// use openssl_session_cache::DatagramPipe;
///
/// let ctx = SslContext::builder(SslMethod::dtls_client())?.build();
/// let mut ssl = Ssl::new(&ctx)?;
/// ssl.set_connect_state();
/// let mut client = openssl::ssl::SslStream::new(ssl, DatagramPipe::new())?;
/// // Nothing to read yet: the client wrote its ClientHello and wants an answer.
/// assert_eq!(client.do_handshake().unwrap_err().code(), ErrorCode::WANT_READ);
/// let hello = client.get_mut().take_outbound();
/// assert_eq!(hello.len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// `read` truncates a datagram larger than the buffer (OpenSSL's DTLS read buffer holds any
/// datagram up to its maximum record size) and reports [`WouldBlock`](io::ErrorKind::WouldBlock)
/// when nothing is queued. An empty pushed datagram reads as an I/O error
/// ([`UnexpectedEof`](io::ErrorKind::UnexpectedEof)), which fails the connection without an
/// alert on every OpenSSL release. (Reading it as 0 bytes would be an end of stream: OpenSSL 3.x
/// failed the connection on it without an alert too, but OpenSSL 4.0 marks a BIO whose read
/// returned 0 as at its end, `BIO_FLAGS_AUTO_EOF` in `bread_conv`, `crypto/bio/bio_meth.c`, and
/// answers with a fatal `decode_error` alert, `SSL_R_UNEXPECTED_EOF_WHILE_READING` in
/// `ossl_tls_handle_rlayer_return`, which removes the connection's session from the cache.)
/// [`Endpoint`](crate::Endpoint) never queues an empty datagram: it carries no record.
#[derive(Debug, Default)]
pub struct DatagramPipe {
    inbound: VecDeque<Vec<u8>>,
    outbound: VecDeque<Vec<u8>>,
}

impl DatagramPipe {
    /// An empty pipe.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues one datagram for the `Ssl` to read.
    pub fn push(&mut self, datagram: Vec<u8>) {
        self.inbound.push_back(datagram);
    }

    /// Takes every datagram the `Ssl` wrote so far, oldest first.
    pub fn take_outbound(&mut self) -> Vec<Vec<u8>> {
        self.outbound.drain(..).collect()
    }

    /// Takes the oldest datagram the `Ssl` wrote, if any.
    pub fn pop_outbound(&mut self) -> Option<Vec<u8>> {
        self.outbound.pop_front()
    }

    /// Drops every datagram the `Ssl` wrote so far.
    pub fn clear_outbound(&mut self) {
        self.outbound.clear();
    }

    /// Frees the storage of each queue that is empty, so that an idle connection's pipe holds
    /// none (a queue keeps its storage otherwise, like any `VecDeque`).
    pub fn free_empty_queues(&mut self) {
        if self.inbound.is_empty() {
            self.inbound = VecDeque::new();
        }
        if self.outbound.is_empty() {
            self.outbound = VecDeque::new();
        }
    }

    /// Datagrams pushed and not read yet.
    pub fn inbound_len(&self) -> usize {
        self.inbound.len()
    }

    /// Datagrams written and not taken yet.
    pub fn outbound_len(&self) -> usize {
        self.outbound.len()
    }
}

impl Read for DatagramPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inbound.pop_front() {
            Some(d) if d.is_empty() => Err(io::ErrorKind::UnexpectedEof.into()),
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for DatagramPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbound.push_back(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_read_is_one_datagram_and_one_write_is_one_datagram() {
        let mut p = DatagramPipe::new();
        p.push(b"first".to_vec());
        p.push(Vec::new());
        p.push(b"third one".to_vec());
        let mut buf = [0u8; 4];
        assert_eq!(p.read(&mut buf).unwrap(), 4, "truncated to the buffer");
        assert_eq!(&buf, b"firs");
        assert_eq!(
            p.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof,
            "an empty datagram reads as an error, not as an end of stream"
        );
        assert_eq!(p.inbound_len(), 1);
        let mut big = [0u8; 64];
        assert_eq!(p.read(&mut big).unwrap(), 9);
        assert_eq!(
            p.read(&mut big).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        p.write_all(b"a").unwrap();
        p.write_all(b"bc").unwrap();
        assert_eq!(p.outbound_len(), 2);
        assert_eq!(p.pop_outbound(), Some(b"a".to_vec()));
        assert_eq!(p.take_outbound(), vec![b"bc".to_vec()]);
        assert!(p.take_outbound().is_empty());
        p.write_all(b"x").unwrap();
        p.clear_outbound();
        assert_eq!(p.outbound_len(), 0);
        p.push(b"kept".to_vec());
        p.free_empty_queues();
        assert_eq!(p.outbound.capacity(), 0, "an empty queue keeps no storage");
        assert_eq!(
            p.inbound_len(),
            1,
            "a queue that holds datagrams keeps them"
        );
        assert_eq!(p.read(&mut big).unwrap(), 4);
        p.free_empty_queues();
        assert_eq!(p.inbound.capacity(), 0);
    }
}
