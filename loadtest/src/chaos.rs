//! The chaos run: the four roles as separate `worker` processes under a fault plan
//! (`common::faults`), a random role SIGKILLed and restarted every few seconds, a load of orders
//! and then carrier events; then a redrive of everything dead-lettered for a transient reason
//! and a drain without faults; then the audit of every order's whole record and of every dead
//! letter. `tests/e2e/chaos.rs` runs it CI-sized; `loadtest --chaos` runs it larger.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use fleet_common::aws::Clients;
use fleet_common::failure::Reason;
use fleet_common::role::Role;
use fleet_common::topology::Topology;
use fleet_harness::queues::{dead_letter_mismatches, dead_letters, send_all, wait_idle};
use fleet_harness::scenario::{Audit, Scenario};
use rand::Rng;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use workers::catalog::CatalogFile;
use workers::store::Tables;

/// The default plan: throttling bursts on every DynamoDB call (transactions included), lost
/// responses after a write landed, hung calls cut by the deadline, slow calls; SQS forwards and
/// DLQ sends failing entry by entry, partial delete failures, receive errors, slow receives.
pub const DEFAULT_FAULTS: &str = "dynamodb:*:throttle:0.6:burst=2s/9s; \
    dynamodb:*:lost_response:0.02; \
    dynamodb:*:hang:0.005; \
    dynamodb:*:slow=150ms:0.03; \
    sqs:SendMessageBatch:fail_entries:0.08; \
    sqs:DeleteMessageBatch:fail_entries:0.08; \
    sqs:ReceiveMessage:error:0.03; \
    sqs:ReceiveMessage:slow=300ms:0.05";

/// The reasons a transient failure is dead-lettered with, and `none` (moved by SQS itself
/// after a worker died on it too often): what ops redrive once the fault is gone. Carrier
/// events for orders whose submission was itself dead-lettered under the faults end as
/// `unknown_order` or `order_not_packed`; they are redriven too (the ghosts among them come
/// back with the same reason, once more).
pub const TRANSIENT_REASONS: [&str; 10] = [
    Reason::UNKNOWN_ORDER.as_str(),
    Reason::ORDER_NOT_PACKED.as_str(),
    Reason::DOWNSTREAM_UNAVAILABLE.as_str(),
    Reason::DOWNSTREAM_TIMEOUT.as_str(),
    Reason::FORWARD_FAILED.as_str(),
    Reason::THROTTLED.as_str(),
    Reason::HANDLER_DEADLINE_EXCEEDED.as_str(),
    Reason::HANDLER_PANIC.as_str(),
    Reason::CONTENDED_ORDER.as_str(),
    "none",
];

/// Short visibility timeouts, polls and retries, so that kills and faults play out in seconds
/// rather than minutes (a killed worker's messages come back after their visibility timeout).
pub fn tune(c: &mut fleet_common::config::FleetConfig) {
    c.aws.attempt_timeout_ms = 1_000;
    c.observability.poller_stale_secs = 60;
    for q in c.queues.values_mut() {
        q.visibility_timeout_secs = 6;
    }
    for w in c.workers.values_mut() {
        w.receive_wait_secs = 1;
        w.heartbeat_interval_secs = 2;
        w.shutdown_deadline_secs = 3;
        w.backoff_min_ms = 200;
        w.backoff_max_secs = 2;
        w.handler_deadline_secs = 30;
        w.throttle_patience_secs = 60;
    }
}

/// Where the processes run and how to reach the queues and tables.
pub struct Setup<'a> {
    /// The `worker` binary.
    pub worker_bin: PathBuf,
    /// The `dlq` binary.
    pub dlq_bin: PathBuf,
    /// The config file both binaries read, and the directory they run in.
    pub config_path: PathBuf,
    /// The working directory of the processes.
    pub workdir: PathBuf,
    /// `FLEET__…` variables for this run's queues, tables and settings.
    pub env: Vec<(String, String)>,
    /// Clients of the harness (no faults).
    pub clients: &'a Clients,
    /// The queues.
    pub topology: &'a Topology,
    /// The tables.
    pub tables: Tables,
}

/// What to do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The fault plan (`FLEET_FAULTS` syntax).
    pub faults: String,
    /// How often a random role is SIGKILLed (and restarted).
    pub kill_every: Duration,
    /// Longest wait for the queues to drain, per phase.
    pub phase_timeout: Duration,
}

