//! One trace per order: W3C trace context (`traceparent`, and `tracestate` when it says
//! something) travels as message attributes on every message the fleet sends, so the spans of
//! the four stages (one per message handled, with a child per DynamoDB and SQS call the handler
//! makes) form one trace. An upstream's `traceparent` is honoured at the edge; on AWS the
//! `AWSTraceHeader` system attribute (X-Ray's format, no attribute used) is read when no
//! `traceparent` is present, and written beside it. A redriven message continues its original
//! trace, with a link that names the redrive.
//!
//! Spans are exported by OpenTelemetry (OTLP over HTTP) only when switched on
//! (`observability.otlp_endpoint`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`); with tracing
//! off the incoming context is passed on unchanged, so an upstream's trace still crosses the
//! fleet.

use std::collections::{BTreeMap, HashMap};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::runtime::Message;

/// The W3C trace context attribute.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C vendor trace state attribute (carried only when not empty).
pub const TRACESTATE: &str = "tracestate";

/// Whether an attribute is W3C trace context (`traceparent` or `tracestate`).
pub fn is_trace_context(name: &str) -> bool {
    name == TRACEPARENT || name == TRACESTATE
}

/// The trace context a received message carries: its `traceparent` (with `tracestate`), else
/// its `AWSTraceHeader`; `None` when neither holds a valid one.
pub fn incoming(
    attributes: &BTreeMap<String, String>,
    aws_trace_header: Option<&str>,
) -> Option<SpanContext> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    if let Some(parent) = attributes.get(TRACEPARENT) {
        carrier.insert(TRACEPARENT.to_owned(), parent.clone());
        // Vendor state is carried only when it is small and holds no card number: it goes into
        // every span exported and every message forwarded.
        if let Some(state) = attributes
            .get(TRACESTATE)
            .filter(|s| s.len() <= 512 && !crate::edge::holds_card_number(s))
        {
            carrier.insert(TRACESTATE.to_owned(), state.clone());
        }
    } else if let Some(parent) = aws_trace_header.and_then(xray_to_traceparent) {
        carrier.insert(TRACEPARENT.to_owned(), parent);
    }
    if carrier.is_empty() {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    let context = cx.span().span_context().clone();
    context.is_valid().then_some(context)
}

/// Makes `span` (a message's) a child of the context its message carries; a redriven message
/// also gets a link to that context naming the redrive.
pub fn attach(span: &tracing::Span, message: &Message) {
    let Some(parent) = incoming(&message.attributes, message.aws_trace_header.as_deref()) else {
        return;
    };
    let _ = span.set_parent(Context::new().with_remote_span_context(parent.clone()));
    if let Some(redrive) = message.redrive_id() {
        span.add_link_with_attributes(parent, vec![KeyValue::new("fleet.redrive.id", redrive)]);
    }
}

/// The trace attributes of a message sent while handling `incoming`: the current span's
/// context when tracing is on, else the incoming message's context unchanged.
pub fn outgoing(incoming_message: &Message) -> Vec<(&'static str, String)> {
    let cx = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    } else if let Some(context) = incoming(
        &incoming_message.attributes,
        incoming_message.aws_trace_header.as_deref(),
    ) {
        let cx = Context::new().with_remote_span_context(context);
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    }
    let mut out = Vec::new();
    if let Some(parent) = carrier.remove(TRACEPARENT) {
        out.push((TRACEPARENT, parent));
        if let Some(state) = carrier.remove(TRACESTATE).filter(|s| !s.is_empty()) {
            out.push((TRACESTATE, state));
        }
    }
    out
}

/// X-Ray's `Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1` as a
/// W3C `traceparent`; `None` without a root and a parent.
pub fn xray_to_traceparent(header: &str) -> Option<String> {
    let (mut root, mut parent, mut sampled) = (None, None, false);
    for part in header.split(';') {
        match part.trim().split_once('=') {
            Some(("Root", v)) => root = Some(v),
            Some(("Parent", v)) => parent = Some(v),
            Some(("Sampled", v)) => sampled = v == "1",
            _ => {}
        }
    }
    let mut pieces = root?.split('-');
    let (version, time, random) = (pieces.next()?, pieces.next()?, pieces.next()?);
    let parent = parent?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if version != "1" || !hex(time, 8) || !hex(random, 24) || !hex(parent, 16) {
        return None;
    }
    Some(
        format!(
            "00-{time}{random}-{parent}-{}",
            if sampled { "01" } else { "00" }
        )
        .to_ascii_lowercase(),
    )
}

/// A W3C `traceparent` in X-Ray's header format (for `AWSTraceHeader`).
pub fn traceparent_to_xray(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1;
    Some(format!(
        "Root=1-{}-{};Parent={parent};Sampled={sampled}",
        &trace[..8],
        &trace[8..]
    ))
}

