//! The query string of a queue URL (§3 of the protocol): control
//! parameters are `_name_`, every other key is a tag (on a put) or a tag
//! filter (on reads and watches). Form-decoded, with bounds on what a
//! request may carry into the replicated log. Pure: no I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use super::param;
use crate::queue::Tags;

/// A query parameter the protocol does not accept: answered 400 with this
/// text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// Longest long poll a get may ask for.
pub const MAX_POLL: Duration = Duration::from_secs(300);

/// Bounds on what a request may write into the replicated log besides its
/// payload: every tag, identity header and request id lands on every
/// replica, so none may be large.
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_KEY_BYTES: usize = 128;
pub const MAX_TAG_VALUE_BYTES: usize = 1024;
pub const MAX_CONTROL_VALUE_BYTES: usize = 4096;

/// A queue URL's query string, split into control parameters (`_name_`)
/// and tags (every other key); form-decoded and bounded.
pub struct Query {
    control: BTreeMap<String, String>,
    pub tags: Tags,
}

/// The rules of a query's tags for tags that came another way (a batch of
/// completes carries each item's tags in its body): a key that is empty or
/// starts with `_` (a control parameter's form) is refused here rather than
/// dropped, since no query string was there to hold it.
pub fn check_tags(tags: &Tags) -> Result<(), QueryError> {
    check_tag_count(tags)?;
    for (k, v) in tags {
        // The length first: a key quoted in the error is a bounded one.
        check_tag_size(k, v)?;
        if k.is_empty() || k.starts_with('_') {
            return Err(QueryError(format!(
                "tag {k:?}: a tag key is not empty and does not start with _"
            )));
        }
    }
    Ok(())
}

fn check_tag_size(key: &str, value: &str) -> Result<(), QueryError> {
    if key.len() > MAX_TAG_KEY_BYTES || value.len() > MAX_TAG_VALUE_BYTES {
        return Err(QueryError(format!(
            "tag keys are at most {MAX_TAG_KEY_BYTES} bytes and values at most \
             {MAX_TAG_VALUE_BYTES}"
        )));
    }
    Ok(())
}

fn check_tag_count(tags: &Tags) -> Result<(), QueryError> {
    if tags.len() > MAX_TAGS {
        return Err(QueryError(format!("at most {MAX_TAGS} tags per request")));
    }
    Ok(())
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Self, QueryError> {
        let mut control = BTreeMap::new();
        let mut tags = Tags::new();
        for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            if k.len() >= 2 && k.starts_with('_') && k.ends_with('_') {
                if v.len() > MAX_CONTROL_VALUE_BYTES {
                    return Err(QueryError(format!(
                        "{k}: value longer than {MAX_CONTROL_VALUE_BYTES} bytes"
                    )));
                }
                control.insert(k.into_owned(), v.into_owned());
            } else if !k.is_empty() && !k.starts_with('_') {
                check_tag_size(&k, &v)?;
                tags.insert(k.into_owned(), v.into_owned());
                check_tag_count(&tags)?;
            }
        }
        Ok(Self { control, tags })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.control.get(key).map(String::as_str)
    }

    pub fn flag(&self, key: &str) -> Result<bool, QueryError> {
        match self.get(key) {
            None | Some("") => Ok(false),
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => Ok(false),
            Some(v) => Err(QueryError(format!(
                "{key}: expected true or false, got {v:?}"
            ))),
        }
    }

    pub fn flag_or(&self, key: &str, default: bool) -> Result<bool, QueryError> {
        if self.get(key).is_none() {
            Ok(default)
        } else {
            self.flag(key)
        }
    }

    pub fn u64_or(&self, key: &str, default: u64) -> Result<u64, QueryError> {
        match self.get(key) {
            None | Some("") => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| {
                QueryError(format!("{key}: expected a non-negative integer, got {v:?}"))
            }),
        }
    }

    /// `_index_`: `None` for -1 (the newest), else the start index.
    pub fn start_index(&self) -> Result<Option<u64>, QueryError> {
        match self.get(param::INDEX).map(str::trim) {
            None | Some("") => Ok(Some(0)),
            Some("-1") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| QueryError(format!("_index_: expected an index or -1, got {v:?}"))),
        }
    }

    pub fn indexes(&self) -> Result<Vec<u64>, QueryError> {
        let raw = self
            .get(param::INDEXES)
            .ok_or_else(|| QueryError("_indexes_ is required".into()))?;
        parse_index_list(raw)
    }

    pub fn timeout(&self) -> Result<Duration, QueryError> {
        match self.get(param::TIMEOUT) {
            None | Some("") => Ok(Duration::ZERO),
            Some(v) => parse_duration(v).map(|d| d.min(MAX_POLL)).ok_or_else(|| {
                QueryError(format!(
                    "_timeout_: expected a duration like 5s or 500ms, got {v:?}"
                ))
            }),
        }
    }
}

