//! `demo`: the four workers on the local emulators under a generated load; prints one JSON
//! summary line and exits non-zero when its audit fails (something lost, applied twice, or
//! dead-lettered unexpectedly). `scripts/demo` runs it.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fleet_common::config::{FleetConfig, CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH};
use fleet_common::telemetry;

/// Run the four workers on the emulators under a generated load; print one JSON summary line.
#[derive(Debug, Parser)]
#[command(name = "demo", version)]
struct Cli {
    /// The fleet config (local emulators).
    #[arg(long, env = CONFIG_PATH_ENV, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Order submissions to generate (plus duplicates, malformed bodies and carrier events).
    #[arg(long, default_value_t = 300)]
    orders: usize,
    /// Seed of the load generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The catalog to seed.
    #[arg(long, default_value = "config/catalog.json")]
    catalog: PathBuf,
    /// Longest wait for each phase, in seconds.
    #[arg(long, default_value_t = 600)]
    phase_timeout_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match FleetConfig::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_tracing(config.observability.log_format, None);
    let options = fleet_harness::demo::Options {
        orders: cli.orders,
        seed: cli.seed,
        catalog: cli.catalog,
        phase_timeout: Duration::from_secs(cli.phase_timeout_secs),
    };
    match fleet_harness::demo::run(config, &options).await {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string(&summary).expect("the summary serializes")
            );
            if summary.lost == 0
                && summary.duplicate_effects == 0
                && summary.unexpected_dead_letters == 0
            {
                ExitCode::SUCCESS
            } else {
                eprintln!("demo: the audit failed (see the summary and the log)");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
