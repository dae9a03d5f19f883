//! `list`, `peek` and `show`: what is in the DLQs, without consuming anything.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::error::{CliError, Exit, Result};
use crate::filter::Filter;
use crate::output::{self, clip, redact_body, Output};
use crate::queues::{self, Ctx, Queue, QueueInfo};
use crate::record::DlqMessage;
use crate::scan::{read_all, scan, Reader};

/// `dlq list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only queues whose name starts with this.
    #[arg(long)]
    pub prefix: Option<String>,
}

impl ListArgs {
    /// Runs `dlq list`.
    ///
    /// # Errors
    /// AWS errors.
    pub async fn run(self, ctx: &Ctx, output: Output, _stop: &CancellationToken) -> Result<Exit> {
        list(ctx, self.prefix.as_deref(), output).await
    }
}

/// `dlq peek`.
#[derive(Debug, clap::Args)]
pub struct PeekArgs {
    /// The queue.
    pub queue: String,
    /// Show at most this many (matching) messages.
    #[arg(long, default_value_t = 10)]
    pub max: usize,
    /// Show bodies as they are (they can hold personal data).
    #[arg(long)]
    pub reveal: bool,
    /// Read a queue that has a redrive policy.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub filter: Filter,
}

impl PeekArgs {
    /// Runs `dlq peek`.
    ///
    /// # Errors
    /// AWS errors; a queue with a redrive policy without `--force`.
    pub async fn run(self, ctx: &Ctx, output: Output, _stop: &CancellationToken) -> Result<Exit> {
        let q = queues::resolve(ctx, &self.queue).await?;
        peek(
            ctx,
            &q,
            self.max,
            &self.filter,
            self.reveal,
            self.force,
            output,
        )
        .await
    }
}

/// `dlq show`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The queue.
    pub queue: String,
    /// Its message id.
    pub message_id: String,
    /// Show the body as it is.
    #[arg(long)]
    pub reveal: bool,
    /// Read a queue that has a redrive policy.
    #[arg(long)]
    pub force: bool,
}

impl ShowArgs {
    /// Runs `dlq show`.
    ///
    /// # Errors
    /// AWS errors; a message that is not there.
    pub async fn run(self, ctx: &Ctx, output: Output, _stop: &CancellationToken) -> Result<Exit> {
        let q = queues::resolve(ctx, &self.queue).await?;
        show(ctx, &q, &self.message_id, self.reveal, self.force, output).await
    }
}

/// One DLQ in `list`.
#[derive(Debug, Serialize)]
pub struct DlqRow {
    /// Its name (also when it is missing).
    pub name: String,
    /// Whether it exists.
    pub exists: bool,
    /// Its URL, ARN and depths, when it exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueInfo>,
    /// Age of the oldest message in seconds, when known.
    pub oldest_age_secs: Option<f64>,
    /// Where that age comes from: `cloudwatch`, `sample` (the oldest of up to ten messages
    /// read and released at once, on the emulators) or `none`.
    pub age_source: &'static str,
    /// The queues whose redrive policy targets it.
    pub sources: Vec<String>,
    /// Named by the fleet config.
    pub configured: bool,
}

/// `dlq list`.
///
/// # Errors
/// AWS errors.
pub async fn list(ctx: &Ctx, prefix: Option<&str>, output: Output) -> Result<Exit> {
    let account = queues::account(ctx, prefix).await?;
    let sources = queues::sources_by_dlq(&account);
    let configured: BTreeSet<String> = ctx
        .config
        .iter()
        .flat_map(|c| c.queues.values().map(|q| q.dlq_name()))
        .collect();
    let mut names: BTreeSet<String> = configured.clone();
    for q in &account {
        if sources.contains_key(&q.arn)
            || q.queue.name.ends_with("-dlq")
            || q.queue.name.ends_with("-dlq.fifo")
        {
            names.insert(q.queue.name.clone());
        }
    }
    let now = OffsetDateTime::now_utc();
    let mut rows = Vec::new();
    for name in names {
        let info = account.iter().find(|q| q.queue.name == name).cloned();
        let (oldest_age_secs, age_source) = match &info {
            Some(i) => oldest_age(ctx, i, now).await?,
            None => (None, "none"),
        };
        rows.push(DlqRow {
            sources: info
                .as_ref()
                .and_then(|i| sources.get(&i.arn))
                .cloned()
                .unwrap_or_default(),
            configured: configured.contains(&name),
            name,
            exists: info.is_some(),
            queue: info,
            oldest_age_secs,
            age_source,
        });
    }
    match output {
        Output::Json => output::json(&rows),
        Output::Table => {
            let table = output::table(
                &["DLQ", "depth", "in flight", "oldest", "sources"],
                rows.iter().map(|r| match &r.queue {
                    Some(i) => vec![
                        r.name.clone(),
                        i.visible.to_string(),
                        i.in_flight.to_string(),
                        r.oldest_age_secs.map_or("-".into(), |s| {
                            format!(
                                "{}{}",
                                human_age(s),
                                if r.age_source == "sample" {
                                    " (sampled)"
                                } else {
                                    ""
                                }
                            )
                        }),
                        if r.sources.is_empty() {
                            "-".into()
                        } else {
                            r.sources.join(", ")
                        },
                    ],
                    None => vec![
                        r.name.clone(),
                        "missing".into(),
                        "-".into(),
                        "-".into(),
                        "configured but not found: run `worker provision` (local) or deploy".into(),
                    ],
                }),
            );
            crate::outln!("{table}");
        }
    }
    Ok(Exit::Ok)
}

