//! The EAS protocol's request headers: the consumer identity and the
//! priority header (the query string is `protocol::Query`).

use axum::http::HeaderMap;

use super::ApiError;
use crate::protocol::parse_priority;
use crate::protocol::{HEADER_GROUP, HEADER_PRIORITY, HEADER_USER};

/// Consumer group and user ids (the SDK's identity headers).
pub const MAX_IDENTITY_BYTES: usize = 128;

/// Consumer identity from the SDK headers: (group, user), each at most
/// [`MAX_IDENTITY_BYTES`] of visible ASCII.
pub fn identity(headers: &HeaderMap) -> Result<(String, Option<String>), ApiError> {
    let get = |name: &str| -> Result<Option<String>, ApiError> {
        let Some(v) = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
        else {
            return Ok(None);
        };
        if v.len() > MAX_IDENTITY_BYTES || !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::BadRequest(format!(
                "{name}: at most {MAX_IDENTITY_BYTES} visible ASCII characters"
            )));
        }
        Ok(Some(v.to_string()))
    };
    Ok((
        get(HEADER_GROUP)?.unwrap_or_else(|| crate::protocol::DEFAULT_GROUP.to_string()),
        get(HEADER_USER)?,
    ))
}

/// A put's priority: the one its query gave (`_priority_`), else the
/// priority header's, else 0.
pub fn priority(from_query: Option<u32>, headers: &HeaderMap) -> Result<u32, ApiError> {
    if let Some(p) = from_query {
        return Ok(p);
    }
    match headers.get(HEADER_PRIORITY).and_then(|v| v.to_str().ok()) {
        Some(raw) => Ok(parse_priority(raw)?),
        None => Ok(0),
    }
}
#[cfg(test)]
mod tests {
    mod fuzz {
        //! The header parser on arbitrary header values (bounded case
        //! counts): whatever it accepts respects the documented bounds.
        use axum::http::HeaderMap;
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

            #[test]
            fn identity_headers_are_bounded_or_refused(
                gid in proptest::collection::vec(any::<u8>(), 0..300),
                uid in proptest::collection::vec(any::<u8>(), 0..300),
            ) {
                let mut headers = HeaderMap::new();
                for (name, value) in [
                    ("x-eas-queueservice-redis-gid", &gid),
                    ("x-eas-queueservice-redis-uid", &uid),
                ] {
                    if let Ok(v) = axum::http::HeaderValue::from_bytes(value) {
                        headers.insert(name, v);
                    }
                }
                if let Ok((group, user)) = identity(&headers) {
                    prop_assert!(!group.is_empty() && group.len() <= MAX_IDENTITY_BYTES);
                    prop_assert!(user.is_none_or(|u| u.len() <= MAX_IDENTITY_BYTES));
                }
            }
        }
    }
}
