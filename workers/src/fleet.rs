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

/// The worker roles, in flow order.
pub const ROLES: [&str; 4] = [
    Role::Ingestion.as_str(),
    Role::Orders.as_str(),
    Role::Warehouse.as_str(),
    Role::Delivery.as_str(),
];

/// What one role did in a run.
#[derive(Debug, Clone)]
pub struct RoleStats {
    /// The role.
    pub role: String,
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
    roles: &[String],
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<RoleStats>> {
    let mut keys: Vec<&str> = roles
        .iter()
        .flat_map(|r| fleet_common::access::queues_of(r))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let topology = Topology::resolve_only(&clients.sqs, config, &keys).await?;
    let tables = Tables::from_config(config)?;
    let ledger =
        fleet_common::redrive_ledger::Ledger::from_config(clients.dynamodb.clone(), config)?;
    let mut tasks = Vec::new();
    let mut stats = Vec::new();
    for role in roles {
        let worker = config.worker(role)?.clone();
        let store = Store::new(
            clients.dynamodb.clone(),
            tables.clone(),
            stage_name(role)?,
            worker.downstream_rate_per_sec,
        );
        let settings = settings(config, role, worker, &topology, ledger.clone());
        let (task, role_stats) = match role.as_str() {
            "ingestion" => spawn(
                clients,
                ingestion::Ingestion::new(config.ingestion.clone()),
                settings,
                &health,
                &shutdown,
            )?,
            "orders" => spawn(
                clients,
                Json(orders::Orders::new(store)),
                settings,
                &health,
                &shutdown,
            )?,
            "warehouse" => spawn(
                clients,
                Json(warehouse::Warehouse::new(store)),
                settings,
                &health,
                &shutdown,
            )?,
            "delivery" => spawn(
                clients,
                Json(delivery::Delivery::new(store)),
                settings,
                &health,
                &shutdown,
            )?,
            other => anyhow::bail!("unknown role `{other}`: use one of {}", ROLES.join(", ")),
        };
        tasks.push(task);
        stats.push(RoleStats {
            role: role.clone(),
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
    role: &str,
    worker: fleet_common::config::WorkerConfig,
    topology: &Topology,
    ledger: Option<fleet_common::redrive_ledger::Ledger>,
) -> ConsumerSettings {
    ConsumerSettings {
        role: role.to_owned(),
        worker,
        topology: topology.clone(),
        max_message_bytes: config.aws.sqs_max_message_bytes,
        untrusted_edge: role == "ingestion",
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

fn stage_name(role: &str) -> anyhow::Result<&'static str> {
    ROLES
        .iter()
        .find(|r| **r == role)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("unknown role `{role}`: use one of {}", ROLES.join(", ")))
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

/// Expands `all` into every role.
pub fn expand_roles(role: &str) -> Vec<String> {
    if role == "all" {
        ROLES.iter().map(|r| (*r).to_owned()).collect()
    } else {
        vec![role.to_owned()]
    }
}