pub fn parse_index_list(raw: &str) -> Result<Vec<u64>, QueryError> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| QueryError(format!("bad index {s:?} in _indexes_")))
        })
        .collect()
}

/// Go duration syntax (`1m30s`, `500ms`, `0s`, `1.5h`) or a bare number of
/// seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_len..];
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(1e9)))
}

/// A priority as the SDKs send it: an integer, where zero and below mean
/// the normal priority (0); empty is 0.
pub fn parse_priority(raw: &str) -> Result<u32, QueryError> {
    match raw.trim() {
        "" => Ok(0),
        v => match v.parse::<i64>() {
            Ok(p) if p <= 0 => Ok(0),
            Ok(p) => Ok(p.min(u32::MAX as i64) as u32),
            Err(_) => Err(QueryError(format!(
                "priority: expected an integer, got {v:?}"
            ))),
        },
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_sdk_format() {
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m0s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn control_params_and_tags_are_split() {
        let q = Query::parse(Some("_index_=3&foo=bar+baz&_unknown_=1&requestId=abc")).unwrap();
        assert_eq!(q.get("_index_"), Some("3"));
        assert_eq!(q.tags.get("foo").map(String::as_str), Some("bar baz"));
        assert_eq!(q.tags.len(), 2);
        assert!(
            Query::parse(Some("_index_=x"))
                .unwrap()
                .start_index()
                .is_err()
        );
        assert_eq!(
            Query::parse(Some("_index_=-1"))
                .unwrap()
                .start_index()
                .unwrap(),
            None
        );
        assert!(parse_index_list("1,2,x").is_err());
        assert_eq!(parse_index_list("1, 2,").unwrap(), vec![1, 2]);
    }

    mod fuzz {
        //! The query parser on arbitrary query strings (bounded case
        //! counts): it never panics, and whatever it accepts respects the
        //! documented bounds.
        use proptest::prelude::*;

        use super::super::*;

        fn query_text() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                Just("_index_=".to_string()),
                Just("_length_=".to_string()),
                Just("_timeout_=".to_string()),
                Just("_window_=".to_string()),
                Just("_auto_delete_=".to_string()),
                Just("_raw_=".to_string()),
                Just("_trim_=".to_string()),
                Just("requestId=".to_string()),
                Just("&".to_string()),
                Just("=".to_string()),
                Just("%".to_string()),
                Just("%FF".to_string()),
                Just("+".to_string()),
                "[0-9]{1,25}",
                "[a-z_]{1,8}",
                "[0-9]+(ms|s|m|h|us|ns)?",
                any::<String>(),
            ];
            proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

            #[test]
            fn query_parsing_never_panics_and_respects_bounds(raw in query_text()) {
                if let Ok(q) = Query::parse(Some(&raw)) {
                    prop_assert!(q.tags.len() <= MAX_TAGS);
                    for (k, v) in &q.tags {
                        prop_assert!(k.len() <= MAX_TAG_KEY_BYTES && v.len() <= MAX_TAG_VALUE_BYTES);
                    }
                    for key in ["_raw_", "_auto_delete_", "_watch_", "_auto_commit_"] {
                        let _ = q.flag(key);
                        let _ = q.flag_or(key, true);
                    }
                    let _ = q.u64_or("_length_", 1);
                    let _ = q.u64_or("_window_", 1);
                    let _ = q.start_index();
                    let _ = q.indexes();
                    if let Ok(t) = q.timeout() {
                        prop_assert!(t <= MAX_POLL);
                    }
                    let _ = q.get(param::PRIORITY).map(parse_priority);
                }
                let _ = parse_index_list(&raw);
                let _ = parse_duration(&raw);
            }

        }
    }
}
