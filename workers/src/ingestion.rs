//! Ingestion: the untrusted edge (threat T-1). Enforces the size limit and the schema, rejects
//! unknown types and fields, keeps or creates the correlation id, stamps source metadata, and
//! routes by type. Every rejection is dead-lettered with its reason; nothing is dropped silently.
//!
//! The edge keeps no idempotency record of its own: every copy of an event that passes it is
//! forwarded, and the next stage's conditional write (the order keyed by its id, a carrier event
//! keyed by its id inside the order) absorbs the copies. An edge record written before the
//! forward is durable would drop a copy whose first forward never landed (a redrive, an upstream
//! retry while the first copy is pending): the order would be lost. Dropping the record is also
//! the cheaper design: no write per message at the edge, and the write a duplicate then costs
//! downstream is paid only by duplicates.

use fleet_common::attribution::{CORRELATION_ID, RECEIVED_AT, REQUEST_ID, SOURCE};
use fleet_common::config::IngestionConfig;
use fleet_common::contract::{
    self, Envelope, SourceMetadata, DELIVERY_STATUS_REPORTED, EXTERNAL_TYPES, ORDER_SUBMITTED,
};
use fleet_common::failure::{HandlerError, Reason};
use fleet_common::runtime::{describe_json_error, Handler, Message, Outcome, Outgoing};
use tracing::info;

use crate::store;

/// Message attribute an upstream may set to name itself.
pub const UPSTREAM_SOURCE: &str = "source";
/// Message attribute an upstream may set with its request id.
pub const UPSTREAM_REQUEST_ID: &str = "request-id";

/// The ingestion worker.
pub struct Ingestion {
    limits: IngestionConfig,
}

impl Ingestion {
    /// An ingestion worker with the edge's limits.
    pub fn new(limits: IngestionConfig) -> Self {
        Self { limits }
    }
}

/// The external types the edge accepts.
pub const ROUTED_TYPES: [&str; 2] = [ORDER_SUBMITTED, DELIVERY_STATUS_REPORTED];

/// The next queue (logical name) of each external type.
pub fn route(kind: &str) -> Option<&'static str> {
    match kind {
        ORDER_SUBMITTED => Some("orders"),
        DELIVERY_STATUS_REPORTED => Some("delivery"),
        _ => None,
    }
}

impl Handler for Ingestion {
    async fn handle(&self, message: &Message) -> Result<Outcome, HandlerError> {
        if message.body.len() > self.limits.max_body_bytes {
            return Err(HandlerError::permanent(
                Reason("body_too_large"),
                format!(
                    "{} bytes, limit {}",
                    message.body.len(),
                    self.limits.max_body_bytes
                ),
            ));
        }
        let value: serde_json::Value = serde_json::from_str(&message.body).map_err(|e| {
            HandlerError::permanent(Reason("malformed_json"), describe_json_error(&e))
        })?;
        let kind = contract::validate(&value, &EXTERNAL_TYPES)
            .map_err(|v| HandlerError::permanent(Reason(v.reason), v.fields.join("; ")))?;
        let mut envelope: Envelope<serde_json::Value> =
            serde_json::from_value(value).map_err(|e| {
                HandlerError::permanent(Reason("schema_violation"), describe_json_error(&e))
            })?;
        let next = route(kind).expect("every external type has a route");

        // The upstream's correlation id, else one derived from the event id: every copy of an
        // event (a redelivery, a redrive, an upstream retry) carries the same one.
        let correlation_id = envelope
            .correlation_id
            .clone()
            .or_else(|| message.correlation_id.clone().filter(|c| valid_id(c)))
            .unwrap_or_else(|| derived_correlation_id(&envelope.event_id));

        // Source metadata is always the edge's own: an upstream cannot pre-stamp it (R-2).
        let metadata = SourceMetadata {
            source: upstream_label(message.attributes.get(UPSTREAM_SOURCE))
                .unwrap_or_else(|| self.limits.default_source.clone()),
            request_id: upstream_label(message.attributes.get(UPSTREAM_REQUEST_ID))
                .unwrap_or_else(|| message.message_id.clone()),
            received_at: store::now_rfc3339(),
        };
        envelope.correlation_id = Some(correlation_id.clone());
        envelope.metadata = Some(metadata.clone());
        info!(event_id = %envelope.event_id, kind, next, "accepted at the edge");
        let body = serde_json::to_string(&envelope).expect("envelopes serialize");
        Ok(Outcome::forward(
            Outgoing::new(next, body)
                .with_attribute(CORRELATION_ID, correlation_id)
                .with_attribute(SOURCE, metadata.source)
                .with_attribute(REQUEST_ID, metadata.request_id)
                .with_attribute(RECEIVED_AT, metadata.received_at),
        ))
    }
}

