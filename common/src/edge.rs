//! The untrusted edge (threat T-1): the decision ingestion makes on every message ([`admit`]),
//! and the checks a JSON Schema cannot make (duplicate keys, card numbers, attribute sizes).
//! Pure functions, used by the ingestion worker and by its fuzz target (`fuzz/`).

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::config::IngestionConfig;
use crate::contract::{
    self, DeliveryStatusReported, Envelope, OrderSubmitted, SourceMetadata,
    DELIVERY_STATUS_REPORTED, EXTERNAL_TYPES, ORDER_SUBMITTED,
};
use crate::failure::{HandlerError, Reason};
use crate::runtime::{describe_json_error, Message};

/// The longest key name an error names (longer ones are cut): key names come from the sender.
const NAMED_KEY_MAX: usize = 64;

/// Checks that no JSON object in `body`, at any depth, holds the same key twice.
///
/// serde_json keeps the last of two equal keys; a validator or WAF in front of the fleet that
/// keeps the first would have approved another message than the one the fleet acts on.
///
/// # Errors
/// The first duplicated key (cut to 64 characters), or the parse error of a body that is not
/// JSON.
pub fn check_unique_keys(body: &str) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_str(body);
    Unique::deserialize_from(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())
}

/// Walks any JSON value, failing on a repeated key.
struct Unique;

impl Unique {
    fn deserialize_from<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor)
    }
}

impl<'de> de::Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::deserialize_from(d)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Unique;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_unit<E>(self) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_none<E>(self) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Unique, D::Error> {
        Unique::deserialize_from(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
        while seq.next_element::<Unique>()?.is_some() {}
        Ok(Unique)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                // Not named: the key is the sender's text (it could hold anything, card data
                // included); the position in the error says where.
                return Err(de::Error::custom("duplicate key"));
            }
            map.next_value::<Unique>()?;
        }
        Ok(Unique)
    }
}

/// Where in `value` a card number is, as a JSON pointer (`/payload/payment_reference`), never
/// the number itself: any string (object keys included) or integer that holds 13–19 digits,
/// alone or split by spaces, dashes, dots, slashes or underscores, that pass the Luhn check.
pub fn find_card_number(value: &serde_json::Value) -> Option<String> {
    fn walk(v: &serde_json::Value, path: &mut String) -> Option<String> {
        match v {
            serde_json::Value::String(s) => holds_card_number(s).then(|| path.clone()),
            serde_json::Value::Number(n) => holds_card_number(&n.to_string()).then(|| path.clone()),
            serde_json::Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                let len = path.len();
                path.push_str(&format!("/{i}"));
                let found = walk(item, path);
                path.truncate(len);
                found
            }),
            serde_json::Value::Object(map) => map.iter().find_map(|(k, item)| {
                let len = path.len();
                let key: String = k.chars().take(NAMED_KEY_MAX).collect();
                path.push_str(&format!("/{}", key.replace('~', "~0").replace('/', "~1")));
                let found = if holds_card_number(k) {
                    Some(format!("{path} (the key)"))
                } else {
                    walk(item, path)
                };
                path.truncate(len);
                found
            }),
            _ => None,
        }
    }
    walk(value, &mut String::new())
}

/// The value of a decimal digit in any of the scripts a sender may use (ASCII, full-width,
/// Arabic-Indic, extended Arabic-Indic, Devanagari).
pub fn digit_value(c: char) -> Option<u8> {
    let zero = match c {
        '0'..='9' => '0',
        '\u{FF10}'..='\u{FF19}' => '\u{FF10}',
        '\u{0660}'..='\u{0669}' => '\u{0660}',
        '\u{06F0}'..='\u{06F9}' => '\u{06F0}',
        '\u{0966}'..='\u{096F}' => '\u{0966}',
        _ => return None,
    };
    Some((c as u32 - zero as u32) as u8)
}

/// An RFC 3339 date and time, anywhere in a text.
static TIMESTAMP: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})?",
    )
    .expect("timestamp regex")
});

/// A UUID (8-4-4-4-12 hex digits), anywhere in a text: message ids, request ids and correlation
/// ids are UUIDs, and about one random UUID in a hundred holds a stretch of 13+ decimal digits
/// between its dashes that passes the Luhn check.
static UUID: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(
        r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}",
    )
    .expect("uuid regex")
});

