//! The attributes each fault kind takes, as `tether proxy fault add --help` lists them and as
//! a fault added without one it needs is told (serde's "missing field `rate`" named neither the
//! kind nor the flag that gives it).

use serde_json::{Map, Value};

use crate::fault::MAX_DELAY_MS;

/// What an attribute's value is, in which unit.
#[derive(Debug, Clone, Copy)]
enum Unit {
    Ms,
    Us,
    Bytes,
    BytesPerSec,
    Probability,
}

impl Unit {
    fn shown(self) -> &'static str {
        match self {
            Unit::Ms => "<ms>",
            Unit::Us => "<µs>",
            Unit::Bytes => "<bytes>",
            Unit::BytesPerSec => "<bytes/s>",
            Unit::Probability => "<0..1>",
        }
    }
}

/// An attribute of a kind: its name, unit, and its default when it has one (else it is
/// required).
struct Attr {
    name: &'static str,
    unit: Unit,
    default: Option<&'static str>,
}

const fn needs(name: &'static str, unit: Unit) -> Attr {
    Attr {
        name,
        unit,
        default: None,
    }
}

const fn may(name: &'static str, unit: Unit, default: &'static str) -> Attr {
    Attr {
        name,
        unit,
        default: Some(default),
    }
}

/// Each kind's attributes, in the order of [`crate::fault::KIND_NAMES`] (a test holds them to
/// [`crate::fault::FaultKind`]).
const KIND_ATTRS: [(&str, &[Attr]); 9] = [
    (
        "latency",
        &[
            needs("latency_ms", Unit::Ms),
            may("jitter_ms", Unit::Ms, "0"),
        ],
    ),
    ("bandwidth", &[needs("bytes_per_sec", Unit::BytesPerSec)]),
    ("blackhole", &[]),
    ("reset", &[may("timeout_ms", Unit::Ms, "0")]),
    ("limit_data", &[needs("bytes", Unit::Bytes)]),
    (
        "slicer",
        &[
            needs("average_size", Unit::Bytes),
            may("size_variation", Unit::Bytes, "0"),
            may("delay_us", Unit::Us, "0"),
        ],
    ),
    ("slow_close", &[needs("delay_ms", Unit::Ms)]),
    ("corrupt", &[needs("rate", Unit::Probability)]),
    (
        "stall",
        &[
            needs("loss_rate", Unit::Probability),
            needs("stall_ms", Unit::Ms),
        ],
    ),
];

fn attrs_of(kind: &str) -> &'static [Attr] {
    KIND_ATTRS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(&[], |(_, a)| a)
}

/// The help's list of each kind's attributes (`fault add`'s after-help).
pub(super) fn help() -> String {
    let mut out = format!(
        "Attributes of each --kind, given as --attr KEY=VALUE; one in [...] is optional, with\n\
         its default; every delay is at most {MAX_DELAY_MS} ms:"
    );
    for (kind, attrs) in KIND_ATTRS {
        let said: Vec<String> = attrs
            .iter()
            .map(|a| match a.default {
                None => format!("{}={}", a.name, a.unit.shown()),
                Some(d) => format!("[{}={} (default {d})]", a.name, a.unit.shown()),
            })
            .collect();
        let said = match said.is_empty() {
            true => "(none)".to_owned(),
            false => said.join(" "),
        };
        out.push_str(&format!("\n  {kind:<11} {said}"));
    }
    out
}

/// Why a `kind` fault given `attributes` cannot be added for want of a required attribute:
/// the kind and each missing one, as the `--attr` that gives it. `None` when none is missing
/// (the kind's other checks are the fault's own).
pub(super) fn missing(kind: &str, attributes: &Map<String, Value>) -> Option<String> {
    let missing: Vec<String> = attrs_of(kind)
        .iter()
        .filter(|a| a.default.is_none() && !attributes.contains_key(a.name))
        .map(|a| format!("--attr {}={}", a.name, a.unit.shown()))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "a {kind} fault needs {} (`tether proxy fault add --help` lists each kind's \
             attributes)",
            missing.join(" ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{FaultKind, KIND_NAMES};

    /// A value of `unit` that every attribute of it deserializes from.
    fn example(unit: Unit) -> Value {
        match unit {
            Unit::Probability => serde_json::json!(0.5),
            _ => serde_json::json!(10),
        }
    }

    fn map(attrs: &[&Attr]) -> Map<String, Value> {
        attrs
            .iter()
            .map(|a| (a.name.to_owned(), example(a.unit)))
            .collect()
    }

    /// The list is the kinds' own: every kind, every attribute each one has, none it has not;
    /// those listed as required are, and those with a default are not.
    #[test]
    fn the_list_is_each_kinds_attributes() {
        let kinds: Vec<&str> = KIND_ATTRS.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, KIND_NAMES);
        for (kind, attrs) in KIND_ATTRS {
            let all: Vec<&Attr> = attrs.iter().collect();
            let made = FaultKind::from_parts(kind, map(&all)).expect("every attribute");
            let names: Vec<&str> = attrs.iter().map(|a| a.name).collect();
            let mut have: Vec<String> = made.attributes().keys().cloned().collect();
            let mut listed: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            have.sort();
            listed.sort();
            assert_eq!(have, listed, "{kind}");
            let required: Vec<&Attr> = attrs.iter().filter(|a| a.default.is_none()).collect();
            FaultKind::from_parts(kind, map(&required)).expect("the required ones");
            assert_eq!(missing(kind, &map(&required)), None, "{kind}");
            for gone in &required {
                let fewer: Vec<&Attr> = required
                    .iter()
                    .copied()
                    .filter(|a| a.name != gone.name)
                    .collect();
                assert!(
                    FaultKind::from_parts(kind, map(&fewer)).is_err(),
                    "{kind} without {}",
                    gone.name
                );
                let said = missing(kind, &map(&fewer)).expect("missing");
                assert!(said.contains(&format!("--attr {}=", gone.name)), "{said}");
            }
        }
    }

    #[test]
    fn a_missing_attribute_is_named_with_its_kind_and_flag() {
        assert_eq!(
            missing("corrupt", &Map::new()).as_deref(),
            Some(
                "a corrupt fault needs --attr rate=<0..1> (`tether proxy fault add --help` \
                 lists each kind's attributes)"
            )
        );
        let mut one = Map::new();
        one.insert("stall_ms".into(), serde_json::json!(5));
        let said = missing("stall", &Map::new()).expect("both missing");
        assert!(
            said.starts_with("a stall fault needs --attr loss_rate=<0..1> --attr stall_ms=<ms>"),
            "{said}"
        );
        let said = missing("stall", &one).expect("one missing");
        assert!(
            said.starts_with("a stall fault needs --attr loss_rate=<0..1> ("),
            "{said}"
        );
        assert_eq!(missing("blackhole", &Map::new()), None);
        assert_eq!(missing("reset", &Map::new()), None);
    }
}
