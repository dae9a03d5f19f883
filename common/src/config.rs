//! Fleet configuration: one TOML file from `config/` plus `FLEET__…` environment overrides,
//! validated once at start-up so that a bad value stops the program with a message naming the key.
//!
//! Overrides use `__` between path segments: `FLEET__WORKERS__ORDERS__MAX_IN_FLIGHT=64` sets
//! `workers.orders.max_in_flight`. A value is read as TOML when it parses as TOML (numbers,
//! booleans, arrays), otherwise as a string.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "FLEET__";
/// The environment variable that names the config file.
pub const CONFIG_PATH_ENV: &str = "FLEET_CONFIG";
/// The config file used when neither `--config` nor `FLEET_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "config/fleet.toml";

/// SQS refuses visibility timeouts above 12 hours.
const MAX_VISIBILITY_TIMEOUT_SECS: u32 = 43_200;
/// SQS keeps messages at most 14 days.
const MAX_RETENTION_SECS: u32 = 1_209_600;
/// SQS takes at most 10 messages per receive.
const MAX_BATCH: u32 = 10;

/// Why a configuration could not be used. Every variant names the file or the key to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (set --config or {CONFIG_PATH_ENV})")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("environment override {var}: {message}")]
    Override { var: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole fleet's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Where AWS is: region and, for the local emulators only, endpoint overrides.
    #[serde(default)]
    pub aws: AwsConfig,
    /// Logs, metrics and the health endpoints.
    #[serde(default)]
    pub observability: ObservabilityConfig,
    /// Every work queue, keyed by the logical name the workers use (`ingest`, `orders`, …).
    /// Each gets a dead-letter queue named `<name>-dlq` (before `.fifo` for FIFO queues).
    pub queues: BTreeMap<String, QueueConfig>,
    /// Every DynamoDB table, keyed by logical name (`orders`, `catalog`).
    #[serde(default)]
    pub tables: BTreeMap<String, TableConfig>,
    /// One consumer per worker role, keyed by role (`ingestion`, `orders`, `warehouse`, `delivery`).
    pub workers: BTreeMap<String, WorkerConfig>,
    /// Limits of the untrusted edge (ingestion).
    #[serde(default)]
    pub ingestion: IngestionConfig,
}

/// Where AWS is, and how long a call to it may take.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Region; when absent the standard chain decides (AWS_REGION, profile).
    pub region: Option<String>,
    /// SQS endpoint override, for the local emulator. Absent in production.
    pub sqs_endpoint_url: Option<String>,
    /// DynamoDB endpoint override, for the local emulator. Absent in production.
    pub dynamodb_endpoint_url: Option<String>,
    /// Longest wait for a connection to AWS, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest a single AWS request may take, answer included, in milliseconds (a long poll
    /// gets its wait on top). A hung call fails with a timeout and is retried like any
    /// transient failure.
    #[serde(default = "default_attempt_timeout_ms")]
    pub attempt_timeout_ms: u64,
    /// SQS's limit on a message (body and attributes) and on a batch request, in bytes: 262144
    /// (256 KiB) by default; SQS now takes up to 1048576 (1 MiB).
    #[serde(default = "default_sqs_max_message_bytes")]
    pub sqs_max_message_bytes: usize,
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self {
            region: None,
            sqs_endpoint_url: None,
            dynamodb_endpoint_url: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            attempt_timeout_ms: default_attempt_timeout_ms(),
            sqs_max_message_bytes: default_sqs_max_message_bytes(),
        }
    }
}

impl AwsConfig {
    /// The longest a single AWS request may take.
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }

    /// The longest wait for a connection.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

const fn default_connect_timeout_ms() -> u64 {
    3_000
}

const fn default_attempt_timeout_ms() -> u64 {
    10_000
}

const fn default_sqs_max_message_bytes() -> usize {
    256 * 1024
}

/// Log format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, span fields included (production).
    #[default]
    Json,
    /// Human-readable lines (a terminal).
    Pretty,
}

/// Logs, metrics, health.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ObservabilityConfig {
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`. Port 0 picks one.
    #[serde(default = "default_listen_addr")]
    pub listen_addr: SocketAddr,
    /// `json` or `pretty`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Also print CloudWatch Embedded Metric Format lines to stdout (production on ECS).
    #[serde(default)]
    pub emf: bool,
    /// How often EMF lines are written.
    #[serde(default = "default_emf_interval_secs")]
    pub emf_interval_secs: NonZeroU32,
    /// The CloudWatch namespace of EMF metrics.
    #[serde(default = "default_emf_namespace")]
    pub emf_namespace: String,
    /// `/healthz` fails when a poller that is not waiting for room has completed no receive for
    /// this long (a wedged poller), so the orchestrator replaces the task.
    #[serde(default = "default_poller_stale_secs")]
    pub poller_stale_secs: u32,
    /// Export one trace per order (OpenTelemetry, OTLP over HTTP) to this collector, e.g.
    /// `http://localhost:4318` (an ADOT or OpenTelemetry Collector sidecar). Absent: off, unless
    /// the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            listen_addr: default_listen_addr(),
            log_format: LogFormat::default(),
            emf: false,
            emf_interval_secs: default_emf_interval_secs(),
            emf_namespace: default_emf_namespace(),
            poller_stale_secs: default_poller_stale_secs(),
            otlp_endpoint: None,
        }
    }
}

