//! Ingestion: the untrusted edge (threat T-1). The decision on each message is
//! `fleet_common::edge::admit` (size, duplicate keys, card numbers, schema, the typed decode,
//! the sender and what it may send); this handler routes what it admits by type. Every
//! rejection is dead-lettered with its reason; nothing is dropped silently.
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
use fleet_common::contract::{DELIVERY_STATUS_REPORTED, ORDER_SUBMITTED};
use fleet_common::edge::{self, Admitted};
pub use fleet_common::edge::{sender_event_id, ROUTED_TYPES, UPSTREAM_REQUEST_ID};
use fleet_common::failure::HandlerError;
use fleet_common::runtime::{Handler, Message, Outcome, Outgoing};
use tracing::info;

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
        let Admitted {
            kind,
            body,
            correlation_id,
            metadata,
        } = edge::admit(&self.limits, message)?;
        let next = route(kind).expect("every external type has a route");
        info!(kind, next, "accepted at the edge");
        Ok(Outcome::forward(
            Outgoing::new(next, body)
                .with_attribute(CORRELATION_ID, correlation_id)
                .with_attribute(SOURCE, metadata.source)
                .with_attribute(REQUEST_ID, metadata.request_id)
                .with_attribute(RECEIVED_AT, metadata.received_at),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::contract::{DeliveryStatusReported, Envelope, OrderSubmitted};
    use fleet_common::failure::HandlerError;

    fn limits() -> IngestionConfig {
        let mut limits = IngestionConfig::default();
        limits.senders.insert(
            "local".into(),
            fleet_common::config::SenderConfig {
                ids: vec!["000000000000".into()],
                types: vec![ORDER_SUBMITTED.into(), DELIVERY_STATUS_REPORTED.into()],
            },
        );
        limits.senders.insert(
            "carrier".into(),
            fleet_common::config::SenderConfig {
                ids: vec!["AROACARRIER".into()],
                types: vec![DELIVERY_STATUS_REPORTED.into()],
            },
        );
        limits.redrivers = vec!["AROAOPERATOR".into()];
        limits
    }

    /// A message as `dlq redrive` sends it back: from the operator, with a redrive record.
    fn redriven(body: String, first_sender: Option<&str>, by: &str) -> Message {
        let mut m = Message::for_test(body);
        m.sender_id = Some(by.into());
        let record = fleet_common::attribution::RedriveRecord {
            count: 1,
            at: time::OffsetDateTime::now_utc(),
            from_queue: "fleet-ingest-dlq".into(),
            previous_reason: Some("dependency_unavailable".into()),
            id: Some("20261202T170000Z-0a1b2c3d".into()),
            sender_id: first_sender.map(str::to_owned),
            copy_of: None,
        };
        m.raw_attributes.insert(
            fleet_common::attribution::REDRIVE.into(),
            aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value(serde_json::to_string(&record).unwrap())
                .build()
                .unwrap(),
        );
        m
    }

    #[test]
    fn a_redrive_by_the_operator_is_checked_as_sent_by_its_first_sender_and_nobody_else_is_believed(
    ) {
        // The operator's redrive of an upstream's order: accepted as the upstream's.
        let order = redriven(order_body(), Some("000000000000"), "AROAOPERATOR:ops-alice");
        let out = ingestion().handle(&order).await_now().unwrap();
        assert_eq!(out.forward.len(), 1, "the redriven order goes on");
        let env: serde_json::Value = serde_json::from_str(&out.forward[0].body).unwrap();
        assert_eq!(
            env["metadata"]["source"], "local",
            "the first sender, not the operator"
        );
        // The same record naming the carrier: the carrier may not place orders.
        let as_carrier = redriven(
            order_body(),
            Some("AROACARRIER:hook"),
            "AROAOPERATOR:ops-alice",
        );
        let err = ingestion().handle(&as_carrier).await_now().unwrap_err();
        assert_eq!(err.reason().0, "sender_not_allowed");
        // From the operator without a first sender (a record written before it was kept).
        let unknown = redriven(order_body(), None, "AROAOPERATOR:ops-alice");
        let err = ingestion().handle(&unknown).await_now().unwrap_err();
        assert_eq!(err.reason().0, "sender_not_allowed");
        assert!(err.detail().contains("redrive record"), "{}", err.detail());
        // An upstream's own record is not believed: the carrier claiming the local sender is
        // still the carrier.
        let forged = redriven(order_body(), Some("000000000000"), "AROACARRIER:hook");
        let err = ingestion().handle(&forged).await_now().unwrap_err();
        assert_eq!(err.reason().0, "sender_not_allowed");
        assert!(err.detail().contains("carrier"), "{}", err.detail());
    }

    fn ingestion() -> Ingestion {
        Ingestion::new(limits())
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
        assert_eq!(env["metadata"]["source"], "local", "the sender SQS saw");
        assert_eq!(env["event_id"], "local:evt-1", "namespaced by sender");
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

    fn rejected(body: &str) -> String {
        let err = ingestion()
            .handle(&Message::for_test(body))
            .await_now()
            .unwrap_err();
        assert!(matches!(err, HandlerError::Permanent { .. }), "{err:?}");
        err.reason().0.to_owned()
    }

    /// Runs a handler future to completion on a small runtime (the edge's checks never wait).
    trait AwaitNow: std::future::Future + Sized {
        fn await_now(self) -> Self::Output {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(self)
        }
    }
    impl<F: std::future::Future> AwaitNow for F {}

    #[test]
    fn a_key_twice_is_refused_not_resolved_to_the_last() {
        let body = order_body().replace(r#""quantity":2"#, r#""quantity":1,"quantity":1000"#);
        assert!(body.contains(r#""quantity":1,"quantity":1000"#));
        assert_eq!(rejected(&body), "duplicate_key");
        let body = order_body().replace(
            r#""type":"order.submitted""#,
            r#""type":"order.submitted","type":"order.submitted""#,
        );
        assert_eq!(rejected(&body), "duplicate_key");
    }

    #[test]
    fn a_card_number_anywhere_is_refused_and_never_echoed() {
        for (from, to) in [
            (
                r#""payment_reference":"pay_123""#,
                r#""payment_reference":"4111111111111111""#,
            ),
            (
                r#""payment_reference":"pay_123""#,
                r#""payment_reference":"4111-1111-1111-1111""#,
            ),
            (r#""line1":"1 Main St""#, r#""line1":"4111 1111 1111 1111""#),
            (
                r#""user_id":"u-1""#,
                r#""user_id":"u-1","card_number":"4111.1111.1111.1111""#,
            ),
        ] {
            let body = order_body().replace(from, to);
            assert_ne!(body, order_body(), "{from}");
            let err = ingestion()
                .handle(&Message::for_test(body))
                .await_now()
                .unwrap_err();
            assert_eq!(err.reason().0, "payment_data", "{to}");
            assert!(
                !err.detail().contains("1111"),
                "the number is not echoed: {}",
                err.detail()
            );
        }
        // In an attribute too: a correlation id goes into every log line about the message.
        let mut message = Message::for_test(order_body());
        message.raw_attributes.insert(
            "correlation-id".into(),
            aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value("4111111111111111")
                .build()
                .unwrap(),
        );
        let err = ingestion().handle(&message).await_now().unwrap_err();
        assert_eq!(err.reason().0, "payment_data");
        assert!(!err.detail().contains("1111"), "{}", err.detail());
    }

    fn with_attribute(name: &str, value: &str) -> Message {
        let mut message = Message::for_test(order_body());
        message.raw_attributes.insert(
            name.into(),
            aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .unwrap(),
        );
        message
    }

    #[test]
    fn trace_context_whose_digits_look_like_a_card_does_not_cost_the_order() {
        // W3C trace ids are random hex: about one in a hundred holds a Luhn-valid run of 13+
        // digits between its letters; a New Relic tracestate joins a priority and a time in
        // milliseconds into one. Both were refused as payment data and the order lost.
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for (name, value) in [
            (
                "traceparent",
                "00-5d14111111111111111aaaaaaaaaaaaa-00f067aa0ba902b7-01",
            ),
            (
                "tracestate",
                "33@nr=0-0-33-5043-27ec5d8b7d2f4e6b-00f067aa0ba902b7-1-1.643539-1791077702331",
            ),
        ] {
            assert!(
                fleet_common::edge::holds_card_number(value),
                "{name}: the case is one the detector flags"
            );
            let mut message = with_attribute(name, value);
            if name == "tracestate" {
                let parent = with_attribute("traceparent", parent).raw_attributes;
                message.raw_attributes.extend(parent);
            }
            let out = ingestion().handle(&message).await_now();
            assert!(out.is_ok(), "{name}: {:?}", out.err());
        }
    }

    #[test]
    fn a_card_number_in_an_attribute_name_or_a_group_id_is_refused() {
        let message = with_attribute("4111-1111-1111-1111", "x");
        let err = ingestion().handle(&message).await_now().unwrap_err();
        assert_eq!(err.reason().0, "payment_data");
        assert!(!err.detail().contains("1111"), "{}", err.detail());
        let mut message = Message::for_test(order_body());
        message.group_id = Some("4111111111111111".into());
        let err = ingestion().handle(&message).await_now().unwrap_err();
        assert_eq!(err.reason().0, "payment_data");
        assert!(!err.detail().contains("1111"), "{}", err.detail());
    }

    #[test]
    fn what_the_edge_accepts_every_later_stage_reads() {
        // A float where an integer belongs passes the JSON Schema ("integer" takes 1.0) but not
        // the typed decode of the next stage: the edge refuses it rather than forward it.
        let float = order_body().replace(r#""quantity":2"#, r#""quantity":2.0"#);
        assert_eq!(rejected(&float), "schema_violation");
        let carrier = serde_json::json!({
            "type": "delivery.status_reported", "schema_version": 1, "event_id": "c-1",
            "occurred_at": "2026-11-23T10:00:00Z",
            "payload": {"order_id": "o-1", "status": "in_transit", "at": "2026-11-23T10:00:00Z", "carrier_reference": "trk-1"}
        })
        .to_string();
        for body in [order_body(), carrier] {
            let out = ingestion()
                .handle(&Message::for_test(body))
                .await_now()
                .unwrap();
            let fwd = &out.forward[0];
            match fwd.queue.as_str() {
                "orders" => {
                    serde_json::from_str::<Envelope<OrderSubmitted>>(&fwd.body).unwrap();
                }
                "delivery" => {
                    serde_json::from_str::<Envelope<DeliveryStatusReported>>(&fwd.body).unwrap();
                }
                other => panic!("routed to {other}"),
            }
        }
    }

    #[test]
    fn received_at_is_when_the_fleets_queue_accepted_the_message_the_same_on_every_delivery() {
        let mut message = Message::for_test(order_body());
        let sent = time::macros::datetime!(2026-12-04 17:00:00.125 UTC);
        message.sent_at = Some(sent);
        let first = ingestion().handle(&message).await_now().unwrap();
        // Delivered again ten minutes later: the same stamp, the same body.
        message.receive_count = 2;
        let again = ingestion().handle(&message).await_now().unwrap();
        let (first, again) = (&first.forward[0], &again.forward[0]);
        assert_eq!(first.body, again.body);
        assert_eq!(
            first.attributes.get(RECEIVED_AT).map(String::as_str),
            Some("2026-12-04T17:00:00.125Z")
        );
        let env: serde_json::Value = serde_json::from_str(&first.body).unwrap();
        assert_eq!(env["metadata"]["received_at"], "2026-12-04T17:00:00.125Z");
    }

    #[test]
    fn attribute_bytes_count_toward_the_size_limit() {
        let mut message = Message::for_test(order_body());
        message.raw_attributes.insert(
            "padding".into(),
            aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value("x".repeat(IngestionConfig::default().max_body_bytes))
                .build()
                .unwrap(),
        );
        let err = ingestion().handle(&message).await_now().unwrap_err();
        assert_eq!(err.reason().0, "body_too_large");
    }

    #[test]
    fn the_sender_is_who_sqs_saw_and_may_send_only_its_types() {
        // A carrier (a role, any session) may report deliveries, not place orders.
        let mut order = Message::for_test(order_body());
        order.sender_id = Some("AROACARRIER:webhook-7".into());
        let err = ingestion().handle(&order).await_now().unwrap_err();
        assert_eq!(err.reason().0, "sender_not_allowed");
        assert!(err.detail().contains("carrier"), "{}", err.detail());
        // Nobody configured: refused, whatever the message says of itself.
        let mut stranger = Message::for_test(order_body());
        stranger.sender_id = Some("AIDASTRANGER".into());
        stranger
            .attributes
            .insert("source".into(), "storefront".into());
        assert_eq!(
            ingestion()
                .handle(&stranger)
                .await_now()
                .unwrap_err()
                .reason()
                .0,
            "sender_not_allowed"
        );
        let mut anonymous = Message::for_test(order_body());
        anonymous.sender_id = None;
        assert_eq!(
            ingestion()
                .handle(&anonymous)
                .await_now()
                .unwrap_err()
                .reason()
                .0,
            "sender_not_allowed"
        );
        // The carrier's events are its own: the same id from another sender is another event.
        let carrier_body = order_body()
            .replace("order.submitted", "delivery.status_reported")
            .replace(
                &serde_json::from_str::<serde_json::Value>(&order_body()).unwrap()["payload"].to_string(),
                r#"{"order_id":"o-1","status":"in_transit","at":"2026-11-23T10:00:00Z","carrier_reference":"trk-1"}"#,
            );
        let mut report = Message::for_test(carrier_body.clone());
        report.sender_id = Some("AROACARRIER:webhook-7".into());
        let out = ingestion().handle(&report).await_now().unwrap();
        let env: serde_json::Value = serde_json::from_str(&out.forward[0].body).unwrap();
        assert_eq!(env["event_id"], "carrier:evt-1");
        assert_eq!(env["metadata"]["source"], "carrier");
        let local = ingestion()
            .handle(&Message::for_test(carrier_body))
            .await_now()
            .unwrap();
        let env: serde_json::Value = serde_json::from_str(&local.forward[0].body).unwrap();
        assert_eq!(env["event_id"], "local:evt-1");
    }
}
