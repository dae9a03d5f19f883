//! `worker`: runs worker roles, provisions local queues and tables, seeds the catalog. All logic
//! lives in the `workers` and `fleet-common` libraries (the demo is `fleet-harness`'s `demo`).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use fleet_common::aws::Clients;
use fleet_common::config::{FleetConfig, CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH};
use fleet_common::health::{self, Health};
use fleet_common::telemetry;
use tokio_util::sync::CancellationToken;
use workers::catalog::CatalogFile;

#[derive(Parser)]
#[command(name = "worker", version, about = "The order fleet's SQS workers")]
struct Cli {
    /// The fleet config file.
    #[arg(long, global = true, env = CONFIG_PATH_ENV, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Threads of the async runtime: 1 (the default) suits a task of up to one vCPU, where the
    /// hand-offs between a worker's tasks cost no thread wake-ups; more for bigger tasks.
    #[arg(long, global = true, env = fleet_common::process::THREADS_ENV, default_value = "1", value_parser = fleet_common::process::parse_threads)]
    threads: std::num::NonZeroUsize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Role {
    Ingestion,
    Orders,
    Warehouse,
    Delivery,
    All,
}

impl Role {
    fn name(self) -> &'static str {
        use fleet_common::role::Role as R;
        match self {
            Self::Ingestion => R::Ingestion.as_str(),
            Self::Orders => R::Orders.as_str(),
            Self::Warehouse => R::Warehouse.as_str(),
            Self::Delivery => R::Delivery.as_str(),
            Self::All => "all",
        }
    }

    /// The roles to run: one, or every role for `all`.
    fn roles(self) -> Vec<fleet_common::role::Role> {
        use fleet_common::role::Role as R;
        match self {
            Self::Ingestion => vec![R::Ingestion],
            Self::Orders => vec![R::Orders],
            Self::Warehouse => vec![R::Warehouse],
            Self::Delivery => vec![R::Delivery],
            Self::All => R::ALL.to_vec(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Consume queues until SIGTERM or SIGINT (a second signal exits at once).
    Run {
        /// The role to run; `all` runs the four in one process.
        #[arg(long, value_enum)]
        role: Role,
    },
    /// Create or update every queue (with its DLQ and redrive policy) and table of the config.
    /// For the local emulators; production is provisioned by deploy/.
    Provision {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Exit 0 when this container's worker answers `/healthz` (the container health check).
    Healthcheck,
    /// Load a catalog file (products, prices, stock, substitutes) into the catalog table.
    SeedCatalog {
        #[arg(long, default_value = "config/catalog.json")]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match fleet_common::process::tokio_runtime(cli.threads) {
        Ok(runtime) => runtime.block_on(worker(cli)),
        Err(e) => {
            eprintln!("worker: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn worker(cli: Cli) -> ExitCode {
    let config = match FleetConfig::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("worker: {e}");
            return ExitCode::from(2);
        }
    };
    // One trace per order, exported when switched on (observability.otlp_endpoint or
    // OTEL_EXPORTER_OTLP_ENDPOINT); off by default.
    let traces = match &cli.command {
        Command::Run { role } => match fleet_common::trace::otlp_provider(
            config.observability.otlp_endpoint.as_deref(),
            role.name(),
        ) {
            Ok(traces) => traces,
            Err(e) => {
                eprintln!("worker: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    telemetry::init_tracing(config.observability.log_format, traces.as_ref());
    let outcome = run(cli.command, config).await;
    if let Some(traces) = traces {
        // Flushes the spans still batched (the exporter blocks: off the async threads).
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: FleetConfig) -> anyhow::Result<()> {
    match command {
        Command::Run { role } => run_roles(config, role).await,
        Command::Healthcheck => healthcheck(config.observability.listen_addr).await,
        Command::Provision { output } => {
            let clients = Clients::from_config(&config.aws).await;
            let report =
                fleet_common::provision::provision(&clients.sqs, &clients.dynamodb, &config)
                    .await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                for line in &report {
                    println!("{:<6} {:<40} {}", line.kind, line.name, line.action);
                }
            }
            Ok(())
        }
        Command::SeedCatalog { file } => {
            let clients = Clients::from_config(&config.aws).await;
            let catalog = CatalogFile::load(&file)?;
            let table = &config.table("catalog")?.name;
            let n = workers::catalog::seed(&clients.dynamodb, table, &catalog).await?;
            println!("seeded {n} products into {table}");
            Ok(())
        }
    }
}

/// Asks the worker's own health endpoint; no HTTP client needed for one request on loopback.
async fn healthcheck(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    let head = tokio::time::timeout(Duration::from_secs(3), ask)
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within 3 s"))??;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "unhealthy: {}",
        head.lines().next().unwrap_or_default()
    );
    Ok(())
}

async fn run_roles(config: FleetConfig, role: Role) -> anyhow::Result<()> {
    let metrics = telemetry::init_metrics(config.observability.emf);
    telemetry::spawn_exporters(&metrics, &config.observability, role.name());
    let faults = fleet_common::faults::FaultPlan::from_env()?;
    let clients = Clients::for_workers(&config.aws, faults.as_ref())
        .await
        .map_err(anyhow::Error::msg)?;
    if config.ingestion.dedup_ttl_hours.is_some() {
        tracing::warn!("ingestion.dedup_ttl_hours is ignored: the edge keeps no dedup record any more (remove the key)");
    }
    if let Some(plan) = &faults {
        tracing::warn!(rules = ?plan.rules(), "fault injection is on (FLEET_FAULTS)");
    }
    let shutdown = CancellationToken::new();
    let health = Health::default();
    health.set_poller_stale(Duration::from_secs(
        config.observability.poller_stale_secs.into(),
    ));
    let addr = health::serve(
        config.observability.listen_addr,
        health.clone(),
        Some(metrics.prometheus.clone()),
        shutdown.child_token(),
    )
    .await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    tokio::spawn(signals(shutdown.clone()));
    workers::fleet::run(&config, &clients, &role.roles(), health, shutdown).await?;
    Ok(())
}

/// The first SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once (messages
/// then come back after their visibility timeout: delayed, never lost).
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: shutting down gracefully (send again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}
