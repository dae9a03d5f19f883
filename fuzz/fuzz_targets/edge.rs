//! The edge's decision (`fleet_common::edge::admit`) on arbitrary input: raw bytes, and
//! near-valid envelopes (orders and carrier events with duplicated keys, floats for integers,
//! card numbers in any field, unknown fields, odd attributes, any sender). What must hold:
//! - it never panics;
//! - every rejection is permanent and carries a reason code;
//! - every acceptance decodes at the next stage (the typed envelope of its type), holds no card
//!   number anywhere, and names its sender in its event id and source.

#![no_main]
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use fleet_common::config::{IngestionConfig, SenderConfig};
use fleet_common::contract::{DeliveryStatusReported, Envelope, OrderSubmitted};
use fleet_common::edge::{admit, find_card_number};
use fleet_common::failure::HandlerError;
use fleet_common::runtime::Message;
use libfuzzer_sys::fuzz_target;

/// A card number (Luhn-valid) in one of the forms the edge must catch.
const CARDS: [&str; 4] = [
    "4111111111111111",
    "4111 1111 1111 1111",
    "5500-0000-0000-0004",
    "3782.822463.10005",
];

#[derive(Arbitrary, Debug)]
enum Body {
    /// Any text at all.
    Raw(String),
    /// An order submission, perturbed.
    Order(OrderCase),
    /// A carrier event, perturbed.
    Carrier(CarrierCase),
}

#[derive(Arbitrary, Debug)]
struct OrderCase {
    event_id: String,
    order_id: String,
    user_id: String,
    lines: Vec<(String, u16, i32, bool)>,
    currency: String,
    payment_reference: String,
    email: Option<String>,
    name: String,
    country: String,
    mutation: Mutation,
}

#[derive(Arbitrary, Debug)]
struct CarrierCase {
    event_id: String,
    order_id: String,
    status: u8,
    at: String,
    carrier_reference: String,
    mutation: Mutation,
}

#[derive(Arbitrary, Debug)]
enum Mutation {
    None,
    /// A key of the payload twice, with another value.
    DuplicateKey(String),
    /// A card number in the field with this index (strings only).
    Card(u8, u8),
    /// A field the schema does not know.
    Unknown(String, String),
    /// The whole envelope with its keys in another order (or the same).
    Shuffle,
}

#[derive(Arbitrary, Debug)]
struct Case {
    body: Body,
    /// 0: the local sender, 1: a carrier (role, any session), 2: unknown, 3: none.
    sender: u8,
    attributes: Vec<(String, String)>,
}

fn limits() -> IngestionConfig {
    let mut limits = IngestionConfig::default();
    limits.senders.insert(
        "storefront".into(),
        SenderConfig {
            ids: vec!["AROASTOREFRONT".into()],
            types: vec!["order.submitted".into()],
        },
    );
    limits.senders.insert(
        "carrier".into(),
        SenderConfig {
            ids: vec!["AROACARRIER".into()],
            types: vec!["delivery.status_reported".into()],
        },
    );
    limits
}

fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn render(fields: &[(String, String)], mutation: &Mutation) -> String {
    let mut fields: Vec<(String, String)> = fields.to_vec();
    match mutation {
        Mutation::None | Mutation::Shuffle => {}
        Mutation::DuplicateKey(v) => {
            if let Some((k, _)) = fields.first().cloned() {
                fields.push((k, quote(v)));
            }
        }
        Mutation::Card(field, form) => {
            let card = CARDS[usize::from(*form) % CARDS.len()];
            let strings: Vec<usize> = fields
                .iter()
                .enumerate()
                .filter(|(_, (_, v))| v.starts_with('"'))
                .map(|(i, _)| i)
                .collect();
            if !strings.is_empty() {
                let i = strings[usize::from(*field) % strings.len()];
                fields[i].1 = quote(card);
            }
        }
        Mutation::Unknown(k, v) => fields.push((k.clone(), quote(v))),
    }
    if matches!(mutation, Mutation::Shuffle) {
        fields.reverse();
    }
    let inner: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", quote(k)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn body(case: &Body) -> String {
    match case {
        Body::Raw(text) => text.clone(),
        Body::Order(o) => {
            let lines: Vec<String> = o
                .lines
                .iter()
                .take(5)
                .map(|(sku, quantity, amount, float)| {
                    let q = if *float {
                        format!("{quantity}.0")
                    } else {
                        quantity.to_string()
                    };
                    format!(
                        r#"{{"sku":{},"quantity":{q},"unit_price":{{"amount_minor":{amount},"currency":{}}}}}"#,
                        quote(sku),
                        quote(&o.currency)
                    )
                })
                .collect();
            let mut payload = vec![
                ("order_id".to_owned(), quote(&o.order_id)),
                ("user_id".to_owned(), quote(&o.user_id)),
                ("lines".to_owned(), format!("[{}]", lines.join(","))),
                (
                    "delivery_address".to_owned(),
                    format!(
                        r#"{{"name":{},"line1":"1 Main St","city":"Paris","postal_code":"75001","country":{}}}"#,
                        quote(&o.name),
                        quote(&o.country)
                    ),
                ),
                ("payment_reference".to_owned(), quote(&o.payment_reference)),
            ];
            if let Some(email) = &o.email {
                payload.push(("email".to_owned(), quote(email)));
            }
            let payload = render(&payload, &o.mutation);
            envelope("order.submitted", &o.event_id, &payload)
        }
        Body::Carrier(c) => {
            let statuses = [
                "label_created",
                "in_transit",
                "out_for_delivery",
                "failed_attempt",
                "delivered",
                "returned",
                "awaiting_carrier",
                "lost",
            ];
            let payload = vec![
                ("order_id".to_owned(), quote(&c.order_id)),
                (
                    "status".to_owned(),
                    quote(statuses[usize::from(c.status) % statuses.len()]),
                ),
                ("at".to_owned(), quote(&c.at)),
                ("carrier_reference".to_owned(), quote(&c.carrier_reference)),
            ];
            let payload = render(&payload, &c.mutation);
            envelope("delivery.status_reported", &c.event_id, &payload)
        }
    }
}

fn envelope(kind: &str, event_id: &str, payload: &str) -> String {
    format!(
        r#"{{"type":{},"schema_version":1,"event_id":{},"occurred_at":"2026-11-23T10:00:00Z","payload":{payload}}}"#,
        quote(kind),
        quote(event_id)
    )
}

fuzz_target!(|case: Case| {
    let limits = limits();
    let mut message = Message::for_test(body(&case.body));
    message.sender_id = match case.sender % 4 {
        0 => Some("AROASTOREFRONT:web-1".to_owned()),
        1 => Some("AROACARRIER".to_owned()),
        2 => Some("AIDASTRANGER".to_owned()),
        _ => None,
    };
    let mut attributes = BTreeMap::new();
    for (k, v) in case.attributes.into_iter().take(10) {
        message.raw_attributes.insert(
            k.clone(),
            aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v.clone())
                .build()
                .expect("data type set"),
        );
        attributes.insert(k, v);
    }
    message.attributes = attributes;
    match admit(&limits, &message) {
        Err(HandlerError::Permanent { reason, .. }) => {
            assert!(
                !reason.0.is_empty()
                    && reason
                        .0
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_'),
                "a reason code: {reason:?}"
            );
        }
        Err(other) => panic!("the edge's rejections are permanent: {other:?}"),
        Ok(admitted) => {
            let value: serde_json::Value =
                serde_json::from_str(&admitted.body).expect("the forward is JSON");
            assert_eq!(find_card_number(&value), None, "no card number goes on");
            match admitted.kind {
                "order.submitted" => {
                    serde_json::from_str::<Envelope<OrderSubmitted>>(&admitted.body)
                        .expect("the orders stage reads what the edge accepts");
                }
                "delivery.status_reported" => {
                    serde_json::from_str::<Envelope<DeliveryStatusReported>>(&admitted.body)
                        .expect("the delivery stage reads what the edge accepts");
                }
                other => panic!("routed an unknown type {other}"),
            }
            let sender = admitted.metadata.source.as_str();
            assert!(matches!(sender, "storefront" | "carrier"), "{sender}");
            assert!(
                value["event_id"]
                    .as_str()
                    .is_some_and(|e| e.starts_with(&format!("{sender}:"))),
                "event ids are namespaced by sender"
            );
        }
    }
});
