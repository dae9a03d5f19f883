//! The load harness: drives the fleet with a generated load, measures it from outside (what the
//! fleet counted on its metrics endpoint, what /proc says about the process, what the queues
//! hold), measures the backends' own ceilings in the same run, audits every order, and writes a
//! report (JSON, a human summary, SVG charts).

#![forbid(unsafe_code)]

pub mod ceiling;
pub mod chaos;
pub mod charts;
pub mod flash;
pub mod probe;
pub mod report;
pub mod runtime;
pub mod scale;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use fleet_common::aws::{is_loopback_url, Clients};
use fleet_common::config::FleetConfig;
use fleet_common::topology::Topology;
use fleet_harness::scenario::{self, Input, Mix, Scenario};
use governor::{Quota, RateLimiter};
use indicatif::{ProgressBar, ProgressStyle};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use workers::catalog::CatalogFile;
use workers::store::Tables;

use crate::report::{Report, Sample};

/// How the load is offered.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Open loop: this many order submissions per second, whatever the fleet does.
    Open(NonZeroU32),
    /// Closed loop: this many producers, each sending its next batch of ten when SQS took the last.
    Closed(usize),
}

/// A load-test run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The fleet config (queues, tables, endpoints).
    pub config: FleetConfig,
    /// Where the config file is (the worker process reads it too).
    pub config_path: PathBuf,
    /// Order submissions to generate.
    pub orders: usize,
    /// The mix of kinds.
    pub mix: Mix,
    /// Open or closed loop.
    pub pace: Pace,
    /// Enqueue everything before the fleet starts: steady state with a full backlog.
    pub backlog: bool,
    /// Send carrier events (in random order, with late and repeated ones) after the orders.
    pub carrier_events: bool,
    /// Start the fleet as a child process (`worker run --role all`); otherwise it runs elsewhere.
    pub start_fleet: bool,
    /// The `worker` binary.
    pub worker_bin: PathBuf,
    /// Extra config for the fleet process (`workers.orders.ack_flush_ms=500`).
    pub fleet_overrides: Vec<(String, String)>,
    /// Seconds per backend ceiling measurement (0: skip).
    pub ceiling_secs: u64,
    /// The catalog to seed.
    pub catalog: PathBuf,
    /// Generator seed.
    pub seed: u64,
    /// Where the report goes.
    pub report_dir: PathBuf,
    /// Longest wait for the queues to drain, per phase.
    pub drain_timeout: Duration,
    /// A flash sale on a few products, with DynamoDB's per-item limits injected.
    pub flash: Option<flash::FlashRun>,
}

/// The fleet's own DynamoDB work without queues, on scratch tables of their own (so the run's
/// audit is untouched): orders generated with the run's mix, taken through the four handlers in
/// memory.
async fn workload_ceiling(
    opts: &Options,
    harness: &Clients,
    catalog: &CatalogFile,
    tag: &str,
    loops: usize,
) -> anyhow::Result<ceiling::Ceiling> {
    let scratch_tag = format!("{tag}w");
    let scratch = opts.config.clone().with_suffix(&scratch_tag);
    fleet_common::provision::provision_tables(&harness.dynamodb, &scratch)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let tables = Tables::from_config(&scratch)?;
    workers::catalog::seed(&harness.dynamodb, &tables.catalog, catalog).await?;
    // More orders than the backend can take in the time given (≈4 messages each).
    let orders = usize::try_from(opts.ceiling_secs.saturating_mul(400)).unwrap_or(usize::MAX);
    let scenario = Scenario::generate(orders, opts.mix, catalog, opts.seed ^ 0x5eed, &scratch_tag);
    let inputs = scenario.submissions.into_iter().map(|i| i.body).collect();
    let inline = Arc::new(fleet_harness::chain::Inline::new(
        &scratch,
        &harness.dynamodb,
    )?);
    ceiling::workload(inline, inputs, loops, opts.ceiling_secs).await
}

