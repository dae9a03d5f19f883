//! The redrive ledger: what became of each message a `dlq redrive` run moved.
//!
//! A run opens its entry (`<run id>`, `#run`) before it moves anything. Every worker that settles
//! a message carrying that run's `fleet-redrive` record then writes the message's latest outcome
//! under the run (`<run id>`, `<message id>`): succeeded, retrying (with the reason), or
//! dead-lettered again (with the reason). A later outcome overwrites an earlier one, so the run's
//! entries say what each message it moved has become: what succeeded downstream, what came back
//! to the DLQ and why, what is still in flight. `dlq redrive --canary` decides on them.
//!
//! A worker writes only under a run whose entry exists (a strongly consistent look, remembered
//! for a minute, or five seconds when the run was not found): a record naming no open run
//! writes nothing. The `dlq` CLI counts only the entries of
//! the messages it sent itself (the ids SQS gave them), so a record forged at the edge with a
//! live run's id, or an old record carried back by an import, cannot change a run's verdict.
//! Each outcome is its own item, written with a plain PutItem: no transaction that concurrent
//! workers would conflict on. Entries expire after [`RETENTION`] (the table's TTL). Writing is
//! best effort: a failed write is logged and counted, never a reason to retry or dead-letter the
//! message.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use serde::Serialize;
use time::OffsetDateTime;

use crate::config::{ConfigError, FleetConfig};

/// The config key of the ledger's table (`[tables.redrives]`).
pub const TABLE_KEY: &str = "redrives";

/// The sort key of a run's own entry.
pub const RUN_ENTRY: &str = "#run";

/// How long entries are kept: longer than a DLQ keeps a message (14 days).
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long a worker waits for its write before going on without it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What became of a redriven message, as far as one worker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Its effect is done and it was acknowledged.
    Succeeded,
    /// It failed and waits for another attempt.
    Retrying {
        /// Why it failed (a reason code).
        reason: &'a str,
    },
    /// It was dead-lettered again.
    DeadLettered {
        /// Why (a reason code).
        reason: &'a str,
    },
}

impl Outcome<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Retrying { .. } => "retrying",
            Self::DeadLettered { .. } => "dead_lettered",
        }
    }

    fn reason(&self) -> Option<&str> {
        match self {
            Self::Succeeded => None,
            Self::Retrying { reason } | Self::DeadLettered { reason } => Some(reason),
        }
    }
}

/// What a run's messages have become, read from the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunOutcomes {
    /// Messages whose effect is done.
    pub succeeded: u64,
    /// Messages that failed at least once and wait for another attempt.
    pub retrying: u64,
    /// Messages dead-lettered again.
    pub dead_lettered: u64,
    /// Of those, by reason.
    pub dead_lettered_reasons: BTreeMap<String, u64>,
    /// Messages retrying, by the reason of their last failure.
    pub retrying_reasons: BTreeMap<String, u64>,
}

impl RunOutcomes {
    /// Messages whose fate is known for good: succeeded or dead-lettered again.
    pub fn settled(&self) -> u64 {
        self.succeeded + self.dead_lettered
    }

    /// Messages with any outcome: settled, or retrying.
    pub fn known(&self) -> u64 {
        self.settled() + self.retrying
    }

