//! The chaos run, CI-sized: 1,000 orders with carrier events through the four roles as separate
//! `worker` processes, while DynamoDB throttles in bursts, forwards, DLQ sends and deletes fail
//! entry by entry, receives fail, calls are slow, responses are lost after the write landed,
//! and a random role is SIGKILLed (and restarted) every few seconds. Then everything that
//! reached a DLQ for a transient reason is redriven and drained without faults, and the audit
//! holds the fleet to its promise: nothing lost, no effect twice, every order's whole record as
//! an undisturbed run leaves it, every dead letter attributed with the right reason.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_common::config::FleetConfig;
use fleet_e2e::{worker_binary, TestEnv};
use rand::Rng;
use tokio::io::AsyncReadExt;
use workers::demo::{dead_letter_mismatches, dead_letters, send_all, wait_idle};
use workers::scenario::{Mix, Scenario};

const PHASE: Duration = Duration::from_secs(600);
const ROLES: [&str; 4] = ["ingestion", "orders", "warehouse", "delivery"];

/// The faults of the run: throttling bursts on every DynamoDB call (transactions included),
/// lost responses after a write landed, hung calls cut by the deadline; SQS forwards and DLQ
/// sends failing entry by entry, partial delete failures, receive errors, slow receives.
const FAULTS: &str = "dynamodb:*:throttle:0.6:burst=2s/9s; \
    dynamodb:*:lost_response:0.02; \
    dynamodb:*:hang:0.005; \
    dynamodb:*:slow=150ms:0.03; \
    sqs:SendMessageBatch:fail_entries:0.08; \
    sqs:DeleteMessageBatch:fail_entries:0.08; \
    sqs:ReceiveMessage:error:0.03; \
    sqs:ReceiveMessage:slow=300ms:0.05";

/// The reasons a transient failure is dead-lettered with (and `none`: moved by SQS itself after
/// a worker died on it too often): what ops redrive once the fault is gone. Carrier events for
/// orders whose submission was itself dead-lettered under the faults end as `unknown_order` or
/// `order_not_packed`: they are redriven too (the ghosts among them come back with the same
/// reason, once more).
const TRANSIENT_REASONS: [&str; 10] = [
    "unknown_order",
    "order_not_packed",
    "downstream_unavailable",
    "downstream_timeout",
    "forward_failed",
    "throttled",
    "handler_deadline_exceeded",
    "handler_panic",
    "contended_order",
    "none",
];

