//! Identifier newtypes. Ids are never bare strings in an API.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest worker or task id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is {len} bytes long; at most {MAX_ID_LEN} are allowed")]
    TooLong { len: usize },
    #[error("id contains {ch:?}; allowed are ASCII letters, digits and . _ ~ - : @ +")]
    BadChar { ch: char },
    /// `.` and `..` are path segments that URL parsers remove, so such an id never reaches
    /// the coordinator (found by the fuzz tests).
    #[error("id {0:?} is a dot segment, which URLs remove")]
    DotSegment(String),
}

/// The characters an id may hold: the URL-unreserved set plus `:`, `@` and `+`.
/// Anything else (spaces, `/`, `%`, braces, non-ASCII) is refused on both ends.
pub const fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-' | ':' | '@' | '+')
}

fn validate(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { len: s.len() });
    }
    if s == "." || s == ".." {
        return Err(IdError::DotSegment(s.to_owned()));
    }
    // Bytewise: every allowed character is ASCII, so the first byte outside the set starts
    // the character to report.
    match s.bytes().position(|b| !ID_BYTES[usize::from(b)]) {
        Some(i) => Err(IdError::BadChar {
            ch: s[i..].chars().next().unwrap_or(char::REPLACEMENT_CHARACTER),
        }),
        None => Ok(()),
    }
}

/// [`is_id_char`] as a table over bytes.
static ID_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 128 {
        t[b] = is_id_char(b as u8 as char);
        b += 1;
    }
    t
};

/// Reads an id's text from the decoder, borrowed straight from the frame when it has no
/// escapes, and checks it: the shared text is the one allocation.
struct IdVisitor;

impl serde::de::Visitor<'_> for IdVisitor {
    type Value = std::sync::Arc<str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an id string")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
        validate(s).map_err(E::custom)?;
        Ok(s.into())
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Shared text: a copy is a reference count, not an allocation, and two copies of one
        /// id compare equal by address before their text is read.
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// Validates `s` against the id rules.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                validate(s)?;
                Ok(Self(s.into()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(IdVisitor).map(Self)
            }
        }
    };
}

string_id!(
    /// A worker's identity, chosen by its operator and stable across restarts.
    WorkerId
);
string_id!(
    /// A task's identity, assigned by the coordinator at submission (or given by the submitter).
    TaskId
);
string_id!(
    /// A checkpoint's identity, created by the worker that wrote it.
    CheckpointId
);

impl TaskId {
    /// A fresh task id (`t-` and 32 hex digits): a UUIDv7, so ids a coordinator assigns sort
    /// by time. The store's indexes on task ids then grow at their end instead of dirtying a
    /// random page per task; random ids cost about a quarter of the coordinator's CPU per task.
    pub fn fresh() -> Self {
        Self(format!("t-{}", uuid::Uuid::now_v7().simple()).into())
    }
}

impl CheckpointId {
    /// A fresh random checkpoint id (`c-` and 32 hex digits).
    pub fn random() -> Self {
        Self(format!("c-{}", random_hex()).into())
    }
}

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The attempt number of a task: 1 for the first lease, +1 each time the task is leased again.
/// A task submitted under the id of one removed by retention numbers its attempts after that
/// one's (its first lease may be attempt 4), so `(task_id, attempt)` names one lease for ever.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Attempt(pub u32);

impl Attempt {
    pub const FIRST: Attempt = Attempt(1);

    pub fn next(self) -> Attempt {
        Attempt(self.0.saturating_add(1))
    }

    pub fn is_zero(&self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Attempt({})", self.0)
    }
}

/// Per-worker message sequence number. Monotonic for the life of a worker's state directory,
/// never reset across sessions; it is the id of every worker message that needs an ack.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default, Debug,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_safe_charset_and_refuse_the_rest() {
        assert!(WorkerId::parse("gpu-box_01.lab~a:b@c+d").is_ok());
        assert_eq!(WorkerId::parse(""), Err(IdError::Empty));
        assert_eq!(
            WorkerId::parse("{worker_id}"),
            Err(IdError::BadChar { ch: '{' })
        );
        assert_eq!(WorkerId::parse("a/b"), Err(IdError::BadChar { ch: '/' }));
        assert_eq!(WorkerId::parse("a b"), Err(IdError::BadChar { ch: ' ' }));
        assert_eq!(WorkerId::parse("a%20"), Err(IdError::BadChar { ch: '%' }));
        assert_eq!(WorkerId::parse("é"), Err(IdError::BadChar { ch: 'é' }));
        assert!(WorkerId::parse(&"a".repeat(128)).is_ok());
        assert_eq!(
            WorkerId::parse(&"a".repeat(129)),
            Err(IdError::TooLong { len: 129 })
        );
    }

    #[test]
    fn deserialising_an_invalid_id_fails() {
        let r: Result<WorkerId, _> = serde_json::from_str("\"bad id\"");
        assert!(r.is_err());
        // Escapes are decoded before the check, both ways.
        let r: Result<TaskId, _> = serde_json::from_str("\"a\\u0020b\"");
        assert!(r.is_err());
        let t: TaskId = serde_json::from_str("\"t-\\u0041\"").expect("valid once decoded");
        assert_eq!(t.as_str(), "t-A");
        // From a tree as from text, and back to the same text.
        let v = serde_json::json!("w-1");
        let w: WorkerId = serde_json::from_value(v.clone()).expect("from a tree");
        assert_eq!(serde_json::to_value(&w).expect("to a tree"), v);
        let r: Result<WorkerId, _> = serde_json::from_value(serde_json::json!(1));
        assert!(r.is_err(), "not a string");
    }

    /// A copy shares the text; equality, order and hashing go by the text either way.
    #[test]
    fn copies_of_an_id_share_its_text_and_equal_ids_are_equal_however_made() {
        let a = TaskId::parse("t-1").expect("valid");
        let copy = a.clone();
        assert!(std::ptr::eq(a.as_str(), copy.as_str()));
        let b: TaskId = serde_json::from_str("\"t-1\"").expect("valid");
        assert!(!std::ptr::eq(a.as_str(), b.as_str()));
        assert_eq!(a, b);
        assert_eq!(a.cmp(&b), std::cmp::Ordering::Equal);
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        assert_eq!(state.hash_one(&a), state.hash_one(&b));
        assert!(a < TaskId::parse("t-2").expect("valid"));
    }

    /// The byte table agrees with `is_id_char` on every character up to U+00FF.
    #[test]
    fn the_byte_table_is_the_id_charset() {
        for c in '\0'..='\u{ff}' {
            let expect = is_id_char(c);
            assert_eq!(
                validate(&c.to_string()).is_ok(),
                expect && c != '.',
                "{c:?}"
            );
        }
    }

    #[test]
    fn fresh_task_ids_are_distinct_valid_and_sort_by_creation() {
        let a = TaskId::fresh();
        let b = TaskId::fresh();
        assert!(a < b, "{a} then {b}");
        assert!(TaskId::parse(a.as_str()).is_ok());
        assert_eq!(a.as_str().len(), 34);
    }
}
