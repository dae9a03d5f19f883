//! The demo: the whole fleet on the local emulators under a generated load, ending in one JSON
//! line that says what happened. Each run gets its own queues and tables (a `demo-…` suffix),
//! so runs never see each other's messages.

use std::time::{Duration, Instant};

use fleet_common::aws::Clients;
use fleet_common::config::FleetConfig;
use fleet_common::health::Health;
use fleet_common::role::Role;
use fleet_common::topology::Topology;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::info;

use workers::catalog::CatalogFile;
use workers::store::Tables;

use crate::queues::{dead_letter_mismatches, dead_letters, queued, send_all, wait_idle};
use crate::scenario::{self, Mix, Scenario};

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
    workers::catalog::seed(&producer.dynamodb, &tables.catalog, &catalog).await?;
    let topology = Topology::resolve(&producer.sqs, &config).await?;
    let scenario = Scenario::generate(options.orders, Mix::default(), &catalog, options.seed, &tag);

    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let fleet_task = {
        let (config, fleet, shutdown) = (config.clone(), fleet.clone(), shutdown.clone());
        tokio::spawn(async move {
            workers::fleet::run(&config, &fleet, &Role::ALL, Health::default(), shutdown).await
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
    if !audit.offenders.is_empty() {
        tracing::warn!(offenders = ?audit.offenders, "audit found problems");
    }
    let dead = dead_letters(&producer.sqs, &topology).await?;
    let unexpected_dead_letters = dead_letter_mismatches(&dead, &scenario.expected_dead_letters);
    let still_queued = queued(&producer.sqs, &topology).await?;
    let mut summary = summarise(&stats, &fleet.requests, elapsed);
    // An expected order not in its state is lost unless its input still waits on a queue.
    summary.lost = audit.lost.saturating_sub(still_queued);
    summary.orders_completed = audit.orders_completed;
    summary.orders_rejected = audit.orders_rejected;
    summary.duplicate_effects = audit.duplicate_effects;
    summary.unexpected_dead_letters = unexpected_dead_letters;
    Ok(summary)
}

/// The run's counts, rates and requests per message (the audit's figures left at zero).
fn summarise(
    stats: &[workers::fleet::RoleStats],
    requests: &fleet_common::aws::RequestCounter,
    elapsed: Duration,
) -> Summary {
    let total = |f: fn(&fleet_common::runtime::Stats) -> u64| -> u64 {
        stats.iter().map(|s| f(&s.stats)).sum()
    };
    let processed = total(|s| s.succeeded.load(std::sync::atomic::Ordering::Relaxed));
    let dead_lettered = total(|s| s.dead_lettered.load(std::sync::atomic::Ordering::Relaxed));
    let snapshot = requests.snapshot();
    let count = |op: &str| snapshot.get(op).copied().unwrap_or(0);
    let sqs_requests = requests.total("sqs");
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
    Summary {
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
        lost: 0,
        orders_completed: 0,
        orders_rejected: 0,
        duplicate_effects: 0,
        unexpected_dead_letters: 0,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
