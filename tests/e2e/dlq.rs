//! The `dlq` binary against the emulators, as ops use it: peek leaves the DLQ as it was, the
//! attribute report groups failures, a filtered redrive moves exactly the matching messages at the
//! requested rate and the fleet then applies them once, a redrive killed half-way and run again
//! loses nothing, and export then import round-trips every byte.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use fleet_common::attribution::{Attribution, ATTRIBUTION, CORRELATION_ID};
use fleet_common::failure::FailureClass;
use fleet_common::health::Health;
use fleet_common::redrive_ledger::Ledger;
use fleet_e2e::{dlq_binary, workspace_root, TestEnv};
use fleet_harness::queues::wait_idle;
use fleet_harness::scenario::{Mix, Scenario};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn dlq(env: &TestEnv, args: &[&str]) -> Output {
    env.dlq(args)
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "dlq failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn attribution(
    reason: &str,
    worker: &str,
    class: FailureClass,
    source_queue: &str,
    n: usize,
) -> String {
    let now = time::OffsetDateTime::now_utc();
    serde_json::to_string(&Attribution {
        reason: reason.into(),
        class,
        detail: format!("{reason} (test)"),
        worker: worker.into(),
        source_queue: source_queue.into(),
        attempts: 1,
        first_failed_at: now,
        last_failed_at: now,
        correlation_id: Some(format!("corr-{n}")),
        source_message_id: format!("src-{n}"),
        origin: Some("storefront".into()),
        imported_at: None,
        version: None,
        sender_id: None,
    })
    .unwrap()
}

fn string(v: impl Into<String>) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .unwrap()
}

