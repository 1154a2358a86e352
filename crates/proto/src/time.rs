//! Writing and reading the timestamps every message carries. chrono's own reader goes through
//! its general format parser (about 1.5 % of the coordinator under a message flood), and its
//! writer through its general formatter (about 125 ns a timestamp, against 55 ns here, both
//! into a fresh `serde_json` writer); the form this protocol
//! writes (`2026-11-30T13:03:43.123456789Z`, chrono's RFC 3339 with `Z` and the fraction in
//! 0, 3, 6 or 9 digits) is written and read here by position, and anything else is handed to
//! chrono, so what is written and accepted is exactly what chrono writes and accepts.

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use serde::de::{Error, Visitor};
use serde::{Deserializer, Serializer};

/// For `#[serde(with = "crate::time")]` on a `DateTime<Utc>`: the text chrono's own
/// `Serialize` writes.
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 30];
    match write(t, &mut buf) {
        // INVARIANT: `write` puts only ASCII digits and separators in the buffer.
        Some(n) => s.serialize_str(std::str::from_utf8(&buf[..n]).unwrap_or_default()),
        None => serde::Serialize::serialize(t, s),
    }
}

/// Writes `t` as chrono's `to_rfc3339_opts(SecondsFormat::AutoSi, true)` does, into `buf`;
/// returns its length, or `None` for what is left to chrono (years outside 0-9999, a leap
/// second).
fn write(t: &DateTime<Utc>, buf: &mut [u8; 30]) -> Option<usize> {
    let (year, nanos) = (t.year(), t.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return None;
    }
    let mut put = |at: usize, n: u32, width: usize| {
        let mut n = n;
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, year as u32, 4);
    put(5, t.month(), 2);
    put(8, t.day(), 2);
    put(11, t.hour(), 2);
    put(14, t.minute(), 2);
    put(17, t.second(), 2);
    let (frac, digits) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    let end = match digits {
        0 => 19,
        _ => {
            put(20, frac, digits);
            20 + digits
        }
    };
    // The fraction's dot at 19 is overwritten by the `Z` when there is no fraction.
    for (at, sep) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ] {
        buf[at] = sep;
    }
    buf[end] = b'Z';
    Some(end + 1)
}

/// For `#[serde(with = "crate::time")]` on a `DateTime<Utc>`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    struct Rfc3339;
    impl Visitor<'_> for Rfc3339 {
        type Value = DateTime<Utc>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an RFC 3339 timestamp")
        }
        fn visit_str<E: Error>(self, s: &str) -> Result<DateTime<Utc>, E> {
            // chrono's own words ("premature end of input") name neither the field's kind nor
            // the form; the value is quoted, cut short (it is the peer's).
            parse(s).map_err(|e| {
                let shown: String = s.chars().take(40).collect();
                E::custom(format_args!(
                    "timestamp {shown:?} is not an RFC 3339 time with an offset, e.g. 2026-12-01T12:00:00Z ({e})"
                ))
            })
        }
    }
    d.deserialize_str(Rfc3339)
}