    /// The counts of some entries.
    pub fn of<'e>(entries: impl IntoIterator<Item = &'e Entry>) -> Self {
        let mut outcomes = Self::default();
        for e in entries {
            outcomes.add(&e.outcome, e.reason.clone());
        }
        outcomes
    }

    fn add(&mut self, outcome: &str, reason: Option<String>) {
        let reason = reason.unwrap_or_else(|| "none".to_owned());
        match outcome {
            "succeeded" => self.succeeded += 1,
            "retrying" => {
                self.retrying += 1;
                *self.retrying_reasons.entry(reason).or_default() += 1;
            }
            "dead_lettered" => {
                self.dead_lettered += 1;
                *self.dead_lettered_reasons.entry(reason).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// Why a ledger call failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The run has no open entry: a forged or expired record (nothing was written).
    #[error("the ledger has no open redrive run `{0}`")]
    UnknownRun(String),
    /// The run id was opened before (ids are unique per run).
    #[error("the redrive run `{0}` is already in the ledger")]
    RunExists(String),
    /// DynamoDB refused or could not be reached.
    #[error("redrive ledger: {0}")]
    Aws(String),
}

/// The ledger table, as the workers and the `dlq` CLI use it.
#[derive(Debug, Clone)]
pub struct Ledger {
    client: aws_sdk_dynamodb::Client,
    table: String,
    partition_key: String,
    sort_key: String,
    ttl_attribute: Option<String>,
    /// Runs looked up, whether open, and when.
    open_runs: Arc<Mutex<HashMap<String, (bool, std::time::Instant)>>>,
}

/// How long a worker trusts what it learned about a run being open.
pub const OPEN_RUN_MEMORY: Duration = Duration::from_secs(60);

/// How long a worker trusts that a run is not open.
pub const CLOSED_RUN_MEMORY: Duration = Duration::from_secs(5);

/// The most runs a worker remembers (forgotten all at once beyond).
const OPEN_RUNS_REMEMBERED: usize = 256;

impl Ledger {
    /// The ledger of `config`; `None` when it has no `[tables.redrives]`.
    ///
    /// # Errors
    /// A `[tables.redrives]` without a sort key.
    pub fn from_config(
        client: aws_sdk_dynamodb::Client,
        config: &FleetConfig,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(table) = config.tables.get(TABLE_KEY) else {
            return Ok(None);
        };
        let sort_key = table.sort_key.clone().ok_or_else(|| {
            ConfigError::invalid(
                format!("tables.{TABLE_KEY}.sort_key"),
                "the redrive ledger needs a sort key (the message id under the run): add sort_key = \"message\"",
            )
        })?;
        Ok(Some(Self {
            client,
            table: table.name.clone(),
            partition_key: table.partition_key.clone(),
            sort_key,
            ttl_attribute: table.ttl_attribute.clone(),
            open_runs: Arc::default(),
        }))
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn key(&self, run: &str, entry: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([
            (
                self.partition_key.clone(),
                AttributeValue::S(run.to_owned()),
            ),
            (self.sort_key.clone(), AttributeValue::S(entry.to_owned())),
        ])
    }

    fn item(
        &self,
        run: &str,
        entry: &str,
        now: OffsetDateTime,
        fields: impl IntoIterator<Item = (&'static str, String)>,
    ) -> HashMap<String, AttributeValue> {
        let mut item = self.key(run, entry);
        if let Some(ttl) = &self.ttl_attribute {
            let expires = now + RETENTION;
            item.insert(
                ttl.clone(),
                AttributeValue::N(expires.unix_timestamp().to_string()),
            );
        }
        item.insert(
            "at".to_owned(),
            AttributeValue::S(now.unix_timestamp().to_string()),
        );
        for (k, v) in fields {
            item.insert(k.to_owned(), AttributeValue::S(v));
        }
        item
    }

    /// Opens a run's entry, before the run moves anything.
    ///
    /// # Errors
    /// The run exists already, or DynamoDB refused.
    pub async fn open_run(
        &self,
        run: &str,
        queue: &str,
        now: OffsetDateTime,
    ) -> Result<(), LedgerError> {
        let item = self.item(run, RUN_ENTRY, now, [("queue", queue.to_owned())]);
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", &self.partition_key)
            .send()
            .await
            .map_err(|e| {
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception())
                {
                    LedgerError::RunExists(run.to_owned())
                } else {
                    LedgerError::Aws(crate::sdk_error_message(&e))
                }
            })?;
        Ok(())
    }

    /// Whether a run has an open entry: asked once, then remembered for [`OPEN_RUN_MEMORY`].
    async fn is_open(&self, run: &str) -> Result<bool, LedgerError> {
        let now = std::time::Instant::now();
        if let Some((open, at)) = self.open_runs.lock().expect("open runs").get(run) {
            // A run found closed is asked again soon: it may have opened a moment later.
            let memory = if *open {
                OPEN_RUN_MEMORY
            } else {
                CLOSED_RUN_MEMORY
            };
            if now.duration_since(*at) < memory {
                return Ok(*open);
            }
        }
        let found = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key(run, RUN_ENTRY)))
            .consistent_read(true)
            .projection_expression("#pk")
            .expression_attribute_names("#pk", &self.partition_key)
            .send()
            .await
            .map_err(|e| LedgerError::Aws(crate::sdk_error_message(&e)))?
            .item()
            .is_some();
        let mut runs = self.open_runs.lock().expect("open runs");
        if runs.len() >= OPEN_RUNS_REMEMBERED {
            runs.clear();
        }
        runs.insert(run.to_owned(), (found, now));
        Ok(found)
    }

    /// Writes a message's latest outcome under its run, if the run is open.
    ///
    /// # Errors
    /// The run is not open (nothing written), or DynamoDB refused.
    pub async fn record(
        &self,
        run: &str,
        message_id: &str,
        outcome: Outcome<'_>,
        now: OffsetDateTime,
    ) -> Result<(), LedgerError> {
        if !self.is_open(run).await? {
            return Err(LedgerError::UnknownRun(run.to_owned()));
        }
        let mut fields = vec![("outcome", outcome.name().to_owned())];
        if let Some(reason) = outcome.reason() {
            fields.push(("reason", reason.to_owned()));
        }
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(self.item(run, message_id, now, fields)))
            .send()
            .await
            .map_err(|e| LedgerError::Aws(crate::sdk_error_message(&e)))?;
        Ok(())
    }

    /// The latest outcome of each message written under a run, by message id.
    ///
    /// # Errors
    /// DynamoDB refused.
    pub async fn entries(&self, run: &str) -> Result<BTreeMap<String, Entry>, LedgerError> {
        let mut entries = BTreeMap::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :run")
                .expression_attribute_names("#pk", &self.partition_key)
                .expression_attribute_values(":run", AttributeValue::S(run.to_owned()))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| LedgerError::Aws(crate::sdk_error_message(&e)))?;
            for item in page.items() {
                let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
                let (Some(message), Some(outcome)) = (text(&self.sort_key), text("outcome")) else {
                    continue;
                };
                if message != RUN_ENTRY {
                    let reason = text("reason");
                    entries.insert(message, Entry { outcome, reason });
                }
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(entries),
            }
        }
    }

    /// What a run's messages have become so far (all entries under it).
    ///
    /// # Errors
    /// DynamoDB refused.
    pub async fn read(&self, run: &str) -> Result<RunOutcomes, LedgerError> {
        Ok(RunOutcomes::of(self.entries(run).await?.values()))
    }
}

