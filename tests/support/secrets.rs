//! Looking for secrets in text: log output, `Debug` output, error messages.
//!
//! A secret shows if any 8 bytes of it in a row appear in any formatting a log line or a
//! `Debug` impl could give them: raw, lowercase or uppercase hex, or a `Debug` list of bytes
//! (`{:?}`, `{:x?}`, `{:X?}`, `{:02x?}`). Eight bytes of a random key do not appear by chance.

/// A named secret to look for.
#[derive(Clone)]
pub struct Secret {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl Secret {
    pub fn new(name: impl Into<String>, bytes: &[u8]) -> Self {
        assert!(
            bytes.len() >= 8,
            "a secret of fewer than 8 bytes cannot be looked for"
        );
        Self {
            name: name.into(),
            bytes: bytes.to_vec(),
        }
    }
}

/// The inside of a `Debug` list (`[a, b, c]` without its brackets), so a window matches
/// inside a longer list.
fn inner(list: String) -> String {
    list[1..list.len() - 1].to_owned()
}

/// Every textual form in which `window` could be written out.
fn forms(window: &[u8]) -> [String; 6] {
    [
        hex::encode(window),
        hex::encode_upper(window),
        inner(format!("{window:?}")),
        inner(format!("{window:x?}")),
        inner(format!("{window:X?}")),
        inner(format!("{window:02x?}")),
    ]
}

/// The secrets of `secrets` that show in `text`, by name.
pub fn shown_in(text: &[u8], secrets: &[Secret]) -> Vec<String> {
    // Raw: every 8-byte window of the text against every window of the secrets.
    let raw: std::collections::HashMap<&[u8], &str> = secrets
        .iter()
        .flat_map(|s| s.bytes.windows(8).map(move |w| (w, s.name.as_str())))
        .collect();
    let mut shown: Vec<String> = text
        .windows(8)
        .filter_map(|w| raw.get(w).map(|n| (*n).to_owned()))
        .collect();
    // Written out: std's substring search (optimised even in a debug build).
    let text = String::from_utf8_lossy(text);
    for s in secrets {
        if s.bytes
            .windows(8)
            .any(|w| forms(w).iter().any(|f| text.contains(f.as_str())))
        {
            shown.push(s.name.clone());
        }
    }
    shown.sort();
    shown.dedup();
    shown
}

/// Fails if any of `secrets` shows in `text`, naming where (`what`) and which.
pub fn assert_none_shown(what: &str, text: &[u8], secrets: &[Secret]) {
    let shown = shown_in(text, secrets);
    assert!(
        shown.is_empty(),
        "{what} shows {shown:?}:\n{}",
        String::from_utf8_lossy(text)
    );
}
