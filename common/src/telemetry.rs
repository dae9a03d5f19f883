//! Logs (tracing, JSON with span fields so every line of a message carries its correlation id)
//! and metrics (the `metrics` facade, exported for Prometheus and as CloudWatch Embedded Metric
//! Format lines).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::layers::FanoutBuilder;
use metrics_util::registry::{AtomicStorage, Registry};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, ObservabilityConfig};

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics exporters.
#[derive(Clone)]
pub struct Metrics {
    /// Renders the Prometheus text format for `/metrics`.
    pub prometheus: PrometheusHandle,
    /// The registry behind the EMF lines.
    pub emf: Arc<EmfRecorder>,
}

/// Installs the global tracing subscriber; `RUST_LOG` filters the logs (default `info`). Logs
/// go to stderr so stdout stays free for command output and EMF lines. With `traces`, spans
/// are also exported as OpenTelemetry spans (see [`crate::trace`]), whatever `RUST_LOG` says.
/// Safe to call twice.
pub fn init_tracing(format: LogFormat, traces: Option<&SdkTracerProvider>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(|| VersionStamped(std::io::stderr()))
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_ansi(stderr_is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces.map(crate::trace::layer))
        .try_init();
}

/// A JSON log line with the build's version as its first field: `{"version":"0.1.0+…",…}`, so
/// that every line says which release wrote it (the formatter writes each line in one call).
struct VersionStamped<W>(W);

impl<W: Write> Write for VersionStamped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match buf.strip_prefix(b"{") {
            Some(rest) => {
                let mut line = Vec::with_capacity(buf.len() + 48);
                line.extend_from_slice(b"{\"version\":\"");
                line.extend_from_slice(crate::build_info::VERSION.as_bytes());
                line.extend_from_slice(b"\"");
                if !rest.starts_with(b"}") {
                    line.push(b',');
                }
                line.extend_from_slice(rest);
                self.0.write_all(&line)?;
            }
            None => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Logs for the command-line tools (`dlq`, `loadtest`): compact lines on stderr, `RUST_LOG`
/// filters (default `warn`, so that only problems interrupt the command's own output).
pub fn init_cli_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(stderr_is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Colours only for a person at a terminal: no escape codes in a file or a pipe (and none to
/// format for every span, measured with `loadtest --runtime`).
fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal()
}

/// Installs the global metrics recorder once per process and returns it: Prometheus, and with
/// `emf` the registry behind the EMF lines. Without `emf` nothing records into that registry:
/// its histograms keep every sample until a flush, and with EMF off nothing flushes them (that
/// was a leak of about 45 KiB per 1,000 messages, found with `loadtest --runtime --telemetry`).
pub fn init_metrics(emf: bool) -> Metrics {
    METRICS
        .get_or_init(|| {
            let prometheus = prometheus_recorder();
            let handle = prometheus.handle();
            let registry = Arc::new(EmfRecorder::default());
            let mut fanout = FanoutBuilder::default().add_recorder(prometheus);
            if emf {
                fanout = fanout.add_recorder(SharedEmf(Arc::clone(&registry)));
            }
            let _ = metrics::set_global_recorder(fanout.build());
            Metrics {
                prometheus: handle,
                emf: registry,
            }
        })
        .clone()
}

/// Bucket bounds (seconds) of every `*_seconds` histogram: 1 ms to a day, about three per
/// decade. Buckets, not quantiles: the counts of many tasks add up to the fleet's distribution
/// (`histogram_quantile` over `sum by (le)`), where per-task quantiles cannot be combined.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0, 14_400.0, 43_200.0, 86_400.0,
];

/// The Prometheus recorder: `*_seconds` histograms exported as histograms with
/// [`SECONDS_BUCKETS`].
pub fn prometheus_recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            SECONDS_BUCKETS,
        )
        .expect("the buckets are not empty")
        .build_recorder()
}

/// Starts the periodic upkeep of the exporters, and EMF output to stdout when configured.
pub fn spawn_exporters(metrics: &Metrics, config: &ObservabilityConfig, role: &str) {
    let prometheus = metrics.prometheus.clone();
    tokio::spawn(async move {
        // Upkeep moves the histograms' buffered samples into their buckets: every second, so
        // that at thousands of messages a second the buffer stays small.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            prometheus.run_upkeep();
        }
    });
    if config.emf {
        let emf = Arc::clone(&metrics.emf);
        let namespace = config.emf_namespace.clone();
        let role = role.to_owned();
        let every = Duration::from_secs(config.emf_interval_secs.get().into());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as u64;
                let mut out = std::io::stdout().lock();
                for line in emf.flush(&namespace, &role, now) {
                    let _ = writeln!(out, "{line}");
                }
            }
        });
    }
}