/// A correlation id for an event whose upstream sent none: the same for every copy of it.
fn derived_correlation_id(event_id: &str) -> String {
    let hash = contract::fingerprint(&event_id);
    format!("c-{}", &hash[..32])
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
}

/// An upstream-supplied label, kept only when it is a short identifier.
fn upstream_label(value: Option<&String>) -> Option<String> {
    value.filter(|v| valid_id(v) && v.len() <= 64).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingestion() -> Ingestion {
        Ingestion::new(IngestionConfig::default())
    }

    fn order_body() -> String {
        serde_json::json!({
            "type": "order.submitted", "schema_version": 1, "event_id": "evt-1",
            "occurred_at": "2026-11-23T10:00:00Z",
            "payload": {
                "order_id": "o-1", "user_id": "u-1",
                "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": {"amount_minor": 1299, "currency": "EUR"}}],
                "delivery_address": {"name": "Jane Doe", "line1": "1 Main St", "city": "Paris", "postal_code": "75001", "country": "FR"},
                "payment_reference": "pay_123"
            }
        })
        .to_string()
    }

    #[tokio::test]
    async fn a_valid_order_is_stamped_and_routed_with_a_correlation_id() {
        let out = ingestion()
            .handle(&Message::for_test(order_body()))
            .await
            .unwrap();
        let fwd = &out.forward[0];
        assert_eq!(fwd.queue, "orders");
        let env: serde_json::Value = serde_json::from_str(&fwd.body).unwrap();
        let corr = env["correlation_id"].as_str().unwrap();
        assert!(corr.starts_with("c-"));
        assert_eq!(fwd.attributes[CORRELATION_ID], corr);
        assert_eq!(env["metadata"]["source"], "unknown");
    }

    #[tokio::test]
    async fn rejections_are_permanent_with_a_reason() {
        let ingest = ingestion();
        let cases = [
            ("{not json", "malformed_json"),
            (
                r#"{"type":"refund.requested","schema_version":1}"#,
                "unknown_type",
            ),
            (
                &order_body().replace(r#""user_id":"u-1""#, r#""user_id":"u-1","ssn":"x""#),
                "schema_violation",
            ),
            (&"x".repeat(70_000), "body_too_large"),
        ];
        for (body, reason) in cases {
            let err = ingest.handle(&Message::for_test(body)).await.unwrap_err();
            assert!(matches!(err, HandlerError::Permanent { .. }), "{reason}");
            assert_eq!(err.reason().0, reason);
        }
    }

    #[tokio::test]
    async fn every_copy_of_an_event_is_forwarded_with_the_same_correlation_id() {
        // A redelivery, a redrive (a new SQS message id) and an upstream retry all reach the
        // next stage, whose conditional write absorbs them; none is dropped at the edge.
        let mut first = Message::for_test(order_body());
        first.message_id = "m-1".into();
        let mut redriven = Message::for_test(order_body());
        redriven.message_id = "m-2".into();
        let a = ingestion().handle(&first).await.unwrap();
        let b = ingestion().handle(&redriven).await.unwrap();
        assert_eq!(a.forward.len(), 1);
        assert_eq!(
            b.forward.len(),
            1,
            "a copy with a new message id is forwarded"
        );
        assert_eq!(
            a.forward[0].attributes[CORRELATION_ID],
            b.forward[0].attributes[CORRELATION_ID]
        );
    }
}