/// A W3C trace context attribute let in whatever its digits: a well-formed `traceparent` (ids
/// of random hex), or any `tracestate` (vendor state, carried on only when it holds no card
/// number and masked in a dead letter when it does).
pub fn exempt_trace_context(name: &str, value: Option<&str>) -> bool {
    match name {
        crate::trace::TRACESTATE => true,
        crate::trace::TRACEPARENT => value.is_some_and(is_w3c_traceparent),
        _ => false,
    }
}

/// `version-traceid-parentid-flags` in lowercase hex (W3C Trace Context, level 1).
pub fn is_w3c_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    parts.len() == 4
        && [2, 32, 16, 2].iter().zip(&parts).all(|(n, p)| {
            p.len() == *n && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
}

/// A character that may stand between the digits of a card number as written.
fn card_separator(c: char) -> bool {
    matches!(
        c,
        ' ' | '-'
            | '.'
            | '/'
            | '_'
            | ':'
            | ','
            | '\u{00A0}'
            | '\u{2007}'
            | '\u{2009}'
            | '\u{202F}'
            | '\u{200B}'
            | '\u{2010}'
            | '\u{2011}'
            | '\u{2012}'
            | '\u{2013}'
            | '\u{2014}'
            | '\u{FF0D}'
            | '\u{3000}'
    )
}

/// Whether `text` holds a card number: a run of digits (in any script), each pair at most
/// three separators apart (spaces, dashes, dots, slashes, underscores, colons, commas and their
/// Unicode kin), whose 13–19 digits pass the Luhn check, taken whole or, for a longer run, as
/// its first or last 13–19 digits (a card written with its expiry and code, or after a house
/// number) starting with a card network's first digit (2–6).
pub fn holds_card_number(text: &str) -> bool {
    // Most texts (ids, names, codes) hold fewer digits than any card: no further work.
    if text.chars().filter(|c| digit_value(*c).is_some()).count() < 13 {
        return false;
    }
    // A timestamp's time and fraction (`10:00:00.123456789`) read as 15 digits with colons and
    // a dot between them: a time is not a card, alone or inside a longer text (the JSON of an
    // attribution or a redrive record holds several).
    let text = TIMESTAMP.replace_all(text, " ");
    // Nor is a UUID.
    let text = UUID.replace_all(&text, " ");
    let mut digits: Vec<u8> = Vec::new();
    let mut gap = 0;
    for c in text.chars() {
        if let Some(d) = digit_value(c) {
            digits.push(d);
            gap = 0;
        } else if card_separator(c) && !digits.is_empty() && gap < 3 {
            gap += 1;
        } else {
            if run_holds_card(&digits) {
                return true;
            }
            digits.clear();
            gap = 0;
        }
    }
    run_holds_card(&digits)
}

fn run_holds_card(digits: &[u8]) -> bool {
    let n = digits.len();
    if (13..=19).contains(&n) && luhn(digits) {
        return true;
    }
    let network = |w: &[u8]| (2..=6).contains(&w[0]) && luhn(w);
    (13..=19.min(n.saturating_sub(1)))
        .any(|len| network(&digits[..len]) || network(&digits[n - len..]))
}

/// `text` with every digit (any script) masked as `#`: what is kept of a message refused for
/// payment data.
pub fn mask_digits(text: &str) -> String {
    text.chars()
        .map(|c| if digit_value(c).is_some() { '#' } else { c })
        .collect()
}

/// The Luhn checksum (ISO/IEC 7812) over digits, the check digit last.
pub fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let double = d * 2;
                if double > 9 {
                    double - 9
                } else {
                    double
                }
            } else {
                d
            }
        })
        .sum();
    !digits.is_empty() && sum % 10 == 0
}

/// The size SQS counts for a message attribute: name, data type and value.
pub fn attribute_bytes(name: &str, data_type: &str, value_len: usize) -> usize {
    name.len() + data_type.len() + value_len
}

/// Message attribute an upstream may set with its request id.
pub const UPSTREAM_REQUEST_ID: &str = "request-id";

