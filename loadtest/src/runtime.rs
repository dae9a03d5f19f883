//! `loadtest --runtime`: what the consumer runtime costs on top of the SDK it drives. A scratch
//! queue is filled with N messages and drained twice in this process, one phase after the
//! other: first by the bare SDK loop (receive ten, delete them in one batch; as many loops as
//! the role has pollers), then by the consumer runtime with a handler that does nothing, under
//! the role's settings. For each phase: CPU per message, messages a second and requests per
//! message over the middle of the drain (10 % to 90 %: warm-up and the dry tail left out), and
//! the resident memory: its peak, what it grew by after warm-up, and its slope per 1,000
//! messages. With N = 1,000,000 the runtime phase is a memory soak.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fleet_common::aws::Clients;
use fleet_common::config::{FleetConfig, WorkerConfig};
use fleet_common::failure::HandlerError;
use fleet_common::health::Health;
use fleet_common::role::Role;
use fleet_common::runtime::{Consumer, ConsumerSettings, Handler, Message, Outcome};
use fleet_common::topology::Topology;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::probe::{sample_process, ProcessSample};

/// How often a phase samples its progress, CPU time and memory.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// What a runtime run measures.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Messages per phase.
    pub messages: u64,
    /// The role whose worker settings (pollers, in-flight cap, batching) the runtime runs with.
    pub role: Role,
    /// The run's metrics and logs are the shipped ones (Prometheus + EMF recorder, JSON logs at
    /// `info`), installed by the caller before the run.
    pub telemetry: bool,
    /// Only this phase (`sdk` or `runtime`); both when `None`.
    pub only: Option<String>,
    /// Longest a phase may take to drain its queue.
    pub drain_timeout: Duration,
}

/// One phase's figures.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Phase {
    /// `sdk` (the bare loop) or `runtime`.
    pub name: String,
    /// Messages drained in the phase.
    pub messages: u64,
    /// Messages in the measured middle of the drain.
    pub counted: u64,
    /// Seconds of the measured middle.
    pub secs: f64,
    /// Process CPU (user + system) per message of the measured middle, µs.
    pub cpu_us_per_message: f64,
    /// Messages a second over the measured middle.
    pub messages_per_sec: f64,
    /// SQS requests per message over the measured middle.
    pub requests_per_message: f64,
    /// Peak resident memory during the phase, MiB.
    pub peak_rss_mib: f64,
    /// Resident memory when 10 % of the messages were drained, MiB.
    pub rss_after_warmup_mib: f64,
    /// The most resident memory grew by after warm-up, MiB.
    pub rss_growth_mib: f64,
    /// Least-squares slope of resident memory against messages drained after warm-up, KiB per
    /// 1,000 messages.
    pub rss_slope_kib_per_1000: f64,
    /// SQS requests of the whole phase (its drain, not its fill), by operation.
    pub requests: std::collections::BTreeMap<String, u64>,
}

/// The run's report (`runtime.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeReport {
    /// Messages per phase.
    pub messages: u64,
    /// The role whose settings the runtime ran with.
    pub role: String,
    /// Its pollers (and so the bare loop's concurrency).
    pub pollers: usize,
    /// Its in-flight cap.
    pub max_in_flight: usize,
    /// Threads of the async runtime both phases ran on (the worker's `--threads`).
    pub threads: usize,
    /// Whether the shipped metrics recorder and JSON logs were on.
    pub telemetry: bool,
    /// The bare SDK loop.
    pub sdk: Option<Phase>,
    /// The consumer runtime with a no-op handler.
    pub runtime: Option<Phase>,
    /// Runtime CPU per message ÷ the bare loop's (both phases run).
    pub cpu_ratio: Option<f64>,
}

