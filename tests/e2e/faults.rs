//! The fleet under the faults SQS and DynamoDB produce (common::faults): each test injects a
//! fault for real, then audits what a user depends on: nothing lost, no effect twice, every
//! dead letter attributed.

use std::time::Duration;

use fleet_common::config::FleetConfig;
use fleet_e2e::{wait_until, TestEnv};
use workers::demo::{dead_letters, send_all, wait_idle};
use workers::scenario::{Mix, Scenario};

const PHASE: Duration = Duration::from_secs(300);

/// Short polls and quick retries, so that faults play out in seconds.
fn quick(c: &mut FleetConfig) {
    for w in c.workers.values_mut() {
        w.receive_wait_secs = 1;
        w.backoff_min_ms = 100;
        w.backoff_max_secs = 1;
    }
}

fn valid_only() -> Mix {
    Mix {
        valid: 1,
        duplicate: 0,
        malformed: 0,
        unknown_sku: 0,
        wrong_price: 0,
        out_of_stock: 0,
    }
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
    let scenario = Scenario::generate(20, valid_only(), &catalog, 5, &env.suffix);
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
