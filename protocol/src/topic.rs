//! Topic names and topic filters (MQTT 5.0 §4.7, 3.1.1 §4.7), validated on construction.
//!
//! A [`TopicName`] or [`TopicFilter`] that exists is valid: constructors and the decoder are
//! the only ways to make one. Both hold a [`ByteString`], so a name decoded from a packet
//! shares the packet's buffer instead of being copied.

use bytestring::ByteString;

/// The longest string MQTT can carry: a two-byte length prefix.
pub const MAX_TOPIC_BYTES: usize = u16::MAX as usize;

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {len} bytes, over the limit of 65535")]
    TooLong { len: usize },
    #[error("topic contains U+0000")]
    NullCharacter,
    #[error("topic name {name:?} contains a wildcard ('+' or '#')")]
    WildcardInName { name: String },
    #[error("topic filter {filter:?} has a misplaced wildcard ('#' must be last and alone in its level, '+' alone in its level)")]
    MisplacedWildcard { filter: String },
    #[error("shared subscription {filter:?} has an empty or invalid share name")]
    InvalidShareName { filter: String },
    #[error("shared subscription {filter:?} has no topic filter after the share name")]
    EmptySharedFilter { filter: String },
    #[error("{filter:?} is a shared subscription, which a route cannot be")]
    SharedRoute { filter: String },
}

/// A topic name that a PUBLISH is sent to: no wildcards, no U+0000, at most 65535 bytes.
///
/// It is never empty, with one exception: a v5 PUBLISH that carries a Topic Alias may send
/// an empty name, and the decoder hands that over as [`TopicName::alias_only`] for the
/// session to resolve.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(ByteString);

impl TopicName {
    /// Validates `name` as a topic name.
    pub fn new(name: impl Into<ByteString>) -> Result<Self, TopicError> {
        let name = name.into();
        if name.is_empty() {
            return Err(TopicError::Empty);
        }
        Self::check(&name)?;
        Ok(Self(name))
    }

    /// The empty name of a PUBLISH that relies on its Topic Alias.
    pub fn alias_only() -> Self {
        Self(ByteString::new())
    }

    /// Validates everything but emptiness: the decoder decides whether empty is allowed.
    pub(crate) fn check(name: &str) -> Result<(), TopicError> {
        if name.len() > MAX_TOPIC_BYTES {
            return Err(TopicError::TooLong { len: name.len() });
        }
        match memchr::memchr3(b'+', b'#', 0, name.as_bytes()) {
            None => Ok(()),
            Some(i) if name.as_bytes()[i] == 0 => Err(TopicError::NullCharacter),
            Some(_) => Err(TopicError::WildcardInName {
                name: name.to_owned(),
            }),
        }
    }

