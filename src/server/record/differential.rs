//! Our record layer against OpenSSL's own, on the same records: a real DTLS 1.2 handshake
//! between two OpenSSL `Ssl`s per suite, then the server's records compared byte for byte with
//! ours, and every record the client writes (and mutated, replayed, reordered copies of them)
//! fed to both OpenSSL's server and [`RecordState::open`]: the same records must be accepted,
//! with the same plaintext, and the same ones refused.

use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVerifyMode,
    SslVersion,
};

use super::keys::{Aead, RecordKeys};
use super::protect::{
    Crypto, Framing, RecordState, Rejected, SealError, CONTENT_ALERT, CONTENT_APPLICATION_DATA,
    MAX_SEQ,
};
use super::replay::ReplayWindow;
use super::{records, u16_at, u48_at};
use crate::server::pipe::DatagramPipe;

/// Every AEAD, through a certificate suite, and the PSK suites the server offers first.
const SUITES: &[(&str, Aead)] = &[
    ("ECDHE-ECDSA-AES128-GCM-SHA256", Aead::Aes128Gcm),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", Aead::Aes256Gcm),
    ("ECDHE-ECDSA-AES128-CCM", Aead::Aes128Ccm),
    ("ECDHE-ECDSA-AES256-CCM", Aead::Aes256Ccm),
    ("ECDHE-ECDSA-AES128-CCM8", Aead::Aes128Ccm8),
    ("ECDHE-ECDSA-AES256-CCM8", Aead::Aes256Ccm8),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", Aead::ChaCha20Poly1305),
    ("PSK-AES128-CCM8", Aead::Aes128Ccm8),
    ("PSK-AES128-GCM-SHA256", Aead::Aes128Gcm),
    ("PSK-CHACHA20-POLY1305", Aead::ChaCha20Poly1305),
];

/// Plaintext lengths tried: empty, around block and tag sizes, an MTU, the maximum.
const LENGTHS: &[usize] = &[
    1, 2, 15, 16, 17, 31, 32, 33, 255, 1000, 1399, 4096, 16_383, 16_384,
];

const PSK: &[u8] = b"differential psk";

fn pin(b: &mut SslContextBuilder, suite: &str) {
    b.set_min_proto_version(Some(SslVersion::DTLS1_2)).unwrap();
    b.set_max_proto_version(Some(SslVersion::DTLS1_2)).unwrap();
    b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    b.set_cipher_list(suite).unwrap();
}

/// Two OpenSSL peers of `suite` after their handshake, and what our side needs to take over
/// the server's records: its keys, next write sequence number, and the replay window of what
/// its OpenSSL already accepted.
struct Pair {
    client: SslStream<DatagramPipe>,
    server: SslStream<DatagramPipe>,
    state: RecordState,
    crypto: Crypto,
}

fn epoch1_seqs(datagrams: &[Vec<u8>]) -> Vec<u64> {
    datagrams
        .iter()
        .flat_map(|d| records(d, 0))
        .filter(|r| u16_at(r, 3) == 1)
        .map(|r| u48_at(r, 5))
        .collect()
}

fn handshake(suite: &str) -> Pair {
    let psk = suite.starts_with("PSK-");
    let mut s = SslContext::builder(SslMethod::dtls_server()).unwrap();
    pin(&mut s, suite);
    if psk {
        s.set_psk_server_callback(|_ssl, _id, out| {
            out[..PSK.len()].copy_from_slice(PSK);
            Ok(PSK.len())
        });
    } else {
        let (cert, key) = crate::self_signed_certificate().unwrap();
        s.set_certificate(&cert).unwrap();
        s.set_private_key(&key).unwrap();
    }
    let mut c = SslContext::builder(SslMethod::dtls_client()).unwrap();
    pin(&mut c, suite);
    c.set_verify(SslVerifyMode::NONE);
    if psk {
        c.set_psk_client_callback(|_ssl, _hint, id, key| {
            id[..3].copy_from_slice(b"id\0");
            key[..PSK.len()].copy_from_slice(PSK);
            Ok(PSK.len())
        });
    }
    let mut server = Ssl::new(&s.build()).unwrap();
    server.set_mtu(1400).unwrap();
    server.set_accept_state();
    let mut client = Ssl::new(&c.build()).unwrap();
    client.set_mtu(1400).unwrap();
    client.set_connect_state();
    let mut server = SslStream::new(server, DatagramPipe::new()).unwrap();
    let mut client = SslStream::new(client, DatagramPipe::new()).unwrap();
    let (mut server_wrote, mut client_wrote) = (Vec::new(), Vec::new());
    let (mut s_done, mut c_done) = (false, false);
    for _ in 0..20 {
        if !c_done {
            match client.do_handshake() {
                Ok(()) => c_done = true,
                Err(e) => assert_eq!(e.code(), ErrorCode::WANT_READ, "client: {e}"),
            }
        }
        for d in client.get_mut().take_outbound() {
            client_wrote.push(d.clone());
            server.get_mut().push(d);
        }
        if !s_done {
            match server.do_handshake() {
                Ok(()) => s_done = true,
                Err(e) => assert_eq!(e.code(), ErrorCode::WANT_READ, "server: {e}"),
            }
        }
        for d in server.get_mut().take_outbound() {
            server_wrote.push(d.clone());
            client.get_mut().push(d);
        }
        if s_done && c_done {
            break;
        }
    }
    assert!(s_done && c_done, "{suite}: handshake did not finish");
    assert_eq!(
        server.ssl().current_cipher().unwrap().name(),
        suite,
        "negotiated"
    );
    let keys = RecordKeys::derive(server.ssl()).expect("keys of an AEAD suite");
    let next_write = epoch1_seqs(&server_wrote)
        .into_iter()
        .max()
        .map_or(0, |s| s + 1);
    let mut window = ReplayWindow::default();
    for seq in epoch1_seqs(&client_wrote) {
        window.accept(seq);
    }
    Pair {
        client,
        server,
        state: RecordState::new(keys, 1, next_write, window),
        crypto: Crypto::default(),
    }
}

