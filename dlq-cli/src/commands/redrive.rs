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
use fleet_common::runtime::carried_group_id;
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

/// What became of the canary, as the workers wrote it in the redrive ledger.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CanaryOutcome {
    /// `--canary`.
    pub size: usize,
    /// Messages moved as the canary.
    pub moved: u64,
    /// Of which succeeded downstream.
    pub succeeded: u64,
    /// Failed at least once and wait for another attempt (they count against the canary).
    pub retrying: u64,
    /// Dead-lettered again.
    pub came_back: u64,
    /// No outcome yet (not picked up, or in the handler).
    pub no_outcome: u64,
    /// Retrying and dead-lettered again, as a percentage of those with an outcome.
    pub came_back_pct: f64,
    /// `--halt-above`.
    pub halt_above_pct: f64,
    /// How long it was watched (less than `--watch` when every message had settled).
    pub watched_ms: u64,
    /// Whether the redrive went on after it.
    pub passed: bool,
}

/// What a redrive did.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The DLQ.
    pub queue: String,
    /// This run's id: in the `fleet-redrive` record of every message it moved, and in the
    /// workers' log lines about them (`dlq attribute --by redrive` groups by it).
    pub redrive_id: String,
    /// `message-move-task`, `receive-send-delete`, or `dry-run`.
    pub path: &'static str,
    /// Why that path.
    pub path_reason: String,
    /// Messages read from the DLQ.
    pub read: u64,
    /// Of which matched the filters.
    pub matched: u64,
    /// Moved: sent to the destination and deleted from the DLQ.
    pub moved: u64,
    /// Sent but not deleted from the DLQ (they will be sent again by a re-run).
    pub not_deleted: u64,
    /// Not sent (still in the DLQ).
    pub failed: u64,
    /// Matched, but no destination could be found (pass --to).
    pub no_destination: u64,
    /// In flight elsewhere at the end (an interrupted run or a consumer holds them).
    pub in_flight_elsewhere: u64,
    /// The run stopped reading at the most messages SQS lets it hold (those it left alone
    /// included): what it did not read is left for another run.
    pub held_limit_reached: bool,
    /// Messages this run moved that were dead-lettered again while it ran (as the ledger says,
    /// and as read in the DLQ): left in the DLQ, never moved twice by one run.
    pub came_back: u64,
    /// Their reasons now (`moved_by_sqs`: their receives ran out, a crash or a timeout).
    pub came_back_reasons: BTreeMap<String, u64>,
    /// Succeeded downstream (from the redrive ledger; absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub succeeded: Option<u64>,
    /// Failed at least once and wait for another attempt (from the ledger).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrying: Option<u64>,
    /// Moved, with no outcome yet: waiting in the queue or in a handler (from the ledger).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
    /// Why it halted, with `halted`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halt_reason: Option<String>,
    /// Messages sent to the DLQ after the run started, without this run's record (a redrive
    /// record lost, a worker of an older build): left alone too, for a later run.
    pub arrived_during_run: u64,
    /// Moved and not back by the end of the run: applied, or still being retried downstream.
    pub not_back: u64,
    /// What became of the canary, with `--canary`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryOutcome>,
    /// Stopped on its own: more came back than `--halt-above` allows, or the outcomes stopped
    /// coming (see `halt_reason`). What was not moved is still in the DLQ.
    pub halted: bool,
    /// Messages per destination queue.
    pub destinations: BTreeMap<String, u64>,
    /// Reasons of the matched messages.
    pub reasons: BTreeMap<String, u64>,
    /// For `--dry-run`: the messages that would move.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub would_move: Vec<WouldMove>,
    /// Wall time of the moving.
    pub elapsed_ms: u64,
    /// Moved messages per second, first send to last.
    pub rate_per_sec: f64,
    /// The move task's handle, on that path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_handle: Option<String>,
    /// Stopped by Ctrl-C.
    pub interrupted: bool,
}

/// One message a dry run would move.
#[derive(Debug, Serialize)]
pub struct WouldMove {
    /// Its id in the DLQ.
    pub message_id: String,
    /// Where it would go.
    pub destination: Option<String>,
    /// Its attribution reason.
    pub reason: String,
    /// Its correlation id.
    pub correlation_id: Option<String>,
}

