//! `loadtest`: parses the command line and runs the harness in the `loadtest` library. Exits 0
//! when the audit passes (nothing lost, nothing applied twice), 1 when it fails, 2 on bad usage.

#![forbid(unsafe_code)]

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fleet_common::config::FleetConfig;
use fleet_harness::scenario::Mix;
use loadtest::{Options, Pace};

/// Drive the fleet, measure it, audit every order.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version)]
struct Cli {
    /// The fleet config; with loopback endpoints the run gets its own queues and tables.
    #[arg(long, env = "FLEET_CONFIG", default_value = "config/fleet.toml")]
    config: PathBuf,
    /// Order submissions (plus their duplicates, malformed bodies and carrier events).
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    /// Or: run this long at --rate (orders = rate × duration).
    #[arg(long, value_parser = humantime::parse_duration, requires = "rate")]
    duration: Option<Duration>,
    /// Open loop: order submissions per second.
    #[arg(long, conflicts_with = "producers")]
    rate: Option<NonZeroU32>,
    /// Closed loop: producers sending back to back (default 8).
    #[arg(long)]
    producers: Option<usize>,
    /// Mix weights: valid=60,duplicate=10,malformed=8,unknown_sku=7,wrong_price=7,out_of_stock=8
    #[arg(long, value_parser = parse_mix, default_value = "valid=60,duplicate=10,malformed=8,unknown_sku=7,wrong_price=7,out_of_stock=8")]
    mix: Mix,
    /// Enqueue everything before starting the fleet (steady state with a backlog).
    #[arg(long)]
    backlog: bool,
    /// Skip the carrier events phase.
    #[arg(long)]
    no_carrier_events: bool,
    /// The fleet runs elsewhere (AWS): do not start it; requests are then not counted.
    #[arg(long)]
    no_start_fleet: bool,
    /// The worker binary (default: next to this one).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Config for the fleet process, KEY=VALUE (repeatable): workers.orders.ack_flush_ms=500
    #[arg(long = "fleet-set", value_parser = parse_kv)]
    fleet_overrides: Vec<(String, String)>,
    /// Run the fleet in its cost profile: one poller per queue, a 1 s batching window and 1 s
    /// acknowledgement batching (full batches of ten; about a second more latency per stage).
    #[arg(long)]
    cost_profile: bool,
    /// Seconds per backend ceiling measurement (0 skips it).
    #[arg(long, default_value_t = 10)]
    ceiling_secs: u64,
    /// The catalog to seed (local runs).
    #[arg(long, default_value = "config/catalog.json")]
    catalog: PathBuf,
    /// Generator seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Report directory (default loadtest/reports/<run time>).
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Longest wait for the queues to drain, per phase.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
    drain_timeout: Duration,
    /// The chaos run instead of a load run: the roles as separate processes under injected
    /// faults, a random one SIGKILLed every --kill-every, then a redrive of the transient dead
    /// letters and an audit (local emulators only).
    #[arg(long)]
    chaos: bool,
    /// The fault plan of the chaos run (FLEET_FAULTS syntax; see loadtest/README.md, "Faults").
    #[arg(long, requires = "chaos", default_value = loadtest::chaos::DEFAULT_FAULTS)]
    faults: String,
    /// A flash sale: this percentage of orders each take a line on a hot product (0–100).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    flash_share: Option<u8>,
    /// How many products are hot in the flash sale.
    #[arg(long, requires = "flash_share", default_value_t = 1)]
    hot_products: usize,
    /// Write units a second one DynamoDB item takes before it is throttled, injected into the
    /// fleet in a flash sale (it stands for DynamoDB's 1,000 per partition; 0: no limit).
    #[arg(long, requires = "flash_share", default_value_t = 50.0)]
    item_limit: f64,
    /// Split each hot product's stock over this many items (1: not sharded).
    #[arg(long, requires = "flash_share", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(workers::store::MAX_STOCK_SHARDS)))]
    stock_shards: u32,
    /// Simulate autoscaling instead of a load run: a sale at 10× and 100× of today against the
    /// deploy template's policy (writes scaling.md, scaling.json and charts to the report
    /// directory).
    #[arg(long)]
    simulate_scaling: bool,
    /// Simulation: messages a second one task drains (e.g. a run's steady msg/s).
    #[arg(long, requires = "simulate_scaling", default_value_t = 150.0)]
    per_task_rate: f64,
    /// Simulation: messages a second to one role today.
    #[arg(long, requires = "simulate_scaling", default_value_t = 25.0)]
    base_rate: f64,
    /// Simulation: DynamoDB write units per message of the busiest role.
    #[arg(long, requires = "simulate_scaling", default_value_t = 9.0)]
    write_units_per_message: f64,
    /// Simulation: share of orders on one hot product, percent (0: no sale on one product).
    #[arg(long, requires = "simulate_scaling", default_value_t = 0.0)]
    sim_hot_share: f64,
    /// Simulation: items the hot product's stock is split over.
    #[arg(long, requires = "simulate_scaling", default_value_t = 1)]
    sim_stock_shards: u32,
    /// Simulation: the oldest message's age to stay under, seconds.
    #[arg(long, requires = "simulate_scaling", default_value_t = 120.0)]
    target_age_secs: f64,
    /// The runtime's cost instead of a load run: a scratch queue of --messages drained by the
    /// bare SDK loop, then by the consumer runtime with a no-op handler (writes runtime.json).
    #[arg(long, conflicts_with_all = ["chaos", "simulate_scaling", "flash_share"])]
    runtime: bool,
    /// Runtime run: messages per phase (1,000,000 makes it a memory soak).
    #[arg(long, requires = "runtime", default_value_t = 100_000)]
    messages: u64,
    /// Runtime run: the role whose worker settings the runtime runs with.
    #[arg(long, requires = "runtime", default_value = "orders")]
    runtime_role: fleet_common::role::Role,
    /// Runtime run: only this phase (`sdk` or `runtime`), e.g. to profile one.
    #[arg(long, requires = "runtime", value_parser = ["sdk", "runtime"])]
    only: Option<String>,
    /// Runtime run: with the shipped metrics recorder (Prometheus + EMF) and the worker's JSON
    /// logs at `info` on stderr, as a worker runs.
    #[arg(long, requires = "runtime")]
    telemetry: bool,
    /// Runtime run: threads of the async runtime both phases run on, as the worker's
    /// `--threads` (default 1, as a worker runs by default).
    #[arg(long, requires = "runtime", default_value = "1", value_parser = fleet_common::process::parse_threads)]
    runtime_threads: std::num::NonZeroUsize,
    /// How often the chaos run SIGKILLs a random role.
    #[arg(long, requires = "chaos", value_parser = humantime::parse_duration, default_value = "3s")]
    kill_every: Duration,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

fn parse_mix(s: &str) -> Result<Mix, String> {
    let mut mix = Mix {
        valid: 0,
        duplicate: 0,
        malformed: 0,
        unknown_sku: 0,
        wrong_price: 0,
        out_of_stock: 0,
    };
    for part in s.split(',') {
        let (k, v) = parse_kv(part)?;
        let n: u32 = v
            .parse()
            .map_err(|_| format!("`{v}` is not a whole number (in {part})"))?;
        match k.as_str() {
            "valid" => mix.valid = n,
            "duplicate" => mix.duplicate = n,
            "malformed" => mix.malformed = n,
            "unknown_sku" => mix.unknown_sku = n,
            "wrong_price" => mix.wrong_price = n,
            "out_of_stock" => mix.out_of_stock = n,
            other => return Err(format!("unknown kind `{other}`: valid, duplicate, malformed, unknown_sku, wrong_price, out_of_stock")),
        }
    }
    Ok(mix)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A runtime run measures the consumer on the runtime a worker runs on; everything else
    // (producers, sampler, ceilings) on a multi-threaded one.
    let runtime = if cli.runtime {
        fleet_common::process::tokio_runtime(cli.runtime_threads)
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match runtime {
        Ok(runtime) => runtime.block_on(loadtest_main(cli)),
        Err(e) => {
            eprintln!("loadtest: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn loadtest_main(cli: Cli) -> ExitCode {
    if cli.runtime && cli.telemetry {
        fleet_common::telemetry::init_tracing(fleet_common::config::LogFormat::Json, None);
    } else {
        fleet_common::telemetry::init_cli_tracing();
    }
    let config = match FleetConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    let (simulate, chaos) = (cli.simulate_scaling, cli.chaos);
    let runtime = cli.runtime.then_some(loadtest::runtime::RuntimeOptions {
        messages: cli.messages,
        role: cli.runtime_role,
        telemetry: cli.telemetry,
        only: cli.only.clone(),
        drain_timeout: cli.drain_timeout,
    });
    let inputs = scaling_inputs(&cli);
    let (faults, kill_every) = (cli.faults.clone(), cli.kill_every);
    let opts = options(cli, config);
    let dir = opts.report_dir.clone();
    if simulate {
        return simulate_scaling(&inputs, &dir);
    }
    if chaos {
        return chaos_run(&opts, faults, kill_every, &dir).await;
    }
    if let Some(runtime) = runtime {
        return runtime_run(&opts.config, &runtime, &dir).await;
    }
    match loadtest::run(opts).await {
        Ok(report) => {
            print!("{}", report.summary());
            println!("  report: {}/report.json (+ summary.txt, throughput.svg, backlog.svg, latency.svg, memory.svg)", dir.display());
            if report.verdict == "PASS" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The run's options from the command line and the config.
fn options(cli: Cli, config: FleetConfig) -> Options {
    let pace = match (cli.rate, cli.producers) {
        (Some(r), _) => Pace::Open(r),
        (None, p) => Pace::Closed(p.unwrap_or(8)),
    };
    let orders = match (cli.duration, cli.rate) {
        (Some(d), Some(r)) => (d.as_secs_f64() * f64::from(r.get())) as usize,
        _ => cli.orders,
    };
    let worker_bin = cli.worker_bin.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("worker")))
            .unwrap_or_else(|| "worker".into())
    });
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut fleet_overrides = Vec::new();
    if cli.cost_profile {
        for role in config.workers.keys() {
            for (k, v) in [
                ("pollers", "1"),
                ("batch_window_ms", "1000"),
                ("ack_flush_ms", "1000"),
                ("forward_flush_ms", "1000"),
            ] {
                fleet_overrides.push((format!("workers.{role}.{k}"), v.to_owned()));
            }
        }
    }
    fleet_overrides.extend(cli.fleet_overrides);
    Options {
        config,
        config_path: cli.config,
        orders,
        mix: cli.mix,
        pace,
        backlog: cli.backlog,
        carrier_events: !cli.no_carrier_events,
        start_fleet: !cli.no_start_fleet,
        worker_bin,
        fleet_overrides,
        ceiling_secs: cli.ceiling_secs,
        catalog: cli.catalog,
        seed: cli.seed,
        report_dir: cli
            .report_dir
            .unwrap_or_else(|| PathBuf::from(format!("loadtest/reports/{stamp}"))),
        drain_timeout: cli.drain_timeout,
        flash: cli.flash_share.map(|share| loadtest::flash::FlashRun {
            sale: fleet_harness::scenario::Flash {
                share: f64::from(share) / 100.0,
                products: cli.hot_products.max(1),
            },
            item_limit: (cli.item_limit > 0.0).then_some(cli.item_limit),
            shards: cli.stock_shards,
        }),
    }
}

/// `--simulate-scaling`'s inputs.
fn scaling_inputs(cli: &Cli) -> loadtest::scale::Inputs {
    loadtest::scale::Inputs {
        per_task_rate: cli.per_task_rate,
        base_rate: cli.base_rate,
        write_units_per_message: cli.write_units_per_message,
        table_write_units: 40_000.0,
        hot_share: cli.sim_hot_share / 100.0,
        stock_shards: cli.sim_stock_shards,
        transaction_secs: 0.02,
        target_age_secs: cli.target_age_secs,
    }
}

/// `--simulate-scaling`: the scaling report, printed.
fn simulate_scaling(inputs: &loadtest::scale::Inputs, dir: &std::path::Path) -> ExitCode {
    match loadtest::scale::report(inputs, dir) {
        Ok(_) => {
            print!(
                "{}",
                std::fs::read_to_string(dir.join("scaling.md")).unwrap_or_default()
            );
            eprintln!("  report: {}/scaling.md (+ scaling.json, scaling-tasks.svg, scaling-backlog.svg, scaling-oldest.svg)", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `--runtime`: the runtime's cost next to the bare SDK loop, printed.
async fn runtime_run(
    config: &FleetConfig,
    opts: &loadtest::runtime::RuntimeOptions,
    dir: &std::path::Path,
) -> ExitCode {
    if opts.telemetry {
        let metrics = fleet_common::telemetry::init_metrics(config.observability.emf);
        fleet_common::telemetry::spawn_exporters(
            &metrics,
            &config.observability,
            opts.role.as_str(),
        );
    }
    match loadtest::runtime::run(config, opts, dir).await {
        Ok(report) => {
            print!("{}", report.summary());
            println!("  report: {}/runtime.json", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `--chaos`: the chaos run, its report printed; fails when its audit does.
async fn chaos_run(
    opts: &Options,
    faults: String,
    kill_every: std::time::Duration,
    dir: &std::path::Path,
) -> ExitCode {
    match loadtest::run_chaos(opts, faults, kill_every).await {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            eprintln!("  report: {}/chaos.json", dir.display());
            if report.passed(report.orders) {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "loadtest: the chaos run's audit failed: {:?}",
                    report.audit.offenders
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_names_its_kinds_and_refuses_unknown_ones() {
        let m = parse_mix("valid=5,out_of_stock=1").unwrap();
        assert_eq!((m.valid, m.out_of_stock, m.duplicate), (5, 1, 0));
        assert!(parse_mix("valid=x").unwrap_err().contains("whole number"));
        assert!(parse_mix("bogus=1").unwrap_err().contains("unknown kind"));
    }
}
