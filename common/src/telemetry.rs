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

/// Installs the global tracing subscriber; `RUST_LOG` filters (default `info`). Logs go to
/// stderr so stdout stays free for command output and EMF lines. Safe to call twice.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(|| VersionStamped(std::io::stderr()))
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
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
        .with_writer(std::io::stderr)
        .try_init();
}

/// Installs the global metrics recorder (Prometheus + EMF) once per process and returns it.
pub fn init_metrics() -> Metrics {
    METRICS
        .get_or_init(|| {
            let prometheus = PrometheusBuilder::new().build_recorder();
            let handle = prometheus.handle();
            let emf = Arc::new(EmfRecorder::default());
            let fanout = FanoutBuilder::default()
                .add_recorder(prometheus)
                .add_recorder(SharedEmf(Arc::clone(&emf)))
                .build();
            let _ = metrics::set_global_recorder(fanout);
            Metrics {
                prometheus: handle,
                emf,
            }
        })
        .clone()
}

/// Starts the periodic upkeep of the exporters, and EMF output to stdout when configured.
pub fn spawn_exporters(metrics: &Metrics, config: &ObservabilityConfig, role: &str) {
    let prometheus = metrics.prometheus.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
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
            if !values.is_empty() {
                let unit = if key.name().ends_with("_seconds") {
                    "Seconds"
                } else {
                    "None"
                };
                // EMF takes at most 100 values per metric in one document.
                values.truncate(100);
                emit(key, serde_json::json!(values), unit);
            }
        });
        lines
    }
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
}
