//! Human output of the client commands: tables, cells, times.

use super::*;

/// `text` up to `max` characters, ending in `…` when it was longer.
pub(super) fn cut_line(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// A value as a table or a listing shows it: a string bare, with its control characters
/// escaped (a task name is anyone's text: a newline would break the table, an escape sequence
/// would reach the terminal); anything else as JSON.
pub(super) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => shown(s),
        other => other.to_string(),
    }
}

/// How long before `now` the time `v` was (`12s ago`, [`span`]), or `-`.
pub(super) fn age(v: &Value, now: chrono::DateTime<chrono::Utc>) -> String {
    v.as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            let secs = (now - t.with_timezone(&chrono::Utc)).num_seconds();
            format!("{} ago", span(secs))
        })
        .unwrap_or_else(|| "-".into())
}

/// How long after `now` the time `v` comes (`in 42s`, [`span`]; `now` once it has come), or
/// `None` when `v` is not a time.
pub(super) fn until(v: &Value, now: chrono::DateTime<chrono::Utc>) -> Option<String> {
    let t = chrono::DateTime::parse_from_rfc3339(v.as_str()?).ok()?;
    let secs = (t.with_timezone(&chrono::Utc) - now).num_seconds();
    Some(if secs > 0 {
        format!("in {}", span(secs))
    } else {
        "now".into()
    })
}

/// `secs` (0 if less) in whole seconds up to a minute (`12s`), then in its two largest units
/// (`5m12s`, `3h5m`, `2d3h`): a worker lost for a day was `86400s`.
pub(super) fn span(secs: i64) -> String {
    let secs = secs.max(0);
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// A time of the API as tables show it: UTC to the millisecond, one format for every column
/// (the API gives some to the nanosecond, some with `+00:00`); anything else as it is.
pub(super) fn when(v: &Value) -> String {
    match v
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    {
        Some(t) => t
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string(),
        None => s(v),
    }
}

/// Anyone's text (a task's name, a worker's error) as a terminal line may show it: control
/// characters escaped (a newline would forge a line, an escape sequence would reach the
/// terminal), and the bidirectional overrides and isolates, which would reorder what follows.
pub(crate) fn shown(text: &str) -> String {
    let escaped = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(escaped) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| match escaped(c) {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

pub(super) fn fmt_f(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|f| format!("{f:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// One table row per element of a JSON array.
pub(super) fn rows_of(v: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_array().into_iter().flatten().map(row).collect()
}

/// Characters of a table's cell shown (`--json` has all of it): a task's name or result is
/// anyone's text, and one of 70,000 characters would make every row of the listing that wide
/// (and is past what the formatter pads: it panicked).
const CELL_SHOWN: usize = 200;

pub(super) fn print_table(head: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    Table::new(head).print(rows)
}

/// The lines of a table: a head, then a line a row, columns padded to their widest cell.
#[cfg(test)]
pub(super) fn table_lines(head: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    Table::new(head).lines(rows)
}

/// A table printed in parts (a listing page by page): its head before the first part, each
/// column padded to its widest cell so far. A later part with a wider cell (but in the last
/// column, which is not padded) widens the column from there on, and begins under a head of its
/// own at the new widths: the lines printed before stay as they were, each row under the head
/// above it. No part is held back to size the columns for the whole table.
pub(super) struct Table {
    head: Vec<String>,
    widths: Vec<usize>,
    /// The head is printed.
    started: bool,
}

impl Table {
    pub(super) fn new(head: &[&str]) -> Self {
        Table {
            head: head.iter().map(|h| h.to_string()).collect(),
            widths: head.iter().map(|h| h.chars().count()).collect(),
            started: false,
        }
    }

    /// Prints `rows` (and the head, the first time).
    pub(super) fn print(&mut self, rows: &[Vec<String>]) -> anyhow::Result<()> {
        for line in self.lines(rows) {
            outln!("{line}")?;
        }
        Ok(())
    }

    /// The lines [`Table::print`] prints.
    fn lines(&mut self, rows: &[Vec<String>]) -> Vec<String> {
        let rows: Vec<Vec<String>> = rows
            .iter()
            // Every cell escaped: a task's output (a result's `stdout_tail`) is anyone's bytes,
            // and JSON leaves C1 controls and bidirectional overrides as they are.
            .map(|r| r.iter().map(|c| cut_line(&shown(c), CELL_SHOWN)).collect())
            .collect();
        let before = self.widths.clone();
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                self.widths[i] = self.widths[i].max(c.chars().count());
            }
        }
        // The last column moves no other: wider, it needs no head of its own.
        let padded = self.widths.len().saturating_sub(1);
        let widened = self.widths[..padded] != before[..padded];
        let widths = &self.widths;
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let pad = widths[i].saturating_sub(c.chars().count());
                    format!("{c}{}", " ".repeat(pad))
                })
                .collect();
            parts.join("  ").trim_end().to_owned()
        };
        let head = (!self.started || widened).then(|| line(&self.head));
        self.started = true;
        head.into_iter()
            .chain(rows.iter().map(|r| line(r)))
            .collect()
    }
}

