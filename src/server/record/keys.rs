//! The record keys of an established DTLS 1.2 connection, taken from OpenSSL once its handshake
//! finished: the suite's AEAD, and each direction's write key and fixed IV.
//!
//! The key block is RFC 5246 §6.3's `PRF(master_secret, "key expansion", server_random +
//! client_random)`, computed by OpenSSL's own TLS1-PRF ([`ffi::tls1_prf`]) with the suite's
//! PRF hash; nothing here is cryptography of ours. For AEAD suites the MAC keys are empty, so
//! the block is `client_write_key, server_write_key, client_write_IV, server_write_IV`.

use std::fmt;

use openssl::ssl::{SslCipherRef, SslRef};
use zeroize::{Zeroize, Zeroizing};

use crate::ffi;

/// The AEADs of the DTLS 1.2 suites the endpoint protects records for (every default and PSK
/// suite of the server). Anything else keeps its `Ssl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Aead {
    /// AES-128-GCM (RFC 5288).
    Aes128Gcm,
    /// AES-256-GCM (RFC 5288).
    Aes256Gcm,
    /// AES-128-CCM with a 16-byte tag (RFC 6655).
    Aes128Ccm,
    /// AES-256-CCM with a 16-byte tag (RFC 6655).
    Aes256Ccm,
    /// AES-128-CCM with an 8-byte tag (RFC 6655, the CoAP suites of RFC 7925).
    Aes128Ccm8,
    /// AES-256-CCM with an 8-byte tag (RFC 6655).
    Aes256Ccm8,
    /// ChaCha20-Poly1305 (RFC 7905).
    ChaCha20Poly1305,
}

impl Aead {
    /// Every AEAD, for tests and the crypto contexts.
    pub(crate) const ALL: [Self; 7] = [
        Self::Aes128Gcm,
        Self::Aes256Gcm,
        Self::Aes128Ccm,
        Self::Aes256Ccm,
        Self::Aes128Ccm8,
        Self::Aes256Ccm8,
        Self::ChaCha20Poly1305,
    ];

    /// The AEAD of OpenSSL's cipher suite `cipher`, if it is one of ours.
    pub(crate) fn of(cipher: &SslCipherRef) -> Option<Self> {
        use openssl::nid::Nid;
        let ccm8 = cipher.name().ends_with("CCM8");
        match cipher.cipher_nid()? {
            Nid::AES_128_GCM => Some(Self::Aes128Gcm),
            Nid::AES_256_GCM => Some(Self::Aes256Gcm),
            Nid::AES_128_CCM if ccm8 => Some(Self::Aes128Ccm8),
            Nid::AES_256_CCM if ccm8 => Some(Self::Aes256Ccm8),
            Nid::AES_128_CCM => Some(Self::Aes128Ccm),
            Nid::AES_256_CCM => Some(Self::Aes256Ccm),
            Nid::CHACHA20_POLY1305 => Some(Self::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// The write key's length.
    pub(crate) fn key_len(self) -> usize {
        match self {
            Self::Aes128Gcm | Self::Aes128Ccm | Self::Aes128Ccm8 => 16,
            _ => 32,
        }
    }

    /// The fixed (implicit) IV's length: a 4-byte salt for GCM and CCM, the 12-byte IV that the
    /// sequence number is XORed into for ChaCha20-Poly1305.
    pub(crate) fn fixed_iv_len(self) -> usize {
        match self {
            Self::ChaCha20Poly1305 => 12,
            _ => 4,
        }
    }

    /// The explicit nonce each record carries before its ciphertext (8 bytes for GCM and CCM,
    /// none for ChaCha20-Poly1305).
    pub(crate) fn explicit_nonce_len(self) -> usize {
        match self {
            Self::ChaCha20Poly1305 => 0,
            _ => 8,
        }
    }

    /// The authentication tag's length.
    pub(crate) fn tag_len(self) -> usize {
        match self {
            Self::Aes128Ccm8 | Self::Aes256Ccm8 => 8,
            _ => 16,
        }
    }

    /// What protection adds to a record's plaintext: explicit nonce and tag.
    #[cfg(test)]
    pub(crate) fn overhead(self) -> usize {
        self.explicit_nonce_len() + self.tag_len()
    }

    /// The EVP cipher's name, for `EVP_CIPHER_fetch`.
    pub(crate) fn evp_name(self) -> &'static str {
        match self {
            Self::Aes128Gcm => "AES-128-GCM",
            Self::Aes256Gcm => "AES-256-GCM",
            Self::Aes128Ccm | Self::Aes128Ccm8 => "AES-128-CCM",
            Self::Aes256Ccm | Self::Aes256Ccm8 => "AES-256-CCM",
            Self::ChaCha20Poly1305 => "ChaCha20-Poly1305",
        }
    }

    /// Whether this is an AES-CCM AEAD (which needs the lengths before the data).
    pub(crate) fn is_ccm(self) -> bool {
        matches!(
            self,
            Self::Aes128Ccm | Self::Aes256Ccm | Self::Aes128Ccm8 | Self::Aes256Ccm8
        )
    }

    /// Failed openings after which a key should be retired (RFC 9147 §4.5.3's integrity limits
    /// for the same AEADs: 2^36 for GCM and ChaCha20-Poly1305, 2^23.5 for CCM, 2^7 for CCM8).
    pub(crate) fn integrity_limit(self) -> u64 {
        match self {
            Self::Aes128Gcm | Self::Aes256Gcm | Self::ChaCha20Poly1305 => 1 << 36,
            Self::Aes128Ccm | Self::Aes256Ccm => 11_863_283, // 2^23.5
            Self::Aes128Ccm8 | Self::Aes256Ccm8 => 1 << 7,
        }
    }
}

/// One direction's write key and fixed IV, zeroized when dropped.
#[derive(Clone)]
pub(crate) struct DirectionKey {
    key: [u8; 32],
    iv: [u8; 12],
    /// Names this key (and its copies) for the contexts that hold its key schedule.
    id: u64,
}

impl DirectionKey {
    /// A key from its bytes (`key` of the AEAD's key length, `iv` its fixed IV).
    pub(crate) fn new(key: &[u8], iv: &[u8]) -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut k = Self {
            key: [0; 32],
            iv: [0; 12],
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        k.key[..key.len()].copy_from_slice(key);
        k.iv[..iv.len()].copy_from_slice(iv);
        k
    }

    /// This key's id (the same for its copies), under which [`Crypto`](super::protect::Crypto)
    /// keeps a context holding its key schedule.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The key, `len` bytes.
    pub(crate) fn key(&self, len: usize) -> &[u8] {
        &self.key[..len]
    }

    /// The fixed IV, `len` bytes.
    pub(crate) fn iv(&self, len: usize) -> &[u8] {
        &self.iv[..len]
    }
}

impl Drop for DirectionKey {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
    }
}

impl fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectionKey").finish_non_exhaustive()
    }
}

