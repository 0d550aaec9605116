//! Topic names and topic filters (spec 4.7): validation, matching with `+`
//! and `#`, `$`-topics, and shared subscriptions (`$share/<group>/<filter>`,
//! spec 4.8.2).
//!
//! [`matches`] is the reference matcher: it walks one filter against one
//! topic. The subscription index ([`super::trie`]) must agree with it.

use thiserror::Error;

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TopicError {
    #[error("empty topic")]
    Empty,
    #[error("topic longer than 65,535 bytes")]
    TooLong,
    #[error("topic is not valid UTF-8 or contains U+0000")]
    Encoding,
    #[error("wildcard in a topic name")]
    Wildcard,
    #[error("'#' not alone in the last level")]
    MultiLevel,
    #[error("'+' not alone in its level")]
    SingleLevel,
    #[error("shared subscription without a valid share name and filter")]
    Share,
}

fn check_encoding(t: &[u8]) -> Result<(), TopicError> {
    if t.is_empty() {
        return Err(TopicError::Empty);
    }
    if t.len() > u16::MAX as usize {
        return Err(TopicError::TooLong);
    }
    if std::str::from_utf8(t).is_err() || t.contains(&0) {
        return Err(TopicError::Encoding);
    }
    Ok(())
}

/// A topic name a message is published to: non-empty, no wildcards.
pub fn validate_topic_name(t: &[u8]) -> Result<(), TopicError> {
    check_encoding(t)?;
    if t.iter().any(|&b| b == b'+' || b == b'#') {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

/// A topic filter (not shared): `#` only as the whole last level, `+` only
/// as a whole level.
pub fn validate_topic_filter(f: &[u8]) -> Result<(), TopicError> {
    check_encoding(f)?;
    let mut levels = f.split(|&b| b == b'/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains(&b'#') && (level.len() != 1 || !last) {
            return Err(TopicError::MultiLevel);
        }
        if level.contains(&b'+') && level.len() != 1 {
            return Err(TopicError::SingleLevel);
        }
    }
    Ok(())
}

/// A subscription filter as sent, split into its share group (if any) and
/// the filter that is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterRef<'a> {
    /// The share name of `$share/<group>/<filter>`.
    pub group: Option<&'a [u8]>,
    /// The filter topics are matched against.
    pub filter: &'a [u8],
}

/// Splits and checks a subscription filter: `$share/<group>/<filter>`
/// gives the group (non-empty, no `/`, `+` or `#`) and a valid filter; any
/// other filter is checked as is.
pub fn parse_filter(f: &[u8]) -> Result<FilterRef<'_>, TopicError> {
    if let Some(rest) = f.strip_prefix(b"$share/") {
        let Some(slash) = rest.iter().position(|&b| b == b'/') else {
            return Err(TopicError::Share);
        };
        let (group, filter) = (&rest[..slash], &rest[slash + 1..]);
        if group.is_empty() || group.iter().any(|&b| b == b'+' || b == b'#') {
            return Err(TopicError::Share);
        }
        check_encoding(f)?;
        validate_topic_filter(filter).map_err(|e| match e {
            TopicError::Empty => TopicError::Share,
            e => e,
        })?;
        return Ok(FilterRef {
            group: Some(group),
            filter,
        });
    }
    validate_topic_filter(f)?;
    Ok(FilterRef {
        group: None,
        filter: f,
    })
}

/// Whether the filter has a wildcard.
pub fn has_wildcard(filter: &[u8]) -> bool {
    filter.iter().any(|&b| b == b'+' || b == b'#')
}

