//! Byte sizes as the byte-size flags (`--max-frame`, `--max-outbox-bytes`, ...) and their
//! config file keys take them: a whole number of bytes (`1048576`), or a whole number and a
//! unit: `B`; binary `KiB`, `MiB`, `GiB` (1024, 1024², 1024³); decimal `kB`, `MB`, `GB`
//! (1000, 1000², 1000³). Units are matched without regard to case (`mib` is `MiB`, `kb` and
//! `KB` are `kB`): the `i` alone makes a unit binary. A space may stand between number and
//! unit. Fractions (`1.5MiB`), signs and sizes past `u64` are refused, saying why.

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

/// Parses a byte size: `65536`, `64KiB`, `1 MiB`, `2GB`.
pub fn parse(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = (&s[..digits], s[digits..].trim_start());
    if number.is_empty() {
        return Err(format!(
            "{:?} is no size: a whole number of bytes, or with a unit (e.g. 65536, 64KiB, 16MiB)",
            crate::cut_value(s)
        ));
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
            "unknown size unit {:?} (use B, KiB, MiB, GiB, kB, MB or GB, or none for bytes)",
            crate::cut_value(unit)
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
}