/// What OpenSSL's server made of one datagram: the application records it delivered.
fn openssl_reads(server: &mut SslStream<DatagramPipe>, datagram: &[u8]) -> Vec<Vec<u8>> {
    server.get_mut().push(datagram.to_vec());
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 15];
    loop {
        match server.ssl_read(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(e) if e.code() == ErrorCode::WANT_READ => break,
            Err(e) => panic!("OpenSSL's server failed on a record it should discard: {e}"),
        }
    }
    // Whatever OpenSSL answered (a retransmitted flight) is not compared.
    server.get_mut().take_outbound();
    got
}

/// What our record layer made of the same datagram: the application records that opened.
fn ours_reads(pair: &mut Pair, datagram: &[u8]) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut out = Vec::new();
    for record in records(datagram, 0) {
        let before = pair.state.window();
        match pair.state.open(&mut pair.crypto, record, &mut out) {
            Ok(o) if o.content_type == CONTENT_APPLICATION_DATA => {
                if !out.is_empty() {
                    got.push(out.clone());
                }
            }
            Ok(o) => panic!("unexpected content type {}", o.content_type),
            Err(Rejected::Overflow) => {}
            Err(_) => {
                assert_eq!(
                    pair.state.window(),
                    before,
                    "a refused record moved the window"
                );
                assert!(out.is_empty(), "plaintext left behind by a refused record");
            }
        }
    }
    got
}

/// Feeds `datagram` to both servers; asserts they deliver the same records.
fn both_read(pair: &mut Pair, datagram: &[u8], what: &str) -> Vec<Vec<u8>> {
    let ours = ours_reads(pair, datagram);
    let theirs = openssl_reads(&mut pair.server, datagram);
    assert_eq!(
        ours.iter().map(Vec::len).collect::<Vec<_>>(),
        theirs.iter().map(Vec::len).collect::<Vec<_>>(),
        "{what}: accept/reject differs"
    );
    assert_eq!(ours, theirs, "{what}: plaintext differs");
    ours
}

fn client_write(pair: &mut Pair, data: &[u8]) -> Vec<u8> {
    pair.client.ssl_write(data).unwrap();
    let mut out = pair.client.get_mut().take_outbound();
    assert_eq!(out.len(), 1, "one record, one datagram");
    out.pop().unwrap()
}

/// Mutated copies of one genuine record: every header byte, nonce, ciphertext and tag bytes,
/// truncations, a trailing byte, two records glued.
fn mutations(record: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let n = record.len();
    let mut positions: Vec<usize> = (0..13.min(n)).collect();
    positions.extend([13, 14, 20, 21, n / 2, n - 9, n - 8, n - 1]);
    positions.retain(|&p| p < n);
    positions.dedup();
    for p in positions {
        for bit in [0x01u8, 0x80] {
            let mut m = record.to_vec();
            m[p] ^= bit;
            out.push((format!("byte {p} ^ {bit:#x}"), m));
        }
    }
    for cut in [n - 1, n - 8, 21, 13, 12, 1] {
        if cut < n {
            out.push((format!("cut to {cut}"), record[..cut].to_vec()));
        }
    }
    // The epoch set to 0 and to 2 (other epochs), the version to DTLS 1.0.
    for (what, at, value) in [
        ("epoch 0", 4, 0u8),
        ("epoch 2", 4, 2),
        ("dtls 1.0", 2, 0xff),
    ] {
        let mut m = record.to_vec();
        m[at] = value;
        out.push((what.to_string(), m));
    }
    out
}

