//! Runs one or more worker roles in this process, each with its own consumer.

use std::sync::Arc;

use fleet_common::aws::Clients;
use fleet_common::config::FleetConfig;
use fleet_common::health::Health;
use fleet_common::role::Role;
use fleet_common::runtime::{Consumer, ConsumerSettings, Handler, Json, Stats};
use fleet_common::topology::Topology;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, Tables};
use crate::{delivery, ingestion, orders, warehouse};

/// What one role did in a run.
#[derive(Debug, Clone)]
pub struct RoleStats {
    /// The role.
    pub role: Role,
    /// Its consumer's counters.
    pub stats: Arc<Stats>,
}

/// Resolves the queues, starts a consumer per role, and runs until `shutdown`; returns each
/// role's counters once every consumer has stopped.
///
/// # Errors
/// A role that is not configured, or a queue that cannot be resolved.
pub async fn run(
    config: &FleetConfig,
    clients: &Clients,
    roles: &[Role],
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<RoleStats>> {
    let mut keys: Vec<&str> = roles
        .iter()
        .flat_map(|r| fleet_common::access::queues_of(r.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let topology = Topology::resolve_only(&clients.sqs, config, &keys).await?;
    let tables = Tables::from_config(config)?;
    let ledger =
        fleet_common::redrive_ledger::Ledger::from_config(clients.dynamodb.clone(), config)?;
    let mut tasks = Vec::new();
    let mut stats = Vec::new();
    for &role in roles {
        let worker = config.worker(role.as_str())?.clone();
        let store = Store::new(
            clients.dynamodb.clone(),
            tables.clone(),
            role.as_str(),
            worker.downstream_rate_per_sec,
        );
        let settings = settings(config, role, worker, &topology, ledger.clone());
        let (task, role_stats) = match role {
            Role::Ingestion => spawn(
                clients,
                ingestion::Ingestion::new(config.ingestion.clone()),
                settings,
                &health,
                &shutdown,
            )?,
            Role::Orders => spawn(
                clients,
                Json(orders::Orders::new(store)),
                settings,
                &health,
                &shutdown,
            )?,
            Role::Warehouse => spawn(
                clients,
                Json(warehouse::Warehouse::new(store)),
                settings,
                &health,
                &shutdown,
            )?,
            Role::Delivery => spawn(
                clients,
                Json(delivery::Delivery::new(store)),
                settings,
                &health,
                &shutdown,
            )?,
        };
        tasks.push(task);
        stats.push(RoleStats {
            role,
            stats: role_stats,
        });
    }
    for task in tasks {
        task.await?;
    }
    Ok(stats)
}

/// What a role's consumer needs besides its handler.
fn settings(
    config: &FleetConfig,
    role: Role,
    worker: fleet_common::config::WorkerConfig,
    topology: &Topology,
    ledger: Option<fleet_common::redrive_ledger::Ledger>,
) -> ConsumerSettings {
    ConsumerSettings {
        role: role.as_str().to_owned(),
        worker,
        topology: topology.clone(),
        max_message_bytes: config.aws.sqs_max_message_bytes,
        untrusted_edge: role == Role::Ingestion,
        // The emulator does not keep system attributes; real SQS carries X-Ray's header.
        aws_trace_header: !config
            .aws
            .sqs_endpoint_url
            .as_deref()
            .is_some_and(fleet_common::aws::is_loopback_url),
        ledger,
        redrivers: config.ingestion.redrivers.clone(),
    }
}

fn spawn<H: Handler>(
    clients: &Clients,
    handler: H,
    settings: ConsumerSettings,
    health: &Health,
    shutdown: &CancellationToken,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, Arc<Stats>)> {
    let consumer = Consumer::new(clients.sqs.clone(), handler, settings, health.clone())
        .map_err(anyhow::Error::msg)?;
    let stats = consumer.stats();
    Ok((tokio::spawn(consumer.run(shutdown.clone())), stats))
}