impl RuntimeReport {
    /// The table printed at the end of the run.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "runtime cost: {} messages per phase, role {} ({} pollers, in-flight cap {}), {} runtime thread(s), telemetry {}\n",
            self.messages,
            self.role,
            self.pollers,
            self.max_in_flight,
            self.threads,
            if self.telemetry { "on (the worker's metrics recorder and JSON logs)" } else { "off" }
        );
        out.push_str(&format!(
            "  {:<8} {:>10} {:>10} {:>9} {:>10} {:>13} {:>14}\n",
            "phase", "CPU µs/msg", "msgs/s", "req/msg", "peak MiB", "growth MiB", "KiB/1000 msgs"
        ));
        for p in [&self.sdk, &self.runtime].into_iter().flatten() {
            out.push_str(&format!(
                "  {:<8} {:>10.1} {:>10.0} {:>9.3} {:>10.1} {:>13.2} {:>14.2}\n",
                p.name,
                p.cpu_us_per_message,
                p.messages_per_sec,
                p.requests_per_message,
                p.peak_rss_mib,
                p.rss_growth_mib,
                p.rss_slope_kib_per_1000
            ));
        }
        if let Some(ratio) = self.cpu_ratio {
            out.push_str(&format!(
                "  runtime CPU per message = {ratio:.2} × the bare SDK loop\n"
            ));
        }
        out
    }
}

