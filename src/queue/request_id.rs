//! A request id as a stored item holds it: nodes assign UUIDs in their
//! canonical text form (36 characters, lowercase, hyphenated), and those
//! are kept as their 16 bytes, without an allocation; any other id is kept
//! as text. Either way it reads back as exactly the text it was given.

use std::fmt;
use std::ops::Deref;

use uuid::Uuid;

/// Length of a UUID in its canonical text form.
const UUID_TEXT_LEN: usize = 36;

#[derive(Clone, PartialEq, Eq)]
pub struct RequestId(Repr);

#[derive(Clone, PartialEq, Eq)]
enum Repr {
    /// A UUID whose canonical lowercase text is the id.
    Uuid([u8; 16]),
    Text(Box<str>),
}

impl RequestId {
    /// The id's text, borrowed or rendered on the stack.
    pub fn text(&self) -> RequestIdText<'_> {
        match &self.0 {
            Repr::Text(text) => RequestIdText::Borrowed(text),
            Repr::Uuid(bytes) => {
                let mut buf = [0u8; UUID_TEXT_LEN];
                Uuid::from_bytes(*bytes).hyphenated().encode_lower(&mut buf);
                RequestIdText::Rendered(buf)
            }
        }
    }
}

impl RequestId {
    /// Bytes the id holds on the heap (none for a UUID).
    pub fn heap_bytes(&self) -> usize {
        match &self.0 {
            Repr::Uuid(_) => 0,
            Repr::Text(text) => text.len(),
        }
    }
}

impl From<String> for RequestId {
    fn from(text: String) -> Self {
        if text.len() == UUID_TEXT_LEN
            && let Ok(uuid) = Uuid::try_parse(&text)
        {
            let mut buf = [0u8; UUID_TEXT_LEN];
            // Only the canonical form: an uppercase or otherwise spelled id
            // must read back as it was given.
            if uuid.hyphenated().encode_lower(&mut buf).as_bytes() == text.as_bytes() {
                return Self(Repr::Uuid(uuid.into_bytes()));
            }
        }
        Self(Repr::Text(text.into_boxed_str()))
    }
}

impl PartialEq<str> for RequestId {
    fn eq(&self, other: &str) -> bool {
        *self.text() == *other
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text(), f)
    }
}

/// A request id's text: see [`RequestId::text`].
pub enum RequestIdText<'a> {
    Borrowed(&'a str),
    Rendered([u8; UUID_TEXT_LEN]),
}

impl Deref for RequestIdText<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Self::Borrowed(text) => text,
            // Rendered by `encode_lower`: ASCII hex digits and hyphens.
            Self::Rendered(buf) => std::str::from_utf8(buf).expect("a rendered UUID is ASCII"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_read_back_as_given_and_canonical_uuids_take_no_allocation() {
        let uuid = Uuid::new_v4().to_string();
        for text in [
            uuid.clone(),
            uuid.to_uppercase(),
            uuid.replace('-', ""),
            format!("{{{uuid}}}"),
            "client-1".to_string(),
            "x".repeat(128),
        ] {
            let id = RequestId::from(text.clone());
            assert_eq!(&*id.text(), text);
            assert_eq!(id.to_string(), text);
            assert!(id == *text.as_str());
            assert_eq!(format!("{id:?}"), format!("{text:?}"));
        }
        assert!(matches!(RequestId::from(uuid.clone()).0, Repr::Uuid(_)));
        assert!(matches!(
            RequestId::from(uuid.to_uppercase()).0,
            Repr::Text(_)
        ));
        assert_ne!(
            RequestId::from(uuid.clone()),
            RequestId::from(uuid.to_uppercase())
        );
    }
}
