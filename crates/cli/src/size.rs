//! Byte sizes as the byte-size flags (`--max-frame`, `--max-outbox-bytes`, ...) and their
//! config file keys take them: a whole number of bytes (`1048576`), or a whole number and a
//! unit: `B`; binary `KiB`, `MiB`, `GiB` (1024, 1024², 1024³); decimal `kB`, `MB`, `GB`
//! (1000, 1000², 1000³). Units are matched without regard to case (`mib` is `MiB`, `kb` and
//! `KB` are `kB`): the `i` alone makes a unit binary. A space may stand between number and
//! unit. Fractions (`1.5MiB`), signs and sizes past `u64` are refused, saying why.
//!
//! Byte rates (`--min-answer-rate`, `--max-bytes-per-sec`) take the same, optionally followed
//! by `/s`: `64KiB/s`, `64KiB`, `65536/s` and `65536` are one rate. A rate that is a float
//! (`--max-bytes-per-sec`) still takes a plain number with a fraction (`1500.5`), but a unit
//! only after a whole number.

use serde::Deserialize;

/// The units taken, each with its multiplier, as an error names them.
const UNITS: [(&str, u64); 7] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("kB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
];

/// What [`parse_as`]'s errors call a value that is not one: a size or a rate.
struct Kind {
    /// Said after a value that does not begin with a digit.
    no: &'static str,
    /// Said after an unknown unit: the units taken.
    units: &'static str,
}

const SIZE: Kind = Kind {
    no: "is no size: a whole number of bytes, or with a unit (e.g. 65536, 64KiB, 16MiB)",
    units: "use B, KiB, MiB, GiB, kB, MB or GB, or none for bytes",
};

/// A rate's unit may end in `/s`, which an unknown unit's error says too (`5XB/s` would
/// otherwise be told only the size units, as if `/s` were not taken).
const RATE: Kind = Kind {
    no: "is no rate: bytes a second, or with a unit (e.g. 65536, 64KiB/s, 16MiB/s)",
    units: "use B, KiB, MiB, GiB, kB, MB or GB, or none for bytes; optionally followed by /s, \
            e.g. 64KiB/s",
};

/// Parses a byte size: `65536`, `64KiB`, `1 MiB`, `2GB`.
pub fn parse(s: &str) -> Result<u64, String> {
    parse_as(s, &SIZE)
}

/// Parses a byte rate, bytes a second: a size as [`parse`] takes it, optionally followed by
/// `/s` (`65536`, `64KiB/s`, `1 MiB/s`, `65536/s`).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    parse_as(per_second(s), &RATE)
}

/// [`parse_rate`] for a rate that is a float: a plain number, with a fraction or not
/// (`1500.5`, `1e6`, `-1`: its range is the setting's to check), or a whole number with a
/// unit; either optionally followed by `/s`.
pub fn parse_rate_f64(s: &str) -> Result<f64, String> {
    let s = per_second(s);
    match s.parse::<f64>() {
        Ok(r) => Ok(r),
        Err(_) => parse_as(s, &RATE).map(|n| n as f64),
    }
}

/// `s` trimmed and without a trailing `/s` (in any case).
fn per_second(s: &str) -> &str {
    let s = s.trim();
    match s.len().checked_sub(2).map(|at| (at, &s.as_bytes()[at..])) {
        Some((at, b"/s" | b"/S")) => s[..at].trim_end(),
        _ => s,
    }
}

/// [`parse`], its errors in the words of `kind`.
fn parse_as(s: &str, kind: &Kind) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = (&s[..digits], s[digits..].trim_start());
    if number.is_empty() {
        return Err(format!("{:?} {}", crate::cut_value(s), kind.no));
    }
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "{:?}: a size is a whole number (e.g. 1536KiB, not 1.5MiB)",
            crate::cut_value(s)
        ));
    }
    let unit = match unit {
        "" => "B",
        u => u,
    };
    let Some((_, times)) = UNITS.iter().find(|(u, _)| u.eq_ignore_ascii_case(unit)) else {
        return Err(format!(
            "unknown size unit {:?} ({})",
            crate::cut_value(unit),
            kind.units
        ));
    };
    let too_large = || {
        format!(
            "{:?} is too large: at most {} bytes",
            crate::cut_value(s),
            u64::MAX
        )
    };
    let n: u64 = number.parse().map_err(|_| too_large())?;
    n.checked_mul(*times).ok_or_else(too_large)
}

/// [`parse`] for a flag whose setting is a `usize`.
pub fn parse_usize(s: &str) -> Result<usize, String> {
    let n = parse(s)?;
    usize::try_from(n).map_err(|_| format!("{s:?} is too large: at most {} bytes", usize::MAX))
}

