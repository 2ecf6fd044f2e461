//! How values are written to Redis: sealed with a key ring, or (opted into by name) in plaintext.

use std::fmt;

use crate::error::StoreError;
use crate::store::envelope::{decode_session, envelope_key_id, KeyRing, OVERHEAD};
use crate::store::{SessionId, StoredSession};

/// The first byte of a plaintext value (sealed values start with the envelope version, 1).
const PLAINTEXT_VERSION: u8 = 0;

pub(crate) enum Codec {
    Sealed(KeyRing),
    Plaintext,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sealed(ring) => f.debug_tuple("Sealed").field(ring).finish(),
            Self::Plaintext => f.write_str("Plaintext"),
        }
    }
}

impl Codec {
    pub(crate) fn encode(
        &self,
        id: &SessionId,
        session: &StoredSession,
    ) -> Result<Vec<u8>, StoreError> {
        match self {
            Self::Sealed(ring) => ring.seal_session(id, session),
            Self::Plaintext => {
                let mut v = Vec::with_capacity(9 + session.len());
                v.push(PLAINTEXT_VERSION);
                v.extend_from_slice(&session.expires_at_millis().to_be_bytes());
                v.extend_from_slice(session.data());
                Ok(v)
            }
        }
    }

    pub(crate) fn decode(&self, id: &SessionId, value: &[u8]) -> Result<StoredSession, StoreError> {
        match self {
            Self::Sealed(ring) => ring.open_session(id, value),
            Self::Plaintext => match value {
                [PLAINTEXT_VERSION, rest @ ..] => decode_session(rest),
                _ => Err(StoreError::Corrupt(
                    "value is not a plaintext session (sealed by another host?)".into(),
                )),
            },
        }
    }

    /// True if the value is sealed under a key id this ring does not hold.
    pub(crate) fn is_foreign(&self, value: &[u8]) -> bool {
        match self {
            Self::Sealed(ring) => {
                envelope_key_id(value).is_some_and(|k| !ring.key_ids().contains(&k))
            }
            Self::Plaintext => false,
        }
    }

    /// Bytes a value holds beyond the session's own.
    pub(crate) fn overhead(&self) -> usize {
        match self {
            Self::Sealed(_) => OVERHEAD + 8,
            Self::Plaintext => 9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_codec_round_trips_and_refuses_sealed_values() {
        let id = SessionId::new(b"i").unwrap();
        let s = StoredSession::from_millis(vec![1, 2, 3], 99);
        let plain = Codec::Plaintext;
        let v = plain.encode(&id, &s).unwrap();
        assert_eq!(plain.decode(&id, &v).unwrap(), s);
        let ring = KeyRing::generate().unwrap();
        let sealed = Codec::Sealed(ring.clone());
        let sv = sealed.encode(&id, &s).unwrap();
        assert!(plain.decode(&id, &sv).is_err());
        assert!(
            sealed.decode(&id, &v).is_err(),
            "an encrypted store refuses plaintext values"
        );
        assert!(!sealed.is_foreign(&sv));
        let other = Codec::Sealed(KeyRing::new(ring.active_key_id().wrapping_add(1), [0; 32]));
        assert!(other.is_foreign(&sv));
    }
}
