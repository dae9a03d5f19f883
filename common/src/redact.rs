//! Redaction of free text that leaves a worker (logs, DLQ attribution): e-mail addresses, long
//! digit runs (phone, card and account numbers) and anything after a known secret-bearing key are
//! masked, and the text is bounded. Handlers never put personal data in errors on purpose; this is
//! the net under that rule (threat I-1).

use std::sync::LazyLock;

use regex::Regex;

/// Longest text kept after redaction, in characters.
pub const MAX_REDACTED_CHARS: usize = 512;

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}").expect("email regex")
});
// Seven or more digits (any script), up to three separators apart (the separators the edge's card
// detector knows): phone, card and account numbers.
static DIGITS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\+?\d(?:[\s.\-_/:,\u{2010}-\u{2014}\u{FF0D}]{0,3}\d){6,}")
        .expect("digit-run regex")
});
static SECRET: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?i)("?(?:password|secret|token|authorization|api[_-]?key|payment_ref(?:erence)?|card)"?\s*[:=]\s*)("[^"]*"|[^\s,}]+)"#)
        .expect("secret regex")
});

/// Masks personal data and secrets in `text` and bounds its length.
pub fn redact(text: &str) -> String {
    let text = SECRET.replace_all(text, "$1[redacted]");
    let text = EMAIL.replace_all(&text, "[email]");
    let text = DIGITS.replace_all(&text, "[number]");
    if text.chars().count() > MAX_REDACTED_CHARS {
        let mut cut: String = text.chars().take(MAX_REDACTED_CHARS).collect();
        cut.push('…');
        cut
    } else {
        text.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn personal_data_is_masked() {
        let out = redact("user jane.doe@example.com called +44 20 7946 0958 about order o-1");
        assert_eq!(out, "user [email] called [number] about order o-1");
    }

    #[test]
    fn secrets_after_known_keys_are_masked() {
        let out = redact(r#"{"payment_reference": "pay_ABC123", "token=xyz"}"#);
        assert!(!out.contains("pay_ABC123"), "{out}");
        assert!(out.contains("[redacted]"), "{out}");
    }

    #[test]
    fn short_numbers_and_ids_stay() {
        assert_eq!(
            redact("quantity 3 of sku SKU-0042"),
            "quantity 3 of sku SKU-0042"
        );
    }

    #[test]
    fn long_text_is_bounded() {
        assert!(redact(&"x".repeat(5000)).chars().count() <= super::MAX_REDACTED_CHARS + 1);
    }
}
