//! Fixtures for the end-to-end tests: a fresh set of queues and tables per test (random
//! suffix) on the local emulators started by `scripts/local-aws up`, and helpers to read them.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use fleet_common::aws::Clients;
use fleet_common::config::FleetConfig;
use fleet_common::topology::Topology;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The local config, as shipped.
pub fn local_config() -> FleetConfig {
    let path = workspace_root().join("config/fleet.toml");
    FleetConfig::load(&path).expect("config/fleet.toml loads")
}

/// One test's private queues and tables.
pub struct TestEnv {
    /// The config, with every queue and table renamed for this test.
    pub config: FleetConfig,
    /// Clients on the emulators.
    pub clients: Clients,
    /// The resolved queues.
    pub topology: Topology,
    /// The suffix of this test's resource names.
    pub suffix: String,
}

impl TestEnv {
    /// Renames every queue and table with a random suffix, lets `tweak` adjust the config,
    /// validates and provisions it.
    pub async fn new(tweak: impl FnOnce(&mut FleetConfig)) -> Self {
        let suffix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut config = local_config().with_suffix(&suffix);
        tweak(&mut config);
        config.validate().expect("the test's config is valid");
        let clients = Clients::from_config(&config.aws).await;
        fleet_common::provision::provision(&clients.sqs, &clients.dynamodb, &config)
            .await
            .expect("provisioning on the local emulators (is `scripts/local-aws up` running?)");
        let topology = Topology::resolve(&clients.sqs, &config)
            .await
            .expect("queues resolve");
        Self {
            config,
            clients,
            topology,
            suffix,
        }
    }

    /// URL of a work queue by logical name.
    pub fn url(&self, key: &str) -> String {
        self.topology
            .pair(key)
            .expect("queue in config")
            .queue
            .url
            .clone()
    }

    /// URL of a DLQ by the logical name of its work queue.
    pub fn dlq_url(&self, key: &str) -> String {
        self.topology
            .pair(key)
            .expect("queue in config")
            .dlq
            .url
            .clone()
    }

    /// Sends `bodies` to a queue in batches of ten, each with a correlation id attribute.
    pub async fn send_all(&self, url: &str, bodies: impl IntoIterator<Item = String>) {
        let bodies: Vec<String> = bodies.into_iter().collect();
        let fifo = url.ends_with(".fifo");
        for (n, chunk) in bodies.chunks(10).enumerate() {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, body)| {
                    let mut e = SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(body)
                        .message_attributes(
                            "correlation-id",
                            MessageAttributeValue::builder()
                                .data_type("String")
                                .string_value(format!("corr-{n}-{i}"))
                                .build()
                                .unwrap(),
                        );
                    if fifo {
                        e = e.message_group_id("g").message_deduplication_id(
                            format!("{n}-{i}-{body}")
                                .chars()
                                .take(128)
                                .collect::<String>(),
                        );
                    }
                    e.build().unwrap()
                })
                .collect();
            let out = self
                .clients
                .sqs
                .send_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("send batch");
            assert!(out.failed().is_empty(), "send failures: {:?}", out.failed());
        }
    }

    /// (visible, in flight, delayed) messages of a queue.
    pub async fn depth(&self, url: &str) -> (u64, u64, u64) {
        let d = fleet_harness::queues::depth(&self.clients.sqs, url)
            .await
            .expect("queue attributes");
        (d.visible, d.in_flight, d.delayed)
    }

    /// Receives everything visible on a queue (deleting nothing), waiting up to `wait` for
    /// `expected` messages. The messages stay invisible for `hold`.
    pub async fn receive_all(
        &self,
        url: &str,
        expected: usize,
        wait: Duration,
        hold: Duration,
    ) -> Vec<aws_sdk_sqs::types::Message> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut seen: HashMap<String, aws_sdk_sqs::types::Message> = HashMap::new();
        while seen.len() < expected && tokio::time::Instant::now() < deadline {
            let out = self
                .clients
                .sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .visibility_timeout(hold.as_secs().max(1) as i32)
                .message_attribute_names("All")
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .send()
                .await
                .expect("receive");
            for m in out.messages() {
                seen.insert(m.message_id().unwrap_or_default().to_owned(), m.clone());
            }
        }
        seen.into_values().collect()
    }
}

