//! The message contract: one versioned JSON envelope for every queue, and the payload of each
//! message type. The JSON Schemas in `common/schemas/` are generated from these types (a test
//! holds the two together), and the edge validates against them.
//!
//! Money is integer minor units with a currency code; times are RFC 3339 in UTC; the event id is
//! the producer's and is the idempotency key. Payment data never enters the fleet: a payment
//! reference only.

use std::sync::LazyLock;

use crate::failure::Reason;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};

/// The schema version this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// An order placed on the storefront (upstream → ingestion → orders).
pub const ORDER_SUBMITTED: &str = "order.submitted";
/// A carrier's status report (upstream → ingestion → delivery).
pub const DELIVERY_STATUS_REPORTED: &str = "delivery.status_reported";
/// An order that passed its checks (orders → warehouse).
pub const ORDER_ACCEPTED: &str = "order.accepted";
/// An order packed and ready for the carrier (warehouse → delivery).
pub const ORDER_PACKED: &str = "order.packed";

/// Types the edge accepts from upstream.
pub const EXTERNAL_TYPES: [&str; 2] = [ORDER_SUBMITTED, DELIVERY_STATUS_REPORTED];
/// Every type, with its schema file name.
pub const ALL_TYPES: [&str; 4] = [
    ORDER_SUBMITTED,
    DELIVERY_STATUS_REPORTED,
    ORDER_ACCEPTED,
    ORDER_PACKED,
];

const ID_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$";
const TIME_PATTERN: &str =
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$";

/// The envelope around every message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Envelope<P> {
    /// The message type, e.g. `order.submitted`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The schema version of the payload.
    pub schema_version: u32,
    /// Chosen by the producer, unique per event: the idempotency key.
    #[schemars(regex(pattern = ID_PATTERN))]
    pub event_id: String,
    /// When the event happened, RFC 3339 UTC.
    #[schemars(regex(pattern = TIME_PATTERN))]
    pub occurred_at: String,
    /// Ties every message and record of one flow together; created at the edge when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = ID_PATTERN))]
    pub correlation_id: Option<String>,
    /// Who sent it and when the fleet took it in; stamped by the edge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<SourceMetadata>,
    /// The type's payload.
    pub payload: P,
}

/// Source metadata stamped by the edge (threat R-2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceMetadata {
    /// The sending system (storefront, carrier-webhook…).
    #[schemars(length(min = 1, max = 64))]
    pub source: String,
    /// The upstream's request id, or the SQS message id when it sent none.
    #[schemars(length(min = 1, max = 128))]
    pub request_id: String,
    /// When ingestion received it, RFC 3339 UTC.
    #[schemars(regex(pattern = TIME_PATTERN))]
    pub received_at: String,
}

/// An amount of money in minor units (cents) of a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Money {
    /// Minor units; never a float.
    #[schemars(range(min = 0, max = 100_000_000))]
    pub amount_minor: i64,
    /// ISO 4217 code.
    #[schemars(regex(pattern = "^[A-Z]{3}$"))]
    pub currency: Currency,
}

/// An ISO 4217 currency code (three upper-case letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// The code as text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII by construction")
    }
}

impl TryFrom<String> for Currency {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|x| x.is_ascii_uppercase()) => Ok(Self([*a, *b, *c])),
            _ => Err("currency must be three upper-case letters".to_owned()),
        }
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> Self {
        c.as_str().to_owned()
    }
}

impl JsonSchema for Currency {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Currency".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> Schema {
        schemars::json_schema!({"type": "string", "pattern": "^[A-Z]{3}$"})
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    /// The product.
    #[schemars(regex(pattern = ID_PATTERN))]
    pub sku: String,
    /// How many.
    #[schemars(range(min = 1, max = 1000))]
    pub quantity: u32,
    /// The price the customer saw, per unit.
    pub unit_price: Money,
}

/// Where the order goes. Personal data: stored in the order, never logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// Recipient's name.
    #[schemars(length(min = 1, max = 200))]
    pub name: String,
    /// Street and number.
    #[schemars(length(min = 1, max = 200))]
    pub line1: String,
    /// Flat, floor…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub line2: Option<String>,
    /// City.
    #[schemars(length(min = 1, max = 100))]
    pub city: String,
    /// Postal code.
    #[schemars(length(min = 1, max = 20))]
    pub postal_code: String,
    /// ISO 3166-1 alpha-2.
    #[schemars(regex(pattern = "^[A-Z]{2}$"))]
    pub country: String,
    /// Recipient's phone, for the carrier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub phone: Option<String>,
}

