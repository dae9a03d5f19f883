//! The demo: the whole fleet on the local emulators under a generated load, ending in one JSON
//! line that says what happened. Each run gets its own queues and tables (a `demo-…` suffix),
//! so runs never see each other's messages.

use std::time::{Duration, Instant};

use fleet_common::aws::Clients;
use fleet_common::config::FleetConfig;
use fleet_common::health::Health;
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
        let roles = workers::fleet::expand_roles("all");
        tokio::spawn(async move {
            workers::fleet::run(&config, &fleet, &roles, Health::default(), shutdown).await
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
