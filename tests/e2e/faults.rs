//! The fleet under the faults SQS and DynamoDB produce (common::faults): each test injects a
//! fault for real, then audits what a user depends on: nothing lost, no effect twice, every
//! dead letter attributed.

#![forbid(unsafe_code)]

use std::time::Duration;

use fleet_common::config::FleetConfig;
use fleet_e2e::{wait_until, TestEnv};
use fleet_harness::queues::{dead_letters, send_all, wait_idle};
use fleet_harness::scenario::{Mix, Scenario};

const PHASE: Duration = Duration::from_secs(300);

/// Short polls and quick retries, so that faults play out in seconds.
fn quick(c: &mut FleetConfig) {
    for w in c.workers.values_mut() {
        w.receive_wait_secs = 1;
        w.backoff_min_ms = 100;
        w.backoff_max_secs = 1;
    }
}

/// Feeds `scenario`'s submissions to the running `fleet`, waits until every queue drains, and
/// stops it; returns what the fault plan injected and each role's counters.
async fn drain_through(
    env: &TestEnv,
    fleet: fleet_e2e::RunningFleet,
    scenario: &Scenario,
) -> (
    std::collections::BTreeMap<String, u64>,
    Vec<workers::fleet::RoleStats>,
) {
    send_all(&env.clients.sqs, &env.url("ingest"), &scenario.submissions)
        .await
        .unwrap();
    wait_idle(&env.clients.sqs, &env.topology, PHASE)
        .await
        .unwrap();
    let injected = fleet
        .faults
        .as_ref()
        .map(fleet_common::faults::FaultPlan::injected)
        .unwrap_or_default();
    (injected, fleet.stop().await)
}

/// Waits until a DLQ holds `n` messages (visible).
async fn dlq_holds(env: &TestEnv, key: &str, n: u64) -> bool {
    let url = env.dlq_url(key);
    wait_until(PHASE, || async { env.depth(&url).await.0 >= n }).await
}

/// Defect: the edge recorded an event id before its forward was durable; a message whose
/// forward failed until it was dead-lettered came back from a redrive with a new message id and
/// was acknowledged as a duplicate without ever being forwarded: the order was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_whose_forward_failed_until_dead_lettered_is_placed_after_a_redrive() {
    let env = TestEnv::new(|c| {
        quick(c);
        c.workers.get_mut("ingestion").unwrap().max_attempts = 2;
    })
    .await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(20, Mix::VALID_ONLY, &catalog, 5, &env.suffix);
    let orders_queue = env.config.queues["orders"].name.clone();

    // Every forward to the orders queue fails: each submission is dead-lettered by ingestion.
    let fleet = env
        .start_fleet(Some(&format!(
            "sqs:SendMessageBatch:fail_entries:1:queue={orders_queue}"
        )))
        .await;
    send_all(&env.clients.sqs, &env.url("ingest"), &scenario.submissions)
        .await
        .unwrap();
    assert!(
        dlq_holds(&env, "ingest", 20).await,
        "every submission reached the ingest DLQ"
    );
    let injected = fleet.faults.as_ref().unwrap().injected();
    fleet.stop().await;
    assert!(
        injected.values().sum::<u64>() >= 40,
        "two failed forwards per message: {injected:?}"
    );
    let dead = dead_letters(&env.clients.sqs, &env.topology).await.unwrap();
    assert_eq!(
        dead.get(&("ingest".into(), "forward_failed".into())),
        Some(&20),
        "{dead:?}"
    );

    // The fault is gone; ops redrive the DLQ with the fleet running.
    let fleet = env.start_fleet(None).await;
    let out = env.dlq(&["redrive", &env.dlq_url("ingest"), "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_idle(&env.clients.sqs, &env.topology, PHASE)
        .await
        .unwrap();
    fleet.stop().await;
    let audit = env.audit(&scenario, &catalog, false).await;
    assert_eq!(audit.lost, 0, "{:?}", audit.offenders);
    assert_eq!(audit.duplicate_effects, 0, "{:?}", audit.offenders);
    assert_eq!(audit.orders_completed, 20);
    let dead = dead_letters(&env.clients.sqs, &env.topology).await.unwrap();
    assert!(dead.is_empty(), "nothing left in a DLQ: {dead:?}");
}

/// Defect: under sustained DynamoDB throttling every message burned its attempts in seconds
/// and landed in a DLQ as `downstream_unavailable`, while the pollers kept receiving at full
/// speed. A throttled fleet slows down and retries in place; throttling alone uses no attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_throttling_slows_the_fleet_and_dead_letters_nothing() {
    let env = TestEnv::new(|c| {
        quick(c);
        for w in c.workers.values_mut() {
            w.max_attempts = 2;
        }
    })
    .await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(60, Mix::VALID_ONLY, &catalog, 7, &env.suffix);
    // Every DynamoDB request is throttled for the first 8 s (transactions as
    // TransactionCanceled/ThrottlingError), then none.
    let fleet = env
        .start_fleet(Some("dynamodb:*:throttle:1:burst=8s/1h"))
        .await;
    let (injected, stats) = drain_through(&env, fleet, &scenario).await;
    assert!(
        injected.values().sum::<u64>() > 60,
        "the throttling was real: {injected:?}"
    );
    let orders = stats
        .iter()
        .find(|s| s.role == fleet_common::role::Role::Orders)
        .unwrap();
    let throttled = orders
        .stats
        .throttled
        .load(std::sync::atomic::Ordering::Relaxed);
    let lowest = orders
        .stats
        .lowest_concurrency_limit
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(throttled > 0, "orders met the throttling");
    assert!(
        (1..=8).contains(&lowest),
        "the concurrency limit came down from 32 (lowest {lowest})"
    );
    let dead = dead_letters(&env.clients.sqs, &env.topology).await.unwrap();
    assert!(dead.is_empty(), "throttling dead-lettered: {dead:?}");
    let audit = env.audit(&scenario, &catalog, false).await;
    assert_eq!(audit.lost, 0, "{:?}", audit.offenders);
    assert_eq!(audit.duplicate_effects, 0, "{:?}", audit.offenders);
}

