//! `redrive`: moves dead-lettered messages back to their source queue (or `--to` another).
//!
//! Two paths. By default the CLI moves messages itself: receive from the DLQ (holding what it
//! reads), send to the destination, and only then delete from the DLQ, so that a crash can
//! duplicate a message in the destination (the fleet's idempotency absorbs that) but never lose
//! one. Messages that do not match stay in the DLQ. Each moved message keeps its body,
//! attributes and trace header, loses its attribution, and gains a `fleet-redrive` record (run
//! id, count, time, DLQ, previous reason). FIFO messages keep their group id; their
//! deduplication id is derived from the original and the redrive count, so a re-run after a
//! crash is deduplicated by the destination while a later redrive is not.
//!
//! With `--move-task` (no filter, `--max` or canary; real AWS only), SQS's StartMessageMoveTask
//! does the work instead: fast and server-side, but blind (no record, no canary); the CLI
//! follows its progress.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use fleet_common::attribution::{self, RedriveRecord};
use fleet_common::redrive_ledger::{Entry, Ledger, RunOutcomes};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use indicatif::ProgressBar;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::error::{CliError, Exit, Result};
use crate::filter::Filter;
use crate::output::{self, Output};
use crate::queues::{self, Ctx, Queue, QueueInfo};
use crate::record::{AttributeValue, DlqMessage};
use crate::scan::{Reader, MAX_HELD};

mod mover;
mod report;

use mover::Mover;
#[cfg(test)]
use mover::{guard, outcomes_of_run, Guard};
pub use report::{print, CanaryOutcome, Report, WouldMove};

/// `dlq redrive`: its flags.
#[derive(Debug, clap::Args)]
pub struct RedriveArgs {
    /// The DLQ.
    pub queue: String,
    /// Destination queue (name, URL or config key); default: each message's source queue.
    #[arg(long)]
    pub to: Option<String>,
    #[command(flatten)]
    pub filter: Filter,
    /// Move at most this many.
    #[arg(long)]
    pub max: Option<usize>,
    /// At most this many messages per second.
    #[arg(long)]
    pub rate: Option<NonZeroU32>,
    /// Show what would move, and where; move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Hand the whole DLQ to SQS's StartMessageMoveTask (AWS only): fast and server-side,
    /// but blind: no filter, no canary, no `fleet-redrive` record, no run-once guarantee.
    #[arg(long)]
    pub move_task: bool,
    /// The default since the fleet's own path became the default; kept so scripts still run.
    #[arg(long, hide = true, conflicts_with = "move_task")]
    pub no_move_task: bool,
    /// How long messages read are held invisible at a time (extended while running).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// How long to wait for messages in flight elsewhere (an interrupted run's) to come back.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub wait_in_flight: Duration,
    /// Move this many first, then watch what becomes of them (--watch) and go on only while
    /// at most --halt-above percent of them came back, are retrying or have no outcome.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub canary: Option<u32>,
    /// With --canary: halt when more than this percentage of the moved messages came back or
    /// are retrying (checked during the watch and before each batch of the rest).
    #[arg(long, value_name = "PCT", default_value_t = 10.0, requires = "canary", value_parser = parse_percent)]
    pub halt_above: f64,
    /// With --canary: how long to watch the canary, and the longest wait for a new outcome.
    #[arg(long, value_name = "DURATION", default_value = "2m", requires = "canary", value_parser = humantime::parse_duration)]
    pub watch: Duration,
}

/// `--halt-above`: a percentage from 0 to 100 (`%` allowed).
fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let pct: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage"))?;
    if (0.0..=100.0).contains(&pct) {
        Ok(pct)
    } else {
        Err(format!("`{s}` is not between 0 and 100"))
    }
}