const fn default_poller_stale_secs() -> u32 {
    120
}

fn default_listen_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
const fn default_emf_interval_secs() -> NonZeroU32 {
    NonZeroU32::new(60).expect("non-zero")
}
fn default_emf_namespace() -> String {
    "OrderFleet".to_owned()
}

/// One SQS work queue and its dead-letter queue.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// The queue's name in SQS (with `.fifo` for FIFO queues).
    pub name: String,
    /// FIFO queue: per-group ordering and deduplication.
    #[serde(default)]
    pub fifo: bool,
    /// How long a received message stays invisible before SQS hands it out again.
    pub visibility_timeout_secs: u32,
    /// Receives after which SQS itself moves a message to the DLQ (the safety net for crashes).
    pub max_receive_count: u32,
    /// How long SQS keeps an unprocessed message.
    pub retention_secs: u32,
    /// How long the DLQ keeps a message; must be longer than `retention_secs`, because SQS keeps
    /// a message's original enqueue time when it moves it to a standard DLQ.
    pub dlq_retention_secs: u32,
    /// Server-side encryption with SQS-owned keys locally; `deploy/` uses a customer-managed KMS key.
    #[serde(default = "yes")]
    pub sse: bool,
}

const fn yes() -> bool {
    true
}

impl QueueConfig {
    /// The DLQ's name: `<name>-dlq`, keeping the `.fifo` suffix last.
    pub fn dlq_name(&self) -> String {
        match self.name.strip_suffix(".fifo") {
            Some(stem) => format!("{stem}-dlq.fifo"),
            None => format!("{}-dlq", self.name),
        }
    }
}

/// One DynamoDB table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// The table's name in DynamoDB.
    pub name: String,
    /// Partition key attribute (a string).
    pub partition_key: String,
    /// Sort key attribute (a string), if any.
    pub sort_key: Option<String>,
    /// Attribute that holds the expiry time (epoch seconds) when the table uses TTL.
    pub ttl_attribute: Option<String>,
}

/// One worker role's consumer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// The logical name (key in `[queues]`) of the queue this worker consumes.
    pub queue: String,
    /// Concurrent long-poll loops on the queue.
    #[serde(default = "default_pollers")]
    pub pollers: NonZeroUsize,
    /// Hard cap on messages in flight in this process (received and not yet acknowledged).
    pub max_in_flight: NonZeroUsize,
    /// Messages asked for per receive (1–10).
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Long-poll wait per receive (0–20 s).
    #[serde(default = "default_receive_wait_secs")]
    pub receive_wait_secs: u32,
    /// How often a running job extends its visibility; must be below the visibility timeout.
    pub heartbeat_interval_secs: u32,
    /// Attempts (receives) before a transiently failing message is dead-lettered by the worker.
    /// Must be below the queue's `max_receive_count`, so the worker attributes the failure before
    /// SQS's redrive policy moves the message without a reason.
    pub max_attempts: u32,
    /// First retry delay; each further attempt doubles it, with jitter.
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Upper bound of the retry delay.
    #[serde(default = "default_backoff_max_secs")]
    pub backoff_max_secs: u64,
    /// How long shutdown waits for in-flight jobs before releasing them to the queue.
    #[serde(default = "default_shutdown_deadline_secs")]
    pub shutdown_deadline_secs: u32,
    /// How long acknowledgements wait to fill a batch of 10. A message's in-flight slot is
    /// free once its effect is done, not when it is deleted, so this adds no latency and holds
    /// no capacity: it only keeps the message invisible a little longer. Capped at a tenth of
    /// the queue's visibility timeout.
    #[serde(default = "default_ack_flush_ms")]
    pub ack_flush_ms: u64,
    /// The longest forwarded messages wait to fill a batch of 10: a forward waits at most a
    /// tenth of how late its message already is, and not at all under a second late.
    #[serde(default = "default_forward_flush_ms")]
    pub forward_flush_ms: u64,
    /// Batching window: after a receive that brought some messages but fewer than asked for,
    /// wait this long before the next one so that a trickle accumulates into full batches (like
    /// Lambda's batching window), and wait up to this long for room for a full batch under the
    /// in-flight cap. Fewer requests per message, up to this much more latency. 0 = off.
    #[serde(default)]
    pub batch_window_ms: u64,
    /// Adaptive batching (with `batch_window_ms` 0): after a partial receive a poller waits
    /// for a fuller batch only when the measured arrival rate fills it within this long, and
    /// for at most a tenth of how late the messages already are; a message less than a second
    /// late never waits (`common/src/runtime/batching.rs`). 0 = never wait.
    #[serde(default = "default_batch_wait_max_ms")]
    pub batch_wait_max_ms: u64,
    /// Cap on DynamoDB requests per second from this worker (governor); absent = no cap.
    pub downstream_rate_per_sec: Option<NonZeroU32>,
    /// Longest one run of the handler may take; past it the attempt fails as
    /// `handler_deadline_exceeded` (transient), and `/healthz` fails while a job that cannot be
    /// stopped outlives it.
    #[serde(default = "default_handler_deadline_secs")]
    pub handler_deadline_secs: u32,
    /// How long a throttled message is retried in place (slowing the consumer, holding its
    /// visibility) before it goes back to the queue as one failed attempt.
    #[serde(default = "default_throttle_patience_secs")]
    pub throttle_patience_secs: u32,
    /// Fair sharing between tenants on a standard queue: at most this many messages of one
    /// message group run at once in a task; a first attempt over it is sent back to the queue
    /// with a short delay (no attempt used). Absent = no cap. Not on the edge queue (a message
    /// sent again would lose the SenderId that names its upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight_per_group: Option<NonZeroUsize>,
}