    /// Wraps a string the caller has already checked with [`TopicName::check`].
    pub(crate) fn from_checked(name: ByteString) -> Self {
        Self(name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a cheaply clonable string sharing the original buffer.
    pub fn as_bytestring(&self) -> &ByteString {
        &self.0
    }

    /// True only for the alias-only name of a v5 PUBLISH.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Topics starting with `$` (such as `$SYS/...`) are not matched by a filter that starts
    /// with a wildcard (MQTT-4.7.2-1).
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl std::fmt::Debug for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for TopicName {
    type Error = TopicError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

/// A topic filter of a subscription, possibly shared (`$share/{group}/{filter}`).
///
/// `+` stands alone in a level and matches one level; `#` stands alone in the last level and
/// matches that level's parent and everything below it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter {
    /// The filter exactly as subscribed, `$share/` prefix included.
    full: ByteString,
    /// For a shared subscription, the length of the share name (it starts at byte 7).
    share_name_len: Option<usize>,
}

const SHARE_PREFIX: &str = "$share/";

impl TopicFilter {
    /// Validates `filter` as a topic filter and recognises a shared subscription.
    pub fn new(filter: impl Into<ByteString>) -> Result<Self, TopicError> {
        let full = filter.into();
        if full.is_empty() {
            return Err(TopicError::Empty);
        }
        if full.len() > MAX_TOPIC_BYTES {
            return Err(TopicError::TooLong { len: full.len() });
        }
        if memchr::memchr(0, full.as_bytes()).is_some() {
            return Err(TopicError::NullCharacter);
        }
        let share_name_len = match full.strip_prefix(SHARE_PREFIX) {
            None => {
                check_filter_levels(&full)?;
                None
            }
            Some(rest) => {
                let Some(slash) = rest.find('/') else {
                    return Err(TopicError::EmptySharedFilter {
                        filter: full.to_string(),
                    });
                };
                let name = &rest[..slash];
                if name.is_empty() || name.contains(['+', '#']) {
                    return Err(TopicError::InvalidShareName {
                        filter: full.to_string(),
                    });
                }
                let inner = &rest[slash + 1..];
                if inner.is_empty() {
                    return Err(TopicError::EmptySharedFilter {
                        filter: full.to_string(),
                    });
                }
                check_filter_levels(inner).map_err(|_| TopicError::MisplacedWildcard {
                    filter: full.to_string(),
                })?;
                Some(slash)
            }
        };
        Ok(Self {
            full,
            share_name_len,
        })
    }

    /// Validates `filter` as the filter of a route: the cloud's `[[route]]` (MQTT topic →
    /// stream) and the edge's `[[uplink.route]]` (what goes up to the cloud). A route takes
    /// every message that matches, so it is a valid topic filter and never a shared
    /// subscription ([`TopicError::SharedRoute`]).
    pub fn new_route(filter: impl Into<ByteString>) -> Result<Self, TopicError> {
        let filter = Self::new(filter)?;
        if filter.is_shared() {
            return Err(TopicError::SharedRoute {
                filter: filter.full.to_string(),
            });
        }
        Ok(filter)
    }

    /// The filter as subscribed, with any `$share/{group}/` prefix.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The share name of a shared subscription.
    pub fn share_name(&self) -> Option<&str> {
        self.share_name_len
            .map(|len| &self.full[SHARE_PREFIX.len()..SHARE_PREFIX.len() + len])
    }

    /// The part that is matched against topic names (without the `$share/{group}/` prefix).
    pub fn filter(&self) -> &str {
        match self.share_name_len {
            None => &self.full,
            Some(len) => &self.full[SHARE_PREFIX.len() + len + 1..],
        }
    }

    pub fn is_shared(&self) -> bool {
        self.share_name_len.is_some()
    }

    /// True if the filter contains `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.filter().contains(['+', '#'])
    }

    /// Whether a message published to `topic` matches this filter (MQTT 5.0 §4.7).
    pub fn matches(&self, topic: &TopicName) -> bool {
        matches(self.filter(), topic.as_str())
    }
}

impl std::fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for TopicFilter {
    type Error = TopicError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

/// Matches a (non-shared) filter string against a topic name string.
///
/// Both are assumed valid; a topic starting with `$` is not matched by a filter whose first
/// level is a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn check_filter_levels(filter: &str) -> Result<(), TopicError> {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let ok = match level {
            "#" => levels.peek().is_none(),
            "+" => true,
            other => !other.contains(['+', '#']),
        };
        if !ok {
            return Err(TopicError::MisplacedWildcard {
                filter: filter.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TopicName {
        TopicName::new(s).expect("valid test topic")
    }

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::new(s).expect("valid test filter")
    }

    #[test]
    fn a_route_filter_is_a_valid_filter_that_is_not_shared() {
        let route = TopicFilter::new_route("sensors/+/temp").expect("a route");
        assert_eq!(route, filter("sensors/+/temp"));
        assert!(TopicFilter::new_route("#").is_ok());
        assert_eq!(
            TopicFilter::new_route("$share/g/sensors/#"),
            Err(TopicError::SharedRoute {
                filter: "$share/g/sensors/#".into()
            })
        );
        assert!(matches!(
            TopicFilter::new_route("a/#/b"),
            Err(TopicError::MisplacedWildcard { .. })
        ));
        assert_eq!(TopicFilter::new_route(""), Err(TopicError::Empty));
        // A shared filter that is itself invalid says what is wrong with it first.
        assert!(matches!(
            TopicFilter::new_route("$share//a"),
            Err(TopicError::InvalidShareName { .. })
        ));
    }

    #[test]
    fn names_refuse_wildcards_nul_and_empty() {
        assert_eq!(TopicName::new(""), Err(TopicError::Empty));
        assert!(matches!(
            TopicName::new("a/+/b"),
            Err(TopicError::WildcardInName { .. })
        ));
        assert!(matches!(
            TopicName::new("a/#"),
            Err(TopicError::WildcardInName { .. })
        ));
        assert_eq!(TopicName::new("a\0b"), Err(TopicError::NullCharacter));
        let long = "x".repeat(MAX_TOPIC_BYTES + 1);
        assert_eq!(
            TopicName::new(long.as_str()),
            Err(TopicError::TooLong { len: 65536 })
        );
        assert!(TopicName::new("/").is_ok());
        assert!(TopicName::new("sensors/temp ℃").is_ok());
    }

    #[test]
    fn filters_place_wildcards_by_the_spec() {
        for ok in [
            "#", "+", "+/+", "a/#", "a/+/b", "/+", "+/", "$SYS/#", "a//b",
        ] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok} should be valid");
        }
        for bad in ["a#", "a/#/b", "#/a", "a+", "a/b+/c", "++", "##"] {
            assert!(
                matches!(
                    TopicFilter::new(bad),
                    Err(TopicError::MisplacedWildcard { .. })
                ),
                "{bad} should be refused"
            );
        }
        assert_eq!(TopicFilter::new(""), Err(TopicError::Empty));
    }

    #[test]
    fn shared_subscriptions_are_parsed() {
        let f = filter("$share/workers/sensors/+/temp");
        assert!(f.is_shared());
        assert_eq!(f.share_name(), Some("workers"));
        assert_eq!(f.filter(), "sensors/+/temp");
        assert!(f.matches(&name("sensors/1/temp")));

        assert!(matches!(
            TopicFilter::new("$share/workers"),
            Err(TopicError::EmptySharedFilter { .. })
        ));
        assert!(matches!(
            TopicFilter::new("$share/workers/"),
            Err(TopicError::EmptySharedFilter { .. })
        ));
        assert!(matches!(
            TopicFilter::new("$share//a"),
            Err(TopicError::InvalidShareName { .. })
        ));
        assert!(matches!(
            TopicFilter::new("$share/a+b/x"),
            Err(TopicError::InvalidShareName { .. })
        ));
        assert!(matches!(
            TopicFilter::new("$share/g/a#"),
            Err(TopicError::MisplacedWildcard { .. })
        ));
        // Not a shared subscription: the prefix must be exactly `$share/`.
        assert!(!filter("$shared/g/a").is_shared());
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        let cases = [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/#", "sport", true),
            ("#", "anything/at/all", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            // $-topics are not matched by a leading wildcard, but are by an explicit level.
            ("#", "$SYS/broker/uptime", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/monitor/Clients", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
        ];
        for (f, t, expected) in cases {
            assert_eq!(filter(f).matches(&name(t)), expected, "{f} vs {t}");
        }
    }
}