/// A byte size in the config file: an integer (`max_frame = 1048576`) or a string with a unit
/// (`max_frame = "1MiB"`), as [`parse`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl Bytes {
    /// As a `usize` setting: saturated where `usize` is narrower than `u64` (the setting's
    /// own bound then refuses it).
    pub fn usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of bytes, or a string with a unit (e.g. \"64MiB\")")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Bytes, E> {
                Ok(Bytes(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Bytes, E> {
                u64::try_from(n)
                    .map(Bytes)
                    .map_err(|_| E::custom(format!("{n}: a size is not negative")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Bytes, E> {
                parse(s).map(Bytes).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A byte rate in the config file: an integer (`min_answer_rate = 65536`) or a string with a
/// unit (`min_answer_rate = "64KiB/s"`), as [`parse_rate`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Rate;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes a second, or a string with a unit (e.g. \"64KiB/s\")")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Rate, E> {
                Ok(Rate(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Rate, E> {
                u64::try_from(n)
                    .map(Rate)
                    .map_err(|_| E::custom(format!("{n}: a rate is not negative")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Rate, E> {
                parse_rate(s).map(Rate).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A byte rate that is a float in the config file: a number, integer or float
/// (`max_bytes_per_sec = 67108864.0`), or a string with a unit (`"64MiB/s"`), as
/// [`parse_rate_f64`] takes it. Its range is the setting's to check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloatRate(pub f64);

impl<'de> Deserialize<'de> for FloatRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FloatRate;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes a second, or a string with a unit (e.g. \"64MiB/s\")")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<FloatRate, E> {
                Ok(FloatRate(n as f64))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<FloatRate, E> {
                Ok(FloatRate(n as f64))
            }
            fn visit_f64<E: serde::de::Error>(self, r: f64) -> Result<FloatRate, E> {
                Ok(FloatRate(r))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<FloatRate, E> {
                parse_rate_f64(s).map(FloatRate).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_and_every_unit_are_taken() {
        for (s, n) in [
            ("0", 0),
            ("1048576", 1_048_576),
            ("17B", 17),
            ("64KiB", 65_536),
            ("1MiB", 1_048_576),
            ("16 MiB", 16_777_216),
            (" 2GiB ", 2_147_483_648),
            ("3kB", 3_000),
            ("3KB", 3_000),
            ("5MB", 5_000_000),
            ("2GB", 2_000_000_000),
            ("18446744073709551615", u64::MAX),
            ("17179869183GiB", 17_179_869_183 << 30),
        ] {
            assert_eq!(parse(s), Ok(n), "{s}");
        }
    }

    /// Case does not matter; the `i` alone tells binary from decimal.
    #[test]
    fn units_are_matched_without_regard_to_case() {
        assert_eq!(parse("1mib"), Ok(1 << 20));
        assert_eq!(parse("1MIB"), Ok(1 << 20));
        assert_eq!(parse("1mb"), Ok(1_000_000));
        assert_eq!(parse("1kb"), Ok(1_000));
        assert_eq!(parse("1b"), Ok(1));
    }

    #[test]
    fn fractions_unknown_units_signs_and_overflow_are_refused_saying_why() {
        for (s, says) in [
            ("1.5MiB", "whole number"),
            ("1,5MiB", "whole number"),
            ("0.5", "whole number"),
            ("10XB", "unknown size unit \"XB\""),
            ("10 K", "unknown size unit \"K\""),
            ("10Mi", "unknown size unit"),
            ("", "no size"),
            ("MiB", "no size"),
            ("-1", "no size"),
            ("+1", "no size"),
            ("18446744073709551616", "too large"),
            ("17179869184GiB", "too large"),
            ("99999999999999999999999KiB", "too large"),
        ] {
            let e = parse(s).expect_err(s);
            assert!(e.contains(says), "{s}: {e}");
        }
        // An overlong unit is quoted cut, not whole.
        let long = format!("1{}", "x".repeat(10_000));
        assert!(parse(&long).expect_err("long").len() < 300);
    }

    /// In the config file: an integer, or a string with a unit; not a negative integer, a
    /// float or a string that is no size.
    #[test]
    fn a_config_value_is_an_integer_or_a_string_with_a_unit() {
        #[derive(Deserialize)]
        struct T {
            n: Bytes,
        }
        let read = |v: &str| toml::from_str::<T>(&format!("n = {v}\n")).map(|t| t.n.0);
        assert_eq!(read("1048576").expect("integer"), 1_048_576);
        assert_eq!(read("\"64MiB\"").expect("string"), 64 << 20);
        assert_eq!(read("\"2048\"").expect("string of bytes"), 2048);
        for (v, says) in [
            ("-1", "not negative"),
            ("1.5", "a number of bytes"),
            ("\"1.5MiB\"", "whole number"),
            ("\"10XB\"", "unknown size unit"),
        ] {
            let e = read(v).expect_err(v).to_string();
            assert!(e.contains(says), "{v}: {e}");
        }
        assert_eq!(Bytes(7).usize(), 7);
    }

    /// A rate is a size, optionally followed by `/s` (`64/s` too); a float rate also takes
    /// a plain number with a fraction, as before, but no fraction before a unit.
    #[test]
    fn a_rate_is_a_size_optionally_per_second() {
        for (s, n) in [
            ("65536", 65_536),
            ("65536/s", 65_536),
            ("64/s", 64),
            ("64KiB", 65_536),
            ("64KiB/s", 65_536),
            ("1 MiB/s", 1 << 20),
            (" 1MiB /s ", 1 << 20),
            ("1mib/S", 1 << 20),
            ("512KiB/s", 512 << 10),
            ("1GB/s", 1_000_000_000),
        ] {
            assert_eq!(parse_rate(s), Ok(n), "{s}");
            assert_eq!(parse_rate_f64(s), Ok(n as f64), "{s}");
        }
        for (s, r) in [
            ("1500.5", 1500.5),
            ("1500.5/s", 1500.5),
            ("1e6", 1e6),
            ("-1", -1.0),
        ] {
            assert_eq!(parse_rate_f64(s), Ok(r), "{s}");
        }
        for (s, says) in [
            ("1.5MiB", "whole number"),
            ("1.5MiB/s", "whole number"),
            ("64XB", "unknown size unit \"XB\""),
            ("64XB/s", "unknown size unit \"XB\""),
            ("64KiB/m", "unknown size unit \"KiB/m\""),
            ("64KiB/s/s", "unknown size unit"),
            ("/s", "no rate"),
            ("", "no rate"),
            ("fast", "no rate: bytes a second"),
            ("99999999999999999999999KiB/s", "too large"),
        ] {
            let e = parse_rate_f64(s).expect_err(s);
            assert!(e.contains(says), "{s}: {e}");
            let e = parse_rate(s).expect_err(s);
            assert!(e.contains(says), "{s}: {e}");
        }
        // The whole rate takes no fraction, no sign.
        for s in ["1500.5", "-1", "1e6"] {
            assert!(parse_rate(s).is_err(), "{s}");
        }
        // A size takes no `/s`.
        assert!(
            parse("64KiB/s")
                .expect_err("size")
                .contains("unknown size unit")
        );
    }

    /// A rate's unknown unit is told that a rate may end in `/s`; a size's is not (it takes
    /// none).
    #[test]
    fn an_unknown_unit_of_a_rate_says_a_rate_may_end_in_per_second() {
        for s in ["5XB/s", "3foo", "64KiB/m"] {
            for e in [parse_rate(s).expect_err(s), parse_rate_f64(s).expect_err(s)] {
                assert!(e.contains("unknown size unit"), "{s}: {e}");
                assert!(
                    e.contains("optionally followed by /s, e.g. 64KiB/s"),
                    "{s}: {e}"
                );
            }
        }
        let e = parse("5XB").expect_err("size");
        assert_eq!(
            e,
            "unknown size unit \"XB\" (use B, KiB, MiB, GiB, kB, MB or GB, or none for bytes)"
        );
        assert!(!e.contains("/s"), "{e}");
    }

    /// In the config file: an integer (or, for a float rate, a float) or a string with a
    /// unit and an optional `/s`.
    #[test]
    fn a_config_rate_is_a_number_or_a_string_with_a_unit() {
        #[derive(Deserialize)]
        struct T {
            n: Option<Rate>,
            r: Option<FloatRate>,
        }
        let whole = |v: &str| toml::from_str::<T>(&format!("n = {v}\n")).map(|t| t.n);
        let float = |v: &str| toml::from_str::<T>(&format!("r = {v}\n")).map(|t| t.r);
        assert_eq!(whole("65536").expect("integer"), Some(Rate(65_536)));
        assert_eq!(whole("\"64KiB/s\"").expect("string"), Some(Rate(65_536)));
        assert_eq!(whole("\"1MiB\"").expect("string"), Some(Rate(1 << 20)));
        assert_eq!(float("65536").expect("integer"), Some(FloatRate(65_536.0)));
        assert_eq!(float("1500.5").expect("float"), Some(FloatRate(1500.5)));
        assert_eq!(
            float("\"64MiB/s\"").expect("string"),
            Some(FloatRate((64 << 20) as f64))
        );
        assert_eq!(
            float("\"1500.5/s\"").expect("string"),
            Some(FloatRate(1500.5))
        );
        for (v, says) in [
            ("-1", "not negative"),
            ("1.5", "bytes a second"),
            ("\"1.5MiB\"", "whole number"),
            ("\"64XB/s\"", "unknown size unit"),
        ] {
            let e = whole(v).expect_err(v).to_string();
            assert!(e.contains(says), "{v}: {e}");
        }
        for (v, says) in [
            ("\"1.5MiB/s\"", "whole number"),
            ("\"64XB\"", "unknown size unit"),
            ("true", "bytes a second"),
        ] {
            let e = float(v).expect_err(v).to_string();
            assert!(e.contains(says), "{v}: {e}");
        }
    }
}