/// The chaos run (`loadtest --chaos`) on the local emulators: its own tuned copy of the fleet
/// (short visibility timeouts and retries, see [`chaos::tune`]), `opts.orders` orders of
/// `opts.mix` with carrier events, the roles as processes under `faults` with a random SIGKILL
/// every `kill_every`; the report is also written to `report_dir/chaos.json`.
///
/// # Errors
/// Not on the local emulators; setup failures; a phase that does not drain.
pub async fn run_chaos(
    opts: &Options,
    faults: String,
    kill_every: Duration,
) -> anyhow::Result<chaos::ChaosReport> {
    anyhow::ensure!(
        opts.config
            .aws
            .sqs_endpoint_url
            .as_deref()
            .is_some_and(is_loopback_url),
        "the chaos run injects faults, which only the local emulators take (a config with loopback endpoints)"
    );
    fleet_common::faults::FaultPlan::parse(&faults)?;
    std::fs::create_dir_all(&opts.report_dir)
        .with_context(|| format!("creating {}", opts.report_dir.display()))?;
    let tag = format!("ch{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut config = opts.config.clone().with_suffix(&tag);
    chaos::tune(&mut config);
    config.validate()?;
    let harness = Clients::from_config(&config.aws).await;
    fleet_common::provision::provision(&harness.sqs, &harness.dynamodb, &config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; are the emulators running (scripts/local-aws up)?"))?;
    let tables = Tables::from_config(&config)?;
    let catalog = CatalogFile::load(&opts.catalog)?;
    workers::catalog::seed(&harness.dynamodb, &tables.catalog, &catalog).await?;
    let topology = Topology::resolve(&harness.sqs, &config).await?;
    let scenario = Scenario::generate(opts.orders, opts.mix, &catalog, opts.seed, &tag);
    let mut env = config.process_overrides();
    env.push((
        "FLEET__OBSERVABILITY__LISTEN_ADDR".into(),
        "127.0.0.1:0".into(),
    ));
    let setup = chaos::Setup {
        dlq_bin: opts.worker_bin.with_file_name("dlq"),
        worker_bin: opts.worker_bin.clone(),
        config_path: opts.config_path.clone(),
        workdir: std::env::current_dir()?,
        env,
        clients: &harness,
        topology: &topology,
        tables,
    };
    let plan = chaos::Plan {
        faults,
        kill_every,
        phase_timeout: opts.drain_timeout,
    };
    eprintln!(
        "chaos run {tag}: {} orders ({} inputs), a random role SIGKILLed every {} s…",
        scenario.expected.len(),
        scenario.submissions.len() + scenario.carrier_events.len(),
        kill_every.as_secs_f64()
    );
    let report = chaos::run(&setup, &plan, &scenario, &catalog).await?;
    std::fs::write(
        opts.report_dir.join("chaos.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}

/// Runs the load and returns its report (also written to `report_dir`).
///
/// # Errors
/// Setup failures (emulators down, missing binary); the verdict of the run is in the report.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&opts.report_dir)
        .with_context(|| format!("creating {}", opts.report_dir.display()))?;
    let setup = Setup::prepare(&opts).await?;
    let mut report = Report::new(&setup.tag, setup.local, &opts, &setup.scenario);
    if opts.ceiling_secs > 0 {
        let (sqs, ddb, workload) = measure_ceilings(&opts, &setup).await?;
        report.set_ceilings(sqs, ddb, workload);
    }
    let load = run_load(&opts, &setup, &mut report).await?;
    audit(&opts, &setup, &load, &mut report).await?;
    report.set_load(
        load.elapsed,
        load.order_phase,
        load.samples,
        load.metrics_after_orders.as_ref(),
        load.final_metrics.as_ref(),
        load.process,
    );
    report.write(&opts.report_dir)?;
    Ok(report)
}

/// What a run works on: its config (its own queues and tables locally), clients, tables,
/// catalog, queues and scenario.
struct Setup {
    tag: String,
    local: bool,
    config: FleetConfig,
    harness: Clients,
    tables: Tables,
    catalog: CatalogFile,
    topology: Topology,
    scenario: Scenario,
}

impl Setup {
    /// Locally: provisions the run's own queues and tables and seeds the catalog (sharded for
    /// a flash sale); on AWS the deployed ones are used.
    async fn prepare(opts: &Options) -> anyhow::Result<Self> {
        let local = opts
            .config
            .aws
            .sqs_endpoint_url
            .as_deref()
            .is_some_and(is_loopback_url);
        let tag = format!("lt{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let config = if local {
            opts.config.clone().with_suffix(&tag)
        } else {
            opts.config.clone()
        };
        let harness = Clients::from_config(&config.aws).await;
        if local {
            fleet_common::provision::provision(&harness.sqs, &harness.dynamodb, &config)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("{e}; are the emulators running (scripts/local-aws up)?")
                })?;
        }
        let tables = Tables::from_config(&config)?;
        let mut catalog = CatalogFile::load(&opts.catalog)?;
        if let Some(flash) = &opts.flash {
            anyhow::ensure!(
                local || flash.shards <= 1,
                "--stock-shards splits stock in the catalog the harness seeds, on the local emulators only: on AWS set stock_shards in the catalog and seed it (worker seed-catalog)"
            );
            flash.shard(&mut catalog);
        }
        if local {
            workers::catalog::seed(&harness.dynamodb, &tables.catalog, &catalog).await?;
        }
        let topology = Topology::resolve(&harness.sqs, &config).await?;
        let scenario = Scenario::generate_with(
            opts.orders,
            opts.mix,
            opts.flash.map(|f| f.sale),
            &catalog,
            opts.seed,
            &tag,
        );
        Ok(Self {
            tag,
            local,
            config,
            harness,
            tables,
            catalog,
            topology,
            scenario,
        })
    }
}

/// The backends' ceilings: a raw SQS loop, raw conditional puts on a scratch table, and the
/// fleet's own DynamoDB work chained in memory (local emulators only).
async fn measure_ceilings(
    opts: &Options,
    setup: &Setup,
) -> anyhow::Result<(ceiling::Ceiling, ceiling::Ceiling, Option<ceiling::Ceiling>)> {
    eprintln!("measuring backend ceilings ({} s each)…", opts.ceiling_secs);
    anyhow::ensure!(
        setup.local,
        "backend ceilings are measured on the local emulators only: pass --ceiling-secs 0 on AWS"
    );
    let harness = &setup.harness;
    let loops = setup
        .config
        .workers
        .values()
        .map(|w| w.max_in_flight.get())
        .max()
        .unwrap_or(16)
        .min(32);
    let sqs = ceiling::sqs(&harness.sqs, &setup.tag, loops / 4 + 1, opts.ceiling_secs).await?;
    // A scratch table of its own: the fleet's tables hold only the fleet's records.
    let scratch = fleet_common::config::TableConfig {
        name: format!("{}-ceiling-puts", setup.tag),
        partition_key: "pk".into(),
        sort_key: None,
        ttl_attribute: Some("expires_at".into()),
    };
    fleet_common::provision::provision_table(&harness.dynamodb, &scratch)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ddb = ceiling::dynamodb(
        &harness.dynamodb,
        &scratch.name,
        scratch.ttl_attribute.as_deref(),
        loops,
        opts.ceiling_secs,
    )
    .await?;
    let workload = workload_ceiling(opts, harness, &setup.catalog, &setup.tag, loops).await?;
    Ok((sqs, ddb, Some(workload)))
}

/// What the load phases measured.
struct Load {
    elapsed: Duration,
    order_phase: Duration,
    samples: Vec<Sample>,
    metrics_after_orders: Option<probe::Metrics>,
    final_metrics: Option<probe::Metrics>,
    process: Option<probe::ProcessSample>,
    /// When SQS accepted each order's submission.
    sent: BTreeMap<String, OffsetDateTime>,
}

/// The order phase (the fleet started before it, or after it for a backlog), drained; then the
/// carrier events, drained; the fleet stopped.
async fn run_load(opts: &Options, setup: &Setup, report: &mut Report) -> anyhow::Result<Load> {
    let (harness, topology, scenario) = (&setup.harness, &setup.topology, &setup.scenario);
    let ingest = topology
        .pair("ingest")
        .context("the config has no ingest queue")?
        .queue
        .url
        .clone();
    let sent_at: Arc<Mutex<BTreeMap<String, OffsetDateTime>>> = Arc::default();
    let log = report_path(opts, "worker.log");
    let mut fleet = None;
    if opts.start_fleet && !opts.backlog {
        fleet = Some(FleetProcess::start(opts, &setup.config, &log).await?);
    }
    let started = Instant::now();
    let mut phases = vec![(
        if opts.backlog {
            "orders enqueued"
        } else {
            "orders"
        }
        .to_owned(),
        0.0,
    )];
    let mut phase = |name: &str| phases.push((name.to_owned(), started.elapsed().as_secs_f64()));
    let sampler = Sampler::start(
        harness.sqs.clone(),
        topology.clone(),
        fleet.as_ref().map(|f| (f.pid, f.metrics_addr)),
    );
    send_phase(
        &harness.sqs,
        &ingest,
        &scenario.submissions,
        opts.pace,
        &sent_at,
        "order submissions",
    )
    .await?;
    if opts.start_fleet && opts.backlog {
        report.backlog_before_start = fleet_harness::queues::queued(&harness.sqs, topology).await?;
        let f = FleetProcess::start(opts, &setup.config, &log).await?;
        sampler.attach(f.pid, f.metrics_addr);
        fleet = Some(f);
        phase("fleet started");
    }
    // The order phase starts with the first send, or with the fleet when it meets a backlog.
    let load_started = if opts.backlog {
        Instant::now()
    } else {
        started
    };
    drain(&harness.sqs, topology, opts.drain_timeout).await?;
    let order_phase = load_started.elapsed();
    let metrics_after_orders = match &fleet {
        Some(f) => Some(f.scrape().await?),
        None => None,
    };
    if opts.carrier_events {
        phase("carrier events");
        send_phase(
            &harness.sqs,
            &ingest,
            &scenario.carrier_events,
            Pace::Closed(4),
            &Arc::default(),
            "carrier events",
        )
        .await?;
        drain(&harness.sqs, topology, opts.drain_timeout).await?;
    }
    phase("drained");
    report.phases = phases;
    let elapsed = started.elapsed();
    let samples = sampler.stop().await;
    let final_metrics = match &fleet {
        Some(f) => Some(f.scrape().await?),
        None => None,
    };
    let process = fleet.as_ref().and_then(|f| probe::sample_process(f.pid));
    if let Some(f) = fleet.take() {
        f.stop().await?;
    }
    let sent = sent_at.lock().expect("sent lock").clone();
    Ok(Load {
        elapsed,
        order_phase,
        samples,
        metrics_after_orders,
        final_metrics,
        process,
        sent,
    })
}

/// Audits every order and the DLQs against the scenario, and a flash sale's stock.
async fn audit(
    opts: &Options,
    setup: &Setup,
    load: &Load,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (harness, scenario) = (&setup.harness, &setup.scenario);
    eprintln!("auditing every order…");
    let (audit, orders) = scenario::audit_with_orders(
        &harness.dynamodb,
        &setup.tables,
        scenario,
        &setup.catalog,
        opts.carrier_events,
    )
    .await?;
    let dead = fleet_harness::queues::dead_letters(&harness.sqs, &setup.topology).await?;
    let mut expected_dead = scenario.expected_dead_letters.clone();
    if !opts.carrier_events {
        // Carrier events for orders that do not exist are the only expected delivery dead letters.
        expected_dead.remove(&(
            "delivery".to_owned(),
            fleet_common::failure::Reason::UNKNOWN_ORDER
                .as_str()
                .to_owned(),
        ));
    }
    let unexpected = fleet_harness::queues::dead_letter_mismatches(&dead, &expected_dead);
    report.set_latency(orders.values(), &load.sent);
    report.set_audit(&audit, unexpected);
    if let Some(run) = &opts.flash {
        let before = setup.catalog.by_sku();
        let before = scenario
            .hot_skus
            .iter()
            .map(|sku| (sku.clone(), before.get(sku).map_or(0, |p| p.stock as i64)))
            .collect();
        report.set_flash(
            flash::FlashReport::measure(
                run,
                &harness.dynamodb,
                &setup.tables,
                &before,
                &orders,
                load.order_phase.as_secs_f64(),
                load.final_metrics.as_ref(),
            )
            .await?,
        );
    }
    Ok(())
}

fn report_path(opts: &Options, file: &str) -> PathBuf {
    opts.report_dir.join(file)
}

/// Sends inputs at the chosen pace; records when each order's submission was accepted by SQS.
async fn send_phase(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    inputs: &[Input],
    pace: Pace,
    sent_at: &Arc<Mutex<BTreeMap<String, OffsetDateTime>>>,
    what: &str,
) -> anyhow::Result<()> {
    let bar = ProgressBar::new(inputs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} {per_sec} ETA {eta}")
            .expect("template"),
    );
    bar.set_message(format!("sending {what}"));
    let batches: Vec<Vec<Input>> = inputs.chunks(10).map(<[Input]>::to_vec).collect();
    let (limiter, concurrency) = match pace {
        Pace::Open(rate) => (
            Some(RateLimiter::direct(
                Quota::per_second(rate).allow_burst(NonZeroU32::new(10).expect("10")),
            )),
            32,
        ),
        Pace::Closed(producers) => (None, producers.max(1)),
    };
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(batches.len());
    for batch in batches {
        if let Some(l) = &limiter {
            l.until_n_ready(NonZeroU32::new(batch.len() as u32).expect("non-empty"))
                .await
                .expect("batch within burst");
        }
        let permit = Arc::clone(&permits).acquire_owned().await.expect("open");
        let (sqs, url, sent_at, bar) = (
            sqs.clone(),
            url.to_owned(),
            Arc::clone(sent_at),
            bar.clone(),
        );
        tasks.push(tokio::spawn(async move {
            fleet_harness::queues::send_batch(&sqs, &url, &batch).await?;
            let now = OffsetDateTime::now_utc();
            let mut sent = sent_at.lock().expect("sent lock");
            for input in &batch {
                if let Some(id) = &input.order_id {
                    sent.entry(id.clone()).or_insert(now);
                }
            }
            bar.inc(batch.len() as u64);
            drop(permit);
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    bar.finish_and_clear();
    Ok(())
}

/// Waits for every work queue to drain, showing the backlog.
async fn drain(
    sqs: &aws_sdk_sqs::Client,
    topology: &Topology,
    limit: Duration,
) -> anyhow::Result<()> {
    let bar = ProgressBar::no_length();
    bar.set_style(
        ProgressStyle::with_template("{spinner} draining: {msg} {elapsed}").expect("template"),
    );
    let watcher = {
        let (sqs, topology, bar) = (sqs.clone(), topology.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(n) = fleet_harness::queues::queued(&sqs, &topology).await {
                    bar.set_message(format!("{n} messages queued"));
                }
                bar.tick();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let result = fleet_harness::queues::wait_idle(sqs, topology, limit).await;
    watcher.abort();
    bar.finish_and_clear();
    result
}

/// The fleet as a child process.
struct FleetProcess {
    child: tokio::process::Child,
    pid: u32,
    metrics_addr: SocketAddr,
}

impl FleetProcess {
    /// The fleet's counters, from its `/metrics` endpoint.
    async fn scrape(&self) -> anyhow::Result<probe::Metrics> {
        Ok(probe::parse(
            &probe::http_get(self.metrics_addr, "/metrics").await?,
        ))
    }

    async fn start(
        opts: &Options,
        config: &FleetConfig,
        log: &std::path::Path,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            opts.worker_bin.exists(),
            "{} is missing: build it with `cargo build --release --bin worker`",
            opts.worker_bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut env = config.name_overrides();
        env.push((
            "FLEET__OBSERVABILITY__LISTEN_ADDR".into(),
            metrics_addr.to_string(),
        ));
        for (k, v) in &opts.fleet_overrides {
            env.push((
                format!("FLEET__{}", k.replace('.', "__").to_uppercase()),
                v.clone(),
            ));
        }
        let log_file = std::fs::File::create(log)?;
        let child = tokio::process::Command::new(&opts.worker_bin)
            .args([
                "--config",
                &opts.config_path.to_string_lossy(),
                "run",
                "--role",
                "all",
            ])
            .envs(env)
            .env(
                "RUST_LOG",
                std::env::var("FLEET_LOADTEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(
                opts.flash
                    .map(|f| (fleet_common::faults::FAULTS_ENV, f.fault_plan())),
            )
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", opts.worker_bin.display()))?;
        let pid = child.id().context("the worker exited at once")?;
        let mut f = Self {
            child,
            pid,
            metrics_addr,
        };
        for _ in 0..150 {
            if probe::http_get(metrics_addr, "/readyz")
                .await
                .is_ok_and(|b| !b.is_empty())
            {
                return Ok(f);
            }
            if let Some(status) = f.child.try_wait()? {
                anyhow::bail!("the worker exited ({status}); see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!(
            "the worker did not become ready within 30 s; see {}",
            log.display()
        )
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(40), self.child.wait()).await {
            Ok(status) => anyhow::ensure!(status?.success(), "the worker did not stop cleanly"),
            Err(_) => {
                self.child.kill().await?;
                anyhow::bail!("the worker did not stop within 40 s of SIGTERM");
            }
        }
        Ok(())
    }
}

/// Samples throughput, backlog and the process once a second.
struct Sampler {
    target: Arc<Mutex<Option<(u32, SocketAddr)>>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(
        sqs: aws_sdk_sqs::Client,
        topology: Topology,
        target: Option<(u32, SocketAddr)>,
    ) -> Self {
        let target = Arc::new(Mutex::new(target));
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let task = {
            let (target, samples) = (Arc::clone(&target), Arc::clone(&samples));
            tokio::spawn(async move {
                let t0 = Instant::now();
                let mut last: Option<(f64, f64, f64)> = None; // (t, processed, cpu)
                let mut last_by_queue: BTreeMap<String, f64> = BTreeMap::new();
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let t = t0.elapsed().as_secs_f64();
                    let mut backlog_by_queue = BTreeMap::new();
                    for (name, pair) in &topology.queues {
                        if let Ok(d) = fleet_harness::queues::depth(&sqs, &pair.queue.url).await {
                            backlog_by_queue.insert(name.clone(), d.visible + d.in_flight);
                        }
                    }
                    let current = *target.lock().expect("target lock");
                    let mut sample = Sample {
                        t_secs: t,
                        backlog: backlog_by_queue.values().sum(),
                        backlog_by_queue,
                        ..Sample::default()
                    };
                    if let Some((pid, addr)) = current {
                        let (processed, receive_delete) = match probe::http_get(addr, "/metrics")
                            .await
                        {
                            Ok(text) => {
                                let m = probe::parse(&text);
                                let dt = last.map_or(1.0, |l| (t - l.0).max(0.001));
                                for (name, pair) in &topology.queues {
                                    let label = format!("queue=\"{}\"", pair.queue.name);
                                    let done =
                                        probe::sum(&m, "fleet_messages_succeeded_total", &[&label]);
                                    let before = last_by_queue.insert(name.clone(), done);
                                    if let Some(before) = before {
                                        sample
                                            .stages_per_sec
                                            .insert(name.clone(), (done - before).max(0.0) / dt);
                                    }
                                }
                                let rd = probe::sum(
                                    &m,
                                    "fleet_aws_requests_total",
                                    &["operation=\"ReceiveMessage\""],
                                ) + probe::sum(
                                    &m,
                                    "fleet_aws_requests_total",
                                    &["operation=\"DeleteMessageBatch\""],
                                );
                                (probe::sum(&m, "fleet_messages_succeeded_total", &[]), rd)
                            }
                            Err(_) => {
                                // A failed scrape: carry the counts, no rates, and keep the
                                // last good scrape as the base (else the next second shows
                                // two seconds of work).
                                let mut samples = samples.lock().expect("samples lock");
                                let previous = samples.last().cloned().unwrap_or_default();
                                sample.processed_total = previous.processed_total;
                                sample.receive_delete_total = previous.receive_delete_total;
                                sample.rss_mib =
                                    probe::sample_process(pid).unwrap_or_default().rss_mib;
                                samples.push(sample);
                                continue;
                            }
                        };
                        sample.receive_delete_total = receive_delete;
                        let proc_sample = probe::sample_process(pid).unwrap_or_default();
                        if let Some((lt, lp, lc)) = last {
                            let dt = (t - lt).max(0.001);
                            sample.processed_per_sec = (processed - lp).max(0.0) / dt;
                            sample.cpu_percent = (proc_sample.cpu_secs - lc).max(0.0) / dt * 100.0;
                        }
                        sample.processed_total = processed;
                        sample.rss_mib = proc_sample.rss_mib;
                        last = Some((t, processed, proc_sample.cpu_secs));
                    }
                    samples.lock().expect("samples lock").push(sample);
                }
            })
        };
        Self {
            target,
            samples,
            task,
        }
    }

    fn attach(&self, pid: u32, addr: SocketAddr) {
        *self.target.lock().expect("target lock") = Some((pid, addr));
    }

    async fn stop(self) -> Vec<Sample> {
        self.task.abort();
        let _ = self.task.await;
        std::mem::take(&mut *self.samples.lock().expect("samples lock"))
    }
}