/// Defect: no call had a deadline, and `/healthz` said ok whatever happened. A hung receive
/// now times out, and a poller that completes no receive fails the health check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_receive_times_out_and_fails_the_health_check_until_it_recovers() {
    let env = TestEnv::new(|c| {
        quick(c);
        c.aws.attempt_timeout_ms = 500;
    })
    .await;
    let fleet = env
        .start_fleet(Some("sqs:ReceiveMessage:hang:1:burst=6s/1h"))
        .await;
    fleet.health.set_poller_stale(Duration::from_secs(3));
    assert!(fleet.health.check().is_ok(), "healthy at the start");
    assert!(
        wait_until(Duration::from_secs(6), || async {
            fleet.health.check().is_err()
        })
        .await,
        "a poller that completes no receive fails /healthz"
    );
    let why = fleet.health.check().unwrap_err();
    assert!(why.contains("completed no receive"), "{why}");
    // The hang ends: the receives time out, are retried and complete again.
    assert!(
        wait_until(Duration::from_secs(40), || async {
            fleet.health.check().is_ok()
        })
        .await,
        "healthy again once receives complete"
    );
    fleet.stop().await;
}

/// DynamoDB calls that hang end at `aws.attempt_timeout_ms` and are retried: the orders are
/// placed, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_dynamodb_calls_time_out_and_the_orders_still_complete_once() {
    let env = TestEnv::new(|c| {
        quick(c);
        c.aws.attempt_timeout_ms = 300;
    })
    .await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(30, Mix::VALID_ONLY, &catalog, 9, &env.suffix);
    let fleet = env
        .start_fleet(Some("dynamodb:*:hang:0.3:burst=10s/1h"))
        .await;
    let (injected, _) = drain_through(&env, fleet, &scenario).await;
    assert!(injected.values().sum::<u64>() > 0, "{injected:?}");
    let audit = env.audit(&scenario, &catalog, false).await;
    assert_eq!(audit.lost, 0, "{:?}", audit.offenders);
    assert_eq!(audit.duplicate_effects, 0, "{:?}", audit.offenders);
    let dead = dead_letters(&env.clients.sqs, &env.topology).await.unwrap();
    assert!(dead.is_empty(), "{dead:?}");
}
