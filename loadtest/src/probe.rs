//! Watching the fleet process from outside: its Prometheus endpoint (request and message counts,
//! exactly what the fleet counted) and /proc (CPU seconds, resident memory).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample of a Prometheus text page: `name{labels}` → value.
pub type Metrics = BTreeMap<String, f64>;

/// Fetches `path` from `addr` with one HTTP/1.0 request.
///
/// # Errors
/// Connection or timeout errors.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), ask).await??;
    Ok(text
        .split_once("\r\n\r\n")
        .map_or(text.clone(), |(_, body)| body.to_owned()))
}

/// Parses the Prometheus text format (comments skipped).
pub fn parse(text: &str) -> Metrics {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of a metric over every label set whose labels contain all of `having` (`k="v"` pairs).
pub fn sum(metrics: &Metrics, name: &str, having: &[&str]) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| k.split('{').next() == Some(name) && having.iter().all(|h| k.contains(h)))
        .map(|(_, v)| v)
        .sum()
}

/// The distinct values of `label` on the series of metric `name`.
pub fn label_values(
    metrics: &Metrics,
    name: &str,
    label: &str,
) -> std::collections::BTreeSet<String> {
    let prefix = format!("{name}{{");
    let marker = format!("{label}=\"");
    metrics
        .keys()
        .filter(|k| k.starts_with(&prefix))
        .filter_map(|k| k.split(marker.as_str()).nth(1)?.split('"').next())
        .map(str::to_owned)
        .collect()
}

/// CPU seconds (user + system) and resident memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcessSample {
    /// User + system CPU seconds so far.
    pub cpu_secs: f64,
    /// Resident set size now, in MiB.
    pub rss_mib: f64,
    /// Peak resident set size, in MiB.
    pub peak_rss_mib: f64,
}

/// Reads /proc/<pid>; `None` when the process is gone or /proc is not there.
pub fn sample_process(pid: u32) -> Option<ProcessSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some(ProcessSample {
        cpu_secs: (utime + stime) / ticks,
        rss_mib: kib("VmRSS:") / 1024.0,
        peak_rss_mib: kib("VmHWM:") / 1024.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_summed_by_name_and_labels() {
        let text = "# HELP x\nfleet_aws_requests_total{operation=\"ReceiveMessage\",service=\"sqs\"} 12\nfleet_aws_requests_total{operation=\"PutItem\",service=\"dynamodb\"} 5\nfleet_aws_requests_total{operation=\"DeleteMessageBatch\",service=\"sqs\"} 3\nfleet_in_flight{queue=\"q\"} 2\n";
        let m = parse(text);
        assert_eq!(
            sum(&m, "fleet_aws_requests_total", &["service=\"sqs\""]),
            15.0
        );
        assert_eq!(sum(&m, "fleet_aws_requests_total", &[]), 20.0);
        assert_eq!(sum(&m, "fleet_in_flight", &[]), 2.0);
        assert_eq!(sum(&m, "fleet_aws", &[]), 0.0, "names match whole");
        assert_eq!(
            label_values(&m, "fleet_aws_requests_total", "service"),
            ["dynamodb".to_owned(), "sqs".to_owned()].into()
        );
        assert!(label_values(&m, "fleet_in_flight", "stage").is_empty());
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample_process(std::process::id()).expect("/proc is readable");
        assert!(s.rss_mib > 0.0 && s.peak_rss_mib >= s.rss_mib);
    }
}