const fn default_handler_deadline_secs() -> u32 {
    120
}
const fn default_throttle_patience_secs() -> u32 {
    300
}

const fn default_batch_wait_max_ms() -> u64 {
    2_000
}
const fn default_pollers() -> NonZeroUsize {
    NonZeroUsize::new(2).expect("non-zero")
}
const fn default_batch_size() -> u32 {
    MAX_BATCH
}
const fn default_receive_wait_secs() -> u32 {
    20
}
const fn default_backoff_min_ms() -> u64 {
    1_000
}
const fn default_backoff_max_secs() -> u64 {
    300
}
const fn default_shutdown_deadline_secs() -> u32 {
    25
}
const fn default_ack_flush_ms() -> u64 {
    500
}
const fn default_forward_flush_ms() -> u64 {
    50
}

impl WorkerConfig {
    /// The heartbeat interval.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_secs.into())
    }
    /// The shutdown deadline.
    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_secs(self.shutdown_deadline_secs.into())
    }
    /// The handler deadline.
    pub fn handler_deadline(&self) -> Duration {
        Duration::from_secs(self.handler_deadline_secs.into())
    }
    /// How long throttling is retried in place.
    pub fn throttle_patience(&self) -> Duration {
        Duration::from_secs(self.throttle_patience_secs.into())
    }
}

/// Limits of the untrusted edge.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestionConfig {
    /// Largest accepted message body, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Deprecated and ignored: `source` is now the named sender (`ingestion.senders`), never
    /// what a message says of itself. Still accepted so that older files load.
    #[serde(default, skip_serializing)]
    pub default_source: Option<String>,
    /// Who may send what: each named sender, the SQS `SenderId`s it sends from, and the types
    /// it may send. A message from any other sender, or of a type its sender may not send, is
    /// refused (`sender_not_allowed`).
    #[serde(default)]
    pub senders: BTreeMap<String, SenderConfig>,
    /// The SQS `SenderId`s that redrive and import into the edge (the operator role running
    /// `dlq`): a message they send is checked as sent by the sender its `fleet-redrive` record
    /// names, and refused without one. Nobody else's record is believed.
    #[serde(default)]
    pub redrivers: Vec<String>,
    /// Deprecated and ignored: the edge no longer keeps a dedup record (each stage's
    /// conditional write is the idempotency). Still accepted so that older files load.
    #[serde(default, skip_serializing)]
    pub dedup_ttl_hours: Option<u32>,
}

impl Default for IngestionConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body_bytes(),
            default_source: None,
            senders: BTreeMap::new(),
            redrivers: Vec::new(),
            dedup_ttl_hours: None,
        }
    }
}

/// One upstream sender of the edge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    /// The SQS `SenderId`s it sends from: an IAM role's unique id (`AROA…`, matching any
    /// session), a user's (`AIDA…`) or an account id.
    pub ids: Vec<String>,
    /// The message types it may send (`order.submitted`, `delivery.status_reported`).
    pub types: Vec<String>,
}

impl IngestionConfig {
    /// The named sender of an SQS `SenderId`: the one listing it, or its role part (before
    /// `:`, the session).
    pub fn sender_of(&self, sender_id: &str) -> Option<(&str, &SenderConfig)> {
        self.senders
            .iter()
            .find(|(_, s)| matches_sender(&s.ids, sender_id))
            .map(|(name, s)| (name.as_str(), s))
    }

    /// Whether an SQS `SenderId` is one of `redrivers` (or its role part is).
    pub fn is_redriver(&self, sender_id: &str) -> bool {
        matches_sender(&self.redrivers, sender_id)
    }
}

/// Whether `ids` list an SQS `SenderId`, or its role part (before `:`, the session).
pub fn matches_sender(ids: &[String], sender_id: &str) -> bool {
    let role = sender_id.split(':').next().unwrap_or(sender_id);
    ids.iter().any(|id| id == sender_id || id == role)
}
const fn default_max_body_bytes() -> usize {
    64 * 1024
}

