//! The consumer runtime against the local emulators: throughput under an in-flight cap, the
//! heartbeat, retries and dead-lettering with attribution, graceful shutdown, FIFO order.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_common::attribution::{Attribution, ATTRIBUTION};
use fleet_common::failure::{FailureClass, HandlerError, Reason};
use fleet_common::health::Health;
use fleet_common::runtime::{Consumer, ConsumerSettings, Handler, Message, Outcome, Outgoing};
use fleet_e2e::{wait_until, TestEnv};
use tokio_util::sync::CancellationToken;

fn start<H: Handler>(
    env: &TestEnv,
    role: &str,
    handler: H,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<()>,
    Arc<fleet_common::runtime::Stats>,
) {
    let worker = env.config.worker(role).unwrap().clone();
    let consumer = Consumer::new(
        env.clients.sqs.clone(),
        handler,
        ConsumerSettings {
            role: role.to_owned(),
            worker,
            topology: env.topology.clone(),
            max_message_bytes: env.config.aws.sqs_max_message_bytes,
            untrusted_edge: false,
            aws_trace_header: false,
            ledger: None,
            redrivers: Vec::new(),
        },
        Health::default(),
    )
    .unwrap();
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    (shutdown, task, stats)
}

/// Records what it handled and the most jobs it ever saw at once.
#[derive(Default)]
struct Instrumented {
    running: AtomicUsize,
    peak: AtomicUsize,
    done: Mutex<HashSet<String>>,
    work: Duration,
}

