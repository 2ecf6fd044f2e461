//! Ticket keys of past epochs are erased: once an epoch's window has passed (or its secret left
//! the ring), the AES and HMAC keys derived for it are nowhere in the process's memory, neither
//! held nor left behind unwiped in freed memory.
//!
//! The test runs alone in a child process (`isolated_test!`) and reads that process's whole
//! writable memory through `/proc/self/mem`, looking for the derived keys. It computes them
//! itself (HKDF-SHA256, as `src/tickets.rs` documents) and holds them only masked, so its own
//! copies never match; a positive control (the keys are found while their epoch is live) shows
//! that the derivation and the scan are right.

mod support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hkdf::Hkdf;
use openssl_session_cache::{KeyRing, ManualClock, SessionCache, TicketKeys};
use sha2::Sha256;
use support::{client_ctx, connect, server_builder, Ctx, Proto, ServerClose};
use zeroize::Zeroize;

const HOUR: Duration = Duration::from_secs(3600);
/// `src/tickets.rs`'s HKDF label.
const LABEL: &[u8] = b"openssl-session-cache ticket key v1";

/// What a key is held as here: XORed with this, so the test's own copy never matches.
fn mask(i: usize) -> u8 {
    (i as u8).wrapping_mul(37).wrapping_add(0x5b)
}

/// A 32-byte key, masked.
#[derive(Clone, Copy)]
struct Masked([u8; 32]);

/// Derives the (AES, HMAC) ticket keys of `(id, epoch)` from `secret`, masked, on a thread of its
/// own whose stack is overwritten before it ends (HKDF's intermediate blocks live there).
fn derived(secret: [u8; 32], id: u32, epoch: u64) -> (Masked, Masked) {
    #[inline(never)]
    fn derive(secret: &[u8; 32], id: u32, epoch: u64) -> (Masked, Masked) {
        let hk = Hkdf::<Sha256>::new(Some(LABEL), secret);
        let mut info = [0u8; 12];
        info[..4].copy_from_slice(&id.to_be_bytes());
        info[4..].copy_from_slice(&epoch.to_be_bytes());
        let mut okm = [0u8; 68];
        hk.expand(&info, &mut okm).unwrap();
        let mut aes = [0u8; 32];
        let mut hmac = [0u8; 32];
        for i in 0..32 {
            aes[i] = okm[4 + i] ^ mask(i);
            hmac[i] = okm[36 + i] ^ mask(i);
        }
        okm.zeroize();
        (Masked(aes), Masked(hmac))
    }
    #[inline(never)]
    fn scrub_stack() {
        let mut junk = [0u8; 256 << 10];
        std::hint::black_box(&mut junk);
        junk.zeroize();
        std::hint::black_box(&junk);
    }
    std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(move || {
            let keys = derive(&secret, id, epoch);
            scrub_stack();
            keys
        })
        .unwrap()
        .join()
        .unwrap()
}

/// For each of `keys`, the regions of this process's writable memory holding either half of it
/// (`/proc/self/maps` lines). Halves, because a freed small block loses its first 16 bytes to
/// the allocator's own bookkeeping: an unwiped key there keeps only its second half.
fn holding(keys: &[Masked]) -> Vec<Vec<String>> {
    // (which key, where in it the half starts, the half's first byte)
    let needles: Vec<(usize, usize, u8)> = keys
        .iter()
        .enumerate()
        .flat_map(|(k, key)| [0, 16].map(|off| (k, off, key.0[off] ^ mask(off))))
        .collect();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mem = File::open("/proc/self/mem").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut found = vec![Vec::new(); keys.len()];
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        if !perms.starts_with("rw") || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut hit = vec![false; keys.len()];
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            let Ok(got) = mem.read_at(&mut buf[..n], at) else {
                break;
            };
            if got < 16 {
                break;
            }
            let chunk = &buf[..got];
            for i in 0..=got - 16 {
                let b = chunk[i];
                for &(k, off, first) in &needles {
                    if b == first
                        && (1..16).all(|j| chunk[i + j] ^ mask(off + j) == keys[k].0[off + j])
                    {
                        hit[k] = true;
                    }
                }
            }
            // Overlap the next chunk by 15 bytes, so no window is missed.
            at += (got - 15) as u64;
        }
        for (k, h) in hit.into_iter().enumerate() {
            if h {
                found[k].push(line.to_owned());
            }
        }
    }
    // The buffer held copies of whatever was scanned: wipe it before it goes back.
    buf.zeroize();
    found
}

/// Fails unless both keys are somewhere (`live`) or nowhere (`!live`) in memory.
fn assert_in_memory(what: &str, keys: (Masked, Masked), live: bool) {
    let found = holding(&[keys.0, keys.1]);
    for (name, regions) in ["AES", "HMAC"].into_iter().zip(found) {
        if live {
            assert!(
                !regions.is_empty(),
                "{what}: the {name} key is not in memory (the scan or the derivation is wrong)"
            );
        } else {
            assert!(
                regions.is_empty(),
                "{what}: the {name} key is still in memory, in {regions:#?}"
            );
        }
    }
}

isolated_test! {
    /// Tickets issued in epoch E (period 1 h, window 2 h) derive E's keys; at E + 3 h a new
    /// ticket erases them (and derives E + 3's); replacing the ring with one without the
    /// secret erases those too.
    fn derived_ticket_keys_are_gone_from_memory_once_their_window_passed() {
        let secret = [0x3c; 32];
        let ring = KeyRing::new(7, secret);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let epoch = now / 3600;
        let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(epoch * 3600)));
        let keys = TicketKeys::builder(ring)
            .period(HOUR)
            .accept_for(2 * HOUR)
            .clock(clock.clone())
            .build()
            .unwrap();
        let cache = SessionCache::builder()
            .ticket_keys(keys.clone())
            .build()
            .unwrap();
        let mut b = server_builder(Proto::Tls12, false);
        cache.install(&mut b).unwrap();
        let server = Ctx {
            ctx: b.build(),
            proto: Proto::Tls12,
        };
        let client = client_ctx(Proto::Tls12, false);
        let ticket = || {
            let out = connect(&server, &client, None, ServerClose::Clean);
            assert!(out.session.is_some());
        };

        ticket();
        assert_eq!(keys.stats().issued, 1, "{:?}", keys.stats());
        let old = derived(secret, 7, epoch);
        assert_in_memory("epoch E, in its window", old, true);

        clock.set(UNIX_EPOCH + Duration::from_secs((epoch + 3) * 3600));
        ticket();
        assert_eq!(
            (keys.stats().issued, keys.stats().erased),
            (2, 1),
            "{:?}",
            keys.stats()
        );
        assert_in_memory("epoch E, past its window", old, false);
        let new = derived(secret, 7, epoch + 3);
        assert_in_memory("epoch E + 3, in its window", new, true);

        keys.replace_ring(KeyRing::new(8, [0x4d; 32]));
        assert_eq!(keys.stats().erased, 2, "{:?}", keys.stats());
        assert_in_memory("epoch E + 3, its secret out of the ring", new, false);
    }
}