/// One message's latest outcome in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `succeeded`, `retrying` or `dead_lettered`.
    pub outcome: String,
    /// Why, for a failure.
    pub reason: Option<String>,
}

impl Entry {
    /// An entry for a message SQS moved to the DLQ by itself (its receives ran out), whatever
    /// the workers last wrote about it.
    pub fn moved_by_sqs() -> Self {
        Self {
            outcome: "dead_lettered".into(),
            reason: Some("moved_by_sqs".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_count_the_settled_and_their_rate() {
        let mut o = RunOutcomes::default();
        assert_eq!(o.known(), 0);
        o.add("succeeded", None);
        o.add("succeeded", None);
        o.add("succeeded", None);
        o.add("dead_lettered", Some("unknown_product".into()));
        o.add("retrying", Some("dependency_unavailable".into()));
        o.add("something_new", None);
        assert_eq!(o.settled(), 4);
        assert_eq!(o.known(), 5, "the unknown outcome is not counted");
        assert_eq!(o.dead_lettered_reasons["unknown_product"], 1);
        assert_eq!(o.retrying_reasons["dependency_unavailable"], 1);
    }

    fn ledger(client: aws_sdk_dynamodb::Client) -> Ledger {
        Ledger {
            client,
            table: "fleet-redrives".into(),
            partition_key: "run".into(),
            sort_key: "message".into(),
            ttl_attribute: Some("expires_at".into()),
            open_runs: Arc::default(),
        }
    }

    #[tokio::test]
    async fn an_outcome_is_written_only_under_an_open_run_which_is_looked_up_once() {
        use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
        use aws_sdk_dynamodb::operation::put_item::PutItemOutput;
        use aws_smithy_mocks::{mock, mock_client, RuleMode};

        let open = mock!(aws_sdk_dynamodb::Client::get_item)
            .match_requests(|r| {
                r.key().unwrap()["run"].as_s().unwrap() == "run-1"
                    && r.consistent_read() == Some(true)
            })
            .then_output(|| {
                GetItemOutput::builder()
                    .item("run", AttributeValue::S("run-1".into()))
                    .build()
            });
        let unknown = mock!(aws_sdk_dynamodb::Client::get_item)
            .match_requests(|r| r.key().unwrap()["run"].as_s().unwrap() != "run-1")
            .then_output(|| GetItemOutput::builder().build());
        let written = mock!(aws_sdk_dynamodb::Client::put_item)
            .match_requests(|r| {
                let item = r.item().unwrap();
                item["run"].as_s().unwrap() == "run-1"
                    && item["message"].as_s().unwrap().starts_with("m-")
                    && item["outcome"].as_s().unwrap() == "dead_lettered"
                    && item["reason"].as_s().unwrap() == "unknown_product"
                    && item.contains_key("expires_at")
                    && r.condition_expression().is_none()
            })
            .then_output(|| PutItemOutput::builder().build());
        let client = mock_client!(
            aws_sdk_dynamodb,
            RuleMode::MatchAny,
            [&open, &unknown, &written]
        );
        let ledger = ledger(client);
        let outcome = Outcome::DeadLettered {
            reason: "unknown_product",
        };
        for m in ["m-1", "m-2", "m-3"] {
            ledger
                .record("run-1", m, outcome, OffsetDateTime::now_utc())
                .await
                .unwrap();
        }
        assert_eq!(written.num_calls(), 3);
        assert_eq!(
            open.num_calls(),
            1,
            "the run is looked up once, then remembered"
        );
        for _ in 0..2 {
            let e = ledger
                .record(
                    "forged",
                    "m-9",
                    Outcome::Succeeded,
                    OffsetDateTime::now_utc(),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(e, LedgerError::UnknownRun(ref run) if run == "forged"),
                "{e}"
            );
        }
        assert_eq!(
            unknown.num_calls(),
            1,
            "a run found closed is remembered too"
        );
        assert_eq!(written.num_calls(), 3, "nothing written under it");
    }

    #[tokio::test]
    async fn a_failed_write_is_an_error_the_caller_logs_not_a_forgery() {
        use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
        use aws_sdk_dynamodb::operation::put_item::PutItemError;
        use aws_sdk_dynamodb::types::error::ProvisionedThroughputExceededException;
        use aws_smithy_mocks::{mock, mock_client, RuleMode};

        let open = mock!(aws_sdk_dynamodb::Client::get_item).then_output(|| {
            GetItemOutput::builder()
                .item("run", AttributeValue::S("run-1".into()))
                .build()
        });
        let throttled = mock!(aws_sdk_dynamodb::Client::put_item).then_error(|| {
            PutItemError::ProvisionedThroughputExceededException(
                ProvisionedThroughputExceededException::builder()
                    .message("slow down")
                    .build(),
            )
        });
        let client = mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&open, &throttled]);
        let e = ledger(client)
            .record(
                "run-1",
                "m-1",
                Outcome::Succeeded,
                OffsetDateTime::now_utc(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, LedgerError::Aws(_)),
            "throttling is no forgery: {e}"
        );
    }

    #[tokio::test]
    async fn a_run_read_over_pages_counts_each_message_once_and_skips_its_own_entry() {
        use aws_sdk_dynamodb::operation::query::QueryOutput;
        use aws_smithy_mocks::{mock, mock_client, RuleMode};

        let entry = |message: &str, outcome: &str, reason: Option<&str>| {
            let mut item = HashMap::from([
                ("run".to_owned(), AttributeValue::S("run-1".into())),
                ("message".to_owned(), AttributeValue::S(message.into())),
                ("outcome".to_owned(), AttributeValue::S(outcome.into())),
            ]);
            if let Some(r) = reason {
                item.insert("reason".into(), AttributeValue::S(r.into()));
            }
            item
        };
        let first = mock!(aws_sdk_dynamodb::Client::query)
            .match_requests(|r| r.exclusive_start_key().is_none())
            .then_output(move || {
                QueryOutput::builder()
                    .items(HashMap::from([
                        ("run".to_owned(), AttributeValue::S("run-1".into())),
                        ("message".to_owned(), AttributeValue::S(RUN_ENTRY.into())),
                    ]))
                    .items(entry("a", "succeeded", None))
                    .items(entry("b", "retrying", Some("dependency_unavailable")))
                    .last_evaluated_key("run", AttributeValue::S("run-1".into()))
                    .last_evaluated_key("message", AttributeValue::S("b".into()))
                    .build()
            });
        let second = mock!(aws_sdk_dynamodb::Client::query)
            .match_requests(|r| r.exclusive_start_key().is_some())
            .then_output(move || {
                QueryOutput::builder()
                    .items(entry("c", "dead_lettered", Some("unknown_product")))
                    .items(entry("d", "succeeded", None))
                    .build()
            });
        let client = mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&first, &second]);
        let o = ledger(client).read("run-1").await.unwrap();
        assert_eq!((o.succeeded, o.retrying, o.dead_lettered), (2, 1, 1));
        assert_eq!(o.dead_lettered_reasons["unknown_product"], 1);
        assert_eq!((first.num_calls(), second.num_calls()), (1, 1));
    }

    #[test]
    fn the_ledger_needs_a_sort_key() {
        let mut config = FleetConfig::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/fleet.toml"
        )))
        .unwrap();
        let client = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::Config::builder()
                .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                .build(),
        );
        let ledger = Ledger::from_config(client.clone(), &config)
            .unwrap()
            .unwrap();
        assert_eq!(ledger.table(), "fleet-redrives");
        config.tables.get_mut(TABLE_KEY).unwrap().sort_key = None;
        let e = Ledger::from_config(client.clone(), &config).unwrap_err();
        assert!(e.to_string().contains("sort_key"), "{e}");
        config.tables.remove(TABLE_KEY);
        assert!(Ledger::from_config(client, &config).unwrap().is_none());
    }
}
