//! How values are written to Redis: sealed with a key ring, or (opted into by name) in plaintext.

use std::fmt;

use arc_swap::ArcSwap;

use crate::error::StoreError;
use crate::store::envelope::{decode_session, envelope_key_id, KeyRing, OVERHEAD};
use crate::store::{SessionId, StoredSession};

/// The first byte of a plaintext value (sealed values start with the envelope version, 1).
const PLAINTEXT_VERSION: u8 = 0;

pub(crate) enum Codec {
    /// Sealed with the ring, which [`replace_ring`](Self::replace_ring) swaps at runtime.
    Sealed(ArcSwap<KeyRing>),
    Plaintext,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sealed(ring) => f.debug_tuple("Sealed").field(&**ring.load()).finish(),
            Self::Plaintext => f.write_str("Plaintext"),
        }
    }
}

impl Codec {
    pub(crate) fn sealed(ring: KeyRing) -> Self {
        Self::Sealed(ArcSwap::from_pointee(ring))
    }

    /// Seals from now on with `ring`'s active key and opens with its keys; returns false for a
    /// plaintext codec, which has no ring. The old ring's keys are wiped once no operation in
    /// flight still uses them.
    pub(crate) fn replace_ring(&self, ring: KeyRing) -> bool {
        match self {
            Self::Sealed(current) => {
                current.store(std::sync::Arc::new(ring));
                true
            }
            Self::Plaintext => false,
        }
    }

    /// The value of `session` under `id`. A peer state's (a versioned value,
    /// [`SessionStore::put_if`](crate::SessionStore::put_if)) starts with its version in the
    /// clear, 8 bytes, ahead of the sealed value (which holds it too), so that the scripts of
    /// `put_if` and `remove_if` can compare it.
    pub(crate) fn encode(
        &self,
        id: &SessionId,
        session: &StoredSession,
    ) -> Result<Vec<u8>, StoreError> {
        if id.is_peer_state() {
            let Some(version) = crate::store::version_of(session.data()) else {
                return Err(StoreError::Corrupt("a peer state without a version".into()));
            };
            let mut v = version.to_be_bytes().to_vec();
            v.extend_from_slice(&self.encode_value(id, session)?);
            return Ok(v);
        }
        self.encode_value(id, session)
    }

    fn encode_value(&self, id: &SessionId, session: &StoredSession) -> Result<Vec<u8>, StoreError> {
        match self {
            Self::Sealed(ring) => ring.load().seal_session(id, session),
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
        if id.is_peer_state() {
            let clear = crate::store::version_of(value);
            let session = self.decode_value(id, value.get(8..).unwrap_or_default())?;
            // The clear copy is not authenticated: it must say what the sealed one says.
            if clear.is_none() || clear != crate::store::version_of(session.data()) {
                return Err(StoreError::Corrupt("a peer state's versions differ".into()));
            }
            return Ok(session);
        }
        self.decode_value(id, value)
    }

    fn decode_value(&self, id: &SessionId, value: &[u8]) -> Result<StoredSession, StoreError> {
        match self {
            Self::Sealed(ring) => ring.load().open_session(id, value),
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
                envelope_key_id(value).is_some_and(|k| ring.load().key(k).is_none())
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
        let sealed = Codec::sealed(ring.clone());
        let sv = sealed.encode(&id, &s).unwrap();
        assert!(plain.decode(&id, &sv).is_err());
        assert!(
            sealed.decode(&id, &v).is_err(),
            "an encrypted store refuses plaintext values"
        );
        assert!(!sealed.is_foreign(&sv));
        let other = Codec::sealed(KeyRing::new(ring.active_key_id().wrapping_add(1), [0; 32]));
        assert!(other.is_foreign(&sv));
        assert!(
            !plain.replace_ring(ring.clone()),
            "a plaintext codec has no ring"
        );
    }

    #[test]
    fn a_replaced_ring_seals_with_its_active_key_and_opens_what_its_keys_sealed() {
        let id = SessionId::new(b"i").unwrap();
        let s = StoredSession::from_millis(vec![7; 20], 99);
        let codec = Codec::sealed(KeyRing::new(1, [1; 32]));
        let under_1 = codec.encode(&id, &s).unwrap();
        assert!(codec.replace_ring(KeyRing::new(1, [1; 32]).rotate(2, [2; 32]).unwrap()));
        let under_2 = codec.encode(&id, &s).unwrap();
        assert_eq!(envelope_key_id(&under_2), Some(2));
        assert_eq!(
            codec.decode(&id, &under_1).unwrap(),
            s,
            "key 1 is still in the ring"
        );
        assert!(codec.replace_ring(KeyRing::new(2, [2; 32])));
        assert!(codec.decode(&id, &under_1).is_err(), "key 1 left the ring");
        assert!(codec.is_foreign(&under_1));
        assert_eq!(codec.decode(&id, &under_2).unwrap(), s);
    }
}