/// The external types the edge accepts.
pub const ROUTED_TYPES: [&str; 2] = [ORDER_SUBMITTED, DELIVERY_STATUS_REPORTED];

/// What the edge forwards.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The type.
    pub kind: &'static str,
    /// The typed envelope, stamped and re-serialised.
    pub body: String,
    /// Its correlation id.
    pub correlation_id: String,
    /// The edge's source metadata.
    pub metadata: SourceMetadata,
}

/// The edge's decision on one message: rejected with a reason, or the envelope to forward.
/// The checks, in order: size (body and attributes), JSON with no key twice, no card
/// number anywhere, the published schema, then the typed decode that every later stage
/// uses; what is forwarded is that typed value re-serialised, never the raw body.
///
/// # Errors
/// A permanent failure with its reason.
pub fn admit(limits: &IngestionConfig, message: &Message) -> Result<Admitted, HandlerError> {
    check_size(limits, message)?;
    check_unique_keys(&message.body).map_err(|e| {
        if e.contains("duplicate key") {
            HandlerError::permanent(Reason::DUPLICATE_KEY, e)
        } else {
            HandlerError::permanent(Reason::MALFORMED_JSON, e)
        }
    })?;
    let value: serde_json::Value = serde_json::from_str(&message.body)
        .map_err(|e| HandlerError::permanent(Reason::MALFORMED_JSON, describe_json_error(&e)))?;
    check_payment_data(message, &value)?;
    let kind = contract::validate(&value, &EXTERNAL_TYPES)
        .map_err(|v| HandlerError::permanent(v.reason, v.fields.join("; ")))?;
    let kind = ROUTED_TYPES
        .into_iter()
        .find(|k| *k == kind)
        .expect("every external type is routed");
    let sender = sender(limits, message, kind)?;
    // When the fleet's queue accepted it (SQS's SentTimestamp): the same for every delivery of
    // this copy, and how late the order is downstream (adaptive batching reads it).
    let received_at = message
        .sent_at
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(crate::now_rfc3339);
    let body = match kind {
        ORDER_SUBMITTED => stamp::<OrderSubmitted>(value, message, sender, received_at)?,
        _ => stamp::<DeliveryStatusReported>(value, message, sender, received_at)?,
    };
    Ok(Admitted {
        kind,
        body: body.0,
        correlation_id: body.1,
        metadata: body.2,
    })
}

/// The body and the attributes, as SQS counts them, within `max_body_bytes`.
fn check_size(limits: &IngestionConfig, message: &Message) -> Result<(), HandlerError> {
    let attribute_bytes: usize = message
        .raw_attributes
        .iter()
        .map(|(k, v)| {
            attribute_bytes(
                k,
                v.data_type(),
                v.string_value().map_or(0, str::len)
                    + v.binary_value().map_or(0, |b| b.as_ref().len()),
            )
        })
        .sum();
    if message.body.len() + attribute_bytes > limits.max_body_bytes {
        return Err(HandlerError::permanent(
            Reason::BODY_TOO_LARGE,
            format!(
                "{} bytes of body and {attribute_bytes} of attributes, limit {}",
                message.body.len(),
                limits.max_body_bytes
            ),
        ));
    }
    Ok(())
}

/// Payment data never enters the fleet (nor its logs or DLQ attributions: only where), in the
/// body, in an attribute's name or value (a correlation or request id goes into every log line)
/// or in the group id (it travels with everything derived from the message, and `dlq show`
/// shows it). Trace context (`traceparent`, `tracestate`) is exempt: its ids are random hex and
/// its vendor state joins numbers and times, so about one in a hundred trace ids and most New
/// Relic states hold a Luhn-valid run, and refusing them lost the order. It is not order data
/// either: the runtime carries a `tracestate` on only when it holds no card number, and a dead
/// letter's copy masks the digits of one that does.
fn check_payment_data(message: &Message, body: &serde_json::Value) -> Result<(), HandlerError> {
    let refused = |where_: String| {
        Err(HandlerError::permanent(
            Reason::PAYMENT_DATA,
            format!("a card number {where_}"),
        ))
    };
    if let Some(name) = message.raw_attributes.iter().find_map(|(name, v)| {
        if holds_card_number(name) {
            return Some("an attribute's name".to_owned());
        }
        (!exempt_trace_context(name, v.string_value())
            && v.string_value().is_some_and(holds_card_number))
        .then(|| {
            format!(
                "attribute {}",
                name.chars().take(NAMED_KEY_MAX).collect::<String>()
            )
        })
    }) {
        return refused(format!("in {name}"));
    }
    if message.group_id.as_deref().is_some_and(holds_card_number) {
        return refused("in the message group id".to_owned());
    }
    if let Some(path) = find_card_number(body) {
        return refused(format!("at {path}"));
    }
    Ok(())
}