/// The figures of a chaos run.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// Orders the scenario expects.
    pub orders: u64,
    /// Inputs sent (submissions, duplicates, malformed bodies, carrier events).
    pub inputs: u64,
    /// Roles SIGKILLed.
    pub kills: u64,
    /// Faults injected, by `service.Operation.fault`, from the processes' logs.
    pub faults_injected: BTreeMap<String, u64>,
    /// Handler runs throttled and retried in place.
    pub throttled_runs: u64,
    /// Transient failures sent back for a retry.
    pub retries: u64,
    /// DLQ contents before the redrive: (queue, reason) → inputs.
    pub dead_letters_before_redrive: BTreeMap<String, u64>,
    /// Messages redriven.
    pub redriven: u64,
    /// Seconds under faults and kills.
    pub chaos_secs: u64,
    /// Seconds in all.
    pub total_secs: u64,
    /// The audit after the drain.
    pub audit: Audit,
    /// Dead letters that differ from the expected ones (missing or extra).
    pub dead_letter_mismatches: u64,
    /// DLQ contents at the end.
    pub dead_letters: BTreeMap<String, u64>,
}

impl ChaosReport {
    /// Nothing lost, nothing applied twice, every order as expected, every dead letter right.
    pub fn passed(&self, expected_orders: u64) -> bool {
        self.audit.lost == 0
            && self.audit.duplicate_effects == 0
            && self.audit.unexpected_orders == 0
            && self.audit.orders_completed == expected_orders
            && self.dead_letter_mismatches == 0
    }
}

/// A role's process and the task that drains its log.
struct Worker {
    child: tokio::process::Child,
    logs: tokio::task::JoinHandle<String>,
}

fn spawn(setup: &Setup<'_>, role: &str, faults: Option<&str>) -> anyhow::Result<Worker> {
    let mut command = tokio::process::Command::new(&setup.worker_bin);
    command
        .arg("--config")
        .arg(&setup.config_path)
        .args(["run", "--role", role])
        .current_dir(&setup.workdir)
        .envs(setup.env.iter().cloned())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match faults {
        Some(plan) => command.env(fleet_common::faults::FAULTS_ENV, plan),
        None => command.env_remove(fleet_common::faults::FAULTS_ENV),
    };
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", setup.worker_bin.display()))?;
    let mut stderr = child.stderr.take().context("piped stderr")?;
    let logs = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    Ok(Worker { child, logs })
}

/// The four roles as processes.
struct Fleet {
    workers: tokio::sync::Mutex<BTreeMap<&'static str, Worker>>,
    logs: Mutex<String>,
    kills: Mutex<u64>,
}

impl Fleet {
    fn start(setup: &Setup<'_>, faults: Option<&str>) -> anyhow::Result<Arc<Self>> {
        let mut workers = BTreeMap::new();
        for role in Role::names() {
            workers.insert(role, spawn(setup, role, faults)?);
        }
        Ok(Arc::new(Self {
            workers: tokio::sync::Mutex::new(workers),
            logs: Mutex::default(),
            kills: Mutex::default(),
        }))
    }

    /// SIGKILLs a random role and starts it again.
    async fn kill_one(&self, setup: &Setup<'_>, faults: &str) -> anyhow::Result<()> {
        let role = Role::ALL[rand::rng().random_range(0..Role::ALL.len())].as_str();
        let mut workers = self.workers.lock().await;
        if let Some(mut old) = workers.remove(role) {
            let _ = old.child.start_kill();
            let _ = old.child.wait().await;
            if let Ok(text) = old.logs.await {
                self.logs.lock().expect("logs lock").push_str(&text);
            }
            *self.kills.lock().expect("kills lock") += 1;
        }
        workers.insert(role, spawn(setup, role, Some(faults))?);
        Ok(())
    }