/// `order.submitted`: a customer placed an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderSubmitted {
    /// The order's id.
    #[schemars(regex(pattern = ID_PATTERN))]
    pub order_id: String,
    /// The customer's id.
    #[schemars(regex(pattern = ID_PATTERN))]
    pub user_id: String,
    /// Customer's e-mail, for notifications. Personal data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 254))]
    pub email: Option<String>,
    /// What was ordered.
    #[schemars(length(min = 1, max = 100))]
    pub lines: Vec<OrderLine>,
    /// Where to deliver.
    pub delivery_address: Address,
    /// The payment provider's reference; never card data.
    #[schemars(regex(pattern = ID_PATTERN))]
    pub payment_reference: String,
}

/// A carrier's view of a shipment.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, PartialOrd, Ord,
)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Packed, waiting for the carrier (set by the fleet, not carriers).
    AwaitingCarrier,
    /// The carrier created a label.
    LabelCreated,
    /// On its way.
    InTransit,
    /// With the driver.
    OutForDelivery,
    /// The driver could not deliver.
    FailedAttempt,
    /// Delivered.
    Delivered,
    /// Sent back.
    Returned,
}

impl DeliveryStatus {
    /// The status's place in the shipment's life; a status never replaces a higher one.
    pub fn rank(self) -> u8 {
        match self {
            Self::AwaitingCarrier => 0,
            Self::LabelCreated => 1,
            Self::InTransit => 2,
            Self::OutForDelivery => 3,
            Self::FailedAttempt => 4,
            Self::Delivered => 5,
            Self::Returned => 6,
        }
    }

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingCarrier => "awaiting_carrier",
            Self::LabelCreated => "label_created",
            Self::InTransit => "in_transit",
            Self::OutForDelivery => "out_for_delivery",
            Self::FailedAttempt => "failed_attempt",
            Self::Delivered => "delivered",
            Self::Returned => "returned",
        }
    }
}

/// Where an order stands in the fleet's orders table: the orders stage accepts or rejects it, the
/// warehouse packs it or finds it cannot. Carrier progress is a [`DeliveryStatus`] beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Products and prices check out; waiting for the warehouse.
    Accepted,
    /// Refused by the orders stage (unknown products, wrong prices); final.
    Rejected,
    /// Packed (lines perhaps substituted or removed); carrier events apply from here.
    Packed,
    /// Nothing on it could be packed; final.
    Unpackable,
}

impl OrderStatus {
    /// The snake_case name, as stored and logged.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Rejected => "rejected",
            Self::Packed => "packed",
            Self::Unpackable => "unpackable",
        }
    }

    /// Every status, in the order an order may reach them.
    pub const ALL: [OrderStatus; 4] = [
        Self::Accepted,
        Self::Rejected,
        Self::Packed,
        Self::Unpackable,
    ];

    /// The status named `name`, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `delivery.status_reported`: a carrier reports where a shipment is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryStatusReported {
    /// The order shipped.
    #[schemars(regex(pattern = ID_PATTERN))]
    pub order_id: String,
    /// The new status.
    pub status: DeliveryStatus,
    /// When the carrier saw it, RFC 3339 UTC.
    #[schemars(regex(pattern = TIME_PATTERN))]
    pub at: String,
    /// The carrier's tracking reference.
    #[schemars(regex(pattern = ID_PATTERN))]
    pub carrier_reference: String,
}

/// `order.accepted` and `order.packed`: a stage hands an order on by id; the order record is
/// the source of truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderRef {
    /// The order's id.
    #[schemars(regex(pattern = ID_PATTERN))]
    pub order_id: String,
}

/// The JSON Schema of a message type's envelope, as published in `common/schemas/`.
pub fn schema_for_type(kind: &str) -> Option<Schema> {
    let mut schema = match kind {
        ORDER_SUBMITTED => schemars::schema_for!(Envelope<OrderSubmitted>),
        DELIVERY_STATUS_REPORTED => schemars::schema_for!(Envelope<DeliveryStatusReported>),
        ORDER_ACCEPTED | ORDER_PACKED => schemars::schema_for!(Envelope<OrderRef>),
        _ => return None,
    };
    let object = schema.ensure_object();
    object.insert(
        "$id".into(),
        format!("https://schemas.fleet.local/{kind}.v{SCHEMA_VERSION}.json").into(),
    );
    object.insert("title".into(), kind.into());
    let props = object
        .get_mut("properties")
        .and_then(|p| p.as_object_mut())
        .expect("an envelope has properties");
    props.insert("type".into(), serde_json::json!({"const": kind}));
    props.insert(
        "schema_version".into(),
        serde_json::json!({"const": SCHEMA_VERSION}),
    );
    Some(schema)
}

