//! The demo: the whole fleet on the local emulators under a generated load, ending in one JSON
//! line that says what happened. Each run gets its own queues and tables (a `demo-…` suffix),
//! so runs never see each other's messages.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use fleet_common::attribution::{Attribution, ATTRIBUTION};
use fleet_common::aws::Clients;
use fleet_common::config::FleetConfig;
use fleet_common::health::Health;
use fleet_common::topology::Topology;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::catalog::CatalogFile;
use crate::scenario::{self, Input, Mix, Scenario};
use crate::store::Tables;

/// What the demo reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Messages whose effect was done and that were acknowledged, all stages.
    pub processed: u64,
    /// Messages the workers dead-lettered.
    pub dead_lettered: u64,
    /// SQS requests the fleet sent (receives, deletes, forwards, heartbeats, DLQ sends).
    pub sqs_requests: u64,
    /// Of which ReceiveMessage and DeleteMessageBatch, per processed message.
    pub receive_delete_requests_per_message: f64,
    /// All fleet SQS requests per processed message.
    pub sqs_requests_per_message: f64,
    /// DynamoDB write requests per processed message.
    pub dynamodb_writes_per_message: f64,
    /// Processed messages per second.
    pub messages_per_second: f64,
    /// Wall time of the run.
    pub elapsed_ms: u64,
    /// Inputs neither done, nor in a DLQ, nor visible on a queue.
    pub lost: u64,
    /// Orders in their expected final state.
    pub orders_completed: u64,
    /// Of which rejected by order processing.
    pub orders_rejected: u64,
    /// Effects applied twice (must be 0).
    pub duplicate_effects: u64,
    /// Dead letters that differ from the expected (queue, reason) counts.
    pub unexpected_dead_letters: u64,
}

/// Demo settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Order submissions to generate.
    pub orders: usize,
    /// Seed of the generator.
    pub seed: u64,
    /// The catalog to seed.
    pub catalog: std::path::PathBuf,
    /// Longest wait for each phase.
    pub phase_timeout: Duration,
}