#[test]
fn our_sealed_records_are_openssls_byte_for_byte_and_its_client_reads_them() {
    for &(suite, aead) in SUITES {
        let mut pair = handshake(suite);
        assert_eq!(pair.state.aead(), aead, "{suite}");
        for &len in LENGTHS {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            // OpenSSL's server writes the record...
            pair.server.ssl_write(&data).unwrap();
            let theirs = pair.server.get_mut().take_outbound();
            assert_eq!(theirs.len(), 1, "{suite} {len}");
            let seq = u48_at(&theirs[0], 5);
            assert_eq!(
                seq,
                pair.state.next_write(),
                "{suite}: sequence numbers in step"
            );
            // ... and ours, at the same sequence number, is the same bytes: for GCM given the
            // explicit nonce OpenSSL chose (random, counting up), for CCM and ChaCha20-Poly1305
            // as they are (the sequence number).
            let explicit = matches!(aead, Aead::Aes128Gcm | Aead::Aes256Gcm)
                .then(|| theirs[0][13..21].try_into().unwrap());
            let mut same = Vec::new();
            pair.crypto
                .seal(
                    aead,
                    pair.state.keys().server_key(),
                    Framing::Plain,
                    CONTENT_APPLICATION_DATA,
                    1,
                    seq,
                    explicit,
                    &data,
                    &mut same,
                )
                .unwrap();
            assert_eq!(same, theirs[0], "{suite} {len}: sealed bytes differ");
            let mut ours = Vec::new();
            pair.state
                .seal(&mut pair.crypto, CONTENT_APPLICATION_DATA, &data, &mut ours)
                .unwrap();
            if explicit.is_none() {
                assert_eq!(ours, theirs[0], "{suite} {len}: sealed bytes differ");
            } else {
                assert_eq!(
                    ours[13..21],
                    ours[3..11],
                    "{suite}: the explicit nonce is the sequence number"
                );
                assert_eq!(ours.len(), theirs[0].len());
            }
            // OpenSSL's client reads ours.
            pair.client.get_mut().push(ours);
            let mut buf = vec![0u8; 1 << 15];
            let n = pair.client.ssl_read(&mut buf).unwrap();
            assert_eq!(&buf[..n], &data[..], "{suite} {len}");
        }
        // An empty record of ours is taken by OpenSSL's client (a read of 0 bytes, which the
        // endpoint skips too), which then reads the next one.
        let mut empty = Vec::new();
        pair.state
            .seal(&mut pair.crypto, CONTENT_APPLICATION_DATA, b"", &mut empty)
            .unwrap();
        let mut next = Vec::new();
        pair.state
            .seal(
                &mut pair.crypto,
                CONTENT_APPLICATION_DATA,
                b"after",
                &mut next,
            )
            .unwrap();
        pair.client.get_mut().push(empty);
        pair.client.get_mut().push(next);
        let mut buf = [0u8; 64];
        assert_eq!(pair.client.ssl_read(&mut buf).unwrap(), 0, "{suite}");
        let n = pair.client.ssl_read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"after", "{suite}");
        // Our close_notify is OpenSSL's, and its client reads it as the end.
        pair.server.shutdown().unwrap();
        let theirs = pair.server.get_mut().take_outbound();
        let explicit = matches!(aead, Aead::Aes128Gcm | Aead::Aes256Gcm)
            .then(|| theirs[0][13..21].try_into().unwrap());
        let mut same = Vec::new();
        pair.crypto
            .seal(
                aead,
                pair.state.keys().server_key(),
                Framing::Plain,
                CONTENT_ALERT,
                1,
                u48_at(&theirs[0], 5),
                explicit,
                &[1, 0],
                &mut same,
            )
            .unwrap();
        assert_eq!(same, theirs[0], "{suite}: close_notify");
        let mut ours = Vec::new();
        pair.state
            .seal(&mut pair.crypto, CONTENT_ALERT, &[1, 0], &mut ours)
            .unwrap();
        pair.client.get_mut().push(ours);
        let e = pair.client.ssl_read(&mut buf).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ZERO_RETURN, "{suite}");
    }
}