/// A stable fingerprint (SHA-256, hex) of a value's JSON form: equal payloads, equal
/// fingerprints, whatever the order of keys in the JSON and whatever serde_json's features
/// (`preserve_order`, which some dependencies switch on, keeps keys in insertion order). Used
/// to tell a redelivery from a conflicting reuse of an event id.
pub fn fingerprint<T: Serialize>(value: &T) -> String {
    use sha2::Digest;
    let mut canonical = String::new();
    if let Ok(v) = serde_json::to_value(value) {
        write_canonical(&v, &mut canonical);
    }
    sha2::Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// JSON text with every object's keys sorted, at every depth.
fn write_canonical(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The published schema file of a type.
pub fn schema_file_name(kind: &str) -> String {
    format!("{kind}.v{SCHEMA_VERSION}.schema.json")
}

static VALIDATORS: LazyLock<Vec<(&'static str, jsonschema::Validator)>> = LazyLock::new(|| {
    ALL_TYPES
        .iter()
        .map(|kind| {
            let schema = schema_for_type(kind).expect("every type has a schema");
            let validator =
                jsonschema::validator_for(schema.as_value()).expect("generated schemas compile");
            (*kind, validator)
        })
        .collect()
});

/// Why a body does not satisfy the contract: a reason code and field-level reasons. Reasons
/// name the field and the rule, never the offending value (which may be personal data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractViolation {
    /// `unknown_type`, `unsupported_schema_version` or `schema_violation`.
    pub reason: Reason,
    /// `field: rule` items, at most 20.
    pub fields: Vec<String>,
}

impl std::fmt::Display for ContractViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.fields.join("; "))
    }
}

/// Checks a parsed body against the schema of its `type`.
///
/// # Errors
/// The violation, with field-level reasons.
pub fn validate(
    body: &serde_json::Value,
    accepted: &[&str],
) -> Result<&'static str, ContractViolation> {
    let kind = body
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or_default();
    let Some((kind, validator)) = VALIDATORS
        .iter()
        .find(|(k, _)| *k == kind && accepted.contains(k))
    else {
        return Err(ContractViolation {
            reason: Reason::UNKNOWN_TYPE,
            fields: vec![format!("type: not one of {}", accepted.join(", "))],
        });
    };
    if body
        .get("schema_version")
        .and_then(serde_json::Value::as_u64)
        != Some(u64::from(SCHEMA_VERSION))
    {
        return Err(ContractViolation {
            reason: Reason::UNSUPPORTED_SCHEMA_VERSION,
            fields: vec![format!("schema_version: must be {SCHEMA_VERSION}")],
        });
    }
    let fields: Vec<String> = validator
        .iter_errors(body)
        .take(20)
        .map(|e| {
            let rule = e
                .schema_path()
                .as_str()
                .rsplit('/')
                .next()
                .unwrap_or("invalid")
                .to_owned();
            let at = e
                .instance_path()
                .as_str()
                .trim_start_matches('/')
                .replace('/', ".");
            let at = if at.is_empty() {
                "(root)".to_owned()
            } else {
                at
            };
            // For missing or unexpected properties, the rule alone does not say which field.
            match rule.as_str() {
                "required" | "additionalProperties" => {
                    format!("{at}: {rule} ({})", property_names(&e.to_string()))
                }
                _ => format!("{at}: {rule}"),
            }
        })
        .collect();
    if fields.is_empty() {
        Ok(kind)
    } else {
        Err(ContractViolation {
            reason: Reason::SCHEMA_VIOLATION,
            fields,
        })
    }
}

