//! One trace per order, exported to an in-memory OpenTelemetry exporter: an order sent with an
//! upstream's `traceparent` goes through the four stages as one trace (a span per message
//! handled, parented stage to stage, with the DynamoDB calls as children), and a message
//! redriven from a DLQ continues its original trace with a link that names the redrive.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use aws_sdk_sqs::types::MessageAttributeValue;
use fleet_common::attribution::{Attribution, ATTRIBUTION};
use fleet_common::config::LogFormat;
use fleet_common::failure::FailureClass;
use fleet_e2e::TestEnv;
use fleet_harness::queues::wait_idle;
use fleet_harness::scenario::{Mix, Scenario};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};

fn string(v: impl Into<String>) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .unwrap()
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// The message spans of a trace, by the worker that handled them.
fn stages(spans: &[SpanData], trace: TraceId) -> BTreeMap<String, Vec<&SpanData>> {
    let mut out: BTreeMap<String, Vec<&SpanData>> = BTreeMap::new();
    for s in spans
        .iter()
        .filter(|s| s.name == "message" && s.span_context.trace_id() == trace)
    {
        let worker = attribute(s, "worker")
            .map(ToString::to_string)
            .unwrap_or_default();
        out.entry(worker).or_default().push(s);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_one_trace_through_the_four_stages_and_a_redrive_continues_it() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    fleet_common::telemetry::init_tracing(LogFormat::Pretty, Some(&provider));

    let env = TestEnv::new(|c| {
        for w in c.workers.values_mut() {
            w.receive_wait_secs = 1;
        }
    })
    .await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(2, Mix::VALID_ONLY, &catalog, 7, &env.suffix);
    let (first, second) = (&scenario.submissions[0], &scenario.submissions[1]);

    // The first order arrives with its upstream's trace context.
    let upstream = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    let upstream_span = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    env.clients
        .sqs
        .send_message()
        .queue_url(env.url("ingest"))
        .message_body(&first.body)
        .message_attributes(
            "traceparent",
            string(format!("00-{upstream}-{upstream_span}-01")),
        )
        .send()
        .await
        .unwrap();
    // The second was dead-lettered at the edge once, in another trace, and is redriven.
    let original = TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let attribution = Attribution {
        reason: "dependency_unavailable".into(),
        class: FailureClass::AttemptsExhausted,
        detail: "test".into(),
        worker: "ingestion".into(),
        source_queue: env.config.queues["ingest"].name.clone(),
        attempts: 5,
        first_failed_at: now,
        last_failed_at: now,
        correlation_id: None,
        source_message_id: "m-1".into(),
        origin: None,
        imported_at: None,
        version: None,
        sender_id: None,
    };
    env.clients
        .sqs
        .send_message()
        .queue_url(env.dlq_url("ingest"))
        .message_body(&second.body)
        .message_attributes(
            "traceparent",
            string(format!("00-{original}-b7ad6b7169203331-01")),
        )
        .message_attributes(
            ATTRIBUTION,
            string(serde_json::to_string(&attribution).unwrap()),
        )
        .send()
        .await
        .unwrap();

    let fleet = env.start_fleet(None).await;
    let redrive = env.dlq(&["redrive", &env.dlq_url("ingest"), "--output", "json"]);
    assert!(
        redrive.status.success(),
        "{}",
        String::from_utf8_lossy(&redrive.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&redrive.stdout).unwrap();
    assert_eq!(report["moved"], 1);
    wait_idle(&env.clients.sqs, &env.topology, Duration::from_secs(120))
        .await
        .unwrap();
    fleet.stop().await;
    let result = env.audit(&scenario, &catalog, false).await;
    assert_eq!(result.orders_completed, 2, "{:?}", result.offenders);
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    // One trace: the upstream's, through every stage, each stage's span a child of the last.
    let order = stages(&spans, upstream);
    let workers: BTreeSet<&str> = order.keys().map(String::as_str).collect();
    assert_eq!(
        workers,
        BTreeSet::from(["delivery", "ingestion", "orders", "warehouse"]),
        "{} spans in the trace",
        order.values().map(Vec::len).sum::<usize>()
    );
    let ids: HashSet<SpanId> = order
        .values()
        .flatten()
        .map(|s| s.span_context.span_id())
        .collect();
    let ingestion = order["ingestion"][0];
    assert_eq!(
        ingestion.parent_span_id, upstream_span,
        "the upstream's span is the parent"
    );
    for stage in ["orders", "warehouse", "delivery"] {
        for s in &order[stage] {
            assert!(
                ids.contains(&s.parent_span_id),
                "the {stage} span's parent is a span of an earlier stage"
            );
        }
    }
    // The DynamoDB calls of a stage are children of its message span.
    for stage in ["orders", "warehouse", "delivery"] {
        let own: HashSet<SpanId> = order[stage]
            .iter()
            .map(|s| s.span_context.span_id())
            .collect();
        let calls: Vec<&str> = spans
            .iter()
            .filter(|s| s.name.starts_with("DynamoDB.") && own.contains(&s.parent_span_id))
            .map(|s| s.name.as_ref())
            .collect();
        assert!(!calls.is_empty(), "no DynamoDB span under the {stage} span");
    }

    // The redriven order continues its original trace, linked with the redrive's id.
    let redriven = stages(&spans, original);
    let edge = &redriven["ingestion"][0];
    let link = edge
        .links
        .iter()
        .find(|l| l.span_context.trace_id() == original)
        .expect("a link to the trace it was dead-lettered in");
    let id = link
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "fleet.redrive.id")
        .map(|kv| kv.value.to_string());
    assert_eq!(id.as_deref(), report["redrive_id"].as_str());
    assert!(
        redriven.contains_key("delivery"),
        "the redriven order's trace goes on to the end"
    );
}