/// The OTLP endpoint the process exports spans to, if tracing is on: the config's, else the
/// standard environment's (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
/// which the exporter reads itself).
pub fn exporter_endpoint(configured: Option<&str>) -> Option<Option<String>> {
    if let Some(base) = configured {
        let base = base.trim_end_matches('/').trim_end_matches("/v1/traces");
        return Some(Some(format!("{base}/v1/traces")));
    }
    let from_env = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|e| !e.is_empty()));
    from_env.then_some(None)
}

/// The tracer provider exporting to an OTLP collector over HTTP, when tracing is on.
///
/// # Errors
/// An exporter that cannot be built (a malformed endpoint).
pub fn otlp_provider(
    configured: Option<&str>,
    role: &str,
) -> Result<Option<SdkTracerProvider>, String> {
    let Some(endpoint) = exporter_endpoint(configured) else {
        return Ok(None);
    };
    use opentelemetry_otlp::WithExportConfig;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    // The blocking HTTP client is built on a thread of its own: it cannot be made inside the
    // async runtime.
    let exporter = std::thread::spawn(move || builder.build())
        .join()
        .map_err(|_| "the OTLP exporter could not be built".to_owned())?
        .map_err(|e| format!("the OTLP exporter could not be built: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(format!("order-fleet-{role}"))
        .with_attribute(KeyValue::new("service.version", crate::build_info::VERSION))
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// The `tracing` layer that turns the fleet's spans into OpenTelemetry spans: message spans, and
/// the AWS SDK's operation spans (`DynamoDB.PutItem`, `SQS.SendMessageBatch`…) under them.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    let targets = tracing_subscriber::filter::Targets::new()
        .with_target("aws_sdk_dynamodb", tracing::Level::DEBUG)
        .with_target("aws_sdk_sqs", tracing::Level::DEBUG)
        .with_target("fleet_common", tracing::Level::WARN)
        .with_target("workers", tracing::Level::WARN);
    // An SDK call is a span only inside a message's span: the pollers' receives, the batched
    // acknowledgements and sends would otherwise each be a trace of their own.
    let inside_a_message = tracing_subscriber::filter::dynamic_filter_fn(|meta, cx| {
        !meta.target().starts_with("aws_sdk_") || cx.lookup_current().is_some()
    });
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("order-fleet"))
        .with_filter(targets)
        .with_filter(inside_a_message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xray_and_w3c_headers_convert_both_ways() {
        let xray = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        let w3c = xray_to_traceparent(xray).unwrap();
        assert_eq!(
            w3c,
            "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01"
        );
        assert_eq!(traceparent_to_xray(&w3c).as_deref(), Some(xray));
        assert_eq!(
            xray_to_traceparent("Root=1-5759e988-bd862e3fe1be46a994272793"),
            None,
            "no parent"
        );
        assert_eq!(xray_to_traceparent("Root=2-x-y;Parent=1"), None);
        assert_eq!(traceparent_to_xray("garbage"), None);
    }

    #[test]
    fn a_valid_traceparent_is_read_and_anything_else_is_not() {
        let mut attributes = BTreeMap::new();
        attributes.insert(
            TRACEPARENT.to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        );
        let context = incoming(&attributes, None).unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(context.is_remote());
        attributes.insert(TRACEPARENT.to_owned(), "00-zz-yy-01".to_owned());
        assert!(incoming(&attributes, None).is_none());
        let xray = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        assert_eq!(
            incoming(&BTreeMap::new(), Some(xray))
                .unwrap()
                .trace_id()
                .to_string(),
            "5759e988bd862e3fe1be46a994272793"
        );
    }

    #[test]
    fn a_trace_state_holding_a_card_number_or_too_long_is_not_carried() {
        let mut m = Message::for_test("{}");
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        m.attributes
            .insert(TRACEPARENT.to_owned(), parent.to_owned());
        m.attributes
            .insert(TRACESTATE.to_owned(), "vendor=ok".to_owned());
        assert_eq!(outgoing(&m)[1], (TRACESTATE, "vendor=ok".to_owned()));
        m.attributes
            .insert(TRACESTATE.to_owned(), "pan=4111111111111111".to_owned());
        assert_eq!(outgoing(&m), vec![(TRACEPARENT, parent.to_owned())]);
        m.attributes
            .insert(TRACESTATE.to_owned(), format!("v={}", "a".repeat(600)));
        assert_eq!(outgoing(&m).len(), 1);
        assert_eq!(
            exporter_endpoint(Some("http://collector:4318/v1/traces/")),
            Some(Some("http://collector:4318/v1/traces".to_owned()))
        );
    }

    #[test]
    fn with_tracing_off_the_incoming_context_is_passed_on_unchanged() {
        let mut m = Message::for_test("{}");
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        m.attributes
            .insert(TRACEPARENT.to_owned(), parent.to_owned());
        assert_eq!(outgoing(&m), vec![(TRACEPARENT, parent.to_owned())]);
        assert!(outgoing(&Message::for_test("{}")).is_empty());
    }
}
