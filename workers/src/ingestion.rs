//! Ingestion: the untrusted edge (threat T-1). Enforces the size limit and the schema, rejects
//! unknown types and fields, keeps or creates the correlation id, stamps source metadata,
//! drops duplicates of an event id, and routes by type. Every rejection is dead-lettered with
//! its reason; nothing is dropped silently.

use aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure;
use fleet_common::attribution::{CORRELATION_ID, RECEIVED_AT, REQUEST_ID, SOURCE};
use fleet_common::config::IngestionConfig;
use fleet_common::contract::{
    self, Envelope, SourceMetadata, DELIVERY_STATUS_REPORTED, EXTERNAL_TYPES, ORDER_SUBMITTED,
};
use fleet_common::failure::{HandlerError, Reason};
use fleet_common::runtime::{describe_json_error, Handler, Message, Outcome, Outgoing};
use tracing::info;

use crate::store::{self, n, s, Store};

/// Message attribute an upstream may set to name itself.
pub const UPSTREAM_SOURCE: &str = "source";
/// Message attribute an upstream may set with its request id.
pub const UPSTREAM_REQUEST_ID: &str = "request-id";

/// The ingestion worker.
pub struct Ingestion {
    store: Store,
    limits: IngestionConfig,
}

impl Ingestion {
    /// An ingestion worker writing its idempotency records through `store`.
    pub fn new(store: Store, limits: IngestionConfig) -> Self {
        Self { store, limits }
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

/// What the edge knows about an event id already.
enum Seen {
    /// First time: the record is ours now.
    New,
    /// This very SQS message came back (a crash or a failed forward): forward again, with the
    /// correlation id and receive time recorded the first time.
    Redelivered {
        correlation_id: String,
        received_at: String,
    },
    /// Another message with the same event and payload: a duplicate from upstream.
    Duplicate,
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

        let fingerprint = contract::fingerprint(&(&envelope.kind, &envelope.payload));
        let correlation_id = envelope
            .correlation_id
            .clone()
            .or_else(|| message.correlation_id.clone().filter(|c| valid_id(c)))
            .unwrap_or_else(|| format!("c-{}", uuid::Uuid::new_v4().simple()));
        let received_at = store::now_rfc3339();
        let (correlation_id, received_at) = match self
            .claim(
                &envelope.event_id,
                message,
                &fingerprint,
                &correlation_id,
                &received_at,
            )
            .await?
        {
            Seen::New => (correlation_id, received_at),
            Seen::Redelivered {
                correlation_id,
                received_at,
            } => (correlation_id, received_at),
            Seen::Duplicate => {
                metrics::counter!("fleet_duplicates_dropped_total", "stage" => "ingestion")
                    .increment(1);
                info!(event_id = %envelope.event_id, kind, "duplicate event dropped");
                return Ok(Outcome::done());
            }
        };

        // Source metadata is always the edge's own: an upstream cannot pre-stamp it (R-2).
        let metadata = SourceMetadata {
            source: upstream_label(message.attributes.get(UPSTREAM_SOURCE))
                .unwrap_or_else(|| self.limits.default_source.clone()),
            request_id: upstream_label(message.attributes.get(UPSTREAM_REQUEST_ID))
                .unwrap_or_else(|| message.message_id.clone()),
            received_at,
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

impl Ingestion {
    /// Records the event id with a conditional put (one write); on a conflict the old record,
    /// returned by the same request, tells redelivery, duplicate and conflict apart.
    async fn claim(
        &self,
        event_id: &str,
        message: &Message,
        fingerprint: &str,
        correlation_id: &str,
        received_at: &str,
    ) -> Result<Seen, HandlerError> {
        let expires_at = time::OffsetDateTime::now_utc().unix_timestamp()
            + i64::from(self.limits.dedup_ttl_hours) * 3600;
        let put = || {
            self.store
                .client
                .put_item()
                .table_name(&self.store.tables.events)
                .item("pk", s(format!("ingest#{event_id}")))
                .item("fingerprint", s(fingerprint))
                .item("message_id", s(&message.message_id))
                .item("correlation_id", s(correlation_id))
                .item("received_at", s(received_at))
                .item("expires_at", n(expires_at))
                .condition_expression("attribute_not_exists(pk)")
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .send()
        };
        match self.store.call(1, put).await {
            Ok(_) => Ok(Seen::New),
            Err(e) => {
                let Some(old) = store::condition_failed_item(&e) else {
                    return Err(store::transient("recording the event id", &e));
                };
                let text = |k: &str| {
                    old.get(k)
                        .and_then(|v| v.as_s().ok())
                        .cloned()
                        .unwrap_or_default()
                };
                if text("fingerprint") != fingerprint {
                    return Err(HandlerError::permanent(
                        Reason::IDEMPOTENCY_CONFLICT,
                        format!("event id {event_id} was first seen with a different payload"),
                    ));
                }
                if text("message_id") == message.message_id {
                    return Ok(Seen::Redelivered {
                        correlation_id: text("correlation_id"),
                        received_at: text("received_at"),
                    });
                }
                Ok(Seen::Duplicate)
            }
        }
    }
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
    use aws_sdk_dynamodb::operation::put_item::{PutItemError, PutItemOutput};
    use aws_sdk_dynamodb::types::error::ConditionalCheckFailedException;
    use aws_smithy_mocks::{mock, mock_client, RuleMode};

    fn ingestion(client: aws_sdk_dynamodb::Client) -> Ingestion {
        let tables = store::Tables {
            orders: "o".into(),
            catalog: "c".into(),
            events: "e".into(),
        };
        Ingestion::new(
            Store::new(client, tables, "ingestion", None),
            IngestionConfig::default(),
        )
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

    fn no_ddb() -> aws_sdk_dynamodb::Client {
        let never = mock!(aws_sdk_dynamodb::Client::put_item)
            .then_output(|| PutItemOutput::builder().build());
        mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&never])
    }

    #[tokio::test]
    async fn a_valid_order_is_stamped_and_routed_with_a_new_correlation_id() {
        let put = mock!(aws_sdk_dynamodb::Client::put_item)
            .then_output(|| PutItemOutput::builder().build());
        let client = mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&put]);
        let out = ingestion(client)
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
        assert_eq!(put.num_calls(), 1, "one write per message");
    }

    #[tokio::test]
    async fn rejections_are_permanent_with_a_reason() {
        let ingest = ingestion(no_ddb());
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

    fn seen_before(fingerprint: String, message_id: &'static str) -> aws_sdk_dynamodb::Client {
        let put = mock!(aws_sdk_dynamodb::Client::put_item).then_error(move || {
            PutItemError::ConditionalCheckFailedException(
                ConditionalCheckFailedException::builder()
                    .item("fingerprint", s(fingerprint.clone()))
                    .item("message_id", s(message_id))
                    .item("correlation_id", s("c-first"))
                    .item("received_at", s("2026-11-23T10:00:01Z"))
                    .build(),
            )
        });
        mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&put])
    }

    fn fingerprint_of(body: &str) -> String {
        let env: Envelope<serde_json::Value> = serde_json::from_str(body).unwrap();
        contract::fingerprint(&(&env.kind, &env.payload))
    }

    #[tokio::test]
    async fn a_duplicate_from_upstream_is_dropped_and_a_conflict_dead_lettered() {
        let body = order_body();
        let out = ingestion(seen_before(fingerprint_of(&body), "another-message"))
            .handle(&Message::for_test(body.clone()))
            .await
            .unwrap();
        assert!(out.forward.is_empty(), "a duplicate is not forwarded");

        let err = ingestion(seen_before("other".into(), "another-message"))
            .handle(&Message::for_test(body))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), Reason::IDEMPOTENCY_CONFLICT);
    }

    #[tokio::test]
    async fn a_redelivery_of_the_same_message_forwards_again_with_the_first_correlation_id() {
        let body = order_body();
        let mut message = Message::for_test(body.clone());
        message.message_id = "m-1".into();
        let out = ingestion(seen_before(fingerprint_of(&body), "m-1"))
            .handle(&message)
            .await
            .unwrap();
        assert_eq!(out.forward.len(), 1);
        assert_eq!(out.forward[0].attributes[CORRELATION_ID], "c-first");
    }
}