/// Decodes the envelope as the next stage will, stamps the edge's metadata and correlation
/// id, and serialises it again.
fn stamp<P: serde::de::DeserializeOwned + serde::Serialize>(
    value: serde_json::Value,
    message: &Message,
    sender: &str,
    received_at: String,
) -> Result<(String, String, SourceMetadata), HandlerError> {
    let mut envelope: Envelope<P> = serde_json::from_value(value)
        .map_err(|e| HandlerError::permanent(Reason::SCHEMA_VIOLATION, describe_json_error(&e)))?;
    // The upstream's correlation id, else one derived from the event id: every copy of an
    // event (a redelivery, a redrive, an upstream retry) carries the same one.
    let correlation_id = envelope
        .correlation_id
        .clone()
        .or_else(|| {
            message
                .correlation_id
                .clone()
                .filter(|c| crate::runtime::is_valid_id(c))
        })
        .unwrap_or_else(|| derived_correlation_id(&sender_event_id(sender, &envelope.event_id)));
    // Source metadata is always the edge's own: an upstream cannot pre-stamp it (R-2). The
    // source is the sender SQS saw, never what the message says of itself.
    let metadata = SourceMetadata {
        source: sender.to_owned(),
        request_id: upstream_label(message.attributes.get(UPSTREAM_REQUEST_ID))
            .unwrap_or_else(|| message.message_id.clone()),
        received_at,
    };
    // Event ids are the sender's own: namespaced, so one sender cannot take another's.
    envelope.event_id = sender_event_id(sender, &envelope.event_id);
    envelope.correlation_id = Some(correlation_id.clone());
    envelope.metadata = Some(metadata.clone());
    let body = serde_json::to_string(&envelope).expect("envelopes serialize");
    Ok((body, correlation_id, metadata))
}

/// The named sender of the message, if it may send `kind`.
fn sender<'a>(
    limits: &'a IngestionConfig,
    message: &Message,
    kind: &str,
) -> Result<&'a str, HandlerError> {
    let not_allowed = |why: String| HandlerError::permanent(Reason::SENDER_NOT_ALLOWED, why);
    if message.sender_id.is_none() {
        return Err(not_allowed("the message has no SenderId".to_owned()));
    }
    // A redrive or an import by the operator is checked as sent by its first sender, which its
    // redrive record names (believed of a redriver only).
    let first = message.first_sender(&limits.redrivers).ok_or_else(|| {
        not_allowed(
            "a redriver sent it without a redrive record naming its first sender".to_owned(),
        )
    })?;
    let id = first.as_str();
    let (name, sender) = limits
        .sender_of(id)
        .ok_or_else(|| not_allowed("its SenderId is not a configured sender".to_owned()))?;
    if !sender.types.iter().any(|t| t == kind) {
        return Err(not_allowed(format!("sender `{name}` may not send {kind}")));
    }
    Ok(name)
}

/// The id of a sender's event inside the fleet: `<sender>:<event id>`.
pub fn sender_event_id(sender: &str, event_id: &str) -> String {
    format!("{sender}:{event_id}")
}

/// A correlation id for an event whose upstream sent none: the same for every copy of it.
fn derived_correlation_id(event_id: &str) -> String {
    let hash = contract::fingerprint(&event_id);
    format!("c-{}", &hash[..32])
}