/// Parses an RFC 3339 timestamp as chrono does, the protocol's own form by position.
pub fn parse(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    match by_position(s) {
        Some(t) => Ok(t),
        None => s.parse(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.F]Z` with 1 to 9 fraction digits; `None` for anything else
/// (including what chrono would accept or refuse otherwise, such as a leap second or an
/// offset).
fn by_position(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[b.len() - 1] != b'Z'
    {
        return None;
    }
    let digits = |d: &[u8]| {
        d.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let nanos = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', frac @ ..] if (1..=9).contains(&frac.len()) => {
            digits(frac)? * 10u32.pow(9 - frac.len() as u32)
        }
        _ => return None,
    };
    let year = i32::try_from(digits(&b[0..4])?).ok()?;
    NaiveDate::from_ymd_opt(year, digits(&b[5..7])?, digits(&b[8..10])?)?
        .and_hms_nano_opt(
            digits(&b[11..13])?,
            digits(&b[14..16])?,
            digits(&b[17..19])?,
            nanos,
        )
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::SecondsFormat;
    use proptest::prelude::*;

    fn chrono_reads(s: &str) -> Option<DateTime<Utc>> {
        s.parse().ok()
    }

    #[test]
    fn the_protocol_s_form_is_read_by_position_and_the_rest_by_chrono() {
        let t = by_position("2026-11-30T13:03:43.123456789Z").expect("by position");
        assert_eq!(Some(t), chrono_reads("2026-11-30T13:03:43.123456789Z"));
        assert_eq!(
            by_position("2026-11-30T13:03:43Z"),
            chrono_reads("2026-11-30T13:03:43Z")
        );
        assert_eq!(
            by_position("2026-11-30T13:03:43.5Z"),
            chrono_reads("2026-11-30T13:03:43.5Z")
        );
        // Left to chrono: offsets, lowercase, a leap second, a space, ten fraction digits.
        for s in [
            "2026-11-30T13:03:43+01:00",
            "2026-11-30t13:03:43z",
            "2016-12-31T23:59:60Z",
            "2026-11-30 13:03:43Z",
            "2026-11-30T13:03:43.1234567891Z",
        ] {
            assert_eq!(by_position(s), None, "{s}");
            assert_eq!(parse(s).ok(), chrono_reads(s), "{s}");
        }
        // Refused like chrono refuses.
        for s in [
            "2026-02-30T00:00:00Z",
            "2026-11-30T24:00:00Z",
            "2026-11-30T13:03:43.Z",
            "x",
        ] {
            assert!(parse(s).is_err(), "{s}");
            assert_eq!(chrono_reads(s), None, "{s}");
        }
    }

    #[test]
    fn a_message_timestamp_is_deserialised_through_it() {
        let t: crate::msg::Heartbeat = serde_json::from_str(
            r#"{"sequence":1,"active_tasks":[],"timestamp":"2026-11-30T13:03:43.25Z"}"#,
        )
        .expect("heartbeat");
        assert_eq!(Some(t.timestamp), chrono_reads("2026-11-30T13:03:43.25Z"));
        let bad: Result<crate::msg::Heartbeat, _> = serde_json::from_str(
            r#"{"sequence":1,"active_tasks":[],"timestamp":"2026-13-30T13:03:43Z"}"#,
        );
        assert!(bad.is_err());
        // Without an offset: the error says what a timestamp must be.
        let said = serde_json::from_str::<crate::msg::Heartbeat>(
            r#"{"sequence":1,"active_tasks":[],"timestamp":"2026-01-01T00:00:00"}"#,
        )
        .expect_err("no offset")
        .to_string();
        assert!(
            said.contains(
                r#"timestamp "2026-01-01T00:00:00" is not an RFC 3339 time with an offset"#
            ),
            "{said}"
        );
    }

    #[test]
    fn the_protocol_s_form_is_written_by_position_as_chrono_writes_it() {
        for (secs, nanos) in [
            (1_796_043_823, 123_456_789),
            (1_796_043_823, 0),
            (1_796_043_823, 250_000_000),
            (1_796_043_823, 250_000),
            (0, 1),
            (253_402_300_799, 999_999_999),
            (-62_167_219_200, 0),
        ] {
            let t = DateTime::from_timestamp(secs, nanos).expect("in range");
            let mut buf = [0u8; 30];
            let n = write(&t, &mut buf).expect("written by position");
            assert_eq!(
                std::str::from_utf8(&buf[..n]).expect("ascii"),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            );
        }
        // Left to chrono: a year past 9999, or before 0.
        for secs in [253_402_300_800, -62_167_219_201] {
            let t = DateTime::from_timestamp(secs, 0).expect("in range");
            assert_eq!(write(&t, &mut [0u8; 30]), None);
        }
    }

    proptest! {
        /// What is written is what chrono's own `Serialize` writes, and reads back as itself.
        #[test]
        fn timestamps_are_written_as_chrono_writes_them(
            secs in -63_000_000_000i64..260_000_000_000i64,
            nanos in prop_oneof![
                0u32..1_000_000_000,
                (0u32..1_000).prop_map(|m| m * 1_000_000),
                (0u32..1_000_000).prop_map(|u| u * 1_000),
            ],
        ) {
            let t = DateTime::from_timestamp(secs, nanos).expect("in range");
            let mut ours = serde_json::Serializer::new(Vec::new());
            serialize(&t, &mut ours).expect("serialise");
            let ours = String::from_utf8(ours.into_inner()).expect("utf-8");
            prop_assert_eq!(&ours, &serde_json::to_string(&t).expect("chrono"));
            let back: DateTime<Utc> = deserialize(&mut serde_json::Deserializer::from_str(&ours))
                .expect("reads back");
            prop_assert_eq!(back, t);
        }

        /// Whatever chrono writes, in every precision, reads back the same as chrono reads it.
        #[test]
        fn what_chrono_writes_reads_back_as_chrono_reads_it(
            secs in -62_000_000_000i64..250_000_000_000i64,
            nanos in 0u32..1_000_000_000,
        ) {
            let t = DateTime::from_timestamp(secs, nanos).expect("in range");
            for f in [SecondsFormat::Secs, SecondsFormat::Millis, SecondsFormat::Micros,
                      SecondsFormat::Nanos, SecondsFormat::AutoSi] {
                let s = t.to_rfc3339_opts(f, true);
                prop_assert_eq!(parse(&s).ok(), chrono_reads(&s), "{}", s);
            }
        }

        /// Near-timestamps (digits and separators swapped about): read by position only
        /// when chrono reads them the same.
        #[test]
        fn near_timestamps_are_read_as_chrono_reads_them(
            s in "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,10})?[Zz]?",
        ) {
            if let Some(t) = by_position(&s) {
                prop_assert_eq!(Some(t), chrono_reads(&s), "{}", s);
            }
            prop_assert_eq!(parse(&s).ok(), chrono_reads(&s), "{}", s);
        }
    }
}
