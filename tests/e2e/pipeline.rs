//! The whole pipeline against the emulators: a mixed load of 500 orders ends in the expected
//! states with the right dead letters; feeding it all again changes nothing; a SIGKILL mid-run
//! ends in the same state; logs carry correlation ids and no personal data.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fleet_common::contract::OrderStatus;
use fleet_common::health::Health;
use fleet_e2e::{worker_binary, TestEnv};
use fleet_harness::queues::{dead_letter_mismatches, dead_letters, send_all, wait_idle};
use fleet_harness::scenario::{scan, Mix, Scenario};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

const PHASE: Duration = Duration::from_secs(300);

fn quick(c: &mut fleet_common::config::FleetConfig) {
    for w in c.workers.values_mut() {
        w.receive_wait_secs = 1;
    }
}

/// Orders and products, as comparable snapshots (history included): each item as canonical JSON.
async fn snapshot(env: &TestEnv) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let tables = env.tables();
    let dump = |items: Vec<HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>| {
        items
            .into_iter()
            .map(|i| {
                let pk = i["pk"].as_s().unwrap().clone();
                let json: serde_json::Value = serde_dynamo::from_item(i).unwrap();
                (pk, canonical(&json))
            })
            .collect()
    };
    (
        dump(scan(&env.clients.dynamodb, &tables.orders).await.unwrap()),
        dump(scan(&env.clients.dynamodb, &tables.catalog).await.unwrap()),
    )
}