impl Report {
    /// The exit code this outcome deserves.
    pub fn exit(&self) -> Exit {
        if self.interrupted {
            Exit::Interrupted
        } else if self.halted
            || self.held_limit_reached
            || self.failed + self.not_deleted + self.no_destination + self.in_flight_elsewhere > 0
        {
            Exit::Partial
        } else {
            Exit::Ok
        }
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
    loop {
        if stop.is_cancelled() {
            let _ = ctx
                .sqs
                .cancel_message_move_task()
                .task_handle(&handle)
                .send()
                .await;
            report.interrupted = true;
            break;
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
            break;
        };
        report.moved = task.approximate_number_of_messages_moved().max(0) as u64;
        bar.set_position(report.moved);
        match task.status() {
            Some("RUNNING") | Some("CANCELLING") | None => {}
            Some("COMPLETED") => break,
            Some(other) => {
                report.failed = (task.approximate_number_of_messages_to_move().unwrap_or(0)
                    - task.approximate_number_of_messages_moved())
                .max(0) as u64;
                report.path_reason = format!(
                    "the move task ended {other}: {}",
                    task.failure_reason().unwrap_or("no reason given")
                );
                break;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.cancelled() => {}
        }
    }
    bar.finish_and_clear();
    report.matched = report.moved + report.failed;
    report.read = report.matched;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report.rate_per_sec = report.moved as f64 / started.elapsed().as_secs_f64().max(0.001);
    Ok(Ok(report))
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

/// The message as it goes back: attribution removed, redrive recorded (with the run's id), FIFO
/// ids carried.
pub fn redriven_entry(
    m: &DlqMessage,
    id: usize,
    from_queue: &str,
    run: &str,
    fifo: bool,
    now: OffsetDateTime,
    redrivers: &[String],
) -> std::result::Result<SendMessageBatchRequestEntry, String> {
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
    // A group cap's counters belong to the queue it was deferred on: it starts afresh.
    carried.attributes.remove(fleet_common::runtime::DEFERRALS);
    carried.attributes.remove(fleet_common::runtime::ATTEMPTS);
    carried.attributes.insert(
        attribution::REDRIVE.to_owned(),
        AttributeValue::string(serde_json::to_string(&record).expect("record serializes")),
    );
    let mut attributes = carried.sdk_attributes()?;
    attribution::fit_attributes(&mut attributes);
    let mut entry = SendMessageBatchRequestEntry::builder()
        .id(id.to_string())
        .message_body(&m.body)
        .set_message_attributes(Some(attributes))
        // The trace continues (on AWS the header costs no attribute).
        .set_message_system_attributes(m.sdk_system_attributes())
        // The tenant's group travels, on standard queues too (fair queues).
        .set_message_group_id(carried_group_id(fifo, m.group_id()));
    if fifo {
        let original = m.deduplication_id().unwrap_or(&m.message_id);
        entry = entry.message_deduplication_id(redrive_deduplication_id(original, record.count));
    }
    entry.build().map_err(|e| e.to_string())
}

/// A run of the receive-send-delete path: what it has read, moved and seen come back.
struct Mover<'a> {
    ctx: &'a Ctx,
    dlq: &'a Queue,
    info: &'a QueueInfo,
    to: Option<&'a Queue>,
    opts: &'a Options,
    stop: &'a CancellationToken,
    reader: Reader,
    report: Report,
    bar: ProgressBar,
    burst: u32,
    limiter: Option<DefaultDirectRateLimiter>,
    destinations: HashMap<String, Queue>,
    /// The DLQ's only source queue (from the redrive policies), once looked up.
    sole_source: Option<Option<String>>,
    first_send: Option<Instant>,
    last_send: Instant,
    waited: Duration,
    /// When the run started: messages sent to the DLQ later are not its to move.
    started: OffsetDateTime,
    /// Matched messages read beyond the canary's size: moved first once it passes.
    held_back: Vec<Planned>,
    /// The ledger, once the run is open in it.
    ledger: Option<&'a Ledger>,
    /// The ids SQS gave the copies this run sent: only their entries in the ledger count.
    sent_ids: HashSet<String>,
    /// What the workers wrote in the ledger about them, as last read.
    entries: BTreeMap<String, Entry>,
    last_ledger_read: Option<Instant>,
    /// This run's messages read back in the DLQ, by reason.
    read_back: u64,
    read_back_reasons: BTreeMap<String, u64>,
    /// Of those, the ones SQS moved there itself (their receives ran out): their id in the DLQ is
    /// the id of the copy that was sent.
    moved_by_sqs: HashSet<String>,
}

/// Room kept under the reader's limit for one more receive.
const BATCH_ROOM: usize = 10;

/// How often the ledger is read while the run waits on outcomes.
const LEDGER_POLL: Duration = Duration::from_secs(1);

/// A matched message with the queue it goes to.
struct Planned {
    message: DlqMessage,
    destination: String,
}

impl<'a> Mover<'a> {
    fn new(
        ctx: &'a Ctx,
        dlq: &'a Queue,
        info: &'a QueueInfo,
        to: Option<&'a Queue>,
        opts: &'a Options,
        output: Output,
        stop: &'a CancellationToken,
    ) -> Self {
        let burst = opts.rate.map_or(10, |r| r.get().min(10));
        let limiter = opts.rate.map(|r| {
            RateLimiter::direct(
                Quota::per_second(r).allow_burst(NonZeroU32::new(burst).expect("non-zero")),
            )
        });
        let expected = opts
            .max
            .map_or(info.visible, |m| (m as u64).min(info.visible));
        let bar = output::progress(
            output,
            Some(expected),
            if opts.dry_run { "reading" } else { "redriving" },
        );
        let started = OffsetDateTime::now_utc();
        Self {
            ctx,
            dlq,
            info,
            to,
            opts,
            stop,
            started,
            reader: Reader::new(ctx, dlq, opts.hold),
            report: Report {
                queue: dlq.name.clone(),
                redrive_id: new_redrive_id(started),
                path: if opts.dry_run {
                    "dry-run"
                } else {
                    "receive-send-delete"
                },
                ..Report::default()
            },
            bar,
            burst,
            limiter,
            destinations: HashMap::new(),
            sole_source: None,
            first_send: None,
            last_send: Instant::now(),
            waited: Duration::ZERO,
            held_back: Vec::new(),
            ledger: None,
            sent_ids: HashSet::new(),
            entries: BTreeMap::new(),
            last_ledger_read: None,
            read_back: 0,
            read_back_reasons: BTreeMap::new(),
            moved_by_sqs: HashSet::new(),
        }
    }

    /// Opens the run in the ledger, moves what matches (canary first when asked), then
    /// releases what it still holds and tallies what became of what moved.
    async fn run(mut self) -> Result<Report> {
        tracing::info!(redrive = %self.report.redrive_id, queue = %self.dlq.name, "redrive started");
        let canary = self.opts.canary.is_some() && !self.opts.dry_run;
        if let (Some(ledger), false) = (&self.ctx.ledger, self.opts.dry_run) {
            match ledger
                .open_run(&self.report.redrive_id, &self.dlq.name, self.started)
                .await
            {
                Ok(()) => self.ledger = Some(ledger),
                // The canary decides on the ledger: without it, nothing moves.
                Err(e) if canary => {
                    return Err(CliError::Aws {
                        doing: "opening the run in the redrive ledger (--canary needs it)".into(),
                        detail: e.to_string(),
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not open the run in the redrive ledger: the report will not say what succeeded downstream");
                }
            }
        }
        let result = self.move_all().await;
        if result.is_ok() && self.ledger.is_some() && self.report.moved > 0 {
            // A last look, so that the table is as fresh as it can be.
            if let Err(e) = self.refresh_outcomes(true).await {
                tracing::warn!(error = %e, "could not read the redrive ledger at the end");
            }
        }
        self.tally();
        self.reader.finish().await;
        self.bar.finish_and_clear();
        result?;
        let report = &mut self.report;
        report.interrupted = self.stop.is_cancelled();
        if let Some(first) = self.first_send {
            let secs = self.last_send.duration_since(first).as_secs_f64();
            report.elapsed_ms = (secs * 1000.0) as u64;
            // The first batch goes at once (the limiter's burst); the rate is over what followed.
            let after_first = report.moved.saturating_sub(u64::from(self.burst));
            report.rate_per_sec = if secs > 0.0 {
                after_first as f64 / secs
            } else {
                report.moved as f64
            };
        }
        tracing::info!(redrive = %report.redrive_id, moved = report.moved, came_back = report.came_back, halted = report.halted, "redrive ended");
        Ok(self.report)
    }

    /// The outcome table: from the ledger when the run is in one, else from what was read
    /// back in the DLQ.
    fn tally(&mut self) {
        let o = self.outcomes();
        let report = &mut self.report;
        report.came_back = o.dead_lettered;
        report.came_back_reasons = o.dead_lettered_reasons.clone();
        if self.ledger.is_some() {
            report.succeeded = Some(o.succeeded);
            report.retrying = Some(o.retrying);
            report.in_flight = Some(report.moved.saturating_sub(o.known()));
        }
        report.not_back = report.moved.saturating_sub(report.came_back);
    }

    /// What became of what this run sent: the ledger's entries of the copies it sent (nobody
    /// else's), those SQS moved to the DLQ itself counted as come back whatever the ledger
    /// last said, and never fewer come back than were read back in the DLQ (a ledger write
    /// can fail).
    fn outcomes(&self) -> RunOutcomes {
        outcomes_of_run(
            &self.entries,
            &self.sent_ids,
            &self.moved_by_sqs,
            (self.read_back, &self.read_back_reasons),
        )
    }

    /// Messages sent to their destination (deleted from the DLQ or not).
    fn sent(&self) -> u64 {
        self.report.moved + self.report.not_deleted
    }

    async fn move_all(&mut self) -> Result<()> {
        let Some(c) = self.opts.canary.filter(|_| !self.opts.dry_run) else {
            return self.move_until(None, None).await;
        };
        if self.ledger.is_none() {
            return Err(CliError::Usage(format!(
                "--canary decides on what the workers write in the redrive ledger: pass --config with a [tables.{}] section (config/fleet.toml has one)",
                fleet_common::redrive_ledger::TABLE_KEY
            )));
        }
        self.move_until(Some(c.size as u64), None).await?;
        if self.stop.is_cancelled() || self.sent() == 0 {
            return Ok(());
        }
        if !self.watch_canary(c).await {
            return Ok(());
        }
        self.move_until(None, Some(c)).await?;
        if !self.stop.is_cancelled() && !self.report.halted {
            // The last of it is watched too, so that the table tells what became of it.
            self.wait_for_outcomes(c).await;
        }
        Ok(())
    }

    /// Moves matching messages until `limit` have been sent (the canary) or none are left.
    /// With `guard` (after the canary passed), each batch waits for its go: no further ahead of
    /// the outcomes than they allow, and a halt when too many come back.
    async fn move_until(&mut self, limit: Option<u64>, guard: Option<Canary>) -> Result<()> {
        if limit.is_none() {
            let mut held = std::mem::take(&mut self.held_back);
            while !held.is_empty() && !self.stop.is_cancelled() {
                if let Some(c) = guard {
                    if !self.keep_going(c).await {
                        return Ok(());
                    }
                }
                let chunk: Vec<Planned> =
                    held.drain(..held.len().min(self.burst as usize)).collect();
                self.send_planned(chunk).await?;
            }
        }
        while !self.stop.is_cancelled() {
            if limit.is_some_and(|l| self.sent() >= l) || self.max_reached() {
                break;
            }
            let Some(batch) = self.next_batch().await? else {
                break;
            };
            let mut planned = self.plan(batch).await?;
            if let Some(l) = limit {
                let room = l.saturating_sub(self.sent()) as usize;
                self.held_back
                    .extend(planned.split_off(room.min(planned.len())));
            }
            if let (Some(c), false) = (guard, planned.is_empty()) {
                if !self.keep_going(c).await {
                    // Still held: released, visible again in the DLQ, when the run ends.
                    self.held_back.extend(planned);
                    return Ok(());
                }
            }
            self.send_planned(planned).await?;
        }
        Ok(())
    }

    fn max_reached(&self) -> bool {
        self.opts
            .max
            .is_some_and(|m| self.report.matched as usize >= m)
    }

    /// Reads the ledger (at most every [`LEDGER_POLL`] unless `now`).
    async fn refresh_outcomes(&mut self, now: bool) -> std::result::Result<(), String> {
        let Some(ledger) = self.ledger else {
            return Ok(());
        };
        if !now
            && self
                .last_ledger_read
                .is_some_and(|t| t.elapsed() < LEDGER_POLL)
        {
            return Ok(());
        }
        self.entries = ledger
            .entries(&self.report.redrive_id)
            .await
            .map_err(|e| e.to_string())?;
        self.last_ledger_read = Some(Instant::now());
        Ok(())
    }

    /// Reads the ledger; a failure halts the run (it cannot judge what it cannot see).
    async fn refresh_or_halt(&mut self, now: bool) -> bool {
        match self.refresh_outcomes(now).await {
            Ok(()) => true,
            Err(e) => {
                self.halt(format!("cannot read the redrive ledger ({e})"));
                false
            }
        }
    }

    fn halt(&mut self, why: String) {
        tracing::warn!(redrive = %self.report.redrive_id, reason = %why, "redrive halted");
        self.report.halted = true;
        self.report.halt_reason = Some(why);
    }

    /// After the canary, before each batch: whether to send it (see [`guard`]). While the
    /// outcomes lag it waits; when none comes for `--watch` it halts.
    async fn keep_going(&mut self, c: Canary) -> bool {
        let mut seen = None;
        let mut since = Instant::now();
        loop {
            if !self.refresh_or_halt(false).await {
                return false;
            }
            let o = self.outcomes();
            let sent = self.sent();
            match guard(c, sent, &o) {
                Guard::Go => return true,
                Guard::Halt => {
                    self.halt(format!(
                        "{} came back and {} are retrying, of the {} of {sent} moved messages with an outcome (more than {}%)",
                        o.dead_lettered,
                        o.retrying,
                        o.known(),
                        c.halt_above_pct
                    ));
                    return false;
                }
                Guard::Wait => {}
            }
            let progress = (o.succeeded, o.retrying, o.dead_lettered);
            if seen != Some(progress) {
                seen = Some(progress);
                since = Instant::now();
            } else if since.elapsed() >= c.watch {
                self.halt(format!(
                    "no new outcome for {} while {} moved messages had none: are the workers running?",
                    humantime::format_duration(c.watch),
                    sent.saturating_sub(o.known())
                ));
                return false;
            }
            self.bar.set_message(format!(
                "waiting for outcomes: {} of {sent} known",
                o.known()
            ));
            tokio::select! {
                () = tokio::time::sleep(LEDGER_POLL) => {}
                () = self.stop.cancelled() => return false,
            }
        }
    }

    /// After the last batch: waits until everything sent has succeeded or come back, for at
    /// most `--watch`, then judges the whole run as the guard would.
    async fn wait_for_outcomes(&mut self, c: Canary) {
        let started = Instant::now();
        while started.elapsed() < c.watch && !self.stop.is_cancelled() {
            if !self.refresh_or_halt(true).await {
                return;
            }
            let o = self.outcomes();
            if o.settled() >= self.sent() {
                break;
            }
            self.bar.set_message(format!(
                "watching the last: {} of {} settled",
                o.settled(),
                self.sent()
            ));
            tokio::select! {
                () = tokio::time::sleep(LEDGER_POLL) => {}
                () = self.stop.cancelled() => {}
            }
        }
        let o = self.outcomes();
        let sent = self.sent();
        let no_outcome = sent.saturating_sub(o.known());
        if c.over(o.dead_lettered + o.retrying + no_outcome, sent) {
            self.halt(format!(
                "in the end, of the {sent} moved: {} came back, {} are retrying, {no_outcome} have no outcome (more than {}%)",
                o.dead_lettered, o.retrying, c.halt_above_pct
            ));
        }
    }

    /// Watches the canary for `--watch`, or until each of its messages has settled, or until
    /// more came back than the threshold allows whatever the rest does. It passes when at most
    /// `--halt-above` percent of it came back, is retrying, or has no outcome at all.
    async fn watch_canary(&mut self, c: Canary) -> bool {
        let started = Instant::now();
        let moved = self.sent();
        self.bar.set_message(format!(
            "canary: {moved} moved, watching for {}",
            humantime::format_duration(c.watch)
        ));
        while started.elapsed() < c.watch && !self.stop.is_cancelled() {
            if !self.refresh_or_halt(true).await {
                return false;
            }
            let o = self.outcomes();
            if o.settled() >= moved || c.over(o.dead_lettered, moved) {
                break;
            }
            self.bar.set_message(format!(
                "canary: {moved} moved, {} settled, {} came back",
                o.settled(),
                o.dead_lettered
            ));
            tokio::select! {
                () = tokio::time::sleep(LEDGER_POLL) => {}
                () = self.stop.cancelled() => {}
            }
        }
        let o = self.outcomes();
        let no_outcome = moved.saturating_sub(o.known());
        let bad = o.dead_lettered + o.retrying + no_outcome;
        let stopped = self.stop.is_cancelled();
        let passed = o.known() > 0 && !c.over(bad, moved) && !stopped;
        if !passed && !stopped {
            self.halt(if o.known() == 0 {
                format!(
                    "no outcome for the canary within {}: are the workers running? (a longer --watch waits longer)",
                    humantime::format_duration(c.watch)
                )
            } else {
                format!(
                    "of the canary's {moved}: {} came back, {} are retrying, {no_outcome} have no outcome (more than {}%)",
                    o.dead_lettered, o.retrying, c.halt_above_pct
                )
            });
        }
        self.report.canary = Some(CanaryOutcome {
            size: c.size,
            moved,
            succeeded: o.succeeded,
            retrying: o.retrying,
            came_back: o.dead_lettered,
            no_outcome,
            came_back_pct: percent(bad, moved),
            halt_above_pct: c.halt_above_pct,
            watched_ms: started.elapsed().as_millis() as u64,
            passed,
        });
        passed
    }

    /// The next batch of messages not seen before; `None` when nothing more can be read (after
    /// waiting for messages in flight elsewhere, up to `--wait-in-flight`), or when the reader
    /// holds as many as SQS lets it (the rest is left for another run, and said so).
    async fn next_batch(&mut self) -> Result<Option<Vec<DlqMessage>>> {
        loop {
            if self.stop.is_cancelled() {
                return Ok(None);
            }
            if self.reader.held() + BATCH_ROOM >= MAX_HELD {
                self.report.held_limit_reached = true;
                return Ok(None);
            }
            let want = self.opts.max.map_or(self.burst as usize, |m| {
                (m - self.report.matched as usize).min(self.burst as usize)
            });
            let batch = self.reader.next(want).await?;
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
            if !self.reader.exhausted(self.ctx).await? {
                continue;
            }
            let elsewhere = queues::info(self.ctx, self.dlq)
                .await?
                .in_flight
                .saturating_sub(self.reader.held() as u64);
            self.report.in_flight_elsewhere = elsewhere;
            if elsewhere == 0 || self.waited >= self.opts.wait_in_flight {
                return Ok(None);
            }
            self.bar.set_message(format!(
                "waiting for {elsewhere} messages in flight elsewhere"
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.waited += Duration::from_secs(1);
            self.reader.reset_polls();
        }
    }

    /// Sorts a batch: messages this run moved that came back are counted and left alone (a run
    /// moves each message once); of the others, those that match get a destination. A dry run
    /// records them instead.
    async fn plan(&mut self, batch: Vec<DlqMessage>) -> Result<Vec<Planned>> {
        self.report.read += batch.len() as u64;
        let stamp = OffsetDateTime::now_utc();
        let mut planned = Vec::new();
        for m in batch {
            let attribution = m.attribution();
            let reason = attribution
                .as_ref()
                .map_or_else(|| "none".into(), |a| a.reason.clone());
            if m.redrive()
                .is_some_and(|r| r.is_from_run(&self.report.redrive_id))
            {
                self.read_back += 1;
                let reason = if attribution.is_none() {
                    // No current attribution: SQS moved it (its receives ran out) under the id
                    // this run's copy had; the workers wrote nothing about that.
                    self.moved_by_sqs.insert(m.message_id.clone());
                    "moved_by_sqs".to_owned()
                } else {
                    reason
                };
                *self.read_back_reasons.entry(reason).or_default() += 1;
                continue;
            }
            // Sent to the DLQ after the run started (by this machine's clock): not in the DLQ
            // when the run began, so not this run's, whatever record it lost on the way.
            if m.sent_at().is_some_and(|sent| sent > self.started) {
                self.report.arrived_during_run += 1;
                continue;
            }
            if self.max_reached() || !self.opts.filter.matches(&m, stamp) {
                continue;
            }
            self.report.matched += 1;
            *self.report.reasons.entry(reason.clone()).or_default() += 1;
            let destination = self.destination_of(&m).await?;
            if self.opts.dry_run {
                self.report.would_move.push(WouldMove {
                    message_id: m.message_id.clone(),
                    destination: destination.clone(),
                    reason,
                    correlation_id: m.correlation_id(),
                });
                *self
                    .report
                    .destinations
                    .entry(destination.unwrap_or_else(|| "(none: pass --to)".into()))
                    .or_default() += 1;
                self.bar.inc(1);
                continue;
            }
            match destination {
                Some(destination) => planned.push(Planned {
                    message: m,
                    destination,
                }),
                None => self.report.no_destination += 1,
            }
        }
        Ok(planned)
    }

    /// `--to`, else the message's source queue, else the DLQ's only source.
    async fn destination_of(&mut self, m: &DlqMessage) -> Result<Option<String>> {
        if let Some(q) = self.to {
            return Ok(Some(q.name.clone()));
        }
        if let Some(source) = source_of(m) {
            return Ok(Some(source));
        }
        if self.sole_source.is_none() {
            let account = queues::account(self.ctx, None).await?;
            let sources = queues::sources_by_dlq(&account)
                .remove(&self.info.arn)
                .unwrap_or_default();
            self.sole_source = Some((sources.len() == 1).then(|| sources[0].clone()));
        }
        Ok(self.sole_source.clone().flatten())
    }

    /// Sends planned messages, by destination, then deletes from the DLQ what was sent.
    async fn send_planned(&mut self, planned: Vec<Planned>) -> Result<()> {
        let mut by_destination: BTreeMap<String, Vec<DlqMessage>> = BTreeMap::new();
        for p in planned {
            by_destination
                .entry(p.destination)
                .or_default()
                .push(p.message);
        }
        for (name, messages) in by_destination {
            for chunk in messages.chunks(self.burst as usize) {
                // What is not sent stays held and is released (visible again) at the end.
                if self.stop.is_cancelled() || self.report.halted {
                    return Ok(());
                }
                self.send_chunk(&name, chunk).await?;
            }
        }
        Ok(())
    }

    async fn send_chunk(&mut self, name: &str, messages: &[DlqMessage]) -> Result<()> {
        let queue = match self.destinations.get(name) {
            Some(q) => q.clone(),
            None => {
                let q = match self.to {
                    Some(q) => q.clone(),
                    None => queues::resolve_name(self.ctx, name).await?,
                };
                self.destinations.insert(name.to_owned(), q.clone());
                q
            }
        };
        if let Some(l) = &self.limiter {
            let n = NonZeroU32::new(messages.len() as u32).expect("non-empty batch");
            l.until_n_ready(n).await.expect("batch within the burst");
        }
        self.first_send.get_or_insert_with(Instant::now);
        let refs: Vec<&DlqMessage> = messages.iter().collect();
        let sent = send(
            self.ctx,
            &queue,
            &self.dlq.name,
            &self.report.redrive_id,
            &refs,
        )
        .await?;
        self.last_send = Instant::now();
        self.sent_ids.extend(sent.values().cloned());
        let (ok, failed): (Vec<&DlqMessage>, Vec<&DlqMessage>) =
            refs.iter().partition(|m| sent.contains_key(&m.message_id));
        self.report.failed += failed.len() as u64;
        let not_deleted = self.reader.delete(&ok).await?;
        self.report.not_deleted += not_deleted.len() as u64;
        self.report.moved += (ok.len() - not_deleted.len()) as u64;
        *self.report.destinations.entry(name.to_owned()).or_default() += ok.len() as u64;
        self.bar.inc(ok.len() as u64);
        if !failed.is_empty() {
            let failed: Vec<DlqMessage> = failed.into_iter().cloned().collect();
            self.reader.release(&failed).await;
        }
        Ok(())
    }
}

/// What became of what a run sent (see [`Mover::outcomes`]): of the ledger's `entries`, only the
/// copies it sent (`sent`); those SQS moved to the DLQ itself (`moved_by_sqs`) as come back,
/// whatever the ledger last said; and never fewer come back than were read back in the DLQ.
fn outcomes_of_run(
    entries: &BTreeMap<String, Entry>,
    sent: &HashSet<String>,
    moved_by_sqs: &HashSet<String>,
    (read_back, read_back_reasons): (u64, &BTreeMap<String, u64>),
) -> RunOutcomes {
    let by_sqs = Entry::moved_by_sqs();
    let mut latest: BTreeMap<&str, &Entry> = entries
        .iter()
        .filter(|(id, _)| sent.contains(*id))
        .map(|(id, e)| (id.as_str(), e))
        .collect();
    for id in moved_by_sqs.iter().filter(|id| sent.contains(*id)) {
        latest.insert(id, &by_sqs);
    }
    let mut o = RunOutcomes::of(latest.into_values());
    if read_back > o.dead_lettered {
        // The ledger missed some (a failed write); one last written as retrying then counts
        // twice, against the run: the guard errs on the side of halting.
        o.dead_lettered = read_back;
        o.dead_lettered_reasons = read_back_reasons.clone();
    }
    o
}

/// What a guarded redrive does next, after its canary passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// Send the next batch.
    Go,
    /// Wait for more outcomes first: more messages have none than have one.
    Wait,
    /// Stop: too many came back or are retrying.
    Halt,
}

/// Decides on `sent` messages with outcomes `o`: halt when more than `--halt-above` percent of
/// everything sent came back (whatever the rest does), or, once at least the canary's size have
/// an outcome, when more than that of those came back or are retrying; otherwise go on while no
/// more messages are without an outcome than have one (at least the canary's size may be), else
/// wait.
fn guard(c: Canary, sent: u64, o: &RunOutcomes) -> Guard {
    let known = o.known();
    let bad = o.dead_lettered + o.retrying;
    if c.over(o.dead_lettered, sent) || (known >= c.size as u64 && c.over(bad, known)) {
        Guard::Halt
    } else if sent.saturating_sub(known) <= (c.size as u64).max(known) {
        Guard::Go
    } else {
        Guard::Wait
    }
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
    let now = OffsetDateTime::now_utc();
    let mut entries = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let entry =
            redriven_entry(m, i, from, run, queue.fifo(), now, ctx.redrivers()).map_err(|e| {
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

/// The outcome table's rows: with the ledger, what succeeded downstream, is retrying, came
/// back, or has no outcome yet; without it, what came back and what did not.
fn outcome_rows(report: &Report) -> Vec<(&'static str, u64)> {
    let mut rows = vec![("moved", report.moved)];
    match (report.succeeded, report.retrying, report.in_flight) {
        (Some(succeeded), Some(retrying), Some(in_flight)) => rows.extend([
            ("succeeded downstream", succeeded),
            ("retrying downstream", retrying),
            ("dead-lettered again (left in the DLQ)", report.came_back),
            ("still in flight (no outcome yet)", in_flight),
        ]),
        _ => rows.extend([
            ("dead-lettered again (left in the DLQ)", report.came_back),
            (
                "not back: applied, or still in flight (no ledger to tell)",
                report.not_back,
            ),
        ]),
    }
    rows.push((
        "matched, not moved (still in the DLQ)",
        report.matched.saturating_sub(report.moved),
    ));
    rows
}

/// Prints a report for people.
pub fn print(report: &Report) {
    let path = match report.path {
        "message-move-task" => format!(
            "path: SQS message move task {} ({})",
            report.task_handle.as_deref().unwrap_or(""),
            report.path_reason
        ),
        "dry-run" => "dry run: nothing moved".to_owned(),
        _ => format!("path: receive, send, then delete ({})", report.path_reason),
    };
    crate::outln!("{path}");
    let rows = report
        .destinations
        .iter()
        .map(|(d, n)| vec![d.clone(), n.to_string()]);
    crate::outln!(
        "{}",
        output::table(
            &[
                if report.path == "dry-run" {
                    "would go to"
                } else {
                    "sent to"
                },
                "messages"
            ],
            rows
        )
    );
    if !report.reasons.is_empty() {
        let rows = report
            .reasons
            .iter()
            .map(|(r, n)| vec![r.clone(), n.to_string()]);
        crate::outln!("{}", output::table(&["reason", "messages"], rows));
    }
    if report.path == "dry-run" {
        crate::outln!(
            "{} of {} messages read would move; every message read is visible again.",
            report.matched,
            report.read
        );
        return;
    }
    crate::outln!(
        "redrive {}: moved {} of {} matching ({} read) in {:.1}s, {:.1} msg/s",
        report.redrive_id,
        report.moved,
        report.matched,
        report.read,
        report.elapsed_ms as f64 / 1000.0,
        report.rate_per_sec
    );
    if let Some(c) = &report.canary {
        crate::outln!(
            "canary: {} moved: {} succeeded, {} retrying, {} came back, {} without an outcome ({:.0}% bad, halt above {:.0}%) within {:.0}s: {}",
            c.moved,
            c.succeeded,
            c.retrying,
            c.came_back,
            c.no_outcome,
            c.came_back_pct,
            c.halt_above_pct,
            c.watched_ms as f64 / 1000.0,
            if c.passed {
                "passed"
            } else if report.halted {
                "halted"
            } else {
                "interrupted"
            }
        );
    }
    crate::outln!(
        "{}",
        output::table(
            &["outcome", "messages"],
            outcome_rows(report)
                .into_iter()
                .map(|(what, n)| vec![what.to_owned(), n.to_string()])
        )
    );
    if !report.came_back_reasons.is_empty() {
        let rows = report
            .came_back_reasons
            .iter()
            .map(|(r, n)| vec![r.clone(), n.to_string()]);
        crate::outln!(
            "{}",
            output::table(&["came back with reason", "messages"], rows)
        );
    }
    if report.arrived_during_run > 0 {
        crate::outln!(
            "{} arrived in the DLQ after the run started: left for a later run",
            report.arrived_during_run
        );
    }
    if report.held_limit_reached {
        crate::outln!(
            "stopped reading at {} held messages (SQS's limit is near): run again for the rest",
            MAX_HELD
        );
    }
    if report.halted {
        crate::outln!(
            "halted: {}; the rest is still in the DLQ. Fix the cause (`dlq attribute {} --by redrive,reason`), then run again.",
            report.halt_reason.as_deref().unwrap_or("too many came back"),
            report.queue
        );
    }
    if report.failed > 0 {
        crate::outln!(
            "{} could not be sent and are still in the DLQ: run again",
            report.failed
        );
    }
    if report.not_deleted > 0 {
        crate::outln!("{} were sent but not deleted from the DLQ: a re-run sends them again (the fleet ignores the duplicate)", report.not_deleted);
    }
    if report.no_destination > 0 {
        crate::outln!(
            "{} have no known source queue: pass --to",
            report.no_destination
        );
    }
    if report.in_flight_elsewhere > 0 {
        crate::outln!("{} are in flight elsewhere (an interrupted run holds them until their visibility ends): run again later", report.in_flight_elsewhere);
    }
    if report.interrupted {
        crate::outln!(
            "interrupted: what was read and not moved is visible again; run again to finish"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::{attribution, message};
    use fleet_common::failure::FailureClass;

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
        let entry = redriven_entry(
            &m,
            3,
            "fleet-orders-dlq",
            "run-1",
            false,
            OffsetDateTime::UNIX_EPOCH,
            &[],
        )
        .unwrap();
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
            "q-dlq",
            "run-2",
            false,
            OffsetDateTime::UNIX_EPOCH,
            &redrivers,
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
        let first = redriven_entry(
            &m,
            0,
            "q-dlq.fifo",
            "run-1",
            true,
            OffsetDateTime::UNIX_EPOCH,
            &[],
        )
        .unwrap();
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
        let second = redriven_entry(
            &m,
            0,
            "q-dlq.fifo",
            "run-1",
            true,
            OffsetDateTime::UNIX_EPOCH,
            &[],
        )
        .unwrap();
        assert_eq!(second.message_deduplication_id(), Some("evt-7.r2"));
        // A standard queue (fair queues): the group travels, no deduplication id.
        let standard = redriven_entry(
            &m,
            0,
            "q-dlq",
            "run-1",
            false,
            OffsetDateTime::UNIX_EPOCH,
            &[],
        )
        .unwrap();
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
        let entry = redriven_entry(
            &m,
            0,
            "q-dlq",
            "run-1",
            false,
            OffsetDateTime::UNIX_EPOCH,
            &[],
        )
        .unwrap();
        let system = entry.message_system_attributes().unwrap();
        let carried =
            &system[&aws_sdk_sqs::types::MessageSystemAttributeNameForSends::AwsTraceHeader];
        assert_eq!(carried.string_value(), Some(header));
        assert_eq!(carried.data_type(), "String");
        // Without a header, nothing is set (SQS refuses an empty system attribute).
        let plain = redriven_entry(
            &message("m2", "{}", None),
            0,
            "q-dlq",
            "run-1",
            false,
            OffsetDateTime::UNIX_EPOCH,
            &[],
        )
        .unwrap();
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