/// The RECORD cell of a result: counted, or why not from how its attempt ended (`end`).
pub(super) fn record_label(stale: bool, end: Option<&str>) -> String {
    match (stale, end) {
        (false, _) => "counted".into(),
        // The result of an attempt a cancel or the task's timeout stopped is not late, merely
        // not counted.
        (true, Some("cancelled")) => "not counted (task cancelled)".into(),
        (true, Some("timed_out")) => "not counted (task timed out)".into(),
        (true, Some(end)) => format!("stale (attempt {end})"),
        (true, None) => "stale".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A result's RECORD cell says why it is not counted from how its attempt ended: stopped
    /// by a cancel or by the task's timeout it is not late; after a lost lease it is stale.
    #[test]
    fn a_results_record_says_why_it_is_not_counted() {
        assert_eq!(record_label(false, Some("lost")), "counted");
        assert_eq!(
            record_label(true, Some("cancelled")),
            "not counted (task cancelled)"
        );
        assert_eq!(
            record_label(true, Some("timed_out")),
            "not counted (task timed out)"
        );
        assert_eq!(record_label(true, Some("lost")), "stale (attempt lost)");
        assert_eq!(record_label(true, None), "stale");
    }

    /// A cell of 70,000 characters (a task's name is anyone's text) is cut, not padded to:
    /// the formatter refuses widths past 65,535 and panicked.
    #[test]
    fn a_very_long_cell_is_cut_and_the_table_printed() {
        let long = "n".repeat(70_000);
        let rows = vec![
            vec!["t1".to_owned(), long],
            vec!["t2".to_owned(), "short".into()],
        ];
        print_table(&["ID", "NAME"], &rows).expect("printed");
        assert_eq!(
            cut_line(&rows[0][1], CELL_SHOWN).chars().count(),
            CELL_SHOWN + 1
        );
    }

    /// A part (a page of `tether tasks --all`) that widens a column begins under a head of its
    /// own, so that every row stands under its head's columns; one that widens only the last
    /// column, which moves no other, or none, does not.
    #[test]
    fn a_part_that_widens_a_column_begins_under_a_head_of_its_own() {
        let mut t = Table::new(&["ID", "NAME"]);
        let row = |id: &str, name: &str| vec![vec![id.to_owned(), name.to_owned()]];
        assert_eq!(t.lines(&row("t1", "a")), ["ID  NAME", "t1  a"]);
        assert_eq!(t.lines(&row("t2", "a longer name")), ["t2  a longer name"]);
        assert_eq!(t.lines(&row("t-long", "b")), ["ID      NAME", "t-long  b"]);
        assert_eq!(t.lines(&row("t3", "c")), ["t3      c"]);
        assert!(t.lines(&[]).is_empty());
    }

    #[test]
    fn an_age_is_whole_seconds_before_now() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-04T20:52:40.100Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        assert_eq!(age(&json!("2026-12-04T20:52:28.680Z"), now), "11s ago");
        assert_eq!(
            age(&json!("2026-12-04T20:52:50Z"), now),
            "0s ago",
            "a clock ahead"
        );
        assert_eq!(age(&Value::Null, now), "-");
        assert_eq!(age(&json!("2026-12-04T19:40:00Z"), now), "1h12m ago");
    }

    /// A span is seconds up to a minute, then its two largest units, the smaller whole.
    #[test]
    fn a_span_is_said_in_its_two_largest_units() {
        assert_eq!(span(-5), "0s");
        assert_eq!(span(59), "59s");
        assert_eq!(span(60), "1m0s");
        assert_eq!(span(3599), "59m59s");
        assert_eq!(span(3600 + 59 * 60 + 59), "1h59m");
        assert_eq!(span(86_400 * 3 + 3600 * 23 + 3599), "3d23h");
    }

    /// Every time column in one format, whatever precision or offset the API gave.
    #[test]
    fn times_are_shown_in_one_format() {
        for t in [
            "2026-12-04T20:52:28.680Z",
            "2026-12-04T20:52:28.680993046Z",
            "2026-12-04T20:52:28.680+00:00",
        ] {
            assert_eq!(when(&json!(t)), "2026-12-04T20:52:28.680Z", "{t}");
        }
        assert_eq!(when(&Value::Null), s(&Value::Null));
    }

    #[test]
    fn a_tables_cells_are_escaped_a_results_output_too() {
        // A command's stdout tail in a result: JSON keeps C1 controls and bidi overrides raw.
        let result = json!({"stdout_tail": "\u{9b}2J\u{202e}evil"}).to_string();
        let lines = table_lines(&["ATTEMPT", "RESULT"], &[vec!["1".into(), result]]);
        assert!(
            lines[1].contains("\\u{9b}2J\\u{202e}evil"),
            "{:?}",
            lines[1]
        );
        assert!(!lines[1].contains('\u{9b}') && !lines[1].contains('\u{202e}'));
    }

    #[test]
    fn shown_text_escapes_control_characters_and_nothing_else() {
        assert_eq!(shown("nightly run 42 ü"), "nightly run 42 ü");
        assert_eq!(shown("a\nb"), "a\\nb");
        assert_eq!(shown("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(shown("a\u{202e}evil"), "a\\u{202e}evil");
        assert_eq!(s(&json!("tab\there")), "tab\\there");
        assert_eq!(s(&Value::Null), "-");
    }

    #[test]
    fn a_long_config_is_cut_on_a_character_boundary_and_says_so() {
        assert_eq!(cut_line("abc", 3), "abc");
        assert_eq!(cut_line("abcd", 3), "abc…");
        assert_eq!(cut_line("ééé", 2), "éé…");
        assert_eq!(cut_line("", 0), "");
    }
}