impl FleetConfig {
    /// Reads the file, applies `FLEET__…` overrides from the process environment, validates.
    ///
    /// # Errors
    /// A [`ConfigError`] that names the file, variable or key at fault.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_with_env(&text, path, std::env::vars())
    }

    /// Parses TOML text, applies the given `FLEET__…` variables, validates.
    ///
    /// # Errors
    /// As [`FleetConfig::load`].
    pub fn from_toml_with_env(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.message().to_owned(),
                })?;
        for (var, raw) in env {
            if let Some(rest) = var.strip_prefix(ENV_PREFIX) {
                apply_override(&mut value, &var, rest, &raw)?;
            }
        }
        let config: FleetConfig = serde_path_to_error::deserialize(toml::Value::Table(value))
            .map_err(|e| ConfigError::invalid(e.path().to_string(), e.inner().message()))?;
        config.validate()?;
        Ok(config)
    }

    /// `FLEET__…` variables that give another process this config's queue and table names (a
    /// suffixed copy made by [`FleetConfig::with_suffix`]).
    pub fn name_overrides(&self) -> Vec<(String, String)> {
        let queues = self.queues.iter().map(|(key, q)| {
            (
                format!("{ENV_PREFIX}QUEUES__{}__NAME", key.to_uppercase()),
                q.name.clone(),
            )
        });
        let tables = self.tables.iter().map(|(key, t)| {
            (
                format!("{ENV_PREFIX}TABLES__{}__NAME", key.to_uppercase()),
                t.name.clone(),
            )
        });
        queues.chain(tables).collect()
    }

    fn validate_senders(&self) -> Result<(), ConfigError> {
        let senders = &self.ingestion.senders;
        if self.workers.contains_key("ingestion") && senders.is_empty() {
            return Err(ConfigError::invalid(
                "ingestion.senders",
                "name at least one sender (its SQS SenderIds and the types it may send): the edge refuses every message from an unknown sender",
            ));
        }
        let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, sender) in senders {
            let at = |f: &str| format!("ingestion.senders.{name}.{f}");
            if name.is_empty()
                || name.len() > 32
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(ConfigError::invalid(
                    format!("ingestion.senders.{name}"),
                    "a sender's name is 1–32 lowercase letters, digits and `-` (it prefixes its event ids)",
                ));
            }
            if sender.ids.is_empty()
                || sender
                    .ids
                    .iter()
                    .any(|id| id.is_empty() || id.contains(':'))
            {
                return Err(ConfigError::invalid(
                    at("ids"),
                    "list at least one SQS SenderId, none empty, none with a `:session` part (a role's id matches all its sessions)",
                ));
            }
            if sender.types.is_empty() {
                return Err(ConfigError::invalid(
                    at("types"),
                    "list the types it may send",
                ));
            }
            for t in &sender.types {
                if !crate::contract::EXTERNAL_TYPES.contains(&t.as_str()) {
                    return Err(ConfigError::invalid(
                        at("types"),
                        format!(
                            "`{t}` is not a type the edge takes ({})",
                            crate::contract::EXTERNAL_TYPES.join(", ")
                        ),
                    ));
                }
            }
            for id in &sender.ids {
                if let Some(other) = owners.insert(id, name) {
                    return Err(ConfigError::invalid(
                        at("ids"),
                        format!("`{id}` is also a SenderId of `{other}`: a message from it would have two senders"),
                    ));
                }
            }
        }
        for id in &self.ingestion.redrivers {
            if id.is_empty() || id.contains(':') {
                return Err(ConfigError::invalid(
                    "ingestion.redrivers",
                    "list SQS SenderIds, none empty, none with a `:session` part",
                ));
            }
            if let Some(sender) = owners.get(id.as_str()) {
                return Err(ConfigError::invalid(
                    "ingestion.redrivers",
                    format!("`{id}` is also a SenderId of `{sender}`: a redriver is the operator, not an upstream"),
                ));
            }
        }
        Ok(())
    }

    /// `FLEET__…` variables that give a `worker` process started with the shipped config file
    /// this config's names and its runtime settings (visibility timeouts, receive counts, waits,
    /// heartbeats, deadlines, retries, request deadlines): how the tests and the chaos run point
    /// processes at their own tuned copy of the fleet.
    pub fn process_overrides(&self) -> Vec<(String, String)> {
        let mut vars = self.name_overrides();
        for (key, q) in &self.queues {
            let key = key.to_uppercase();
            for (field, value) in [
                (
                    "VISIBILITY_TIMEOUT_SECS",
                    q.visibility_timeout_secs.to_string(),
                ),
                ("MAX_RECEIVE_COUNT", q.max_receive_count.to_string()),
            ] {
                vars.push((format!("{ENV_PREFIX}QUEUES__{key}__{field}"), value));
            }
        }
        for (role, w) in &self.workers {
            let role = role.to_uppercase();
            for (field, value) in [
                (
                    "HEARTBEAT_INTERVAL_SECS",
                    w.heartbeat_interval_secs.to_string(),
                ),
                ("RECEIVE_WAIT_SECS", w.receive_wait_secs.to_string()),
                (
                    "SHUTDOWN_DEADLINE_SECS",
                    w.shutdown_deadline_secs.to_string(),
                ),
                ("MAX_ATTEMPTS", w.max_attempts.to_string()),
                ("BACKOFF_MIN_MS", w.backoff_min_ms.to_string()),
                ("BACKOFF_MAX_SECS", w.backoff_max_secs.to_string()),
                ("HANDLER_DEADLINE_SECS", w.handler_deadline_secs.to_string()),
                (
                    "THROTTLE_PATIENCE_SECS",
                    w.throttle_patience_secs.to_string(),
                ),
            ] {
                vars.push((format!("{ENV_PREFIX}WORKERS__{role}__{field}"), value));
            }
        }
        vars.push((
            format!("{ENV_PREFIX}AWS__ATTEMPT_TIMEOUT_MS"),
            self.aws.attempt_timeout_ms.to_string(),
        ));
        vars.push((
            format!("{ENV_PREFIX}OBSERVABILITY__POLLER_STALE_SECS"),
            self.observability.poller_stale_secs.to_string(),
        ));
        vars
    }

    /// The same fleet with every queue and table name suffixed by `-<suffix>` (before `.fifo`):
    /// an isolated copy for a test or a demo run on shared emulators.
    #[must_use]
    pub fn with_suffix(mut self, suffix: &str) -> Self {
        for q in self.queues.values_mut() {
            q.name = match q.name.strip_suffix(".fifo") {
                Some(stem) => format!("{stem}-{suffix}.fifo"),
                None => format!("{}-{suffix}", q.name),
            };
        }
        for t in self.tables.values_mut() {
            t.name = format!("{}-{suffix}", t.name);
        }
        self
    }

    /// The worker config of a role.
    ///
    /// # Errors
    /// When the role has no `[workers.<role>]` section.
    pub fn worker(&self, role: &str) -> Result<&WorkerConfig, ConfigError> {
        self.workers
            .get(role)
            .ok_or_else(|| ConfigError::invalid(format!("workers.{role}"), "missing section"))
    }

    /// The queue config by logical name.
    ///
    /// # Errors
    /// When there is no `[queues.<name>]` section.
    pub fn queue(&self, name: &str) -> Result<&QueueConfig, ConfigError> {
        self.queues
            .get(name)
            .ok_or_else(|| ConfigError::invalid(format!("queues.{name}"), "missing section"))
    }

    /// The table config by logical name.
    ///
    /// # Errors
    /// When there is no `[tables.<name>]` section.
    pub fn table(&self, name: &str) -> Result<&TableConfig, ConfigError> {
        self.tables
            .get(name)
            .ok_or_else(|| ConfigError::invalid(format!("tables.{name}"), "missing section"))
    }

    /// Checks every cross-field rule the types cannot express.
    ///
    /// # Errors
    /// The first violated rule, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_observability()?;
        self.validate_senders()?;
        self.validate_aws()?;
        self.validate_queues()?;
        self.validate_workers()?;
        self.validate_tables()
    }

    /// Health and tracing: a poller's staleness above what a healthy idle poll can take; an OTLP endpoint that is a local collector.
    fn validate_observability(&self) -> Result<(), ConfigError> {
        let longest_poll_ms = self
            .workers
            .values()
            .map(|w| u64::from(w.receive_wait_secs) * 1000)
            .max()
            .unwrap_or(0);
        // A receive may take its long poll plus a request's deadline, and a failed one is
        // followed by up to 20 s of backoff: a poller is wedged only past all of that.
        let poller_floor_ms = longest_poll_ms + self.aws.attempt_timeout_ms + 20_000;
        if u64::from(self.observability.poller_stale_secs) * 1000 <= poller_floor_ms {
            return Err(ConfigError::invalid(
                "observability.poller_stale_secs",
                format!(
                    "must be above the longest receive_wait_secs + aws.attempt_timeout_ms + 20 s of receive backoff ({} s here), or a healthy idle poller fails /healthz",
                    poller_floor_ms.div_ceil(1000)
                ),
            ));
        }
        if let Some(endpoint) = &self.observability.otlp_endpoint {
            if !endpoint.starts_with("http://") || endpoint.len() <= "http://".len() {
                return Err(ConfigError::invalid(
                    "observability.otlp_endpoint",
                    "must be an http:// URL of the collector (e.g. http://localhost:4318, a sidecar): the exporter speaks OTLP over plain HTTP to a local collector, which forwards over TLS",
                ));
            }
        }
        Ok(())
    }

    /// SQS's size limits (the edge's body within them) and request timeouts.
    fn validate_aws(&self) -> Result<(), ConfigError> {
        if !(1024..=1024 * 1024).contains(&self.aws.sqs_max_message_bytes) {
            return Err(ConfigError::invalid(
                "aws.sqs_max_message_bytes",
                "must be 1024–1048576 (SQS takes messages of at most 1 MiB)",
            ));
        }
        if self.ingestion.max_body_bytes > self.aws.sqs_max_message_bytes {
            return Err(ConfigError::invalid(
                "ingestion.max_body_bytes",
                "must not exceed aws.sqs_max_message_bytes",
            ));
        }
        for (key, value) in [
            ("aws.connect_timeout_ms", self.aws.connect_timeout_ms),
            ("aws.attempt_timeout_ms", self.aws.attempt_timeout_ms),
        ] {
            if !(100..=120_000).contains(&value) {
                return Err(ConfigError::invalid(
                    key.to_owned(),
                    "must be between 100 and 120000 (milliseconds)",
                ));
            }
        }
        if self.ingestion.max_body_bytes == 0 || self.ingestion.max_body_bytes > 256 * 1024 {
            return Err(ConfigError::invalid(
                "ingestion.max_body_bytes",
                "must be 1–262144 (SQS's own limit is 256 KiB)",
            ));
        }
        Ok(())
    }

    /// Queue names, visibility, receive counts and retention.
    fn validate_queues(&self) -> Result<(), ConfigError> {
        for (key, q) in &self.queues {
            let at = |f: &str| format!("queues.{key}.{f}");
            if q.name.is_empty() || q.name.len() > 80 - 4 {
                return Err(ConfigError::invalid(
                    at("name"),
                    "must be 1–76 characters (the DLQ adds `-dlq`)",
                ));
            }
            if !q
                .name
                .trim_end_matches(".fifo")
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::invalid(
                    at("name"),
                    "may hold only letters, digits, `-` and `_`",
                ));
            }
            if q.fifo != q.name.ends_with(".fifo") {
                return Err(ConfigError::invalid(
                    at("name"),
                    "a FIFO queue's name must end in `.fifo`, and only a FIFO queue's",
                ));
            }
            if q.visibility_timeout_secs > MAX_VISIBILITY_TIMEOUT_SECS {
                return Err(ConfigError::invalid(
                    at("visibility_timeout_secs"),
                    "must be at most 43200 (12 hours)",
                ));
            }
            if q.visibility_timeout_secs == 0 {
                return Err(ConfigError::invalid(
                    at("visibility_timeout_secs"),
                    "must be above 0",
                ));
            }
            if !(1..=1000).contains(&q.max_receive_count) {
                return Err(ConfigError::invalid(
                    at("max_receive_count"),
                    "must be 1–1000",
                ));
            }
            for (field, v) in [
                ("retention_secs", q.retention_secs),
                ("dlq_retention_secs", q.dlq_retention_secs),
            ] {
                if !(60..=MAX_RETENTION_SECS).contains(&v) {
                    return Err(ConfigError::invalid(
                        at(field),
                        "must be 60–1209600 (14 days)",
                    ));
                }
            }
            if q.dlq_retention_secs <= q.retention_secs {
                return Err(ConfigError::invalid(at("dlq_retention_secs"), "must be longer than retention_secs, or messages expire in the DLQ before anyone looks"));
            }
        }
        Ok(())
    }

    /// Each worker against its queue: batches, waits, deadlines, heartbeats under the visibility, attempts under the receive count, backoff, the group cap.
    fn validate_workers(&self) -> Result<(), ConfigError> {
        for (role, w) in &self.workers {
            let at = |f: &str| format!("workers.{role}.{f}");
            let q = self.queues.get(&w.queue).ok_or_else(|| {
                ConfigError::invalid(
                    at("queue"),
                    format!("names no queue: there is no [queues.{}]", w.queue),
                )
            })?;
            if !(1..=MAX_BATCH).contains(&w.batch_size) {
                return Err(ConfigError::invalid(at("batch_size"), "must be 1–10"));
            }
            if w.forward_flush_ms > 20_000 {
                return Err(ConfigError::invalid(
                    at("forward_flush_ms"),
                    "must be at most 20000",
                ));
            }
            if w.batch_window_ms > 20_000 {
                return Err(ConfigError::invalid(
                    at("batch_window_ms"),
                    "must be at most 20000 (a long poll's limit)",
                ));
            }
            if w.batch_wait_max_ms > 20_000 {
                return Err(ConfigError::invalid(
                    at("batch_wait_max_ms"),
                    "must be at most 20000 (a long poll's limit)",
                ));
            }
            if let Some(cap) = w.max_in_flight_per_group {
                if cap > w.max_in_flight {
                    return Err(ConfigError::invalid(
                        at("max_in_flight_per_group"),
                        format!("must be at most max_in_flight ({})", w.max_in_flight),
                    ));
                }
                if role == "ingestion" || q.fifo {
                    return Err(ConfigError::invalid(
                        at("max_in_flight_per_group"),
                        "is for standard work queues after the edge: a FIFO queue already runs one message of a group at a time, and the edge cannot send a message again without losing the SenderId that names its upstream",
                    ));
                }
            }
            if w.receive_wait_secs > 20 {
                return Err(ConfigError::invalid(
                    at("receive_wait_secs"),
                    "must be 0–20",
                ));
            }
            if w.handler_deadline_secs == 0 || w.handler_deadline_secs > 43_200 {
                return Err(ConfigError::invalid(
                    at("handler_deadline_secs"),
                    "must be 1–43200 (a message stays invisible at most 12 hours)",
                ));
            }
            if u64::from(w.throttle_patience_secs) > 43_200 {
                return Err(ConfigError::invalid(
                    at("throttle_patience_secs"),
                    "must be at most 43200 (a message stays invisible at most 12 hours)",
                ));
            }
            if w.heartbeat_interval_secs == 0
                || w.heartbeat_interval_secs >= q.visibility_timeout_secs
            {
                return Err(ConfigError::invalid(
                    at("heartbeat_interval_secs"),
                    format!("must be above 0 and below the visibility timeout of queue `{}` ({} s), or jobs are redelivered while they run", w.queue, q.visibility_timeout_secs),
                ));
            }
            if w.max_attempts == 0 || w.max_attempts >= q.max_receive_count {
                return Err(ConfigError::invalid(
                    at("max_attempts"),
                    format!("must be at least 1 and below max_receive_count of queue `{}` ({}), so the worker dead-letters with a reason before SQS does without one", w.queue, q.max_receive_count),
                ));
            }
            if w.backoff_min_ms == 0 || w.backoff_min_ms > w.backoff_max_secs.saturating_mul(1000) {
                return Err(ConfigError::invalid(
                    at("backoff_min_ms"),
                    "must be above 0 and at most backoff_max_secs",
                ));
            }
            if w.backoff_max_secs > u64::from(MAX_VISIBILITY_TIMEOUT_SECS) {
                return Err(ConfigError::invalid(
                    at("backoff_max_secs"),
                    "must be at most 43200 (the longest visibility SQS allows)",
                ));
            }
        }
        Ok(())
    }

    /// Table names.
    fn validate_tables(&self) -> Result<(), ConfigError> {
        for (key, t) in &self.tables {
            if t.name.len() < 3 || t.name.len() > 255 {
                return Err(ConfigError::invalid(
                    format!("tables.{key}.name"),
                    "must be 3–255 characters",
                ));
            }
        }
        Ok(())
    }
}