/// Waits until `check` is true, polling every 100 ms, for at most `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl TestEnv {
    /// Seeds the shipped catalog into this test's catalog table.
    pub async fn seed_catalog(&self) -> workers::catalog::CatalogFile {
        let catalog =
            workers::catalog::CatalogFile::load(&workspace_root().join("config/catalog.json"))
                .expect("catalog loads");
        let table = &self.config.table("catalog").unwrap().name;
        workers::catalog::seed(&self.clients.dynamodb, table, &catalog)
            .await
            .expect("catalog seeds");
        catalog
    }

    /// Audits every order and product of this test against `scenario` (with the delivery
    /// states when `with_delivery`).
    pub async fn audit(
        &self,
        scenario: &fleet_harness::scenario::Scenario,
        catalog: &workers::catalog::CatalogFile,
        with_delivery: bool,
    ) -> fleet_harness::scenario::Audit {
        fleet_harness::scenario::audit(
            &self.clients.dynamodb,
            &self.tables(),
            scenario,
            catalog,
            with_delivery,
        )
        .await
        .expect("the tables can be read")
    }

    /// The table names of this test.
    pub fn tables(&self) -> workers::store::Tables {
        workers::store::Tables::from_config(&self.config).unwrap()
    }

    /// `FLEET__…` variables that point the `worker` binary at this test's queues and tables.
    pub fn env_overrides(&self) -> Vec<(String, String)> {
        let mut vars = self.config.process_overrides();
        vars.push((
            "FLEET__OBSERVABILITY__LISTEN_ADDR".into(),
            "127.0.0.1:0".into(),
        ));
        vars
    }
}

/// The `worker` binary built next to this test (`cargo build --bins` first).
pub fn worker_binary() -> PathBuf {
    binary("worker")
}

/// The `dlq` binary built next to this test (`cargo build --bins` first).
pub fn dlq_binary() -> PathBuf {
    binary("dlq")
}

fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// The four roles running in this test's process, on worker clients (SDK retries off, request
/// deadlines on), with a fault plan when one is given.
pub struct RunningFleet {
    /// Cancel to stop the fleet.
    pub shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<Vec<workers::fleet::RoleStats>>>,
    /// The plan the fleet's requests meet, with what it injected.
    pub faults: Option<fleet_common::faults::FaultPlan>,
    /// The fleet's health, as `/healthz` would report it.
    pub health: fleet_common::health::Health,
}

impl RunningFleet {
    /// Stops the fleet gracefully and returns each role's counters.
    pub async fn stop(self) -> Vec<workers::fleet::RoleStats> {
        self.shutdown.cancel();
        self.task
            .await
            .expect("the fleet task ends")
            .expect("the fleet ran")
    }
}

impl TestEnv {
    /// Starts every role in this process; `faults` is a fault plan (`FLEET_FAULTS` syntax).
    pub async fn start_fleet(&self, faults: Option<&str>) -> RunningFleet {
        let faults =
            faults.map(|f| fleet_common::faults::FaultPlan::parse(f).expect("the plan parses"));
        let clients = Clients::for_workers(&self.config.aws, faults.as_ref())
            .await
            .expect("worker clients");
        let shutdown = tokio_util::sync::CancellationToken::new();
        let health = fleet_common::health::Health::default();
        let task = {
            let (config, shutdown, health) =
                (self.config.clone(), shutdown.clone(), health.clone());
            tokio::spawn(async move {
                workers::fleet::run(
                    &config,
                    &clients,
                    &fleet_common::role::Role::ALL,
                    health,
                    shutdown,
                )
                .await
            })
        };
        RunningFleet {
            shutdown,
            task,
            faults,
            health,
        }
    }

    /// Runs the `dlq` binary on this test's queues and tables.
    pub fn dlq(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(dlq_binary())
            .args(["--config", "config/fleet.toml"])
            .args(args)
            .current_dir(workspace_root())
            .envs(self.env_overrides())
            .output()
            .expect("dlq runs")
    }
}