async fn oldest_age(
    ctx: &Ctx,
    info: &QueueInfo,
    now: OffsetDateTime,
) -> Result<(Option<f64>, &'static str)> {
    if info.visible == 0 && info.in_flight == 0 {
        return Ok((None, "none"));
    }
    if let Some(cw) = &ctx.cloudwatch {
        return Ok((
            queues::oldest_age_from_cloudwatch(cw, &info.queue.name, now).await?,
            "cloudwatch",
        ));
    }
    // No CloudWatch (the emulators): sample a batch, unless reading could move messages on.
    if info.redrive_policy.is_some() || info.visible == 0 {
        return Ok((None, "none"));
    }
    let mut reader = Reader::new(ctx, &info.queue, Duration::from_secs(5));
    let sample = reader.next(10).await;
    reader.finish().await;
    let oldest = sample?.iter().filter_map(DlqMessage::sent_at).min();
    Ok((
        oldest.map(|t| (now - t).as_seconds_f64().max(0.0)),
        "sample",
    ))
}

/// `3d4h`, `12m`, `40s`.
pub fn human_age(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Refuses to read a queue that has a redrive policy: every read counts as a receive, and
/// enough of them would move its messages to its DLQ.
///
/// # Errors
/// When the queue has a redrive policy and `force` is not set.
pub async fn guard_reads(ctx: &Ctx, queue: &Queue, force: bool) -> Result<QueueInfo> {
    let info = queues::info(ctx, queue).await?;
    if let Some(p) = &info.redrive_policy {
        if !force {
            return Err(CliError::Usage(format!(
                "`{}` has a redrive policy (maxReceiveCount {}): reading it counts as receives and can move its messages to its DLQ; pass --force to read it anyway",
                queue.name, p.max_receive_count
            )));
        }
    }
    Ok(info)
}

/// A message for JSON output: the record plus what the CLI reads out of it.
#[derive(Debug, Serialize)]
pub struct Shown {
    /// The message (body redacted unless revealed).
    #[serde(flatten)]
    pub message: DlqMessage,
    /// The correlation id.
    pub correlation_id: Option<String>,
    /// The fleet's attribution, parsed, when it explains this stay in the queue.
    pub attribution: Option<fleet_common::attribution::Attribution>,
    /// An attribution carried from an earlier stay in a DLQ (the message left and came back by
    /// SQS's redrive policy): why it failed before, not why it is here now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_attribution: Option<fleet_common::attribution::Attribution>,
    /// The last redrive, parsed.
    pub redrive: Option<fleet_common::attribution::RedriveRecord>,
    /// Whether the body is shown as it is.
    pub revealed: bool,
}

fn shown(m: &DlqMessage, reveal: bool) -> Shown {
    let mut message = m.clone();
    if !reveal {
        message.body = redact_body(&m.body);
    }
    Shown {
        correlation_id: m.correlation_id(),
        attribution: m.attribution(),
        stale_attribution: m.stale_attribution(),
        redrive: m.redrive(),
        message,
        revealed: reveal,
    }
}

/// `dlq peek`.
///
/// # Errors
/// AWS errors; a queue with a redrive policy without `--force`.
pub async fn peek(
    ctx: &Ctx,
    queue: &Queue,
    max: usize,
    filter: &Filter,
    reveal: bool,
    force: bool,
    output: Output,
) -> Result<Exit> {
    let info = guard_reads(ctx, queue, force).await?;
    let mut reader = Reader::new(ctx, queue, Duration::from_secs(30));
    let found = read_matching(ctx, &mut reader, filter, max).await;
    reader.finish().await;
    let (matched, read) = found?;
    match output {
        Output::Json => output::json(&serde_json::json!({
            "queue": queue.name,
            "depth": info.visible,
            "read": read,
            "messages": matched.iter().map(|m| shown(m, reveal)).collect::<Vec<_>>(),
        })),
        Output::Table => {
            crate::outln!("{}", peek_table(&matched, reveal));
            eprintln!(
                "{} of {} read shown; every message read is visible again.{}",
                matched.len(),
                read,
                if reveal {
                    ""
                } else {
                    " Bodies are redacted: --reveal shows them."
                }
            );
        }
    }
    Ok(Exit::Ok)
}

/// Reads until `max` messages pass `filter` or nothing more can be read: those, and how many
/// were read.
async fn read_matching(
    ctx: &Ctx,
    reader: &mut Reader,
    filter: &Filter,
    max: usize,
) -> Result<(Vec<DlqMessage>, usize)> {
    let now = OffsetDateTime::now_utc();
    let stop = CancellationToken::new();
    let (mut matched, mut read) = (Vec::new(), 0);
    loop {
        let batch = read_all(ctx, reader, Some(10), &stop, |_| {}).await?;
        if batch.is_empty() {
            return Ok((matched, read));
        }
        read += batch.len();
        matched.extend(batch.into_iter().filter(|m| filter.matches(m, now)));
        if matched.len() >= max {
            matched.truncate(max);
            return Ok((matched, read));
        }
    }
}

/// The messages `peek` shows, as a table; bodies redacted unless `reveal`.
fn peek_table(matched: &[DlqMessage], reveal: bool) -> comfy_table::Table {
    let rows = matched.iter().map(|m| {
        let a = m.attribution();
        vec![
            m.message_id.clone(),
            m.sent_at().map_or("-".into(), |t| t.to_string()),
            m.receive_count().map_or("-".into(), |n| n.to_string()),
            m.correlation_id().unwrap_or_else(|| "-".into()),
            a.as_ref().map_or("(moved by SQS)".into(), |a| {
                format!("{} / {}", a.reason, a.worker)
            }),
            clip(
                &if reveal {
                    m.body.clone()
                } else {
                    redact_body(&m.body)
                },
                80,
            ),
        ]
    });
    output::table(
        &[
            "message id",
            "sent",
            "receives",
            "correlation id",
            "reason / worker",
            "body",
        ],
        rows,
    )
}

/// `dlq show`.
///
/// # Errors
/// AWS errors; the message is not found.
pub async fn show(
    ctx: &Ctx,
    queue: &Queue,
    message_id: &str,
    reveal: bool,
    force: bool,
    output: Output,
) -> Result<Exit> {
    guard_reads(ctx, queue, force).await?;
    let mut reader = Reader::new(ctx, queue, Duration::from_secs(30));
    let mut found = None;
    let stop = CancellationToken::new();
    // Only the message asked for is kept: the others are held (receipts only) until the end.
    let result = scan(ctx, &mut reader, None, &stop, |m| {
        if m.message_id == message_id {
            found = Some(m);
            stop.cancel();
        }
    })
    .await;
    reader.finish().await;
    result?;
    let Some(m) = found else {
        return Err(CliError::Usage(format!(
            "message `{message_id}` is not in `{}` (or is in flight elsewhere)",
            queue.name
        )));
    };
    let s = shown(&m, reveal);
    match output {
        Output::Json => output::json(&s),
        Output::Table => {
            let mut rows: Vec<Vec<String>> = vec![
                vec!["message id".into(), m.message_id.clone()],
                vec![
                    "correlation id".into(),
                    s.correlation_id.clone().unwrap_or_else(|| "-".into()),
                ],
            ];
            for (k, v) in &m.system_attributes {
                rows.push(vec![k.clone(), v.clone()]);
            }
            for (k, v) in &m.attributes {
                let value = v
                    .string_value
                    .clone()
                    .or_else(|| {
                        v.binary_value
                            .as_ref()
                            .map(|b| format!("(binary, base64) {b}"))
                    })
                    .unwrap_or_default();
                let value = serde_json::from_str::<serde_json::Value>(&value)
                    .ok()
                    .filter(|v| v.is_object())
                    .map_or(value, |v| {
                        serde_json::to_string_pretty(&v).unwrap_or_default()
                    });
                rows.push(vec![format!("{k} ({})", v.data_type), value]);
            }
            let body = serde_json::from_str::<serde_json::Value>(&s.message.body)
                .map_or(s.message.body.clone(), |v| {
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                });
            rows.push(vec![
                if reveal {
                    "body".into()
                } else {
                    "body (redacted)".into()
                },
                body,
            ]);
            crate::outln!("{}", output::table(&["field", "value"], rows));
        }
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::human_age;

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(human_age(42.0), "42s");
        assert_eq!(human_age(600.0), "10m");
        assert_eq!(human_age(3.0 * 3600.0 + 60.0), "3h1m");
        assert_eq!(human_age(2.0 * 86_400.0 + 7200.0), "2d2h");
    }
}