/// Whether `filter` (valid, not shared) matches the topic name `topic`.
/// A topic starting with `$` is not matched by a filter starting with a
/// wildcard (spec 4.7.2).
pub fn matches(filter: &[u8], topic: &[u8]) -> bool {
    if topic.first() == Some(&b'$') && matches!(filter.first(), Some(b'+' | b'#')) {
        return false;
    }
    let mut f = filter.split(|&b| b == b'/');
    let mut t = topic.split(|&b| b == b'/');
    loop {
        match (f.next(), t.next()) {
            (Some(b"#"), _) => return true,
            (Some(b"+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(validate_topic_name(b"a/b/c").is_ok());
        assert!(validate_topic_name(b"/").is_ok());
        assert!(validate_topic_name(b"$SYS/x").is_ok());
        assert_eq!(validate_topic_name(b""), Err(TopicError::Empty));
        assert_eq!(validate_topic_name(b"a/+"), Err(TopicError::Wildcard));
        assert_eq!(validate_topic_name(b"a#"), Err(TopicError::Wildcard));
        assert_eq!(validate_topic_name(b"a\0"), Err(TopicError::Encoding));
        assert_eq!(validate_topic_name(&[0xff]), Err(TopicError::Encoding));
        assert_eq!(
            validate_topic_name(&vec![b'a'; 65_536]),
            Err(TopicError::TooLong)
        );
    }

    #[test]
    fn topic_filters() {
        for ok in [
            &b"#"[..],
            b"+",
            b"a/#",
            b"a/+/b",
            b"+/+",
            b"/+",
            b"a//b",
            b"$SYS/#",
        ] {
            assert!(validate_topic_filter(ok).is_ok(), "{ok:?}");
        }
        assert_eq!(validate_topic_filter(b"a/#/b"), Err(TopicError::MultiLevel));
        assert_eq!(validate_topic_filter(b"a#"), Err(TopicError::MultiLevel));
        assert_eq!(validate_topic_filter(b"a/b#"), Err(TopicError::MultiLevel));
        assert_eq!(validate_topic_filter(b"a+/b"), Err(TopicError::SingleLevel));
        assert_eq!(validate_topic_filter(b""), Err(TopicError::Empty));
    }

    #[test]
    fn shared_filters() {
        assert_eq!(
            parse_filter(b"$share/g1/a/+"),
            Ok(FilterRef {
                group: Some(b"g1"),
                filter: b"a/+"
            })
        );
        assert_eq!(
            parse_filter(b"$share/g/#"),
            Ok(FilterRef {
                group: Some(b"g"),
                filter: b"#"
            })
        );
        assert_eq!(parse_filter(b"$share/g"), Err(TopicError::Share));
        assert_eq!(parse_filter(b"$share//a"), Err(TopicError::Share));
        assert_eq!(parse_filter(b"$share/g/"), Err(TopicError::Share));
        assert_eq!(parse_filter(b"$share/g+/a"), Err(TopicError::Share));
        assert_eq!(parse_filter(b"$share/g/a#"), Err(TopicError::MultiLevel));
        assert_eq!(
            parse_filter(b"$shared/g/a"),
            Ok(FilterRef {
                group: None,
                filter: b"$shared/g/a"
            })
        );
    }

    #[test]
    fn matching() {
        let yes: &[(&[u8], &[u8])] = &[
            (b"a/b", b"a/b"),
            (b"a/+", b"a/b"),
            (b"a/#", b"a/b/c"),
            (b"a/#", b"a"),
            (b"#", b"a/b"),
            (b"+/+", b"/a"),
            (b"+", b""),
            (b"a/+/c", b"a//c"),
            (b"$SYS/#", b"$SYS/x"),
            (b"$SYS/+", b"$SYS/x"),
            (b"a/b/#", b"a/b/"),
        ];
        for (f, t) in yes {
            assert!(matches(f, t), "{f:?} {t:?}");
        }
        let no: &[(&[u8], &[u8])] = &[
            (b"a/b", b"a/c"),
            (b"a/+", b"a/b/c"),
            (b"a/+", b"a"),
            (b"+", b"/a"),
            (b"#", b"$SYS/x"),
            (b"+/x", b"$SYS/x"),
            (b"a/b", b"a/b/c"),
            (b"a/b/c", b"a/b"),
        ];
        for (f, t) in no {
            assert!(!matches(f, t), "{f:?} {t:?}");
        }
    }
}