/// The property names quoted in a `required`/`additionalProperties` error; names are schema
/// field names or attacker-chosen keys, so they are bounded and stripped to identifier chars.
fn property_names(message: &str) -> String {
    message
        .split(['"', '\''])
        .skip(1)
        .step_by(2)
        .map(|name| {
            name.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(40)
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn an_order_status_is_stored_under_the_name_it_is_logged_and_parsed_by() {
        for status in OrderStatus::ALL {
            let stored = serde_json::to_value(status).unwrap();
            assert_eq!(stored, serde_json::json!(status.as_str()));
            assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(OrderStatus::parse("shipped"), None);
    }

    fn schemas_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas")
    }

    /// The published schemas are what the code generates. Run with `UPDATE_SCHEMAS=1` after
    /// changing a type, and review the diff.
    #[test]
    fn published_schemas_match_the_rust_types() {
        for kind in ALL_TYPES {
            let generated =
                serde_json::to_string_pretty(&schema_for_type(kind).unwrap()).unwrap() + "\n";
            let path = schemas_dir().join(schema_file_name(kind));
            if std::env::var_os("UPDATE_SCHEMAS").is_some() {
                std::fs::create_dir_all(schemas_dir()).unwrap();
                std::fs::write(&path, &generated).unwrap();
            }
            let published = std::fs::read_to_string(&path).unwrap_or_else(|_| {
                panic!("{} is missing; run with UPDATE_SCHEMAS=1", path.display())
            });
            assert_eq!(
                published,
                generated,
                "{} drifted from the Rust types; run with UPDATE_SCHEMAS=1",
                path.display()
            );
        }
    }

    pub(crate) fn sample_order() -> serde_json::Value {
        serde_json::json!({
            "type": "order.submitted", "schema_version": 1, "event_id": "evt-1",
            "occurred_at": "2026-11-23T10:00:00Z",
            "payload": {
                "order_id": "o-1", "user_id": "u-1", "email": "jane@example.com",
                "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": {"amount_minor": 1299, "currency": "EUR"}}],
                "delivery_address": {"name": "Jane Doe", "line1": "1 Main St", "city": "Paris", "postal_code": "75001", "country": "FR"},
                "payment_reference": "pay_123"
            }
        })
    }

    #[test]
    fn schema_and_serde_agree_on_valid_and_invalid_bodies() {
        let valid = sample_order();
        assert_eq!(validate(&valid, &EXTERNAL_TYPES), Ok(ORDER_SUBMITTED));
        serde_json::from_value::<Envelope<OrderSubmitted>>(valid.clone())
            .expect("serde reads what the schema accepts");

        let mut cases = Vec::new();
        let mut v = valid.clone();
        v["payload"]["lines"][0]["unit_price"]["amount_minor"] = serde_json::json!(12.5);
        cases.push(("a float price", v));
        let mut v = valid.clone();
        v["payload"]["card_number"] = serde_json::json!("4111111111111111");
        cases.push(("an unknown field", v));
        let mut v = valid.clone();
        v["payload"]
            .as_object_mut()
            .unwrap()
            .remove("payment_reference");
        cases.push(("a missing field", v));
        let mut v = valid.clone();
        v["payload"]["lines"][0]["unit_price"]["currency"] = serde_json::json!("euro");
        cases.push(("a bad currency", v));
        for (what, body) in cases {
            assert!(
                validate(&body, &EXTERNAL_TYPES).is_err(),
                "the schema refuses {what}"
            );
            assert!(
                serde_json::from_value::<Envelope<OrderSubmitted>>(body).is_err(),
                "serde refuses {what}"
            );
        }
    }

    #[test]
    fn violations_name_fields_not_values() {
        let mut v = sample_order();
        v["payload"]["lines"][0]["quantity"] = serde_json::json!(0);
        v["payload"]["delivery_address"]["country"] = serde_json::json!("jane@example.com");
        v["payload"]["card_number"] = serde_json::json!("4111111111111111");
        let err = validate(&v, &EXTERNAL_TYPES).unwrap_err();
        assert_eq!(err.reason, Reason::SCHEMA_VIOLATION);
        let text = err.to_string();
        assert!(text.contains("payload.lines.0.quantity: minimum"), "{text}");
        assert!(
            text.contains("payload.delivery_address.country: pattern"),
            "{text}"
        );
        assert!(
            text.contains("additionalProperties (card_number)"),
            "{text}"
        );
        assert!(
            !text.contains("jane@example.com") && !text.contains("4111"),
            "{text}"
        );
    }

    #[test]
    fn unknown_and_internal_types_are_refused_at_the_edge() {
        let mut v = sample_order();
        v["type"] = serde_json::json!("order.accepted");
        assert_eq!(
            validate(&v, &EXTERNAL_TYPES).unwrap_err().reason,
            Reason::UNKNOWN_TYPE
        );
        v["type"] = serde_json::json!("refund.requested");
        assert_eq!(
            validate(&v, &EXTERNAL_TYPES).unwrap_err().reason,
            Reason::UNKNOWN_TYPE
        );
        let mut v = sample_order();
        v["schema_version"] = serde_json::json!(2);
        assert_eq!(
            validate(&v, &EXTERNAL_TYPES).unwrap_err().reason,
            Reason::UNSUPPORTED_SCHEMA_VERSION
        );
    }

    #[test]
    fn delivery_statuses_are_ranked() {
        assert!(DeliveryStatus::Delivered.rank() > DeliveryStatus::InTransit.rank());
        assert!(DeliveryStatus::LabelCreated.rank() > DeliveryStatus::AwaitingCarrier.rank());
    }

    #[test]
    fn fingerprints_do_not_depend_on_key_order() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"q":2,"p":3}],"x":"s"}}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":{"x":"s","y":[1,{"p":3,"q":2}]},"b":1}"#).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        let c: serde_json::Value =
            serde_json::from_str(r#"{"a":{"x":"s","y":[{"p":3,"q":2},1]},"b":1}"#).unwrap();
        assert_ne!(fingerprint(&a), fingerprint(&c), "array order matters");
    }
}