/// A recorder that keeps counters, gauges and histograms for CloudWatch Embedded Metric Format.
#[derive(Debug)]
pub struct EmfRecorder {
    registry: Registry<Key, AtomicStorage>,
}

impl Default for EmfRecorder {
    fn default() -> Self {
        Self {
            registry: Registry::atomic(),
        }
    }
}

impl EmfRecorder {
    /// One EMF JSON document per metric with data since the last flush: counters as the delta,
    /// gauges as the current value, histograms as their recorded values. Each metric is
    /// published under two dimension sets: `[role]` (what alarms and dashboards aggregate) and
    /// `[role, <labels>…]` (the detail).
    pub fn flush(&self, namespace: &str, role: &str, timestamp_ms: u64) -> Vec<String> {
        let mut lines = Vec::new();
        let mut emit = |key: &Key, value: serde_json::Value, unit: &str| {
            let mut doc = serde_json::Map::new();
            let mut dims = vec![serde_json::Value::from("role")];
            doc.insert("role".into(), role.into());
            for label in key.labels() {
                dims.push(label.key().into());
                doc.insert(label.key().into(), label.value().into());
            }
            doc.insert(key.name().into(), value);
            doc.insert(
                "_aws".into(),
                serde_json::json!({
                    "Timestamp": timestamp_ms,
                    "CloudWatchMetrics": [{
                        "Namespace": namespace,
                        "Dimensions": if dims.len() > 1 { serde_json::json!([["role"], dims]) } else { serde_json::json!([dims]) },
                        "Metrics": [{"Name": key.name(), "Unit": unit}]
                    }]
                }),
            );
            lines.push(serde_json::Value::Object(doc).to_string());
        };
        self.registry.visit_counters(|key, counter| {
            let delta = counter.swap(0, Ordering::Relaxed);
            if delta > 0 {
                emit(key, delta.into(), "Count");
            }
        });
        self.registry.visit_gauges(|key, gauge| {
            emit(
                key,
                f64::from_bits(gauge.load(Ordering::Relaxed)).into(),
                "None",
            );
        });
        self.registry.visit_histograms(|key, histogram| {
            let mut values = Vec::new();
            histogram.clear_with(|chunk| values.extend_from_slice(chunk));
            // CloudWatch takes finite numbers only (serde would write NaN as null).
            values.retain(|v: &f64| v.is_finite());
            if !values.is_empty() {
                let unit = if key.name().ends_with("_seconds") {
                    "Seconds"
                } else {
                    "None"
                };
                emit(key, histogram_value(&values), unit);
            }
        });
        lines
    }
}

/// The most distinct values one EMF metric may carry.
const EMF_MAX_VALUES: usize = 100;

/// Recorded values as an EMF histogram: `Values` with their `Counts` (at most 100 distinct
/// values, each a bucket of values within a few percent of each other), and the exact `Count`,
/// `Sum`, `Min` and `Max`. Every recorded value is counted: truncating to 100 values (what EMF
/// takes as a plain array) would drop the rest of a busy interval and bias the percentiles
/// CloudWatch computes.
fn histogram_value(values: &[f64]) -> serde_json::Value {
    let (min, max) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let sum: f64 = values.iter().sum();
    // Log-scale buckets 5 % wide, doubled in width until at most 100 are in use.
    let mut growth: f64 = 1.05;
    let buckets = loop {
        let mut buckets: std::collections::BTreeMap<i64, u64> = std::collections::BTreeMap::new();
        for &v in values {
            let index = if v > 0.0 {
                (v.ln() / growth.ln()).floor() as i64
            } else {
                i64::MIN
            };
            *buckets.entry(index).or_default() += 1;
        }
        if buckets.len() <= EMF_MAX_VALUES {
            break buckets;
        }
        growth *= growth;
    };
    let (mut out_values, mut counts) = (Vec::new(), Vec::new());
    for (index, count) in buckets {
        let value = if index == i64::MIN {
            0.0
        } else {
            // The bucket's geometric middle, kept within what was recorded.
            growth.powf(index as f64 + 0.5).clamp(min.max(0.0), max)
        };
        out_values.push(value);
        counts.push(count);
    }
    serde_json::json!({
        "Values": out_values,
        "Counts": counts,
        "Count": values.len(),
        "Sum": sum,
        "Min": min,
        "Max": max,
    })
}

struct SharedEmf(Arc<EmfRecorder>);