impl RedriveArgs {
    /// Runs `dlq redrive` and prints its report.
    ///
    /// # Errors
    /// A `--hold` out of range; AWS errors that stop the whole run.
    pub async fn run(self, ctx: &Ctx, output: Output, stop: &CancellationToken) -> Result<Exit> {
        if self.hold < Duration::from_secs(2) || self.hold > Duration::from_secs(43_200) {
            return Err(CliError::Usage("--hold must be between 2s and 12h".into()));
        }
        let q = queues::resolve(ctx, &self.queue).await?;
        let opts = Options {
            to: self.to,
            filter: self.filter,
            max: self.max,
            rate: self.rate,
            dry_run: self.dry_run,
            move_task: self.move_task,
            hold: self.hold,
            wait_in_flight: self.wait_in_flight,
            canary: self.canary.map(|size| Canary {
                size: size as usize,
                halt_above_pct: self.halt_above,
                watch: self.watch,
            }),
        };
        let report = run(ctx, &q, &opts, output, stop).await?;
        match output {
            Output::Json => output::json(&report),
            Output::Table => print(&report),
        }
        Ok(report.exit())
    }
}

/// What to redrive and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Destination for every message; default: each message's source queue.
    pub to: Option<String>,
    /// Which messages.
    pub filter: Filter,
    /// At most this many.
    pub max: Option<usize>,
    /// At most this many messages per second.
    pub rate: Option<NonZeroU32>,
    /// Show what would move; move nothing.
    pub dry_run: bool,
    /// Hand the whole DLQ to StartMessageMoveTask (AWS only, no filter, max or canary).
    pub move_task: bool,
    /// How long read messages are held invisible at a time.
    pub hold: Duration,
    /// How long to wait for messages that are in flight elsewhere (an interrupted run's).
    pub wait_in_flight: Duration,
    /// Move a few first and watch what becomes of them.
    pub canary: Option<Canary>,
}

/// `--canary N --halt-above PCT --watch D`: move N messages, watch them for D, go on only while
/// at most PCT % of what moved has come back to the DLQ (and stop later if it rises above).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Canary {
    /// Messages moved first.
    pub size: usize,
    /// Halt when more than this percentage of the moved messages has come back.
    pub halt_above_pct: f64,
    /// How long to watch the canary before going on.
    pub watch: Duration,
}

impl Canary {
    /// Whether `part` is more than `--halt-above` percent of `whole`.
    fn over(&self, part: u64, whole: u64) -> bool {
        part as f64 * 100.0 > self.halt_above_pct * whole as f64
    }
}

/// `dlq redrive`.
///
/// # Errors
/// AWS errors that stop the whole run (the DLQ or the destination cannot be reached).
pub async fn run(
    ctx: &Ctx,
    dlq: &Queue,
    opts: &Options,
    output: Output,
    stop: &CancellationToken,
) -> Result<Report> {
    if opts.move_task
        && (opts.dry_run || opts.canary.is_some() || !opts.filter.is_empty() || opts.max.is_some())
    {
        return Err(CliError::Usage(
            "--move-task hands the whole DLQ to SQS: it cannot be combined with filters, --max, --canary or --dry-run; drop --move-task to use them".into(),
        ));
    }
    let info = queues::info(ctx, dlq).await?;
    let to = match &opts.to {
        Some(arg) => Some(resolve_destination(ctx, arg).await?),
        None => None,
    };
    let why_not_task = if !opts.move_task {
        Some("each message gets a fleet-redrive record; --move-task hands the DLQ to SQS instead")
    } else if ctx.local {
        Some("--move-task: StartMessageMoveTask is not available on the local emulator")
    } else {
        None
    };
    let mut fallback = why_not_task.map(str::to_owned);
    if fallback.is_none() {
        match move_task(ctx, &info, to.as_ref(), opts.rate, output, stop).await? {
            Ok(report) => return Ok(report),
            Err(refused) => fallback = Some(refused),
        }
    }
    let mover = Mover::new(ctx, dlq, &info, to.as_ref(), opts, output, stop);
    let mut report = mover.run().await?;
    report.path_reason = fallback.unwrap_or_default();
    Ok(report)
}