/// Sends (body, attribution JSON or none) pairs to a queue in batches of ten.
async fn dead_letter(env: &TestEnv, url: &str, messages: &[(String, Option<String>)]) {
    for (k, chunk) in messages.chunks(10).enumerate() {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, (body, attribution))| {
                let mut e = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .message_attributes(CORRELATION_ID, string(format!("corr-{k}-{i}")));
                if let Some(a) = attribution {
                    e = e.message_attributes(ATTRIBUTION, string(a));
                }
                e.build().unwrap()
            })
            .collect();
        let out = env
            .clients
            .sqs
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
        assert!(out.failed().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_leaves_the_depth_unchanged_and_attribute_reports_three_groups() {
    let env = TestEnv::new(|_| {}).await;
    let dlq_url = env.dlq_url("ingest");
    let source = env.config.queues["ingest"].name.clone();
    let mut messages = Vec::new();
    for n in 0..7 {
        messages.push((
            format!("{{\"bad\":{n}"),
            Some(attribution(
                "malformed_json",
                "ingestion",
                FailureClass::Permanent,
                &source,
                n,
            )),
        ));
    }
    for n in 0..5 {
        messages.push((
            format!("{{\"n\":{n}}}"),
            Some(attribution(
                "dependency_unavailable",
                "orders",
                FailureClass::AttemptsExhausted,
                &source,
                n,
            )),
        ));
    }
    for n in 0..3 {
        messages.push((format!("{{\"crashed\":{n}}}"), None));
    }
    dead_letter(&env, &dlq_url, &messages).await;

    let peek = json_of(&dlq(
        &env,
        &["peek", &dlq_url, "--max", "20", "--output", "json"],
    ));
    assert_eq!(peek["messages"].as_array().unwrap().len(), 15);
    assert_eq!(
        env.depth(&dlq_url).await,
        (15, 0, 0),
        "every message visible again right after a peek"
    );

    let filtered = json_of(&dlq(
        &env,
        &["peek", &dlq_url, "--reason", "none", "--output", "json"],
    ));
    assert_eq!(filtered["messages"].as_array().unwrap().len(), 3);

    let report = json_of(&dlq(
        &env,
        &[
            "attribute",
            &dlq_url,
            "--by",
            "reason,worker,class,source",
            "--output",
            "json",
        ],
    ));
    let groups: BTreeMap<String, (u64, String, String, String)> = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["reason"].as_str().unwrap().to_owned(),
                (
                    g["count"].as_u64().unwrap(),
                    g["worker"].as_str().unwrap().to_owned(),
                    g["class"].as_str().unwrap().to_owned(),
                    g["source_queue"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    assert_eq!(groups.len(), 3, "{groups:?}");
    assert_eq!(
        groups["malformed_json"],
        (7, "ingestion".into(), "permanent".into(), source.clone())
    );
    assert_eq!(
        groups["dependency_unavailable"],
        (
            5,
            "orders".into(),
            "attempts_exhausted".into(),
            source.clone()
        )
    );
    assert_eq!(
        groups["(none: moved by SQS)"],
        (3, "-".into(), "queue_redrive".into(), source.clone()),
        "sources of unattributed messages come from the redrive policies"
    );
    assert_eq!(env.depth(&dlq_url).await.0, 15);

    // A work queue (it has a redrive policy) is refused without --force; a missing queue is named.
    let refused = dlq(&env, &["peek", &env.url("ingest")]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    let missing = dlq(&env, &["peek", "no-such-queue-xyz"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("`no-such-queue-xyz` does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_redrive_of_a_thousand_moves_exactly_the_matching_at_the_rate_and_the_fleet_applies_them_once(
) {
    let env = TestEnv::new(|c| {
        for w in c.workers.values_mut() {
            w.receive_wait_secs = 1;
        }
    })
    .await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(150, Mix::VALID_ONLY, &catalog, 5, &env.suffix);
    assert_eq!(scenario.submissions.len(), 150);
    let source = env.config.queues["ingest"].name.clone();
    let mut messages: Vec<(String, Option<String>)> = Vec::new();
    for (n, input) in scenario.submissions.iter().enumerate() {
        messages.push((
            input.body.clone(),
            Some(attribution(
                "dependency_unavailable",
                "ingestion",
                FailureClass::AttemptsExhausted,
                &source,
                n,
            )),
        ));
    }
    for n in 0..850 {
        messages.push((
            format!("not json {n}"),
            Some(attribution(
                "malformed_json",
                "ingestion",
                FailureClass::Permanent,
                &source,
                n,
            )),
        ));
    }
    // Interleave the two kinds.
    messages.sort_by_key(|(b, _)| format!("{:x}", md5ish(b)));
    let dlq_url = env.dlq_url("ingest");
    dead_letter(&env, &dlq_url, &messages).await;

    let dry = json_of(&dlq(
        &env,
        &[
            "redrive",
            &dlq_url,
            "--reason",
            "dependency_unavailable",
            "--dry-run",
            "--output",
            "json",
        ],
    ));
    assert_eq!(dry["matched"], 150);
    assert_eq!(dry["moved"], 0);
    assert_eq!(env.depth(&dlq_url).await.0, 1000, "a dry run moves nothing");

    let out = dlq(
        &env,
        &[
            "redrive",
            &dlq_url,
            "--reason",
            "dependency_unavailable",
            "--rate",
            "40",
            "--output",
            "json",
        ],
    );
    let report = json_of(&out);
    assert_eq!(report["path"], "receive-send-delete");
    assert_eq!(report["matched"], 150);
    assert_eq!(report["moved"], 150);
    assert_eq!(report["destinations"][&source], 150);
    let rate = report["rate_per_sec"].as_f64().unwrap();
    assert!(
        (36.0..=44.0).contains(&rate),
        "rate {rate}/s, asked for 40/s (±10%)"
    );
    assert_eq!(
        env.depth(&dlq_url).await,
        (850, 0, 0),
        "exactly the non-matching messages stay"
    );
    assert_eq!(env.depth(&env.url("ingest")).await.0, 150);

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
    wait_idle(&env.clients.sqs, &env.topology, Duration::from_secs(300))
        .await
        .unwrap();
    shutdown.cancel();
    fleet.await.unwrap().unwrap();
    let result = env.audit(&scenario, &catalog, false).await;
    assert_eq!(result.orders_completed, 150, "{:?}", result.offenders);
    assert_eq!(result.duplicate_effects, 0, "{:?}", result.offenders);
    assert_eq!(
        env.depth(&dlq_url).await.0,
        850,
        "nothing redriven came back"
    );
}

/// A cheap stable shuffle key.
fn md5ish(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_killed_half_way_and_run_again_moves_every_message() {
    let env = TestEnv::new(|_| {}).await;
    let dlq_url = env.dlq_url("delivery");
    let destination = env.dlq_url("warehouse"); // a queue no worker reads in this test
    let source = env.config.queues["delivery"].name.clone();
    let messages: Vec<(String, Option<String>)> = (0..300)
        .map(|n| {
            (
                format!("{{\"n\":{n}}}"),
                Some(attribution(
                    "unknown_order",
                    "delivery",
                    FailureClass::Permanent,
                    &source,
                    n,
                )),
            )
        })
        .collect();
    dead_letter(&env, &dlq_url, &messages).await;

    let mut first = Command::new(dlq_binary())
        .args([
            "--config",
            "config/fleet.toml",
            "redrive",
            &dlq_url,
            "--to",
            &destination,
            "--rate",
            "50",
            "--hold",
            "3s",
            "--output",
            "json",
        ])
        .current_dir(workspace_root())
        .envs(env.env_overrides())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while env.depth(&destination).await.0 < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first run made no progress"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill().unwrap(); // SIGKILL: no clean-up at all
    first.wait().unwrap();
    let moved_before = env.depth(&destination).await.0;
    assert!(moved_before < 300, "killed half-way");

    let report = json_of(&dlq(
        &env,
        &[
            "redrive",
            &dlq_url,
            "--to",
            &destination,
            "--output",
            "json",
        ],
    ));
    assert_eq!(report["in_flight_elsewhere"], 0);
    assert_eq!(env.depth(&dlq_url).await, (0, 0, 0), "the DLQ is empty");
    let landed = env
        .receive_all(
            &destination,
            300,
            Duration::from_secs(30),
            Duration::from_secs(60),
        )
        .await;
    let bodies: HashSet<String> = landed
        .iter()
        .map(|m| m.body().unwrap().to_owned())
        .collect();
    let expected: HashSet<String> = messages.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(
        bodies, expected,
        "every message arrived (duplicates allowed, none lost)"
    );
    assert!(
        landed.len() <= 300 + 10,
        "at most the batch in flight at the kill is duplicated: {}",
        landed.len()
    );
    for m in &landed {
        let attrs = m.message_attributes().unwrap();
        assert!(!attrs.contains_key(ATTRIBUTION));
        let record: Value =
            serde_json::from_str(attrs["fleet-redrive"].string_value().unwrap()).unwrap();
        assert_eq!(record["previous_reason"], "unknown_order");
        assert_eq!(record["count"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_round_trips_every_byte() {
    let env = TestEnv::new(|_| {}).await;
    let from = env.dlq_url("orders");
    let to = env.dlq_url("warehouse");
    let mut originals = BTreeMap::new();
    for chunk in 0..3 {
        let entries = (0..10)
            .map(|i| {
                let n = chunk * 10 + i;
                let body = format!("{{\"n\":{n},\"text\":\"caf\u{e9} \u{2713} \u{20ac} \\\"quoted\\\"\\n\"}}  trailing spaces  ");
                originals.insert(n, body.clone());
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .message_attributes("n", MessageAttributeValue::builder().data_type("Number").string_value(n.to_string()).build().unwrap())
                    .message_attributes("blob", MessageAttributeValue::builder().data_type("Binary").binary_value(Blob::new(vec![0, 255, n as u8, 10])).build().unwrap())
                    .message_attributes("tag", MessageAttributeValue::builder().data_type("String.custom").string_value(format!("t-{n}")).build().unwrap())
                    .build()
                    .unwrap()
            })
            .collect();
        let out = env
            .clients
            .sqs
            .send_message_batch()
            .queue_url(&from)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
        assert!(out.failed().is_empty(), "{:?}", out.failed());
    }
    let dir = std::env::temp_dir().join(format!("dlq-e2e-{}", env.suffix));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("orders-dlq.jsonl");
    let file_arg = file.to_str().unwrap();
    let export = json_of(&dlq(
        &env,
        &[
            "export", &from, "--file", file_arg, "--delete", "--output", "json",
        ],
    ));
    assert_eq!(export["exported"], 30);
    assert_eq!(export["deleted"], 30);
    assert_eq!(
        env.depth(&from).await,
        (0, 0, 0),
        "exported messages were deleted after the file was synced"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 30);
    let again = dlq(&env, &["export", &from, "--file", file_arg]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "an existing file is not overwritten without --force"
    );

    let import = json_of(&dlq(
        &env,
        &["import", file_arg, "--to", &to, "--output", "json"],
    ));
    assert_eq!(import["sent"], 30);
    let landed = env
        .receive_all(&to, 30, Duration::from_secs(20), Duration::from_secs(60))
        .await;
    assert_eq!(landed.len(), 30);
    for m in &landed {
        let attrs = m.message_attributes().unwrap();
        let n: usize = attrs["n"].string_value().unwrap().parse().unwrap();
        assert_eq!(m.body().unwrap(), originals[&n], "body of message {n}");
        assert_eq!(attrs["n"].data_type(), "Number");
        assert_eq!(attrs["blob"].data_type(), "Binary");
        assert_eq!(
            attrs["blob"].binary_value().unwrap().as_ref(),
            &[0, 255, n as u8, 10]
        );
        assert_eq!(attrs["tag"].data_type(), "String.custom");
        assert_eq!(attrs["tag"].string_value(), Some(format!("t-{n}").as_str()));
        assert_eq!(attrs.len(), 3, "no attribute added or lost");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `dlq` without blocking the fleet running in this process; fails the test when it has
/// not ended within `limit` (a redrive that never ends is the defect some of these look for).
async fn dlq_within(env: &TestEnv, args: &[&str], limit: Duration) -> Output {
    let run = tokio::process::Command::new(dlq_binary())
        .args(["--config", "config/fleet.toml"])
        .args(args)
        .current_dir(workspace_root())
        .envs(env.env_overrides())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("`dlq {}` did not end within {limit:?}", args.join(" ")))
        .expect("dlq runs")
}

/// The `fleet-redrive` record of each message, read from the queue (held for `hold`).
async fn redrive_records(env: &TestEnv, url: &str, expected: usize) -> Vec<Value> {
    env.receive_all(
        url,
        expected,
        Duration::from_secs(30),
        Duration::from_secs(30),
    )
    .await
    .iter()
    .map(|m| {
        let attrs = m.message_attributes().expect("attributes");
        serde_json::from_str(attrs["fleet-redrive"].string_value().expect("a record"))
            .expect("the record is JSON")
    })
    .collect()
}

/// Dead-lettered ingest messages that fail again as soon as they are back (not JSON).
fn unfixable(env: &TestEnv, n: usize) -> Vec<(String, Option<String>)> {
    let source = env.config.queues["ingest"].name.clone();
    (0..n)
        .map(|i| {
            (
                format!("{{not json {i}"),
                Some(attribution(
                    "malformed_json",
                    "ingestion",
                    FailureClass::Permanent,
                    &source,
                    i,
                )),
            )
        })
        .collect()
}

/// The issue's loop: a redrive of messages that the running fleet dead-letters again at once
/// took them again and again (one message moved 10,832 times in 701 s). A run now moves each
/// message once, counts what came back, and ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_with_the_fleet_running_moves_each_message_once_even_when_it_fails_again() {
    let env = TestEnv::new(|c| {
        for w in c.workers.values_mut() {
            w.receive_wait_secs = 1;
        }
    })
    .await;
    let dlq_url = env.dlq_url("ingest");
    dead_letter(&env, &dlq_url, &unfixable(&env, 30)).await;
    let fleet = env.start_fleet(None).await;

    let report = json_of(
        &dlq_within(
            &env,
            &["redrive", &dlq_url, "--rate", "20", "--output", "json"],
            Duration::from_secs(90),
        )
        .await,
    );
    let run = report["redrive_id"]
        .as_str()
        .expect("a redrive id")
        .to_owned();
    assert_eq!(report["matched"], 30, "{report}");
    assert_eq!(report["moved"], 30, "each message moved once: {report}");
    let came_back = report["came_back"].as_u64().unwrap();
    assert!(came_back <= 30, "{report}");
    assert_eq!(report["not_back"].as_u64().unwrap(), 30 - came_back);
    if came_back > 0 {
        assert_eq!(report["came_back_reasons"]["malformed_json"], came_back);
    }

    // Let everything the run moved come back, then look at every message in the DLQ.
    wait_idle(&env.clients.sqs, &env.topology, Duration::from_secs(60))
        .await
        .unwrap();
    fleet.stop().await;
    assert_eq!(
        env.depth(&dlq_url).await,
        (30, 0, 0),
        "all 30 back, no copies"
    );
    let by_redrive = json_of(&dlq(
        &env,
        &[
            "attribute",
            &dlq_url,
            "--by",
            "redrive,reason",
            "--output",
            "json",
        ],
    ));
    assert_eq!(by_redrive["groups"][0]["redrive"], run.as_str());
    assert_eq!(by_redrive["groups"][0]["reason"], "malformed_json");
    assert_eq!(by_redrive["groups"][0]["count"], 30);
    let version = json_of(&dlq(
        &env,
        &[
            "attribute",
            &dlq_url,
            "--by",
            "version",
            "--since",
            "10m",
            "--output",
            "json",
        ],
    ));
    let built = version["groups"][0]["version"].as_str().unwrap().to_owned();
    assert!(
        built.starts_with(concat!(env!("CARGO_PKG_VERSION"), "+")) && built.len() > 6,
        "the workers' build names itself: {built}"
    );
    assert_eq!(version["groups"][0]["count"], 30);
    // The workers wrote what became of each message under the run, in the ledger.
    let ledger = Ledger::from_config(env.clients.dynamodb.clone(), &env.config)
        .unwrap()
        .expect("the test config has a redrive ledger");
    let outcomes = ledger.read(&run).await.unwrap();
    assert_eq!(outcomes.dead_lettered, 30, "{outcomes:?}");
    assert_eq!(outcomes.dead_lettered_reasons["malformed_json"], 30);
    assert_eq!((outcomes.succeeded, outcomes.retrying), (0, 0));
    let records = redrive_records(&env, &dlq_url, 30).await;
    assert_eq!(records.len(), 30);
    for r in &records {
        assert_eq!(r["id"], run.as_str(), "the worker kept the run's record");
        assert_eq!(r["count"], 1, "moved once");
    }
}

/// A guarded redrive: when the failure is not fixed the canary comes back and the run halts by
/// itself, leaving the rest in the DLQ; when it is fixed the canary stays away and the run
/// completes, and the fleet applies every order once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_halts_a_redrive_whose_failure_is_not_fixed_and_lets_a_fixed_one_complete() {
    let env = TestEnv::new(|c| {
        for w in c.workers.values_mut() {
            w.receive_wait_secs = 1;
        }
    })
    .await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(40, Mix::VALID_ONLY, &catalog, 5, &env.suffix);
    let source = env.config.queues["ingest"].name.clone();
    let mut messages = unfixable(&env, 100);
    for (n, input) in scenario.submissions.iter().enumerate() {
        messages.push((
            input.body.clone(),
            Some(attribution(
                "dependency_unavailable",
                "ingestion",
                FailureClass::AttemptsExhausted,
                &source,
                n,
            )),
        ));
    }
    let dlq_url = env.dlq_url("ingest");
    dead_letter(&env, &dlq_url, &messages).await;
    let fleet = env.start_fleet(None).await;

    // Not fixed: the malformed messages fail again.
    let halted = dlq_within(
        &env,
        &[
            "redrive",
            &dlq_url,
            "--reason",
            "malformed_json",
            "--canary",
            "10",
            "--halt-above",
            "20",
            "--watch",
            "30s",
            "--output",
            "json",
        ],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        halted.status.code(),
        Some(3),
        "a halted redrive is a partial one"
    );
    let report: Value = serde_json::from_slice(&halted.stdout).unwrap();
    assert_eq!(report["halted"], true, "{report}");
    assert_eq!(report["moved"], 10, "only the canary moved: {report}");
    assert_eq!(report["canary"]["passed"], false);
    assert_eq!(report["canary"]["succeeded"], 0, "{report}");
    assert!(
        report["halt_reason"]
            .as_str()
            .unwrap()
            .contains("came back"),
        "{report}"
    );
    assert!(report["came_back"].as_u64().unwrap() > 2, "{report}");
    assert_eq!(
        report["came_back_reasons"]["malformed_json"],
        report["came_back"]
    );

    // Fixed (the dependency is back): the canary passes and the rest follows.
    let completed = json_of(
        &dlq_within(
            &env,
            &[
                "redrive",
                &dlq_url,
                "--reason",
                "dependency_unavailable",
                "--canary",
                "5",
                "--watch",
                "30s",
                "--output",
                "json",
            ],
            Duration::from_secs(90),
        )
        .await,
    );
    assert_eq!(completed["halted"], false, "{completed}");
    assert_eq!(completed["canary"]["passed"], true);
    assert_eq!(completed["canary"]["moved"], 5);
    assert_eq!(completed["canary"]["succeeded"], 5, "{completed}");
    assert_eq!(completed["moved"], 40, "{completed}");
    assert_eq!(completed["came_back"], 0, "{completed}");
    // The last of it was watched until each had an outcome: all succeeded downstream.
    assert_eq!(completed["succeeded"], 40, "{completed}");
    assert_eq!(completed["in_flight"], 0, "{completed}");

    wait_idle(&env.clients.sqs, &env.topology, Duration::from_secs(120))
        .await
        .unwrap();
    fleet.stop().await;
    let result = env.audit(&scenario, &catalog, false).await;
    assert_eq!(result.orders_completed, 40, "{:?}", result.offenders);
    assert_eq!(result.duplicate_effects, 0, "{:?}", result.offenders);
    assert_eq!(
        env.depth(&dlq_url).await.0,
        100,
        "the 90 never moved and the 10 of the canary are in the DLQ"
    );
}

/// The ledger takes an outcome only under a run that `dlq redrive` opened: a `fleet-redrive`
/// record an upstream forges at the edge names no open run, so the worker writes nothing (and
/// the message is processed as any other). One naming a live run is written, and the run does
/// not count it: it counts only the copies it sent (a unit test in dlq-cli's redrive holds that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_redrive_record_writes_nothing_in_the_ledger() {
    let env = TestEnv::new(|c| {
        for w in c.workers.values_mut() {
            w.receive_wait_secs = 1;
        }
    })
    .await;
    let catalog = env.seed_catalog().await;
    let scenario = Scenario::generate(2, Mix::VALID_ONLY, &catalog, 5, &env.suffix);
    let ledger = Ledger::from_config(env.clients.dynamodb.clone(), &env.config)
        .unwrap()
        .unwrap();
    // One record names a run nobody opened; the other a run opened as `dlq redrive` opens one.
    let (forged, opened) = ("20260101T000000Z-deadbeef", "20260101T000000Z-cafebabe");
    ledger
        .open_run(opened, "fleet-ingest-dlq", time::OffsetDateTime::now_utc())
        .await
        .unwrap();
    for (submission, run) in scenario.submissions.iter().zip([forged, opened]) {
        let record = format!(
            r#"{{"count":1,"at":"2026-01-01T00:00:00Z","from_queue":"x","previous_reason":"none","id":"{run}"}}"#
        );
        env.clients
            .sqs
            .send_message()
            .queue_url(env.url("ingest"))
            .message_body(&submission.body)
            .message_attributes("fleet-redrive", string(&record))
            .send()
            .await
            .unwrap();
    }
    let fleet = env.start_fleet(None).await;
    wait_idle(&env.clients.sqs, &env.topology, Duration::from_secs(60))
        .await
        .unwrap();
    fleet.stop().await;
    let result = env.audit(&scenario, &catalog, false).await;
    assert_eq!(result.orders_completed, 2, "{:?}", result.offenders);
    assert_eq!(
        ledger.read(forged).await.unwrap(),
        Default::default(),
        "nothing under a run nobody opened"
    );
    let written = ledger.read(opened).await.unwrap();
    assert_eq!(
        (written.succeeded, written.settled()),
        (1, 1),
        "the opened run's message is written: {written:?}"
    );
}