/// JSON with object keys sorted at every level (serde_json may keep insertion order, and
/// DynamoDB maps come back in any order).
fn canonical(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<&String, String> =
                map.iter().map(|(k, v)| (k, canonical(v))).collect();
            let fields: Vec<String> = sorted.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
            format!("{{{}}}", fields.join(","))
        }
        serde_json::Value::Array(items) => format!(
            "[{}]",
            items.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// Compares snapshots item by item, naming the first item that differs.
fn assert_same(what: &str, before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
    assert_eq!(
        before.len(),
        after.len(),
        "{what}: items appeared or vanished"
    );
    for (pk, item) in before {
        let later = after.get(pk).map(String::as_str).unwrap_or("(missing)");
        assert!(
            later == item,
            "{what} {pk} changed on the second feed:\nbefore {item}\nafter  {later}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_mixed_orders_end_as_expected_and_a_second_feed_changes_nothing() {
    let env = TestEnv::new(quick).await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(500, Mix::default(), &catalog, 11, &env.suffix);
    let shutdown = CancellationToken::new();
    let fleet = {
        let (config, clients, shutdown) =
            (env.config.clone(), env.clients.clone(), shutdown.clone());
        tokio::spawn(async move {
            workers::fleet::run(
                &config,
                &clients,
                &fleet_common::role::Role::ALL,
                Health::default(),
                shutdown,
            )
            .await
        })
    };
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

    let first = env.audit(&scenario, &catalog, true).await;
    assert_eq!(first.lost, 0, "{:?}", first.offenders);
    assert_eq!(first.duplicate_effects, 0, "{:?}", first.offenders);
    assert_eq!(first.unexpected_orders, 0);
    assert_eq!(first.orders_completed, scenario.expected.len() as u64);
    assert!(first.orders_rejected > 0);
    let dead = dead_letters(&env.clients.sqs, &env.topology).await.unwrap();
    assert_eq!(
        dead, scenario.expected_dead_letters,
        "every rejected input in a DLQ with its reason, nothing else"
    );
    let before = snapshot(&env).await;

    // A redrive of everything: every copy passes the edge (it keeps no record), so each
    // stage's own conditional write is what holds.
    send_all(&env.clients.sqs, &ingest, &scenario.submissions)
        .await
        .unwrap();
    send_all(&env.clients.sqs, &ingest, &scenario.carrier_events)
        .await
        .unwrap();
    wait_idle(&env.clients.sqs, &env.topology, PHASE)
        .await
        .unwrap();
    shutdown.cancel();
    fleet.await.unwrap().unwrap();

    let after = snapshot(&env).await;
    assert_same("product (stock)", &before.1, &after.1);
    assert_same("order", &before.0, &after.0);
    let second = env.audit(&scenario, &catalog, true).await;
    assert_eq!(second.duplicate_effects, 0, "{:?}", second.offenders);
}

/// A worker process and the task that drains its log (stderr) as it runs: an undrained pipe
/// would fill and block the worker's logging.
struct Worker {
    child: tokio::process::Child,
    logs: tokio::task::JoinHandle<String>,
}

async fn spawn_worker(env: &TestEnv) -> Worker {
    let mut child = tokio::process::Command::new(worker_binary())
        .args(["run", "--role", "all"])
        .current_dir(fleet_e2e::workspace_root())
        .envs(env.env_overrides())
        .env("RUST_LOG", "info,fleet_common=debug,workers=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("worker starts");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let logs = tokio::spawn(async move {
        let mut text = String::new();
        stderr
            .read_to_string(&mut text)
            .await
            .expect("log is UTF-8");
        text
    });
    Worker { child, logs }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_run_ends_in_the_same_state_and_logs_hold_no_personal_data() {
    let env = TestEnv::new(|c| {
        quick(c);
        for q in c.queues.values_mut() {
            q.visibility_timeout_secs = 4;
        }
        for w in c.workers.values_mut() {
            w.heartbeat_interval_secs = 2;
            w.shutdown_deadline_secs = 5;
        }
    })
    .await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(300, Mix::default(), &catalog, 23, &env.suffix);
    let ingest = env.url("ingest");
    send_all(&env.clients.sqs, &ingest, &scenario.submissions)
        .await
        .unwrap();

    let mut first = spawn_worker(&env).await;
    let orders_table = env.tables().orders;
    let started = Instant::now();
    loop {
        let done = scan(&env.clients.dynamodb, &orders_table)
            .await
            .unwrap()
            .len();
        if done >= 60 {
            break;
        }
        assert!(started.elapsed() < PHASE, "the worker made no progress");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
    let mut logs = first.logs.await.unwrap();

    let mut second = spawn_worker(&env).await;
    wait_idle(&env.clients.sqs, &env.topology, PHASE)
        .await
        .unwrap();
    send_all(&env.clients.sqs, &ingest, &scenario.carrier_events)
        .await
        .unwrap();
    wait_idle(&env.clients.sqs, &env.topology, PHASE)
        .await
        .unwrap();

    // SIGTERM: the process exits cleanly within its deadline.
    let asked = Instant::now();
    let pid = second.child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(8), second.child.wait())
        .await
        .expect("exits within its deadline")
        .unwrap();
    assert!(status.success(), "a graceful stop exits 0: {status}");
    assert!(asked.elapsed() < Duration::from_secs(8));
    logs.push_str(&second.logs.await.unwrap());

    let result = env.audit(&scenario, &catalog, true).await;
    assert_eq!(result.lost, 0, "{:?}", result.offenders);
    assert_eq!(result.duplicate_effects, 0, "{:?}", result.offenders);
    assert_eq!(
        result.orders_completed,
        scenario.expected.len() as u64,
        "the same final state as an undisturbed run"
    );
    let dead = dead_letters(&env.clients.sqs, &env.topology).await.unwrap();
    assert_eq!(
        dead_letter_mismatches(&dead, &scenario.expected_dead_letters),
        0,
        "{dead:?}"
    );

    // No personal data in any log line; every line about a message carries its correlation id.
    let mut secrets = Vec::new();
    for input in &scenario.submissions {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&input.body) else {
            continue;
        };
        let p = &v["payload"];
        for field in [
            &p["email"],
            &p["payment_reference"],
            &p["delivery_address"]["name"],
            &p["delivery_address"]["line1"],
            &p["delivery_address"]["phone"],
        ] {
            if let Some(s) = field.as_str() {
                secrets.push(s.to_owned());
            }
        }
    }
    assert!(secrets.len() > 500);
    let lines: Vec<&str> = logs.lines().collect();
    assert!(lines.len() > 100, "the workers logged");
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "personal data in the logs: {secret}"
        );
    }
    let mut message_lines = 0;
    for line in &lines {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("log lines are JSON: {line}"));
        if json["span"]["name"] == "message" {
            message_lines += 1;
            assert!(json["span"]["correlation_id"].is_string(), "{line}");
        }
    }
    assert!(message_lines > 100, "message lines carry their span");
}