/// The record keys of one established connection, seen from the server: it opens what the
/// client wrote and seals what it writes itself.
#[derive(Clone)]
pub(crate) struct RecordKeys {
    pub(crate) aead: Aead,
    /// The client's write key: opens the peer's records.
    pub(crate) client: DirectionKey,
    /// The server's write key: seals ours.
    pub(crate) server: DirectionKey,
}

impl fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordKeys")
            .field("aead", &self.aead)
            .finish_non_exhaustive()
    }
}

/// Why keys could not be taken from a connection (it then keeps its `Ssl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoKeys {
    /// The suite is not one of the AEADs above (a CBC suite, say).
    Unsupported,
    /// OpenSSL had no session, master secret, randoms or PRF hash to give.
    Unavailable,
}

impl RecordKeys {
    /// The same keys seen from the client (tests and fuzzing: a client's record layer).
    #[cfg(any(test, feature = "__fuzzing"))]
    pub(crate) fn swapped(&self) -> Self {
        Self {
            aead: self.aead,
            client: self.server.clone(),
            server: self.client.clone(),
        }
    }

    /// The server's write key (seals our records).
    #[cfg(test)]
    pub(crate) fn server_key(&self) -> &DirectionKey {
        &self.server
    }

    /// Derives the record keys of `ssl`, whose DTLS 1.2 handshake finished, from its session's
    /// master secret and the two randoms through OpenSSL's TLS1-PRF.
    pub(crate) fn derive(ssl: &SslRef) -> Result<Self, NoKeys> {
        let cipher = ssl.current_cipher().ok_or(NoKeys::Unavailable)?;
        let aead = Aead::of(cipher).ok_or(NoKeys::Unsupported)?;
        let digest = cipher.handshake_digest().ok_or(NoKeys::Unavailable)?;
        let session = ssl.session().ok_or(NoKeys::Unavailable)?;
        let mut master = Zeroizing::new([0u8; 48]);
        if session.master_key(&mut master[..]) != 48 {
            return Err(NoKeys::Unavailable);
        }
        let (mut client_random, mut server_random) = ([0u8; 32], [0u8; 32]);
        if ssl.client_random(&mut client_random) != 32
            || ssl.server_random(&mut server_random) != 32
        {
            return Err(NoKeys::Unavailable);
        }
        Self::from_master_secret(aead, digest, &master[..], &client_random, &server_random)
            .map_err(|_| NoKeys::Unavailable)
    }