/// Sets `rest` (`A__B__C`, case-insensitive) in `table` to `raw`.
fn apply_override(
    table: &mut toml::Table,
    var: &str,
    rest: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    if path.iter().any(String::is_empty) {
        return Err(ConfigError::Override {
            var: var.to_owned(),
            message: "empty path segment (use `__` between keys)".to_owned(),
        });
    }
    let value = parse_override_value(raw);
    let (last, parents) = path
        .split_last()
        .expect("split yields at least one segment");
    let mut cursor = table;
    for segment in parents {
        let entry = cursor
            .entry(segment.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cursor = entry.as_table_mut().ok_or_else(|| ConfigError::Override {
            var: var.to_owned(),
            message: format!("`{segment}` is a value, not a section"),
        })?;
    }
    cursor.insert(last.clone(), value);
    Ok(())
}

fn parse_override_value(raw: &str) -> toml::Value {
    // Parse `x = <raw>` so numbers, booleans and arrays keep their type.
    format!("x = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("x"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = include_str!("../../config/fleet.toml");

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<FleetConfig, ConfigError> {
        FleetConfig::from_toml_with_env(
            text,
            Path::new("test.toml"),
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    fn error_text(text: &str, env: &[(&str, &str)]) -> String {
        parse(text, env)
            .expect_err("config must be refused")
            .to_string()
    }

    #[test]
    fn the_shipped_config_is_valid() {
        let config = parse(LOCAL, &[]).expect("config/fleet.toml is valid");
        for role in crate::role::Role::names() {
            config.worker(role).expect("every role is configured");
        }
    }

    #[test]
    fn a_batching_window_beyond_a_long_poll_is_refused() {
        let ok = parse(
            LOCAL,
            &[("FLEET__WORKERS__ORDERS__BATCH_WINDOW_MS", "1000")],
        )
        .expect("1 s is fine");
        assert_eq!(ok.worker("orders").unwrap().batch_window_ms, 1000);
        let message = error_text(
            LOCAL,
            &[("FLEET__WORKERS__ORDERS__BATCH_WINDOW_MS", "60000")],
        );
        assert!(
            message.contains("workers.orders.batch_window_ms"),
            "{message}"
        );
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_path() {
        let text = LOCAL.replacen("[workers.orders]", "[workers.orders]\nmax_inflight = 3", 1);
        let message = error_text(&text, &[]);
        assert!(message.contains("workers.orders"), "{message}");
        assert!(message.contains("max_inflight"), "{message}");
    }

    #[test]
    fn a_redriver_is_the_operator_never_an_upstream() {
        let mut config: FleetConfig = toml::from_str(LOCAL).unwrap();
        config.ingestion.redrivers = vec!["AROAOPERATOR".into()];
        config.validate().unwrap();
        assert!(config.ingestion.is_redriver("AROAOPERATOR:ops-alice"));
        assert!(!config.ingestion.is_redriver("000000000000"));
        config.ingestion.redrivers = vec!["000000000000".into()];
        let e = config.validate().unwrap_err().to_string();
        assert!(
            e.contains("ingestion.redrivers") && e.contains("local"),
            "{e}"
        );
        config.ingestion.redrivers = vec!["AROAOPERATOR:ops-alice".into()];
        assert!(config.validate().is_err(), "a session part");
    }

    #[test]
    fn senders_are_required_unambiguous_and_bound_to_known_types() {
        let production = include_str!("../../config/production.toml");
        let config = parse(production, &[]).expect("config/production.toml is valid");
        assert_eq!(
            config
                .ingestion
                .sender_of("AROACARRIERWEBHOOKROLEID:session-1")
                .map(|(n, _)| n),
            Some("carrier"),
            "a role's id matches any of its sessions"
        );
        assert!(config.ingestion.sender_of("AIDASOMEONE").is_none());
        let none = LOCAL.replace("[ingestion.senders.local]", "[ingestion.unused]");
        let message = error_text(&none, &[]);
        assert!(
            message.contains("ingestion.senders") || message.contains("unused"),
            "{message}"
        );
        let no_senders = LOCAL
            .replace("[ingestion.senders.local]\n", "")
            .replace("ids = [\"000000000000\"]\n", "")
            .replace(
                "types = [\"order.submitted\", \"delivery.status_reported\"]\n",
                "",
            );
        let message = error_text(&no_senders, &[]);
        assert!(message.contains("ingestion.senders"), "{message}");
        let twice = LOCAL.replace(
            "[ingestion.senders.local]",
            "[ingestion.senders.other]\nids = [\"000000000000\"]\ntypes = [\"order.submitted\"]\n\n[ingestion.senders.local]",
        );
        let message = error_text(&twice, &[]);
        assert!(message.contains("two senders"), "{message}");
        let message = error_text(
            LOCAL,
            &[(
                "FLEET__INGESTION__SENDERS__LOCAL__TYPES",
                r#"["refund.requested"]"#,
            )],
        );
        assert!(
            message.contains("ingestion.senders.local.types"),
            "{message}"
        );
    }

    #[test]
    fn zero_concurrency_is_refused_naming_the_key() {
        let message = error_text(LOCAL, &[("FLEET__WORKERS__ORDERS__MAX_IN_FLIGHT", "0")]);
        assert!(
            message.contains("workers.orders.max_in_flight"),
            "{message}"
        );
    }

    #[test]
    fn a_heartbeat_longer_than_the_visibility_timeout_is_refused() {
        let message = error_text(
            LOCAL,
            &[("FLEET__WORKERS__ORDERS__HEARTBEAT_INTERVAL_SECS", "100000")],
        );
        assert!(
            message.contains("workers.orders.heartbeat_interval_secs"),
            "{message}"
        );
        assert!(message.contains("visibility timeout"), "{message}");
    }

    #[test]
    fn max_attempts_must_stay_below_the_redrive_policy() {
        let message = error_text(LOCAL, &[("FLEET__WORKERS__ORDERS__MAX_ATTEMPTS", "99")]);
        assert!(message.contains("workers.orders.max_attempts"), "{message}");
    }

    #[test]
    fn a_dlq_must_keep_messages_longer_than_its_source() {
        let message = error_text(
            LOCAL,
            &[("FLEET__QUEUES__ORDERS__DLQ_RETENTION_SECS", "60")],
        );
        assert!(
            message.contains("queues.orders.dlq_retention_secs"),
            "{message}"
        );
    }

    #[test]
    fn overrides_keep_their_type_and_apply() {
        let config = parse(
            LOCAL,
            &[
                ("FLEET__WORKERS__ORDERS__MAX_IN_FLIGHT", "7"),
                ("FLEET__AWS__REGION", "eu-west-1"),
            ],
        )
        .unwrap();
        assert_eq!(config.worker("orders").unwrap().max_in_flight.get(), 7);
        assert_eq!(config.aws.region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn an_override_of_a_wrong_type_names_the_key() {
        let message = error_text(LOCAL, &[("FLEET__WORKERS__ORDERS__POLLERS", "many")]);
        assert!(message.contains("workers.orders.pollers"), "{message}");
    }

    #[test]
    fn a_worker_on_a_missing_queue_is_refused() {
        let message = error_text(LOCAL, &[("FLEET__WORKERS__ORDERS__QUEUE", "nope")]);
        assert!(
            message.contains("workers.orders.queue") && message.contains("nope"),
            "{message}"
        );
    }

    #[test]
    fn dlq_names_keep_the_fifo_suffix_last() {
        let mut q = parse(LOCAL, &[]).unwrap().queues["orders"].clone();
        q.name = "a.fifo".into();
        assert_eq!(q.dlq_name(), "a-dlq.fifo");
        q.name = "a".into();
        assert_eq!(q.dlq_name(), "a-dlq");
    }
}