/// Fills a scratch queue and drains it with the bare loop, then again with the runtime.
///
/// # Errors
/// AWS errors, a queue that does not drain within the timeout, or a config without the role.
pub async fn run(
    config: &FleetConfig,
    opts: &RuntimeOptions,
    report_dir: &std::path::Path,
) -> anyhow::Result<RuntimeReport> {
    std::fs::create_dir_all(report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;
    let tag = format!("rt{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut config = config.clone().with_suffix(&tag);
    let worker = config
        .worker(opts.role.as_str())
        .with_context(|| format!("the config has no [workers.{}]", opts.role))?
        .clone();
    config.queues.retain(|key, _| *key == worker.queue);
    // The clients a worker runs with: no SDK retries, a deadline on every request.
    let clients = Clients::for_workers(&config.aws, None)
        .await
        .map_err(anyhow::Error::msg)?;
    for queue in config.queues.values() {
        fleet_common::provision::provision_queue(&clients.sqs, queue)
            .await
            .map_err(|e| {
                anyhow::anyhow!("{e}; are the emulators running (scripts/local-aws up)?")
            })?;
    }
    let keys = [worker.queue.as_str()];
    let topology = Topology::resolve_only(&clients.sqs, &config, &keys).await?;
    let pair = topology
        .pair(&worker.queue)
        .context("the scratch queue resolves")?
        .clone();

    let wants = |phase: &str| opts.only.as_deref().is_none_or(|only| only == phase);
    let sdk = if wants("sdk") {
        fill(&clients, &pair.queue.url, opts.messages).await?;
        let drained = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let loops: Vec<_> = (0..worker.pollers.get())
            .map(|_| {
                tokio::spawn(bare_loop(
                    clients.sqs.clone(),
                    pair.queue.url.clone(),
                    Arc::clone(&drained),
                    stop.clone(),
                ))
            })
            .collect();
        let phase = watch("sdk", opts, &clients, || drained.load(Ordering::Relaxed)).await;
        stop.cancel();
        for l in loops {
            l.await?;
        }
        Some(phase?)
    } else {
        None
    };

    let runtime = if wants("runtime") {
        fill(&clients, &pair.queue.url, opts.messages).await?;
        let consumer = consumer(&clients, &config, &topology, &worker, opts.role)?;
        let stats = consumer.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer.run(stop.clone()));
        let phase = watch("runtime", opts, &clients, || {
            stats.succeeded.load(Ordering::Relaxed)
        })
        .await;
        stop.cancel();
        task.await?;
        Some(phase?)
    } else {
        None
    };

    for q in [&pair.queue, &pair.dlq] {
        let _ = clients.sqs.delete_queue().queue_url(&q.url).send().await;
    }
    let report = RuntimeReport {
        messages: opts.messages,
        role: opts.role.as_str().to_owned(),
        pollers: worker.pollers.get(),
        max_in_flight: worker.max_in_flight.get(),
        // The runtime the caller built (the worker's `--threads`): 1 is a current-thread one.
        threads: tokio::runtime::Handle::current().metrics().num_workers(),
        telemetry: opts.telemetry,
        cpu_ratio: match (&sdk, &runtime) {
            (Some(sdk), Some(runtime)) if sdk.cpu_us_per_message > 0.0 => {
                Some(runtime.cpu_us_per_message / sdk.cpu_us_per_message)
            }
            _ => None,
        },
        sdk,
        runtime,
    };
    std::fs::write(
        report_dir.join("runtime.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}

/// A consumer of the scratch queue with the role's settings and a handler that does nothing.
fn consumer(
    clients: &Clients,
    config: &FleetConfig,
    topology: &Topology,
    worker: &WorkerConfig,
    role: Role,
) -> anyhow::Result<Consumer<NoOp>> {
    Consumer::new(
        clients.sqs.clone(),
        NoOp,
        ConsumerSettings {
            role: role.as_str().to_owned(),
            worker: worker.clone(),
            topology: topology.clone(),
            max_message_bytes: config.aws.sqs_max_message_bytes,
            untrusted_edge: false,
            aws_trace_header: false,
            ledger: None,
            redrivers: Vec::new(),
        },
        Health::default(),
    )
    .map_err(anyhow::Error::msg)
}

/// The handler of the runtime phase: every message is done at once.
struct NoOp;

impl Handler for NoOp {
    async fn handle(&self, _message: &Message) -> Result<Outcome, HandlerError> {
        Ok(Outcome::done())
    }
}

/// Sends `n` messages of about the size of an order (400 bytes) to `url`.
async fn fill(clients: &Clients, url: &str, n: u64) -> anyhow::Result<()> {
    let progress = indicatif::ProgressBar::new(n).with_message("filling the scratch queue");
    progress.set_style(
        indicatif::ProgressStyle::with_template("  {msg} {bar:30} {pos}/{len} ({eta})")
            .expect("a valid template"),
    );
    crate::ceiling::fill_queue(&clients.sqs, url, n, 400, |sent| progress.inc(sent)).await?;
    progress.finish_and_clear();
    Ok(())
}

/// The bare SDK loop: receive ten (long poll of 1 s), delete them in one batch, until stopped.
async fn bare_loop(
    sqs: aws_sdk_sqs::Client,
    url: String,
    drained: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        if let Some(n) = crate::ceiling::receive_delete_once(&sqs, &url).await {
            drained.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// One sample of a phase.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    drained: u64,
    requests: u64,
    process: ProcessSample,
}

/// Samples a phase until `drained()` reaches the run's messages, and reduces the samples to
/// the phase's figures.
async fn watch(
    name: &str,
    opts: &RuntimeOptions,
    clients: &Clients,
    drained: impl Fn() -> u64,
) -> anyhow::Result<Phase> {
    reset_peak_rss();
    let before = clients.requests.snapshot();
    let progress =
        indicatif::ProgressBar::new(opts.messages).with_message(format!("{name}: draining"));
    progress.set_style(
        indicatif::ProgressStyle::with_template("  {msg} {bar:30} {pos}/{len} ({per_sec})")
            .expect("a valid template"),
    );
    let deadline = Instant::now() + opts.drain_timeout;
    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    loop {
        ticker.tick().await;
        let process = sample_process(std::process::id()).context("/proc/self is readable")?;
        let sample = Sample {
            at: Instant::now(),
            drained: drained(),
            requests: clients.requests.total("sqs"),
            process,
        };
        progress.set_position(sample.drained);
        samples.push(sample);
        if sample.drained >= opts.messages {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name}: {} of {} messages drained in {:?}",
            sample.drained,
            opts.messages,
            opts.drain_timeout
        );
    }
    progress.finish_and_clear();
    let mut phase = reduce(name, opts.messages, &samples);
    phase.requests = clients
        .requests
        .snapshot()
        .into_iter()
        .map(|(op, n)| (op.clone(), n - before.get(&op).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    Ok(phase)
}

/// A phase's figures from its samples: rates over the middle of the drain (the first sample
/// past 10 % of the messages to the first past 90 %), memory after warm-up (from 10 %).
fn reduce(name: &str, messages: u64, samples: &[Sample]) -> Phase {
    let at = |share: u64| samples.iter().find(|s| s.drained * 100 >= messages * share);
    let (Some(from), Some(to)) = (at(10), at(90)) else {
        return Phase {
            name: name.to_owned(),
            ..Phase::default()
        };
    };
    let counted = to.drained.saturating_sub(from.drained).max(1);
    let secs = (to.at - from.at).as_secs_f64().max(f64::MIN_POSITIVE);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= from.at).collect();
    let peak_rss_mib = samples
        .iter()
        .map(|s| s.process.peak_rss_mib)
        .fold(0.0, f64::max);
    let highest = after.iter().map(|s| s.process.rss_mib).fold(0.0, f64::max);
    Phase {
        name: name.to_owned(),
        messages,
        counted,
        secs,
        cpu_us_per_message: (to.process.cpu_secs - from.process.cpu_secs) * 1e6 / counted as f64,
        messages_per_sec: counted as f64 / secs,
        requests_per_message: to.requests.saturating_sub(from.requests) as f64 / counted as f64,
        peak_rss_mib,
        rss_after_warmup_mib: from.process.rss_mib,
        rss_growth_mib: (highest - from.process.rss_mib).max(0.0),
        rss_slope_kib_per_1000: slope(
            after
                .iter()
                .map(|s| (s.drained as f64 / 1000.0, s.process.rss_mib * 1024.0)),
        ),
        requests: std::collections::BTreeMap::new(),
    }
}

/// The least-squares slope of `y` over `x`; 0 with fewer than two distinct `x`.
fn slope(points: impl Iterator<Item = (f64, f64)>) -> f64 {
    let points: Vec<(f64, f64)> = points.collect();
    crate::report::least_squares_slope(&points).unwrap_or(0.0)
}

/// Resets this process's peak resident memory (VmHWM), so that each phase reports its own
/// (Linux: `5` to /proc/self/clear_refs). Where that is refused the peak is the process's.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(start: Instant, ms: u64, drained: u64, requests: u64, cpu: f64, rss: f64) -> Sample {
        Sample {
            at: start + Duration::from_millis(ms),
            drained,
            requests,
            process: ProcessSample {
                cpu_secs: cpu,
                rss_mib: rss,
                peak_rss_mib: rss + 1.0,
            },
        }
    }

    #[test]
    fn a_phase_is_measured_over_the_middle_of_its_drain() {
        let t = Instant::now();
        // 1,000 messages: warm-up to 100 is left out, the dry tail after 900 too.
        let samples = [
            sample(t, 0, 0, 0, 1.0, 10.0),
            sample(t, 100, 100, 20, 1.5, 12.0),
            sample(t, 600, 500, 100, 1.7, 12.0),
            sample(t, 1100, 900, 180, 1.9, 14.0),
            sample(t, 5000, 1000, 400, 3.0, 14.0),
        ];
        let p = reduce("runtime", 1000, &samples);
        assert_eq!(p.counted, 800);
        assert!((p.secs - 1.0).abs() < 1e-9);
        assert!((p.messages_per_sec - 800.0).abs() < 1e-6);
        assert!((p.cpu_us_per_message - 0.4 * 1e6 / 800.0).abs() < 1e-6);
        assert!((p.requests_per_message - 0.2).abs() < 1e-9);
        assert!((p.rss_after_warmup_mib - 12.0).abs() < 1e-9);
        assert!((p.rss_growth_mib - 2.0).abs() < 1e-9);
        assert!((p.peak_rss_mib - 15.0).abs() < 1e-9);
        assert!(p.rss_slope_kib_per_1000 > 0.0);
    }

    #[test]
    fn a_drain_that_never_got_going_reports_nothing_rather_than_nonsense() {
        let t = Instant::now();
        let p = reduce("sdk", 1000, &[sample(t, 0, 0, 0, 1.0, 10.0)]);
        assert_eq!(p.counted, 0);
        assert_eq!(p.cpu_us_per_message, 0.0);
    }

    #[test]
    fn the_slope_of_a_line_is_its_gradient_and_flat_memory_has_none() {
        let line = (0..10).map(|i| (f64::from(i), 3.0 * f64::from(i) + 7.0));
        assert!((slope(line) - 3.0).abs() < 1e-9);
        assert_eq!(slope((0..10).map(|i| (f64::from(i), 5.0))), 0.0);
        assert_eq!(slope(std::iter::once((1.0, 2.0))), 0.0);
    }
}
