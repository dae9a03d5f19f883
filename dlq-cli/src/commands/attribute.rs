//! `attribute`: why are these messages here? Groups a DLQ by reason, worker, source queue, error
//! class and first-failure time window, with counts and examples. Messages that SQS moved by
//! itself (a crash or a timeout: no attribution) form groups of their own.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::ValueEnum;
use serde::Serialize;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::commands::inspect::guard_reads;
use crate::error::{Exit, Result};
use crate::filter::Filter;
use crate::output::{self, clip, Output};
use crate::queues::{self, Ctx, Queue};
use crate::record::DlqMessage;
use crate::scan::{read_all, Reader};

/// What to group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// The reason code.
    Reason,
    /// The worker role that gave up.
    Worker,
    /// The queue it came from.
    Source,
    /// permanent, attempts_exhausted, queue_redrive.
    Class,
    /// The first-failure time window (`--window`).
    Window,
    /// The build of the worker that gave up (crate version + git revision): a spike after a
    /// release points at the release.
    Version,
    /// The `dlq redrive` run that last moved the message (what a given redrive did).
    Redrive,
}

/// The reason shown for messages without attribution.
pub const UNATTRIBUTED: &str = "(none: moved by SQS)";

/// One group of the report.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupKey {
    /// Reason code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Worker role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Source queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_queue: Option<String>,
    /// Error class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Start of the first-failure window, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_start: Option<String>,
    /// The worker's build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The redrive run that last moved it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redrive: Option<String>,
}

/// An example message of a group.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    /// Message id in the DLQ.
    pub message_id: String,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// The attribution's (redacted) detail.
    pub detail: Option<String>,
}

/// A group with its count and examples.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// What the group shares.
    #[serde(flatten)]
    pub key: GroupKey,
    /// Messages in it.
    pub count: u64,
    /// Up to `--examples` of them.
    pub examples: Vec<Example>,
}

/// Groups messages. `sources` names the source queue(s) of messages without attribution.
pub fn group(
    messages: &[DlqMessage],
    by: &[Dimension],
    window: Duration,
    examples: usize,
    sources: &str,
) -> Vec<Group> {
    let mut groups: BTreeMap<GroupKey, Group> = BTreeMap::new();
    let window_secs = window.as_secs().max(1) as i64;
    for m in messages {
        let a = m.attribution();
        let has = |d| by.contains(&d);
        let first = m.first_failed_at();
        let key = GroupKey {
            reason: has(Dimension::Reason).then(|| {
                a.as_ref()
                    .map_or(UNATTRIBUTED.to_owned(), |a| a.reason.clone())
            }),
            worker: has(Dimension::Worker)
                .then(|| a.as_ref().map_or("-".to_owned(), |a| a.worker.clone())),
            source_queue: has(Dimension::Source).then(|| {
                a.as_ref()
                    .map(|a| a.source_queue.clone())
                    .or_else(|| {
                        m.dead_letter_source_arn()
                            .map(|arn| arn.rsplit(':').next().unwrap_or(arn).to_owned())
                    })
                    .unwrap_or_else(|| sources.to_owned())
            }),
            class: has(Dimension::Class).then(|| {
                a.as_ref()
                    .map_or("queue_redrive".to_owned(), |a| a.class.to_string())
            }),
            window_start: has(Dimension::Window).then(|| {
                first.map_or("-".to_owned(), |t| {
                    let start = t.unix_timestamp().div_euclid(window_secs) * window_secs;
                    OffsetDateTime::from_unix_timestamp(start)
                        .ok()
                        .and_then(|s| {
                            s.format(&time::format_description::well_known::Rfc3339)
                                .ok()
                        })
                        .unwrap_or_else(|| "-".into())
                })
            }),
            version: has(Dimension::Version).then(|| {
                a.as_ref()
                    .and_then(|a| a.version.clone())
                    .unwrap_or_else(|| "-".to_owned())
            }),
            redrive: has(Dimension::Redrive).then(|| {
                m.redrive()
                    .and_then(|r| r.id)
                    .unwrap_or_else(|| "-".to_owned())
            }),
        };
        let g = groups.entry(key.clone()).or_insert_with(|| Group {
            key,
            count: 0,
            examples: Vec::new(),
        });
        g.count += 1;
        if g.examples.len() < examples {
            g.examples.push(Example {
                message_id: m.message_id.clone(),
                correlation_id: m.correlation_id(),
                detail: a.map(|a| a.detail),
            });
        }
    }
    let mut out: Vec<Group> = groups.into_values().collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
    out
}

/// `dlq attribute`: the queue and what to group.
#[derive(Debug, clap::Args)]
pub struct AttributeArgs {
    /// The queue.
    pub queue: String,
    #[command(flatten)]
    pub options: Options,
}

impl AttributeArgs {
    /// Runs `dlq attribute`.
    ///
    /// # Errors
    /// AWS errors; a queue with a redrive policy without `--force`.
    pub async fn run(self, ctx: &Ctx, output: Output, _stop: &CancellationToken) -> Result<Exit> {
        let q = queues::resolve(ctx, &self.queue).await?;
        run(ctx, &q, &self.options, output).await
    }
}

/// What `dlq attribute` groups, and over which messages.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Group by these (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "reason,worker,source,class,window"
    )]
    pub by: Vec<Dimension>,
    /// Width of the first-failure time window.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Examples per group.
    #[arg(long, default_value_t = 3)]
    pub examples: usize,
    /// Read at most this many messages.
    #[arg(long)]
    pub max: Option<usize>,
    /// Read a queue that has a redrive policy.
    #[arg(long)]
    pub force: bool,
    /// Only the messages that pass these.
    #[command(flatten)]
    pub filter: Filter,
}