    /// SIGTERM to every process; each must exit 0 within 15 s. Returns every log.
    async fn stop(&self) -> anyhow::Result<String> {
        let mut workers = self.workers.lock().await;
        for w in workers.values() {
            if let Some(pid) = w.child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        let mut logs = std::mem::take(&mut *self.logs.lock().expect("logs lock"));
        for (role, mut w) in std::mem::take(&mut *workers) {
            let status = tokio::time::timeout(Duration::from_secs(15), w.child.wait())
                .await
                .map_err(|_| anyhow::anyhow!("{role} did not stop within 15 s of SIGTERM"))??;
            anyhow::ensure!(status.success(), "{role} exited {status} on SIGTERM");
            logs.push_str(&w.logs.await.unwrap_or_default());
        }
        Ok(logs)
    }
}

/// Runs the chaos run on `scenario` (its catalog already seeded) and audits it.
///
/// # Errors
/// A process that does not start or stop cleanly, queues that do not drain, a redrive that
/// fails; the audit's verdict is in the report.
pub async fn run(
    setup: &Setup<'_>,
    plan: &Plan,
    scenario: &Scenario,
    catalog: &CatalogFile,
) -> anyhow::Result<ChaosReport> {
    let started = Instant::now();
    let sqs = &setup.clients.sqs;
    let ingest = setup
        .topology
        .pair("ingest")
        .context("no ingest queue")?
        .queue
        .url
        .clone();

    let (kills, logs) = under_faults(setup, plan, scenario, &ingest).await?;
    let chaos_secs = started.elapsed().as_secs();

    let before = dead_letters(sqs, setup.topology).await?;
    let clean = Fleet::start(setup, None)?;
    let mut redriven = 0;
    for pair in setup.topology.queues.values() {
        redriven += redrive(setup, &pair.dlq.url).await?;
    }
    wait_idle(sqs, setup.topology, plan.phase_timeout).await?;
    clean.stop().await?;

    let audit = fleet_harness::scenario::audit(
        &setup.clients.dynamodb,
        &setup.tables,
        scenario,
        catalog,
        true,
    )
    .await?;
    let dead = dead_letters(sqs, setup.topology).await?;
    let flat = |m: &BTreeMap<(String, String), u64>| {
        m.iter()
            .map(|((q, r), n)| (format!("{q}/{r}"), *n))
            .collect()
    };
    let count = |needle: &str| logs.lines().filter(|l| l.contains(needle)).count() as u64;
    Ok(ChaosReport {
        orders: scenario.expected.len() as u64,
        inputs: (scenario.submissions.len() + scenario.carrier_events.len()) as u64,
        kills,
        faults_injected: injected(&logs),
        throttled_runs: count("slowing down and retrying in place"),
        retries: count("transient failure; will retry"),
        dead_letters_before_redrive: flat(&before),
        redriven,
        chaos_secs,
        total_secs: started.elapsed().as_secs(),
        dead_letter_mismatches: dead_letter_mismatches(&dead, &scenario.expected_dead_letters),
        dead_letters: flat(&dead),
        audit,
    })
}

/// The faulty phase: the scenario's submissions, then its carrier events, each let settle, with
/// the fleet under `plan`'s faults and a role killed every `kill_every`. Returns the kills and
/// every worker's logs.
async fn under_faults(
    setup: &Setup<'_>,
    plan: &Plan,
    scenario: &Scenario,
    ingest: &str,
) -> anyhow::Result<(u64, String)> {
    let sqs = &setup.clients.sqs;
    let fleet = Fleet::start(setup, Some(&plan.faults))?;
    let stop_killing = CancellationToken::new();
    let killing = async {
        loop {
            tokio::select! {
                () = stop_killing.cancelled() => return Ok::<(), anyhow::Error>(()),
                () = tokio::time::sleep(plan.kill_every) => {}
            }
            fleet.kill_one(setup, &plan.faults).await?;
        }
    };
    let load = async {
        send_all(sqs, ingest, &scenario.submissions).await?;
        wait_idle(sqs, setup.topology, plan.phase_timeout).await?;
        send_all(sqs, ingest, &scenario.carrier_events).await?;
        wait_idle(sqs, setup.topology, plan.phase_timeout).await?;
        stop_killing.cancel();
        Ok::<(), anyhow::Error>(())
    };
    let (killed, loaded) = tokio::join!(killing, load);
    killed?;
    loaded?;
    let kills = *fleet.kills.lock().expect("kills lock");
    let logs = fleet.stop().await?;
    Ok((kills, logs))
}

/// `dlq redrive` of every transient dead letter of one DLQ; returns how many moved.
async fn redrive(setup: &Setup<'_>, dlq_url: &str) -> anyhow::Result<u64> {
    let mut command = tokio::process::Command::new(&setup.dlq_bin);
    command
        .arg("--config")
        .arg(&setup.config_path)
        .args(["redrive", dlq_url, "--output", "json"])
        .current_dir(&setup.workdir)
        .envs(setup.env.iter().cloned());
    for reason in TRANSIENT_REASONS {
        command.args(["--reason", reason]);
    }
    let out = command
        .output()
        .await
        .with_context(|| format!("running {}", setup.dlq_bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "dlq redrive {dlq_url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(report["moved"].as_u64().unwrap_or(0))
}

/// Faults injected, counted from the processes' JSON log lines ("fault injected", with the
/// service, operation and fault), killed processes included.
fn injected(logs: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in logs.lines().filter(|l| l.contains("fault injected")) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let f = &v["fields"];
        let key = format!(
            "{}.{}.{}",
            f["service"].as_str().unwrap_or("?"),
            f["operation"].as_str().unwrap_or("?"),
            f["fault"].as_str().unwrap_or("?")
        );
        *out.entry(key).or_default() += f["count"].as_u64().unwrap_or(1);
    }
    out
}