fn chaos_config(c: &mut FleetConfig) {
    c.aws.attempt_timeout_ms = 1_000;
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

/// A role's process and the task that drains its log.
struct Worker {
    child: tokio::process::Child,
    logs: tokio::task::JoinHandle<String>,
}

fn spawn(vars: &[(String, String)], role: &str, faults: Option<&str>) -> Worker {
    let mut command = tokio::process::Command::new(worker_binary());
    command
        .args(["run", "--role", role])
        .current_dir(fleet_e2e::workspace_root())
        .envs(vars.iter().cloned())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match faults {
        Some(plan) => command.env(fleet_common::faults::FAULTS_ENV, plan),
        None => command.env_remove(fleet_common::faults::FAULTS_ENV),
    };
    let mut child = command.spawn().expect("worker starts");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let logs = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    Worker { child, logs }
}

/// The four roles, each its own process; `kill_every` SIGKILLs a random one and restarts it.
struct Fleet {
    workers: Arc<tokio::sync::Mutex<BTreeMap<&'static str, Worker>>>,
    logs: Arc<Mutex<String>>,
    kills: Arc<Mutex<u64>>,
}

impl Fleet {
    fn start(env: &TestEnv, faults: Option<&str>) -> Self {
        let vars = env.env_overrides();
        let workers = ROLES
            .iter()
            .map(|r| (*r, spawn(&vars, r, faults)))
            .collect();
        Self {
            workers: Arc::new(tokio::sync::Mutex::new(workers)),
            logs: Arc::default(),
            kills: Arc::default(),
        }
    }

    fn kill_every(
        &self,
        env: &TestEnv,
        every: Duration,
        faults: &'static str,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let (workers, logs, kills) = (self.workers.clone(), self.logs.clone(), self.kills.clone());
        let vars = env.env_overrides();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let role = ROLES[rand::rng().random_range(0..ROLES.len())];
                let mut workers = workers.lock().await;
                let Some(mut old) = workers.remove(role) else {
                    continue;
                };
                let _ = old.child.start_kill();
                let _ = old.child.wait().await;
                if let Ok(text) = old.logs.await {
                    logs.lock().unwrap().push_str(&text);
                }
                *kills.lock().unwrap() += 1;
                workers.insert(role, spawn(&vars, role, Some(faults)));
            }
        })
    }

    /// SIGTERM to every process; each exits 0 within its deadline. Returns the logs.
    async fn stop(self) -> String {
        let mut workers = self.workers.lock().await;
        for w in workers.values() {
            if let Some(pid) = w.child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        let mut logs = self.logs.lock().unwrap().clone();
        for (role, mut w) in std::mem::take(&mut *workers) {
            let status = tokio::time::timeout(Duration::from_secs(15), w.child.wait())
                .await
                .unwrap_or_else(|_| panic!("{role} did not stop within 15 s"))
                .unwrap();
            assert!(status.success(), "{role} exited {status}");
            logs.push_str(&w.logs.await.unwrap());
        }
        logs
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_orders_through_faults_and_kills_end_as_an_undisturbed_run_would() {
    let env = TestEnv::new(chaos_config).await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(1_000, Mix::default(), &catalog, 1_000, &env.suffix);
    let started = Instant::now();

    let fleet = Fleet::start(&env, Some(FAULTS));
    let stop_killing = tokio_util::sync::CancellationToken::new();
    let killer = fleet.kill_every(&env, Duration::from_secs(3), FAULTS, stop_killing.clone());
    let ingest = env.url("ingest");
    send_all(&env.clients.sqs, &ingest, &scenario.submissions)
        .await
        .unwrap();
    wait_idle(&env.clients.sqs, &env.topology, PHASE)
        .await
        .unwrap();
    send_all(&env.clients.sqs, &ingest, &scenario.carrier_events)
        .await
        .unwrap();
    wait_idle(&env.clients.sqs, &env.topology, PHASE)
        .await
        .unwrap();
    stop_killing.cancel();
    killer.await.unwrap();
    let kills = *fleet.kills.lock().unwrap();
    let logs = fleet.stop().await;
    let chaos_secs = started.elapsed().as_secs();

    // The faults were real.
    let count = |needle: &str| logs.lines().filter(|l| l.contains(needle)).count();
    let throttled = count("slowing down and retrying in place");
    let retried = count("transient failure; will retry");
    let deletes = count("DeleteMessageBatch entries failed");
    assert!(kills >= 3, "{kills} kills");
    assert!(throttled > 0, "no throttling met");
    assert!(retried > 0, "no transient failure met");
    assert!(deletes > 0, "no partial delete failure met");

    // Ops redrive what failed for a transient reason, once the faults are gone.
    let before = dead_letters(&env.clients.sqs, &env.topology).await.unwrap();
    let fleet = Fleet::start(&env, None);
    let mut redriven = 0;
    for key in ["ingest", "orders", "warehouse", "delivery"] {
        let mut args = vec!["redrive".to_owned(), env.dlq_url(key)];
        for reason in TRANSIENT_REASONS {
            args.push("--reason".into());
            args.push(reason.into());
        }
        args.extend(["--output".into(), "json".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = env.dlq(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        redriven += report["moved"].as_u64().unwrap_or(0);
    }
    wait_idle(&env.clients.sqs, &env.topology, PHASE)
        .await
        .unwrap();
    fleet.stop().await;

    let audit = env.audit(&scenario, &catalog, true).await;
    let dead = dead_letters(&env.clients.sqs, &env.topology).await.unwrap();
    eprintln!(
        "chaos: {} orders, {kills} kills, {throttled} throttled runs, {retried} retries, {deletes} partial delete failures, {redriven} redriven (DLQs before the redrive: {before:?}), {chaos_secs} s under faults; lost {}, duplicate effects {}",
        scenario.expected.len(),
        audit.lost,
        audit.duplicate_effects
    );
    assert_eq!(audit.lost, 0, "{:?}", audit.offenders);
    assert_eq!(audit.duplicate_effects, 0, "{:?}", audit.offenders);
    assert_eq!(audit.unexpected_orders, 0);
    assert_eq!(audit.orders_completed, scenario.expected.len() as u64);
    assert_eq!(
        dead_letter_mismatches(&dead, &scenario.expected_dead_letters),
        0,
        "every dead letter attributed with the right reason, nothing else: {dead:?} vs {:?}",
        scenario.expected_dead_letters
    );
}