async fn resolve_destination(ctx: &Ctx, arg: &str) -> Result<Queue> {
    if arg.starts_with("http") {
        return queues::resolve(ctx, arg).await;
    }
    // A config key names the work queue here, not its DLQ.
    let name = ctx
        .config
        .as_ref()
        .and_then(|c| c.queues.get(arg))
        .map_or_else(|| arg.to_owned(), |q| q.name.clone());
    queues::resolve_name(ctx, &name).await
}

/// The server-side path. `Ok(Err(why))` when SQS refused the task and the CLI should move the
/// messages itself.
async fn move_task(
    ctx: &Ctx,
    info: &QueueInfo,
    to: Option<&Queue>,
    rate: Option<NonZeroU32>,
    output: Output,
    stop: &CancellationToken,
) -> Result<std::result::Result<Report, String>> {
    let destination_arn = match to {
        Some(q) => Some(queues::info(ctx, q).await?.arn),
        None => None,
    };
    let started = Instant::now();
    let start = ctx
        .sqs
        .start_message_move_task()
        .source_arn(&info.arn)
        .set_destination_arn(destination_arn)
        .set_max_number_of_messages_per_second(rate.map(|r| r.get() as i32))
        .send()
        .await;
    let handle = match start {
        Ok(out) => out.task_handle().unwrap_or_default().to_owned(),
        Err(e) => {
            let code = e.code().unwrap_or("error").to_owned();
            return Ok(Err(format!(
                "StartMessageMoveTask refused ({code}): {}",
                e.message().unwrap_or_default()
            )));
        }
    };
    let bar = output::progress(output, Some(info.visible), "moving (SQS message move task)");
    let mut report = Report {
        queue: info.queue.name.clone(),
        path: "message-move-task",
        path_reason: "--move-task: SQS moves the messages itself, without a fleet-redrive record"
            .into(),
        task_handle: Some(handle.clone()),
        ..Report::default()
    };
    let followed = follow_move_task(ctx, info, &handle, &mut report, &bar, stop).await;
    bar.finish_and_clear();
    followed?;
    report.matched = report.moved + report.failed;
    report.read = report.matched;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report.rate_per_sec = report.moved as f64 / started.elapsed().as_secs_f64().max(0.001);
    Ok(Ok(report))
}

/// Follows a move task every 2 s until it ends (or cancels it on Ctrl-C), counting into `report`.
async fn follow_move_task(
    ctx: &Ctx,
    info: &QueueInfo,
    handle: &str,
    report: &mut Report,
    bar: &ProgressBar,
    stop: &CancellationToken,
) -> Result<()> {
    loop {
        if stop.is_cancelled() {
            let _ = ctx
                .sqs
                .cancel_message_move_task()
                .task_handle(handle)
                .send()
                .await;
            report.interrupted = true;
            return Ok(());
        }
        let tasks = ctx
            .sqs
            .list_message_move_tasks()
            .source_arn(&info.arn)
            .max_results(1)
            .send()
            .await
            .map_err(|e| CliError::aws("following the message move task", &e))?;
        let Some(task) = tasks.results().first() else {
            return Ok(());
        };
        report.moved = task.approximate_number_of_messages_moved().max(0) as u64;
        bar.set_position(report.moved);
        match task.status() {
            Some("RUNNING") | Some("CANCELLING") | None => {}
            Some("COMPLETED") => return Ok(()),
            Some(other) => {
                report.failed = (task.approximate_number_of_messages_to_move().unwrap_or(0)
                    - task.approximate_number_of_messages_moved())
                .max(0) as u64;
                report.path_reason = format!(
                    "the move task ended {other}: {}",
                    task.failure_reason().unwrap_or("no reason given")
                );
                return Ok(());
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.cancelled() => {}
        }
    }
}

/// Where a message goes back to: its attribution's source queue, else the queue SQS says it came
/// from, else the DLQ's only source.
fn source_of(m: &DlqMessage) -> Option<String> {
    let from_arn = || {
        m.dead_letter_source_arn()
            .map(|arn| arn.rsplit(':').next().unwrap_or(arn).to_owned())
    };
    // A current attribution names the queue the worker gave up on; SQS's own stamp names the
    // queue its redrive policy moved the message from (which a stale attribution may not).
    m.attribution()
        .map(|a| a.source_queue)
        .or_else(from_arn)
        .or_else(|| m.stored_attribution().map(|a| a.source_queue))
}

/// The deduplication id of a redriven FIFO message: the original's, marked with the redrive count
/// (hashed when that would exceed SQS's 128 characters).
pub fn redrive_deduplication_id(original: &str, count: u32) -> String {
    let id = format!("{original}.r{count}");
    if id.len() <= 128 {
        id
    } else {
        format!("{:x}.r{count}", Sha256::digest(original.as_bytes()))
    }
}

/// What a redrive run stamps on each message it sends.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    /// The DLQ it moves from.
    pub from_queue: &'a str,
    /// The run's id.
    pub run: &'a str,
    /// The destination is a FIFO queue.
    pub fifo: bool,
    /// When.
    pub now: OffsetDateTime,
    /// The SenderIds that redrive into the edge (`ingestion.redrivers`).
    pub redrivers: &'a [String],
}