#[test]
fn we_accept_and_refuse_the_records_openssl_accepts_and_refuses() {
    for &(suite, _) in SUITES {
        let mut pair = handshake(suite);
        for &len in LENGTHS {
            let data: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
            let record = client_write(&mut pair, &data);
            for (what, m) in mutations(&record) {
                let got = both_read(&mut pair, &m, &format!("{suite} {len}: {what}"));
                assert!(got.is_empty(), "{suite} {len}: {what} was accepted");
            }
            let got = both_read(&mut pair, &record, &format!("{suite} {len}: genuine"));
            assert_eq!(got, vec![data.clone()], "{suite} {len}");
            let got = both_read(&mut pair, &record, &format!("{suite} {len}: replayed"));
            assert!(got.is_empty());
        }
        // A datagram of several records, one of them forged, and a trailing partial header.
        let a = client_write(&mut pair, b"first");
        let mut forged = client_write(&mut pair, b"forged");
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let c = client_write(&mut pair, b"third");
        let glued = [a, forged, c, vec![23, 0xfe, 0xfd]].concat();
        let got = both_read(&mut pair, &glued, &format!("{suite}: glued"));
        assert_eq!(got, vec![b"first".to_vec(), b"third".to_vec()]);
        // The client's close_notify opens as an alert here, and is the end there.
        pair.client.shutdown().unwrap();
        let close = pair.client.get_mut().take_outbound().pop().unwrap();
        let mut out = Vec::new();
        let opened = pair.state.open(&mut pair.crypto, &close, &mut out).unwrap();
        assert_eq!(
            (opened.content_type, out.as_slice()),
            (CONTENT_ALERT, &[1u8, 0][..])
        );
        pair.server.get_mut().push(close);
        let mut buf = [0u8; 16];
        let e = pair.server.ssl_read(&mut buf).unwrap_err();
        assert_eq!(e.code(), ErrorCode::ZERO_RETURN, "{suite}");
    }
}

#[test]
fn gaps_reordering_and_the_window_edge_are_judged_as_openssl_judges_them() {
    for &(suite, _) in SUITES {
        let mut pair = handshake(suite);
        let sent: Vec<Vec<u8>> = (0..100u8)
            .map(|i| client_write(&mut pair, &[i; 10]))
            .collect();
        let seq0 = u48_at(&sent[0], 5);
        // Delivery order: ahead, behind within the window, replays, a jump, the window's edge.
        for (i, expect) in [
            (10, true),
            (5, true),
            (5, false),
            (99, true),
            (10, false),
            (99 - 64, false),
            (99 - 63, true),
            (99 - 65, false),
            (98, true),
            (0, false),
        ] {
            let got = both_read(&mut pair, &sent[i], &format!("{suite}: record {i}"));
            assert_eq!(
                !got.is_empty(),
                expect,
                "{suite}: record {i} (seq {})",
                seq0 + i as u64
            );
        }
    }
}

#[test]
fn no_write_sequence_number_is_used_twice_and_the_last_is_for_close_notify() {
    let mut pair = handshake("ECDHE-ECDSA-AES128-GCM-SHA256");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let mut out = Vec::new();
        pair.state
            .seal(&mut pair.crypto, CONTENT_APPLICATION_DATA, b"x", &mut out)
            .unwrap();
        assert!(seen.insert(u48_at(&out, 5)), "a sequence number twice");
    }
    pair.state.set_next_write(MAX_SEQ - 1);
    let mut out = Vec::new();
    pair.state
        .seal(
            &mut pair.crypto,
            CONTENT_APPLICATION_DATA,
            b"last data",
            &mut out,
        )
        .unwrap();
    assert_eq!(u48_at(&out, 5), MAX_SEQ - 1);
    assert!(pair.state.exhausted());
    assert_eq!(
        pair.state.seal(
            &mut pair.crypto,
            CONTENT_APPLICATION_DATA,
            b"x",
            &mut Vec::new()
        ),
        Err(SealError::Exhausted)
    );
    let mut close = Vec::new();
    pair.state
        .seal(&mut pair.crypto, CONTENT_ALERT, &[1, 0], &mut close)
        .unwrap();
    assert_eq!(u48_at(&close, 5), MAX_SEQ);
    assert_eq!(
        pair.state
            .seal(&mut pair.crypto, CONTENT_ALERT, &[1, 0], &mut Vec::new()),
        Err(SealError::Exhausted)
    );
}

#[test]
fn failed_openings_are_counted_per_key() {
    let mut pair = handshake("PSK-AES128-CCM8");
    let mut record = client_write(&mut pair, b"counted");
    let last = record.len() - 1;
    record[last] ^= 1;
    for _ in 0..3 {
        assert_eq!(
            pair.state.open(&mut pair.crypto, &record, &mut Vec::new()),
            Err(Rejected::Unopened)
        );
    }
    assert_eq!(pair.state.unopened(), 3);
    assert_eq!(pair.state.aead().integrity_limit(), 128);
}