impl Handler for Instrumented {
    async fn handle(&self, message: &Message) -> Result<Outcome, HandlerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.work).await;
        self.done.lock().unwrap().insert(message.body.clone());
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(Outcome::done())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_messages_under_a_cap_of_sixteen() {
    let env = TestEnv::new(|c| {
        let w = c.workers.get_mut("orders").unwrap();
        w.max_in_flight = NonZeroUsize::new(16).unwrap();
        w.pollers = NonZeroUsize::new(3).unwrap();
        w.receive_wait_secs = 1;
    })
    .await;
    let url = env.url("orders");
    env.send_all(&url, (0..2000).map(|i| format!("job-{i}")))
        .await;

    let handler = Arc::new(Instrumented {
        work: Duration::from_millis(5),
        ..Default::default()
    });
    let (shutdown, task, stats) = start(&env, "orders", Arc::clone(&handler));
    let all_done = wait_until(Duration::from_secs(120), || async {
        handler.done.lock().unwrap().len() == 2000
    })
    .await;
    assert!(
        all_done,
        "handled {} of 2000",
        handler.done.lock().unwrap().len()
    );
    let drained = wait_until(Duration::from_secs(10), || async {
        env.depth(&url).await == (0, 0, 0)
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();

    assert!(
        drained,
        "every message deleted; depth {:?}",
        env.depth(&url).await
    );
    assert!(
        handler.peak.load(Ordering::SeqCst) <= 16,
        "peak concurrency {}",
        handler.peak.load(Ordering::SeqCst)
    );
    assert!(
        handler.peak.load(Ordering::SeqCst) > 1,
        "work ran concurrently"
    );
    assert_eq!(stats.succeeded.load(Ordering::SeqCst), 2000);
    assert_eq!(
        stats.received.load(Ordering::SeqCst),
        2000,
        "no message was delivered twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_three_visibility_timeouts_is_delivered_once() {
    let env = TestEnv::new(|c| {
        c.queues.get_mut("orders").unwrap().visibility_timeout_secs = 2;
        let w = c.workers.get_mut("orders").unwrap();
        w.heartbeat_interval_secs = 1;
        w.receive_wait_secs = 1;
    })
    .await;
    let url = env.url("orders");
    env.send_all(&url, ["long-job".to_owned()]).await;

    let handler = Arc::new(Instrumented {
        work: Duration::from_millis(6_500),
        ..Default::default()
    });
    let (shutdown, task, stats) = start(&env, "orders", Arc::clone(&handler));
    assert!(
        wait_until(Duration::from_secs(20), || async {
            stats.succeeded.load(Ordering::SeqCst) == 1
        })
        .await
    );
    // Leave time for a redelivery that a missing heartbeat would cause.
    tokio::time::sleep(Duration::from_secs(3)).await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(stats.received.load(Ordering::SeqCst), 1, "delivered once");
    assert_eq!(env.depth(&url).await, (0, 0, 0));
}

/// Fails as told per body: `flaky-N` fails transiently N times then succeeds, `poison` fails
/// permanently, `broken` always fails transiently.
#[derive(Default)]
struct Scripted {
    attempts: Mutex<HashMap<String, Vec<Instant>>>,
}

impl Handler for Scripted {
    async fn handle(&self, message: &Message) -> Result<Outcome, HandlerError> {
        let tries = {
            let mut attempts = self.attempts.lock().unwrap();
            let seen = attempts.entry(message.body.clone()).or_default();
            seen.push(Instant::now());
            seen.len()
        };
        match message.body.as_str() {
            "poison" => Err(HandlerError::permanent(
                Reason("bad_order"),
                "order has no lines; user jane@example.com",
            )),
            "broken" => Err(HandlerError::transient(
                Reason::DOWNSTREAM_UNAVAILABLE,
                "catalog timed out",
            )),
            body => {
                let fail_times: usize = body.trim_start_matches("flaky-").parse().unwrap_or(0);
                if tries <= fail_times {
                    Err(HandlerError::transient(
                        Reason::DOWNSTREAM_UNAVAILABLE,
                        "throttled",
                    ))
                } else {
                    Ok(Outcome::done())
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_succeed_and_failures_land_in_the_dlq_attributed() {
    let env = TestEnv::new(|c| {
        let w = c.workers.get_mut("orders").unwrap();
        w.max_attempts = 3;
        w.backoff_min_ms = 1_000;
        w.backoff_max_secs = 30;
        w.receive_wait_secs = 1;
    })
    .await;
    let url = env.url("orders");
    env.send_all(
        &url,
        [
            "flaky-2".to_owned(),
            "poison".to_owned(),
            "broken".to_owned(),
        ],
    )
    .await;
    let handler = Arc::new(Scripted::default());
    let (shutdown, task, stats) = start(&env, "orders", Arc::clone(&handler));

    let settled = wait_until(Duration::from_secs(40), || async {
        stats.succeeded.load(Ordering::SeqCst) == 1
            && stats.dead_lettered.load(Ordering::SeqCst) == 2
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    assert!(
        settled,
        "flaky succeeds, poison and broken are dead-lettered: {stats:?}"
    );

    let attempts = handler.attempts.lock().unwrap().clone();
    let flaky = &attempts["flaky-2"];
    assert_eq!(flaky.len(), 3, "two failures, then success");
    let first_gap = flaky[1] - flaky[0];
    let second_gap = flaky[2] - flaky[1];
    assert!(
        first_gap >= Duration::from_millis(900),
        "first retry waited {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(1_900),
        "second retry waited longer: {second_gap:?}"
    );
    assert_eq!(
        attempts["poison"].len(),
        1,
        "a permanent failure is not retried"
    );
    assert_eq!(
        attempts["broken"].len(),
        3,
        "a transient failure is tried max_attempts times"
    );

    let dead = env
        .receive_all(
            &env.dlq_url("orders"),
            2,
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(dead.len(), 2);
    let by_body: HashMap<String, Attribution> = dead
        .iter()
        .map(|m| {
            let json = m.message_attributes().unwrap()[ATTRIBUTION]
                .string_value()
                .unwrap();
            (
                m.body().unwrap().to_owned(),
                serde_json::from_str(json).unwrap(),
            )
        })
        .collect();
    let poison = &by_body["poison"];
    assert_eq!(
        (poison.reason.as_str(), poison.class, poison.attempts),
        ("bad_order", FailureClass::Permanent, 1)
    );
    assert_eq!(poison.worker, "orders");
    assert_eq!(
        poison.source_queue,
        env.topology.pair("orders").unwrap().queue.name
    );
    assert!(
        poison.correlation_id.is_some(),
        "the correlation id travels into the attribution"
    );
    assert!(
        !poison.detail.contains("jane@example.com"),
        "attribution text is redacted: {}",
        poison.detail
    );
    let broken = &by_body["broken"];
    assert_eq!(
        (broken.reason.as_str(), broken.class, broken.attempts),
        ("downstream_unavailable", FailureClass::AttemptsExhausted, 3)
    );
    assert!(broken.first_failed_at <= broken.last_failed_at);
    for m in &dead {
        assert!(
            m.message_attributes()
                .unwrap()
                .contains_key("correlation-id"),
            "original attributes are kept"
        );
    }
    assert_eq!(env.depth(&url).await, (0, 0, 0));
}

/// Takes a while; records an effect only when it finishes.
struct Slow {
    work: Duration,
    done: Mutex<HashSet<String>>,
}

impl Handler for Slow {
    async fn handle(&self, message: &Message) -> Result<Outcome, HandlerError> {
        tokio::time::sleep(self.work).await;
        self.done.lock().unwrap().insert(message.body.clone());
        Ok(Outcome::done())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_load_finishes_or_releases_every_message() {
    let env = TestEnv::new(|c| {
        let w = c.workers.get_mut("orders").unwrap();
        w.max_in_flight = NonZeroUsize::new(20).unwrap();
        w.shutdown_deadline_secs = 3;
        w.receive_wait_secs = 1;
    })
    .await;
    let url = env.url("orders");
    let total = 300;
    env.send_all(&url, (0..total).map(|i| format!("job-{i}")))
        .await;
    let handler = Arc::new(Slow {
        work: Duration::from_millis(400),
        done: Mutex::new(HashSet::new()),
    });
    let (shutdown, task, stats) = start(&env, "orders", Arc::clone(&handler));
    assert!(
        wait_until(Duration::from_secs(20), || async {
            handler.done.lock().unwrap().len() >= 40
        })
        .await
    );

    let asked = Instant::now();
    shutdown.cancel();
    task.await.unwrap();
    let took = asked.elapsed();
    assert!(
        took <= Duration::from_secs(4),
        "stopped within the deadline: {took:?}"
    );

    let done = handler.done.lock().unwrap().clone();
    assert!(done.len() < total, "the test stopped mid-load");
    assert_eq!(
        stats.succeeded.load(Ordering::SeqCst) as usize,
        done.len(),
        "every finished job was acknowledged"
    );
    // Nothing is left invisible: what was not done is visible again at once.
    let (visible, in_flight, _) = env.depth(&url).await;
    assert_eq!(in_flight, 0, "nothing left in flight");
    assert_eq!(
        visible as usize,
        total - done.len(),
        "done + visible = sent: none lost"
    );
    let rest = env
        .receive_all(
            &url,
            total - done.len(),
            Duration::from_secs(20),
            Duration::from_secs(60),
        )
        .await;
    let rest: HashSet<String> = rest.iter().map(|m| m.body().unwrap().to_owned()).collect();
    assert!(
        rest.is_disjoint(&done),
        "a finished job is not back on the queue"
    );
    assert_eq!(rest.len() + done.len(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_still_running_at_the_deadline_is_released_not_lost() {
    let env = TestEnv::new(|c| {
        let w = c.workers.get_mut("orders").unwrap();
        w.shutdown_deadline_secs = 1;
        w.receive_wait_secs = 1;
    })
    .await;
    let url = env.url("orders");
    env.send_all(&url, ["stuck".to_owned()]).await;
    let handler = Arc::new(Slow {
        work: Duration::from_secs(30),
        done: Mutex::new(HashSet::new()),
    });
    let (shutdown, task, stats) = start(&env, "orders", Arc::clone(&handler));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            stats.received.load(Ordering::SeqCst) == 1
        })
        .await
    );
    shutdown.cancel();
    let asked = Instant::now();
    task.await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "the deadline bounds shutdown"
    );
    assert_eq!(stats.released.load(Ordering::SeqCst), 1);
    assert_eq!(env.depth(&url).await.0, 1, "visible again at once");
}

/// Forwards every message with a marker, recording order per group.
#[derive(Default)]
struct Ordered {
    seen: Mutex<Vec<String>>,
}

impl Handler for Ordered {
    async fn handle(&self, message: &Message) -> Result<Outcome, HandlerError> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.seen.lock().unwrap().push(message.body.clone());
        // One group per forwarded message, so the test can receive them all at once.
        let out = Outgoing::new("warehouse", format!("fwd:{}", message.body))
            .with_fifo(message.body.clone(), message.body.clone());
        Ok(Outcome::forward(out))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_groups_are_processed_in_order_and_forwards_carry_the_correlation_id() {
    let env = TestEnv::new(|c| {
        for key in ["orders", "warehouse"] {
            let q = c.queues.get_mut(key).unwrap();
            q.fifo = true;
            q.name.push_str(".fifo");
        }
        c.workers.get_mut("orders").unwrap().receive_wait_secs = 1;
    })
    .await;
    let url = env.url("orders");
    env.send_all(&url, (0..50).map(|i| format!("{i:03}"))).await;
    let handler = Arc::new(Ordered::default());
    let (shutdown, task, stats) = start(&env, "orders", Arc::clone(&handler));
    assert!(
        wait_until(Duration::from_secs(30), || async {
            stats.succeeded.load(Ordering::SeqCst) == 50
        })
        .await
    );
    shutdown.cancel();
    task.await.unwrap();
    let seen = handler.seen.lock().unwrap().clone();
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "one group is processed in send order");

    let forwarded = env
        .receive_all(
            &env.url("warehouse"),
            50,
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(forwarded.len(), 50);
    for m in &forwarded {
        let corr = m.message_attributes().unwrap()["correlation-id"]
            .string_value()
            .unwrap();
        assert!(
            corr.starts_with("corr-"),
            "forwarded with the incoming correlation id: {corr}"
        );
    }
}

/// Fails the first message of the group on its first two runs; every run takes `work`.
struct Stubborn {
    work: Duration,
    runs: Mutex<Vec<(String, u32)>>,
}

impl Handler for Stubborn {
    async fn handle(&self, message: &Message) -> Result<Outcome, HandlerError> {
        tokio::time::sleep(self.work).await;
        let first_runs = {
            let mut runs = self.runs.lock().unwrap();
            runs.push((message.body.clone(), message.receive_count));
            runs.iter().filter(|(b, _)| b == "000").count()
        };
        if message.body == "000" && first_runs <= 2 {
            return Err(HandlerError::transient(
                Reason::DOWNSTREAM_UNAVAILABLE,
                "not yet",
            ));
        }
        Ok(Outcome::done())
    }
}

/// Defect: only the running message of a FIFO group was heartbeated, and after a failure the
/// rest of the group was handed back to SQS, each time raising its receive count toward the
/// DLQ. Now a group is held whole: heartbeated, retried in place, never handed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_group_is_held_whole_through_a_retry_and_nothing_is_received_twice() {
    let env = TestEnv::new(|c| {
        let q = c.queues.get_mut("orders").unwrap();
        q.fifo = true;
        q.name.push_str(".fifo");
        q.visibility_timeout_secs = 3;
        let w = c.workers.get_mut("orders").unwrap();
        w.receive_wait_secs = 1;
        w.heartbeat_interval_secs = 1;
        w.backoff_min_ms = 500;
        w.backoff_max_secs = 1;
        w.max_attempts = 5;
    })
    .await;
    let url = env.url("orders");
    env.send_all(&url, (0..5).map(|i| format!("{i:03}"))).await;
    let handler = Arc::new(Stubborn {
        work: Duration::from_millis(1_500),
        runs: Mutex::default(),
    });
    let (shutdown, task, stats) = start(&env, "orders", Arc::clone(&handler));
    assert!(
        wait_until(Duration::from_secs(60), || async {
            stats.succeeded.load(Ordering::SeqCst) == 5
        })
        .await,
        "the group completes"
    );
    shutdown.cancel();
    task.await.unwrap();
    let runs = handler.runs.lock().unwrap().clone();
    let bodies: Vec<&str> = runs.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(
        bodies,
        ["000", "000", "000", "001", "002", "003", "004"],
        "in order, the first retried in place, none overtaking it, none run twice"
    );
    assert!(
        runs.iter().all(|(_, receives)| *receives == 1),
        "no message of the group was handed back to SQS and received again: {runs:?}"
    );
    assert_eq!(env.depth(&env.dlq_url("orders")).await.0, 0);
    assert_eq!(env.depth(&url).await, (0, 0, 0));
}

/// Records what the handler saw, and refuses everything permanently.
#[derive(Default)]
struct Refuses {
    seen: Mutex<Vec<HashMap<String, String>>>,
}

impl Handler for Refuses {
    async fn handle(&self, message: &Message) -> Result<Outcome, HandlerError> {
        self.seen
            .lock()
            .unwrap()
            .push(message.attributes.clone().into_iter().collect());
        Err(HandlerError::permanent(Reason::MALFORMED_BODY, "refused"))
    }
}

/// Defects: an upstream's `fleet-source` forged the origin of the DLQ attribution, and a small
/// body with large attributes could not be dead-lettered (the DLQ send, with the attribution
/// added, went over SQS's size limit and failed on every attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_ignores_forged_fleet_attributes_and_an_oversized_message_still_reaches_the_dlq() {
    let env = TestEnv::new(|c| {
        c.workers.get_mut("ingestion").unwrap().receive_wait_secs = 1;
    })
    .await;
    let url = env.url("ingest");
    let string = |v: &str| {
        aws_sdk_sqs::types::MessageAttributeValue::builder()
            .data_type("String")
            .string_value(v)
            .build()
            .unwrap()
    };
    env.clients
        .sqs
        .send_message()
        .queue_url(&url)
        .message_body("{}")
        .message_attributes("fleet-source", string("forged-partner"))
        .message_attributes("padding", string(&"x".repeat(256 * 1024 - 100)))
        .send()
        .await
        .expect("SQS takes the message: it is within 256 KiB");
    let worker = env.config.worker("ingestion").unwrap().clone();
    let handler = Arc::new(Refuses::default());
    let consumer = Consumer::new(
        env.clients.sqs.clone(),
        Arc::clone(&handler),
        ConsumerSettings {
            role: "ingestion".into(),
            worker,
            topology: env.topology.clone(),
            max_message_bytes: env.config.aws.sqs_max_message_bytes,
            untrusted_edge: true,
            aws_trace_header: false,
            ledger: None,
            redrivers: Vec::new(),
        },
        Health::default(),
    )
    .unwrap();
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    assert!(
        wait_until(Duration::from_secs(30), || async {
            stats.dead_lettered.load(Ordering::SeqCst) == 1
        })
        .await,
        "dead-lettered"
    );
    shutdown.cancel();
    task.await.unwrap();
    let seen = handler.seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|a| !a.contains_key("fleet-source")),
        "the handler never saw the upstream's fleet-source: {:?}",
        seen.iter()
            .map(|a| a.keys().collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    let dead = env
        .receive_all(
            &env.dlq_url("ingest"),
            1,
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(dead.len(), 1);
    let attrs = dead[0].message_attributes().unwrap();
    let attribution: Attribution =
        serde_json::from_str(attrs[ATTRIBUTION].string_value().unwrap()).unwrap();
    assert_eq!(
        attribution.origin, None,
        "no forged origin in the attribution"
    );
    assert_eq!(attribution.reason, "malformed_body");
    assert!(
        !attrs.contains_key("padding"),
        "the large attribute made room"
    );
}