/// The message as it goes back: attribution removed, redrive recorded (with the run's id and
/// the first sender), FIFO ids carried.
pub fn redriven_entry(
    m: &DlqMessage,
    id: usize,
    stamp: &Stamp<'_>,
) -> std::result::Result<SendMessageBatchRequestEntry, String> {
    let Stamp {
        from_queue,
        run,
        fifo,
        now,
        redrivers,
    } = *stamp;
    let previous = m.redrive();
    let record = RedriveRecord {
        id: Some(run.to_owned()),
        count: previous.map_or(1, |p| p.count + 1),
        at: now,
        from_queue: from_queue.to_owned(),
        previous_reason: Some(
            m.attribution()
                .map_or_else(|| "none".to_owned(), |a| a.reason),
        ),
        sender_id: m.original_sender(redrivers),
        copy_of: None,
    };
    let mut carried = m.clone();
    carried.attributes.remove(attribution::ATTRIBUTION);
    carried.attributes.insert(
        attribution::REDRIVE.to_owned(),
        AttributeValue::string(serde_json::to_string(&record).expect("record serializes")),
    );
    let original = m.deduplication_id().unwrap_or(&m.message_id);
    carried.batch_entry(id, fifo, redrive_deduplication_id(original, record.count))
}

/// `part` as a percentage of `whole` (0 when `whole` is 0).
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// A new redrive id: the UTC start time and a random suffix (`20261125T042043Z-3f9a1c2b`),
/// sortable, and short enough for a log line.
pub fn new_redrive_id(now: OffsetDateTime) -> String {
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Sends a batch; returns, for each message SQS accepted, its id in the DLQ and the id SQS gave
/// the copy (under which the workers write its outcome in the ledger).
async fn send(
    ctx: &Ctx,
    queue: &Queue,
    from: &str,
    run: &str,
    messages: &[&DlqMessage],
) -> Result<HashMap<String, String>> {
    let stamp = Stamp {
        from_queue: from,
        run,
        fifo: queue.fifo(),
        now: OffsetDateTime::now_utc(),
        redrivers: ctx.redrivers(),
    };
    let mut entries = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let entry = redriven_entry(m, i, &stamp).map_err(|e| {
            CliError::Usage(format!("message {} cannot be sent: {e}", m.message_id))
        })?;
        entries.push(entry);
    }
    let out = ctx
        .sqs
        .send_message_batch()
        .queue_url(&queue.url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(|e| CliError::aws(format!("sending to `{}`", queue.name), &e))?;
    for f in out.failed() {
        tracing::warn!(queue = %queue.name, code = f.code(), sender_fault = f.sender_fault(), "a message was not sent; it stays in the DLQ");
    }
    Ok(out
        .successful()
        .iter()
        .filter_map(|s| {
            let m = messages.get(s.id().parse::<usize>().ok()?)?;
            Some((m.message_id.clone(), s.message_id().to_owned()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{attribution, message};
    use fleet_common::failure::FailureClass;

    /// A run's stamp for a test: `run-1`, at the epoch, no redrivers.
    fn stamp(from_queue: &'static str, fifo: bool) -> Stamp<'static> {
        Stamp {
            from_queue,
            run: "run-1",
            fifo,
            now: OffsetDateTime::UNIX_EPOCH,
            redrivers: &[],
        }
    }

    #[test]
    fn a_redriven_message_loses_its_attribution_and_records_the_redrive() {
        let a = attribution(
            "dependency_unavailable",
            "orders",
            FailureClass::AttemptsExhausted,
        );
        let mut m = message("m1", "{\"x\":1}", Some(&a));
        m.attributes
            .insert("correlation-id".into(), AttributeValue::string("corr-9"));
        let entry = redriven_entry(&m, 3, &stamp("fleet-orders-dlq", false)).unwrap();
        assert_eq!(entry.id(), "3");
        assert_eq!(entry.message_body(), "{\"x\":1}");
        let attrs = entry.message_attributes().unwrap();
        assert!(!attrs.contains_key(attribution::ATTRIBUTION));
        assert_eq!(attrs["correlation-id"].string_value(), Some("corr-9"));
        let record: RedriveRecord =
            serde_json::from_str(attrs[attribution::REDRIVE].string_value().unwrap()).unwrap();
        assert_eq!(record.count, 1);
        assert_eq!(record.from_queue, "fleet-orders-dlq");
        assert_eq!(
            record.previous_reason.as_deref(),
            Some("dependency_unavailable")
        );
        assert_eq!(source_of(&m).as_deref(), Some("fleet-orders"));
        // Who sent it first travels, for the edge to check (the redrive comes from the operator).
        assert_eq!(record.sender_id.as_deref(), Some("AROASTOREFRONT:s-1"));
    }

    #[test]
    fn the_first_sender_is_what_the_fleet_vouches_for_never_an_upstreams_record() {
        let redrivers = ["AROAOPERATOR".to_owned()];
        let record = |sender: &str| {
            AttributeValue::string(
                serde_json::to_string(&RedriveRecord {
                    count: 1,
                    at: OffsetDateTime::UNIX_EPOCH,
                    from_queue: "fleet-ingest-dlq".into(),
                    previous_reason: None,
                    id: Some("run-1".into()),
                    sender_id: Some(sender.into()),
                    copy_of: None,
                })
                .unwrap(),
            )
        };
        // Dead-lettered by a worker: its attribution names the first sender it vouched for.
        let a = attribution(
            "dependency_unavailable",
            "ingestion",
            FailureClass::AttemptsExhausted,
        );
        let mut m = message("m1", "{}", Some(&a));
        m.attributes
            .insert(attribution::REDRIVE.into(), record("AROAFORGED"));
        assert_eq!(
            m.original_sender(&redrivers).as_deref(),
            Some("AROASTOREFRONT:s-1")
        );
        // Moved by SQS from the operator's copy: that copy's record names the first sender.
        let mut moved = message("m2", "{}", None);
        moved
            .system_attributes
            .insert("SenderId".into(), "AROAOPERATOR:ops-alice".into());
        moved
            .attributes
            .insert(attribution::REDRIVE.into(), record("AROASTOREFRONT:s-1"));
        assert_eq!(
            moved.original_sender(&redrivers).as_deref(),
            Some("AROASTOREFRONT:s-1")
        );
        // Without knowing the redrivers (no --config) the record is not believed.
        assert_eq!(
            moved.original_sender(&[]).as_deref(),
            Some("AROAOPERATOR:ops-alice")
        );
        // Moved by SQS from an upstream's message with a forged record: the upstream it is.
        moved
            .system_attributes
            .insert("SenderId".into(), "AROACARRIER:hook".into());
        assert_eq!(
            moved.original_sender(&redrivers).as_deref(),
            Some("AROACARRIER:hook")
        );
        let entry = redriven_entry(
            &moved,
            0,
            &Stamp {
                run: "run-2",
                redrivers: &redrivers,
                ..stamp("q-dlq", false)
            },
        )
        .unwrap();
        let carried: RedriveRecord = serde_json::from_str(
            entry.message_attributes().unwrap()[attribution::REDRIVE]
                .string_value()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(carried.sender_id.as_deref(), Some("AROACARRIER:hook"));
    }

    #[test]
    fn fifo_ids_are_carried_and_a_second_redrive_gets_a_new_deduplication_id() {
        let mut m = message("m1", "{}", None);
        m.system_attributes
            .insert("MessageGroupId".into(), "order-7".into());
        m.system_attributes
            .insert("MessageDeduplicationId".into(), "evt-7".into());
        let first = redriven_entry(&m, 0, &stamp("q-dlq.fifo", true)).unwrap();
        assert_eq!(first.message_group_id(), Some("order-7"));
        assert_eq!(first.message_deduplication_id(), Some("evt-7.r1"));
        // Redriven once already: the record says so.
        m.attributes.insert(
            attribution::REDRIVE.into(),
            AttributeValue::string(
                first.message_attributes().unwrap()[attribution::REDRIVE]
                    .string_value()
                    .unwrap(),
            ),
        );
        let second = redriven_entry(&m, 0, &stamp("q-dlq.fifo", true)).unwrap();
        assert_eq!(second.message_deduplication_id(), Some("evt-7.r2"));
        // A standard queue (fair queues): the group travels, no deduplication id.
        let standard = redriven_entry(&m, 0, &stamp("q-dlq", false)).unwrap();
        assert_eq!(standard.message_group_id(), Some("order-7"));
        assert_eq!(standard.message_deduplication_id(), None);
        let long = redrive_deduplication_id(&"x".repeat(128), 1);
        assert!(long.len() <= 128 && long.ends_with(".r1"));
    }

    fn outcomes(succeeded: u64, retrying: u64, dead_lettered: u64) -> RunOutcomes {
        RunOutcomes {
            succeeded,
            retrying,
            dead_lettered,
            ..RunOutcomes::default()
        }
    }

    #[test]
    fn a_run_counts_only_the_copies_it_sent_and_what_sqs_moved_back_counts_once() {
        let entry = |outcome: &str, reason: Option<&str>| Entry {
            outcome: outcome.into(),
            reason: reason.map(str::to_owned),
        };
        let entries = BTreeMap::from([
            ("a".to_owned(), entry("succeeded", None)),
            (
                "b".to_owned(),
                entry("retrying", Some("dependency_unavailable")),
            ),
            (
                "c".to_owned(),
                entry("dead_lettered", Some("unknown_product")),
            ),
            // Written under the run by a message it never sent: a forged record at the edge,
            // or an old one carried back by an import.
            ("forged".to_owned(), entry("succeeded", None)),
        ]);
        let sent: HashSet<String> = ["a", "b", "c", "d"].map(String::from).into();
        let none = BTreeMap::new();
        let o = outcomes_of_run(&entries, &sent, &HashSet::new(), (0, &none));
        assert_eq!((o.succeeded, o.retrying, o.dead_lettered), (1, 1, 1));
        // `b` retried, then SQS moved it to the DLQ (its receives ran out): come back, once.
        let by_sqs: HashSet<String> = ["b".to_owned()].into();
        let read = BTreeMap::from([
            ("moved_by_sqs".to_owned(), 1),
            ("unknown_product".to_owned(), 1),
        ]);
        let o = outcomes_of_run(&entries, &sent, &by_sqs, (2, &read));
        assert_eq!((o.succeeded, o.retrying, o.dead_lettered), (1, 0, 2));
        assert_eq!(o.dead_lettered_reasons["moved_by_sqs"], 1);
        assert_eq!(o.known(), 3, "d has no outcome yet");
        // A ledger write that failed: the DLQ still shows what came back.
        let read = BTreeMap::from([("unknown_product".to_owned(), 3)]);
        let o = outcomes_of_run(&entries, &sent, &HashSet::new(), (3, &read));
        assert_eq!(
            (o.dead_lettered, o.retrying),
            (3, 1),
            "b may count twice, against the run: the guard errs on the side of halting"
        );
    }

    #[test]
    fn after_the_canary_the_redrive_keeps_within_its_evidence_and_halts_on_returns() {
        let c = Canary {
            size: 10,
            halt_above_pct: 10.0,
            watch: Duration::from_secs(60),
        };
        // Right after the canary: 10 sent, 10 succeeded: go.
        assert_eq!(guard(c, 10, &outcomes(10, 0, 0)), Guard::Go);
        // Never more without an outcome than with one (and the canary's size).
        assert_eq!(guard(c, 40, &outcomes(20, 0, 0)), Guard::Go);
        assert_eq!(guard(c, 41, &outcomes(20, 0, 0)), Guard::Wait);
        // 3 of 20 known came back (15 % > 10 %): halt, though 21 more have no outcome.
        assert_eq!(guard(c, 41, &outcomes(17, 0, 3)), Guard::Halt);
        // Retrying counts against it too: the failure may not be fixed.
        assert_eq!(guard(c, 41, &outcomes(17, 3, 0)), Guard::Halt);
        // Retrying is progress of a kind for the exposure: 20 known, 20 unknown.
        assert_eq!(guard(c, 40, &outcomes(19, 1, 0)), Guard::Go);
        // Too few known to judge a rate (fewer than the canary's size): 1 of 5 is no verdict…
        assert_eq!(guard(c, 10, &outcomes(4, 0, 1)), Guard::Go);
        // …but 2 back of 10 sent is more than 10 % of everything sent, whatever the rest does.
        assert_eq!(guard(c, 10, &outcomes(3, 0, 2)), Guard::Halt);
        // At the threshold exactly it goes on.
        assert_eq!(guard(c, 100, &outcomes(90, 0, 10)), Guard::Go);
    }

    #[test]
    fn a_redriven_message_continues_its_aws_trace() {
        let mut m = message("m1", "{}", None);
        let header = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        m.system_attributes
            .insert("AWSTraceHeader".into(), header.into());
        let entry = redriven_entry(&m, 0, &stamp("q-dlq", false)).unwrap();
        let system = entry.message_system_attributes().unwrap();
        let carried =
            &system[&aws_sdk_sqs::types::MessageSystemAttributeNameForSends::AwsTraceHeader];
        assert_eq!(carried.string_value(), Some(header));
        assert_eq!(carried.data_type(), "String");
        // Without a header, nothing is set (SQS refuses an empty system attribute).
        let plain = redriven_entry(&message("m2", "{}", None), 0, &stamp("q-dlq", false)).unwrap();
        assert!(plain.message_system_attributes().is_none());
    }

    #[test]
    fn the_exit_code_says_whether_everything_moved() {
        assert_eq!(Report::default().exit(), Exit::Ok);
        assert_eq!(
            Report {
                failed: 1,
                ..Report::default()
            }
            .exit(),
            Exit::Partial
        );
        assert_eq!(
            Report {
                no_destination: 2,
                ..Report::default()
            }
            .exit(),
            Exit::Partial
        );
        assert_eq!(
            Report {
                interrupted: true,
                failed: 1,
                ..Report::default()
            }
            .exit(),
            Exit::Interrupted
        );
    }
}