/// The load harness's DynamoDB ceiling runs the handlers chained in memory; it must do the
/// fleet's real work, or the bound it gives would be a fiction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_chain_does_the_work_the_fleet_does() {
    let env = TestEnv::new(quick).await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(60, Mix::default(), &catalog, 31, &env.suffix);
    let inline = fleet_harness::chain::Inline::new(&env.config, &env.clients.dynamodb).unwrap();
    let mut handled = 0;
    for input in &scenario.submissions {
        handled += inline.run(input.body.clone()).await;
    }
    let result = env.audit(&scenario, &catalog, false).await;
    assert_eq!(result.lost, 0, "{:?}", result.offenders);
    assert_eq!(result.duplicate_effects, 0, "{:?}", result.offenders);
    assert_eq!(result.orders_completed, scenario.expected.len() as u64);
    let packed = scenario
        .expected
        .values()
        .filter(|e| e.status == OrderStatus::Packed)
        .count();
    // Every input is handled at the edge; accepted orders go on to the warehouse, packed ones
    // to delivery.
    assert!(
        handled >= scenario.submissions.len() + scenario.expected.len() + packed,
        "{handled} messages handled"
    );
}

/// A flash sale on a hot product whose stock is split over shards, packed concurrently until
/// the shards run dry one by one: every unit packed left a shard, no shard goes below zero, and
/// every order ends packed or unpackable (a short hot line removed), none stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_hot_product_running_dry_never_oversells() {
    use futures::StreamExt;
    let env = TestEnv::new(quick).await;
    let mut catalog = workers::catalog::CatalogFile::load(
        &fleet_e2e::workspace_root().join("config/catalog.json"),
    )
    .unwrap();
    // Orders of the shipped catalog, every one with a line on the hot product...
    let flash = fleet_harness::scenario::Flash {
        share: 1.0,
        products: 1,
    };
    let scenario =
        Scenario::generate_with(60, Mix::VALID_ONLY, Some(flash), &catalog, 43, &env.suffix);
    let hot = scenario.hot_skus[0].clone();
    // ...against 30 units of it over 4 shards, and no substitute: demand is about five times
    // the stock.
    let entry = catalog.products.iter_mut().find(|p| p.sku == hot).unwrap();
    (entry.stock, entry.stock_shards, entry.substitute) = (30, Some(4), None);
    let table = env.config.table("catalog").unwrap().name.clone();
    workers::catalog::seed(&env.clients.dynamodb, &table, &catalog)
        .await
        .unwrap();
    let inline = std::sync::Arc::new(
        fleet_harness::chain::Inline::new(&env.config, &env.clients.dynamodb).unwrap(),
    );
    futures::stream::iter(scenario.submissions.iter().map(|i| i.body.clone()))
        .map(|body| {
            let inline = std::sync::Arc::clone(&inline);
            async move { inline.run(body).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;

    let items = scan(&env.clients.dynamodb, &table).await.unwrap();
    let mut left = 0_i64;
    for item in &items {
        let pk = item["pk"].as_s().unwrap();
        if workers::store::stock_item_owner(pk).0 == hot {
            let stock: i64 = item["stock"].as_n().unwrap().parse().unwrap();
            assert!(stock >= 0, "{pk} went below zero: {stock}");
            left += stock;
        }
    }
    let orders: Vec<workers::store::OrderRecord> =
        scan(&env.clients.dynamodb, &env.tables().orders)
            .await
            .unwrap()
            .into_iter()
            .map(|i| serde_dynamo::from_item(i).unwrap())
            .collect();
    assert_eq!(orders.len(), 60);
    let mut packed_units = 0_i64;
    for o in &orders {
        assert!(
            o.status == OrderStatus::Packed || o.status == OrderStatus::Unpackable,
            "{} is {}",
            o.order_id,
            o.status
        );
        if o.status == OrderStatus::Packed {
            packed_units += o
                .lines
                .iter()
                .filter(|l| l.sku == hot)
                .map(|l| i64::from(l.quantity))
                .sum::<i64>();
        }
    }
    assert_eq!(
        packed_units,
        30 - left,
        "units packed = units that left the shards"
    );
    // A line is not split between shards: each shard may keep fewer units than a line asks.
    assert!(left <= 4 * 3, "{left} units left over 4 shards");
    assert!(
        orders.iter().any(|o| o
            .history
            .iter()
            .any(|h| h.event == "line_removed" && h.note.as_deref() == Some(hot.as_str()))),
        "demand exceeded the stock: some hot lines were removed"
    );
}