/// An upstream-supplied label, kept only when it is a short identifier.
fn upstream_label(value: Option<&String>) -> Option<String> {
    value
        .filter(|v| crate::runtime::is_valid_id(v) && v.len() <= 64)
        .cloned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuids_are_not_card_numbers_and_a_card_beside_one_still_is() {
        // Ids the fleet and its upstreams carry in attributes: before UUIDs were set apart,
        // about one in a hundred was refused as payment data.
        let flagged = (0..20_000)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .filter(|id| {
                holds_card_number(id)
                    || holds_card_number(&format!(r#"{{"message_id":"{}"}}"#, id.to_uppercase()))
            })
            .count();
        assert_eq!(flagged, 0);
        let id = "12345678-1234-4234-8234-123456789012";
        assert!(!holds_card_number(id));
        assert!(holds_card_number(&format!("{id} 4111 1111 1111 1111")));
    }

    use super::*;

    #[test]
    fn a_key_twice_at_any_depth_is_refused() {
        assert!(check_unique_keys(r#"{"a":1,"b":{"c":[{"d":1,"e":2}]}}"#).is_ok());
        let e = check_unique_keys(r#"{"quantity":1,"quantity":1000}"#).unwrap_err();
        assert!(e.contains("duplicate key at line 1"), "{e}");
        assert!(!e.contains("quantity"), "the key is not echoed: {e}");
        assert!(check_unique_keys(r#"{"p":{"lines":[{"sku":"A","sku":"B"}]}}"#).is_err());
        // An escaped key is the same key.
        assert!(check_unique_keys(r#"{"a":1,"\u0061":2}"#).is_err());
        assert!(check_unique_keys(r#"{"a":1} trailing"#).is_err());
        assert!(check_unique_keys("{not json").is_err());
        // The same key in two sibling objects is fine.
        assert!(check_unique_keys(r#"[{"a":1},{"a":2}]"#).is_ok());
    }

    #[test]
    fn card_numbers_are_found_in_any_form_and_only_where_luhn_passes() {
        for card in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "4111.1111.1111.1111",
            "4111/1111/1111/1111",
            "4111_1111_1111_1111",
            "ref 378282246310005 ok",
            "6011111111111117",
            "pay_4111111111111111",
            "4111:1111:1111:1111",
            "4111111111111111-1228",
            "4111 1111 1111 1111 12/28 737",
            "Flat 2 4111 1111 1111 1111",
            "4111--1111--1111--1111",
            "4111 - 1111 - 1111 - 1111",
            "\u{FF14}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}\u{FF11}",
            "4111\u{00A0}1111\u{00A0}1111\u{00A0}1111",
            "4111\u{2013}1111\u{2013}1111\u{2013}1111",
            "4111,1111,1111,1111",
            "paid 2026-11-25T02:57:12Z with 4111 1111 1111 1111",
        ] {
            assert!(holds_card_number(card), "{card}");
        }
        for not_card in [
            "4111111111111112",
            "411111111111",
            "11111111111111111111",
            "+33 6 12 34 56 78",
            "pay_0123456789ab",
            "2026-11-25T10:00:00Z",
            "2026-11-25T21:07:13.123456789Z",
            "2026-11-25T02:57:12.445566778Z",
            // Its time and fraction, 031234123456780, pass Luhn: the exemption is what holds.
            "2026-11-25T03:12:34.123456780Z",
            r#"{"reason":"x","first_failed_at":"2026-11-25T03:12:34.123456780Z"}"#,
        ] {
            assert!(!holds_card_number(not_card), "{not_card}");
        }
        let v = serde_json::json!({"payload": {"lines": [{"sku": "A"}], "payment_reference": "4111 1111 1111 1111"}});
        assert_eq!(
            find_card_number(&v).as_deref(),
            Some("/payload/payment_reference")
        );
        let v = serde_json::json!({"payload": {"n": 4_111_111_111_111_111_u64}});
        assert_eq!(find_card_number(&v).as_deref(), Some("/payload/n"));
        assert_eq!(find_card_number(&serde_json::json!({"a": "b"})), None);
    }

    #[test]
    fn a_message_refused_for_payment_data_keeps_no_digit() {
        let masked = mask_digits(r#"{"payment_reference":"4111 1111 1111 1111","n":"\u{FF14}2"}"#);
        assert!(
            !masked.chars().any(|c| digit_value(c).is_some()),
            "{masked}"
        );
        assert!(masked.contains("#### #### #### ####"), "{masked}");
    }
}