impl Recorder for SharedEmf {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.0.registry.get_or_create_counter(key, Arc::clone))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.0.registry.get_or_create_gauge(key, Arc::clone))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.0.registry.get_or_create_histogram(key, Arc::clone))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_json_log_line_names_the_build() {
        let mut out = super::VersionStamped(Vec::new());
        out.write_all(b"{\"level\":\"INFO\"}\n").unwrap();
        out.write_all(b"{}\n").unwrap();
        let text = String::from_utf8(out.0).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["version"], crate::build_info::VERSION);
        }
        assert!(text.contains("\"level\":\"INFO\""));
    }

    use super::*;

    #[test]
    fn emf_lines_carry_deltas_dimensions_and_the_namespace() {
        let emf = Arc::new(EmfRecorder::default());
        let recorder = SharedEmf(Arc::clone(&emf));
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("fleet_messages_succeeded_total", "queue" => "q").increment(3);
            metrics::histogram!("fleet_handler_seconds", "queue" => "q").record(0.25);
        });
        let lines = emf.flush("OrderFleet", "orders", 1_700_000_000_000);
        assert_eq!(lines.len(), 2);
        let counter: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(counter["fleet_messages_succeeded_total"], 3);
        assert_eq!(counter["queue"], "q");
        assert_eq!(
            counter["_aws"]["CloudWatchMetrics"][0]["Namespace"],
            "OrderFleet"
        );
        assert_eq!(
            counter["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            serde_json::json!([["role"], ["role", "queue"]]),
            "alarms aggregate by role; the detail keeps the labels"
        );
        // A second flush has nothing new to say about the counter.
        assert!(emf.flush("OrderFleet", "orders", 1).is_empty());
    }

    /// The value at quantile `q` of a distribution given as values with counts.
    fn quantile(values: &[f64], counts: &[u64], q: f64) -> f64 {
        let total: u64 = counts.iter().sum();
        let rank = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (v, c) in values.iter().zip(counts) {
            seen += c;
            if seen >= rank {
                return *v;
            }
        }
        *values.last().unwrap()
    }

    #[test]
    fn a_busy_interval_reaches_cloudwatch_whole_as_values_with_counts() {
        let emf = Arc::new(EmfRecorder::default());
        let recorder = SharedEmf(Arc::clone(&emf));
        // 10,000 handler times from 1 ms to 10 s, log-uniform: 100 of them would be 1 %.
        let recorded: Vec<f64> = (0..10_000)
            .map(|i| 0.001 * 10f64.powf(4.0 * f64::from(i) / 10_000.0))
            .collect();
        metrics::with_local_recorder(&recorder, || {
            let h = metrics::histogram!("fleet_handler_seconds", "queue" => "q");
            for v in &recorded {
                h.record(*v);
            }
            h.record(f64::NAN);
            h.record(f64::INFINITY);
        });
        let lines = emf.flush("OrderFleet", "orders", 1);
        let doc: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        let h = &doc["fleet_handler_seconds"];
        let values: Vec<f64> = serde_json::from_value(h["Values"].clone()).unwrap();
        let counts: Vec<u64> = serde_json::from_value(h["Counts"].clone()).unwrap();
        assert!(values.len() <= 100, "{} distinct values", values.len());
        assert_eq!(values.len(), counts.len());
        assert_eq!(counts.iter().sum::<u64>(), 10_000, "every value counted");
        assert_eq!(h["Count"], 10_000);
        assert!((h["Sum"].as_f64().unwrap() - recorded.iter().sum::<f64>()).abs() < 1e-6);
        assert_eq!(h["Min"].as_f64().unwrap(), recorded[0]);
        assert_eq!(h["Max"].as_f64().unwrap(), recorded[9_999]);
        for q in [0.5, 0.9, 0.99] {
            let truth = recorded[(q * 10_000.0) as usize - 1];
            let seen = quantile(&values, &counts, q);
            assert!(
                (seen / truth - 1.0).abs() < 0.12,
                "p{}: {seen} against {truth}",
                q * 100.0
            );
        }
    }

    #[test]
    fn prometheus_exports_seconds_as_histograms_that_add_up_across_tasks() {
        let recorder = prometheus_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("fleet_handler_seconds", "queue" => "q").record(0.03);
            metrics::histogram!("fleet_message_age_seconds", "queue" => "q").record(7200.0);
        });
        let text = handle.render();
        assert!(
            text.contains(r#"fleet_handler_seconds_bucket{queue="q",le="0.05"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"fleet_handler_seconds_bucket{queue="q",le="0.025"} 0"#));
        assert!(text.contains(r#"fleet_message_age_seconds_bucket{queue="q",le="14400"} 1"#));
        assert!(text.contains("fleet_handler_seconds_count"));
        assert!(!text.contains("quantile="), "no summaries: {text}");
    }
}