/// `dlq attribute`.
///
/// # Errors
/// AWS errors.
pub async fn run(ctx: &Ctx, queue: &Queue, opts: &Options, output: Output) -> Result<Exit> {
    let info = guard_reads(ctx, queue, opts.force).await?;
    let bar = output::progress(
        output,
        Some(
            opts.max
                .map_or(info.visible, |m| (m as u64).min(info.visible)),
        ),
        "reading",
    );
    let mut reader = Reader::new(ctx, queue, Duration::from_secs(60));
    let stop = CancellationToken::new();
    let read = read_all(ctx, &mut reader, opts.max, &stop, |_| bar.inc(1)).await;
    reader.finish().await;
    bar.finish_and_clear();
    let now = OffsetDateTime::now_utc();
    let messages: Vec<DlqMessage> = read?
        .into_iter()
        .filter(|m| opts.filter.matches(m, now))
        .collect();
    let sources = if messages
        .iter()
        .any(|m| m.attribution().is_none() && m.dead_letter_source_arn().is_none())
    {
        let account = queues::account(ctx, None).await?;
        queues::sources_by_dlq(&account)
            .get(&info.arn)
            .map_or("-".to_owned(), |s| s.join(", "))
    } else {
        String::new()
    };
    let by = &opts.by;
    let groups = group(&messages, by, opts.window, opts.examples, &sources);
    match output {
        Output::Json => output::json(
            &serde_json::json!({ "queue": queue.name, "messages": messages.len(), "groups": groups }),
        ),
        Output::Table => {
            crate::outln!("{}", groups_table(by, &groups));
            eprintln!(
                "{} messages in {} groups; every message read is visible again.",
                messages.len(),
                groups.len()
            );
        }
    }
    Ok(Exit::Ok)
}

/// The groups as a table: a column per dimension, the count, and examples.
fn groups_table(by: &[Dimension], groups: &[Group]) -> comfy_table::Table {
    let header: Vec<&str> = by
        .iter()
        .map(|d| match d {
            Dimension::Reason => "reason",
            Dimension::Worker => "worker",
            Dimension::Source => "source queue",
            Dimension::Class => "class",
            Dimension::Window => "first failed in",
            Dimension::Version => "worker version",
            Dimension::Redrive => "redrive",
        })
        .chain(["count", "examples (message id / correlation id)"])
        .collect();
    let rows = groups.iter().map(|g| {
        let mut row: Vec<String> = [
            &g.key.reason,
            &g.key.worker,
            &g.key.source_queue,
            &g.key.class,
            &g.key.window_start,
            &g.key.version,
            &g.key.redrive,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        row.push(g.count.to_string());
        row.push(
            g.examples
                .iter()
                .map(|e| {
                    format!(
                        "{} / {}",
                        clip(&e.message_id, 12),
                        e.correlation_id.as_deref().unwrap_or("-")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
        );
        row
    });
    output::table(&header, rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{attribution, message};
    use fleet_common::failure::FailureClass;

    #[test]
    fn three_kinds_of_failure_make_three_groups_with_their_counts() {
        let malformed = attribution("malformed_body", "ingestion", FailureClass::Permanent);
        let exhausted = attribution(
            "dependency_unavailable",
            "orders",
            FailureClass::AttemptsExhausted,
        );
        let mut messages = Vec::new();
        for i in 0..5 {
            messages.push(message(&format!("a{i}"), "{}", Some(&malformed)));
        }
        for i in 0..3 {
            messages.push(message(&format!("b{i}"), "{}", Some(&exhausted)));
        }
        messages.push(message("c0", "{}", None));
        let all = [
            Dimension::Reason,
            Dimension::Worker,
            Dimension::Source,
            Dimension::Class,
            Dimension::Window,
        ];
        let groups = group(
            &messages,
            &all,
            Duration::from_secs(3600),
            2,
            "fleet-orders",
        );
        let counts: Vec<(Option<String>, u64)> = groups
            .iter()
            .map(|g| (g.key.reason.clone(), g.count))
            .collect();
        assert_eq!(
            counts,
            vec![
                (Some("malformed_body".into()), 5),
                (Some("dependency_unavailable".into()), 3),
                (Some(UNATTRIBUTED.into()), 1)
            ]
        );
        assert_eq!(groups[0].examples.len(), 2);
        let moved = &groups[2].key;
        assert_eq!(moved.class.as_deref(), Some("queue_redrive"));
        assert_eq!(moved.source_queue.as_deref(), Some("fleet-orders"));
        assert_eq!(
            groups[0].key.window_start.as_deref(),
            Some("2026-11-20T10:00:00Z")
        );
    }

    #[test]
    fn grouping_by_fewer_dimensions_merges_groups() {
        let a = attribution("malformed_body", "ingestion", FailureClass::Permanent);
        let b = attribution("conflict", "ingestion", FailureClass::Permanent);
        let messages = vec![message("a", "{}", Some(&a)), message("b", "{}", Some(&b))];
        let groups = group(
            &messages,
            &[Dimension::Worker],
            Duration::from_secs(60),
            3,
            "-",
        );
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].count, 2);
        assert_eq!(groups[0].key.reason, None);
    }
}