    /// The key block of RFC 5246 §6.3 for `aead`, split into the two directions.
    pub(crate) fn from_master_secret(
        aead: Aead,
        prf_hash: openssl::hash::MessageDigest,
        master_secret: &[u8],
        client_random: &[u8; 32],
        server_random: &[u8; 32],
    ) -> Result<Self, openssl::error::ErrorStack> {
        let (k, iv) = (aead.key_len(), aead.fixed_iv_len());
        let mut block = Zeroizing::new(vec![0u8; 2 * (k + iv)]);
        ffi::tls1_prf(
            prf_hash,
            master_secret,
            b"key expansion",
            &[server_random, client_random],
            &mut block,
        )?;
        let client_key = &block[..k];
        let server_key = &block[k..2 * k];
        let client_iv = &block[2 * k..2 * k + iv];
        let server_iv = &block[2 * k + iv..];
        Ok(Self {
            aead,
            client: DirectionKey::new(client_key, client_iv),
            server: DirectionKey::new(server_key, server_iv),
        })
    }
}

#[cfg(test)]
mod tests {
    use openssl::hash::MessageDigest;

    use super::*;

    #[test]
    fn the_prf_is_openssls_tls12_prf() {
        // RFC 5246's PRF with SHA-256: the test vector published on the IETF TLS mailing list
        // (secret 9bbe436b..., seed a0ba9f93..., label "test label", 100 bytes).
        let secret = hex::decode("9bbe436ba940f017b17652849a71db35").unwrap();
        let seed = hex::decode("a0ba9f936cda311827a6f796ffd5198c").unwrap();
        let mut out = [0u8; 100];
        ffi::tls1_prf(
            MessageDigest::sha256(),
            &secret,
            b"test label",
            &[&seed],
            &mut out,
        )
        .unwrap();
        assert_eq!(
            hex::encode(out),
            "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a6b301791e90d35c9c9a46b4e\
             14baf9af0fa022f7077def17abfd3797c0564bab4fbc91666e9def9b97fce34f796789baa48082d122ee42c5\
             a72e5a5110fff70187347b66"
        );
        // Seeds given in parts are concatenated.
        let mut split = [0u8; 100];
        ffi::tls1_prf(
            MessageDigest::sha256(),
            &secret,
            b"test ",
            &[b"label", &seed],
            &mut split,
        )
        .unwrap();
        assert_eq!(out, split);
    }

    #[test]
    fn suite_parameters_follow_the_rfcs() {
        for aead in Aead::ALL {
            let (key, iv, explicit, tag) = match aead {
                Aead::Aes128Gcm | Aead::Aes128Ccm => (16, 4, 8, 16),
                Aead::Aes256Gcm | Aead::Aes256Ccm => (32, 4, 8, 16),
                Aead::Aes128Ccm8 => (16, 4, 8, 8),
                Aead::Aes256Ccm8 => (32, 4, 8, 8),
                Aead::ChaCha20Poly1305 => (32, 12, 0, 16),
            };
            assert_eq!(
                (
                    aead.key_len(),
                    aead.fixed_iv_len(),
                    aead.explicit_nonce_len(),
                    aead.tag_len()
                ),
                (key, iv, explicit, tag),
                "{aead:?}"
            );
            assert_eq!(aead.overhead(), explicit + tag);
        }
    }

    #[test]
    fn key_block_is_split_client_key_server_key_client_iv_server_iv() {
        let master = [7u8; 48];
        let (cr, sr) = ([1u8; 32], [2u8; 32]);
        let keys = RecordKeys::from_master_secret(
            Aead::Aes128Gcm,
            MessageDigest::sha256(),
            &master,
            &cr,
            &sr,
        )
        .unwrap();
        let mut block = [0u8; 40];
        ffi::tls1_prf(
            MessageDigest::sha256(),
            &master,
            b"key expansion",
            &[&sr, &cr],
            &mut block,
        )
        .unwrap();
        assert_eq!(keys.client.key(16), &block[..16]);
        assert_eq!(keys.server.key(16), &block[16..32]);
        assert_eq!(keys.client.iv(4), &block[32..36]);
        assert_eq!(keys.server.iv(4), &block[36..40]);
        assert_eq!(
            format!("{keys:?}"),
            "RecordKeys { aead: Aes128Gcm, .. }",
            "no key bytes in Debug"
        );
    }
}