/// Runs the demo and returns its summary.
///
/// # Errors
/// When the emulators are not reachable or a phase does not finish in time.
pub async fn run(config: FleetConfig, options: &Options) -> anyhow::Result<Summary> {
    let tag = format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let config = config.with_suffix(&tag);
    let fleet = Clients::for_workers(&config.aws, None)
        .await
        .map_err(anyhow::Error::msg)?;
    let producer = Clients::from_config(&config.aws).await;
    fleet_common::provision::provision(&producer.sqs, &producer.dynamodb, &config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; are the emulators running (scripts/local-aws up)?"))?;
    let catalog = CatalogFile::load(&options.catalog)?;
    let tables = Tables::from_config(&config)?;
    crate::catalog::seed(&producer.dynamodb, &tables.catalog, &catalog).await?;
    let topology = Topology::resolve(&producer.sqs, &config).await?;
    let scenario = Scenario::generate(options.orders, Mix::default(), &catalog, options.seed, &tag);

    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let fleet_task = {
        let (config, fleet, shutdown) = (config.clone(), fleet.clone(), shutdown.clone());
        let roles = crate::fleet::expand_roles("all");
        tokio::spawn(async move {
            crate::fleet::run(&config, &fleet, &roles, Health::default(), shutdown).await
        })
    };
    let ingest = topology
        .pair("ingest")
        .expect("the config has an ingest queue")
        .queue
        .url
        .clone();
    info!(
        orders = options.orders,
        inputs = scenario.submissions.len(),
        "sending order submissions"
    );
    send_all(&producer.sqs, &ingest, &scenario.submissions).await?;
    wait_idle(&producer.sqs, &topology, options.phase_timeout).await?;
    info!(
        events = scenario.carrier_events.len(),
        "sending carrier events"
    );
    send_all(&producer.sqs, &ingest, &scenario.carrier_events).await?;
    wait_idle(&producer.sqs, &topology, options.phase_timeout).await?;
    let elapsed = started.elapsed();
    shutdown.cancel();
    let stats = fleet_task.await??;

    let audit = scenario::audit(&producer.dynamodb, &tables, &scenario, &catalog, true).await?;
    let dead = dead_letters(&producer.sqs, &topology).await?;
    let unexpected_dead_letters = dead_letter_mismatches(&dead, &scenario.expected_dead_letters);
    let still_queued = queued(&producer.sqs, &topology).await?;
    let processed: u64 = stats
        .iter()
        .map(|s| s.stats.succeeded.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let dead_lettered: u64 = stats
        .iter()
        .map(|s| {
            s.stats
                .dead_lettered
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    let requests = fleet.requests.snapshot();
    let count = |op: &str| requests.get(op).copied().unwrap_or(0);
    let sqs_requests = fleet.requests.total("sqs");
    let per = |n: u64| {
        if processed == 0 {
            0.0
        } else {
            round3(n as f64 / processed as f64)
        }
    };
    let writes = fleet_common::aws::DYNAMODB_WRITE_OPERATIONS
        .iter()
        .map(|op| count(&format!("dynamodb.{op}")))
        .sum();
    if !audit.offenders.is_empty() {
        tracing::warn!(offenders = ?audit.offenders, "audit found problems");
    }
    Ok(Summary {
        processed,
        dead_lettered,
        sqs_requests,
        receive_delete_requests_per_message: per(
            count("sqs.ReceiveMessage") + count("sqs.DeleteMessageBatch")
        ),
        sqs_requests_per_message: per(sqs_requests),
        dynamodb_writes_per_message: per(writes),
        messages_per_second: round3(processed as f64 / elapsed.as_secs_f64().max(0.001)),
        elapsed_ms: elapsed.as_millis() as u64,
        // An expected order not in its state is lost unless its input still waits on a queue.
        lost: audit.lost.saturating_sub(still_queued),
        orders_completed: audit.orders_completed,
        orders_rejected: audit.orders_rejected,
        duplicate_effects: audit.duplicate_effects,
        unexpected_dead_letters,
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Sends inputs in batches of ten.
///
/// # Errors
/// When SQS refuses a send.
pub async fn send_all(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    inputs: &[Input],
) -> anyhow::Result<()> {
    for chunk in inputs.chunks(10) {
        send_batch(sqs, url, chunk).await?;
    }
    Ok(())
}

/// Sends up to ten inputs in one SendMessageBatch.
///
/// # Errors
/// When SQS refuses the request or any message of it.
pub async fn send_batch(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    batch: &[Input],
) -> anyhow::Result<()> {
    let entries = batch
        .iter()
        .enumerate()
        .map(|(i, input)| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(&input.body)
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let out = sqs
        .send_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await?;
    anyhow::ensure!(
        out.failed().is_empty(),
        "SQS refused {} messages",
        out.failed().len()
    );
    Ok(())
}

/// Messages visible, in flight or delayed on every work queue.
///
/// # Errors
/// When SQS cannot be asked.
pub async fn queued(sqs: &aws_sdk_sqs::Client, topology: &Topology) -> anyhow::Result<u64> {
    let mut total = 0;
    for pair in topology.queues.values() {
        let out = sqs
            .get_queue_attributes()
            .queue_url(&pair.queue.url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await?;
        let attrs = out.attributes().cloned().unwrap_or_default();
        for k in [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ] {
            total += attrs
                .get(&k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Waits until every work queue has been empty for three checks in a row.
///
/// # Errors
/// When that does not happen within `limit`.
pub async fn wait_idle(
    sqs: &aws_sdk_sqs::Client,
    topology: &Topology,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut quiet = 0;
    while quiet < 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the queues did not drain within {} s",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        quiet = if queued(sqs, topology).await? == 0 {
            quiet + 1
        } else {
            0
        };
    }
    Ok(())
}

/// Every distinct input in every DLQ: (logical queue, reason) → count. Messages are left in place.
///
/// # Errors
/// When SQS cannot be read.
pub async fn dead_letters(
    sqs: &aws_sdk_sqs::Client,
    topology: &Topology,
) -> anyhow::Result<BTreeMap<(String, String), u64>> {
    let mut counts = BTreeMap::new();
    for (key, pair) in &topology.queues {
        let mut seen = std::collections::BTreeSet::new();
        let mut empty = 0;
        while empty < 2 {
            let out = sqs
                .receive_message()
                .queue_url(&pair.dlq.url)
                .max_number_of_messages(10)
                .visibility_timeout(30)
                .wait_time_seconds(0)
                .message_attribute_names(ATTRIBUTION)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await?;
            if out.messages().is_empty() {
                empty += 1;
            }
            for m in out.messages() {
                let attribution = m
                    .message_attributes()
                    .and_then(|a| a.get(ATTRIBUTION))
                    .and_then(|v| v.string_value())
                    .and_then(|j| serde_json::from_str::<Attribution>(j).ok());
                // One input is one dead letter. Delivery is at least once, so one input can be
                // dead-lettered more than once: a worker killed between its DLQ send and the
                // delete from the source sends it again (same source message id), and a
                // message forwarded twice (a delete that failed after the forward) reaches the
                // next stage as two messages (same event id). Count each event once.
                let event_id = m
                    .body()
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
                    .and_then(|v| {
                        v.get("event_id")
                            .and_then(|e| e.as_str())
                            .map(str::to_owned)
                    });
                // A message refused for payment data is kept with its digits masked: its
                // event id no longer tells it apart, its source message id does.
                let event_id = event_id.filter(|_| {
                    attribution
                        .as_ref()
                        .is_none_or(|a| a.reason != "payment_data")
                });
                let input = event_id.map_or_else(
                    || {
                        attribution.as_ref().map_or_else(
                            || m.message_id().unwrap_or_default().to_owned(),
                            |a| a.source_message_id.clone(),
                        )
                    },
                    |e| format!("event:{e}"),
                );
                if !seen.insert(input) {
                    continue;
                }
                let reason = attribution.map_or_else(|| "queue_redrive".to_owned(), |a| a.reason);
                *counts.entry((key.clone(), reason)).or_default() += 1;
            }
        }
    }
    Ok(counts)
}

/// How many dead letters differ from the expected counts (missing ones and extra ones).
pub fn dead_letter_mismatches(
    found: &BTreeMap<(String, String), u64>,
    expected: &BTreeMap<(String, String), u64>,
) -> u64 {
    let keys: std::collections::BTreeSet<_> = found.keys().chain(expected.keys()).collect();
    keys.into_iter()
        .map(|k| {
            found
                .get(k)
                .copied()
                .unwrap_or(0)
                .abs_diff(expected.get(k).copied().unwrap_or(0))
        })
        .sum()
}
