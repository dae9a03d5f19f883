//! How results are shown: tables for people, JSON for scripts; progress bars on a terminal only;
//! message bodies redacted unless `--reveal`.

use clap::ValueEnum;
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::Value;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Tables and sentences, for people.
    #[default]
    Table,
    /// One JSON document on stdout, for scripts.
    Json,
}

/// Writes a line to stdout; a closed pipe (`dlq … | head`) is not an error.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Prints a value as one JSON document.
pub fn json<T: Serialize>(value: &T) {
    crate::outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("output serializes")
    );
}

/// A table with a header row.
pub fn table<I, R, C>(header: &[&str], rows: I) -> Table
where
    I: IntoIterator<Item = R>,
    R: IntoIterator<Item = C>,
    C: Into<comfy_table::Cell>,
{
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    for row in rows {
        t.add_row(row);
    }
    t
}

/// A progress bar on stderr with rate and ETA; hidden for JSON output and when stderr is not a
/// terminal (so logs and pipes stay clean).
pub fn progress(output: Output, len: Option<u64>, what: &str) -> ProgressBar {
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    if output == Output::Json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    } else {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    let template = if len.is_some() {
        "{msg} {bar:30} {pos}/{len} {per_sec} ETA {eta}"
    } else {
        "{msg} {spinner} {pos} {per_sec} {elapsed}"
    };
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    bar.set_message(what.to_owned());
    bar
}

/// Body fields shown as they are: ids, codes and times that identify a message without saying
/// anything about a person. Every other string is masked.
const SAFE_FIELDS: &[&str] = &[
    "type",
    "schema_version",
    "event_id",
    "occurred_at",
    "correlation_id",
    "order_id",
    "sku",
    "status",
    "currency",
    "reported_at",
    "carrier",
    "reason",
    "source",
];

/// A body for display without `--reveal`: JSON keeps its shape, numbers and identifying fields,
/// every other string becomes `‹redacted: N chars›`; anything else shows only its size.
pub fn redact_body(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(mut v) => {
            mask(&mut v, None);
            v.to_string()
        }
        Err(_) => format!("‹{} bytes, not JSON: --reveal shows it›", body.len()),
    }
}

fn mask(v: &mut Value, key: Option<&str>) {
    match v {
        Value::String(s) if !key.is_some_and(|k| SAFE_FIELDS.contains(&k)) => {
            *s = format!("‹redacted: {} chars›", s.chars().count());
        }
        Value::Array(items) => items.iter_mut().for_each(|i| mask(i, key)),
        Value::Object(map) => map.iter_mut().for_each(|(k, v)| mask(v, Some(k))),
        _ => {}
    }
}

/// Shortens text for a table cell.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!(
            "{}…",
            s.chars().take(max.saturating_sub(1)).collect::<String>()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_keep_their_shape_and_ids_but_not_personal_data() {
        let body = r#"{"type":"order.submitted","event_id":"e-1","payload":{"order_id":"o-1","email":"ann@example.com","delivery_address":{"name":"Ann Lee","phone":"+44 7700 900123"},"lines":[{"sku":"SKU-1","quantity":2}],"payment_reference":"pay_123"}}"#;
        let shown = redact_body(body);
        for secret in ["ann@example.com", "Ann Lee", "7700", "pay_123"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        for kept in ["order.submitted", "e-1", "o-1", "SKU-1", "\"quantity\":2"] {
            assert!(shown.contains(kept), "{kept} missing from {shown}");
        }
    }

    #[test]
    fn a_body_that_is_not_json_shows_only_its_size() {
        assert_eq!(
            redact_body("call 555-0100"),
            "‹13 bytes, not JSON: --reveal shows it›"
        );
    }
}
