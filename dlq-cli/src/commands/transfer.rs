//! `export`, `import` and `purge`.
//!
//! Export writes JSON Lines (one [`DlqMessage`] per line: body, message attributes, system
//! attributes) to a temporary file, fsyncs it, renames it into place and fsyncs the directory;
//! only then, with `--delete`, does it delete what it wrote. Import sends every line's body and
//! attributes exactly as they are (FIFO: with its group and deduplication ids).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use governor::{Quota, RateLimiter};
use serde::Serialize;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::commands::inspect::guard_reads;
use crate::error::{CliError, Exit, Result};
use crate::filter::Filter;
use crate::output::{self, Output};
use crate::queues::{self, Ctx, Queue};
use crate::record::DlqMessage;
use crate::scan::Reader;

/// What `export` did.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    /// The queue.
    pub queue: String,
    /// The file written.
    pub file: String,
    /// Messages read.
    pub read: u64,
    /// Messages written (those matching the filters).
    pub exported: u64,
    /// Deleted from the queue after the file was synced (`--delete`).
    pub deleted: u64,
    /// Exported but not deleted (still in the queue).
    pub not_deleted: u64,
    /// Messages whose hold lapsed and that were received again: the export may be missing
    /// some (run it again).
    pub lapsed: u64,
}

/// `dlq export`: the queue, and what to write.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The queue.
    pub queue: String,
    #[command(flatten)]
    pub options: ExportOptions,
}

impl ExportArgs {
    /// Runs `dlq export`.
    ///
    /// # Errors
    /// AWS and file errors.
    pub async fn run(self, ctx: &Ctx, output: Output, stop: &CancellationToken) -> Result<Exit> {
        let q = queues::resolve(ctx, &self.queue).await?;
        export(ctx, &q, &self.options, output, stop).await
    }
}

/// What `dlq export` writes, and what it does with what it wrote.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportOptions {
    /// The file to write (JSON Lines).
    #[arg(long)]
    pub file: std::path::PathBuf,
    /// Delete what was exported, once the file is synced to disk.
    #[arg(long)]
    pub delete: bool,
    /// Export at most this many messages.
    #[arg(long)]
    pub max: Option<usize>,
    /// Replace an existing file.
    #[arg(long = "force")]
    pub overwrite: bool,
    /// Which messages.
    #[command(flatten)]
    pub filter: Filter,
}

/// `dlq import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The export file.
    pub file: std::path::PathBuf,
    /// Destination queue (name, URL or config key of a work queue).
    #[arg(long)]
    pub to: String,
    /// At most this many messages per second.
    #[arg(long)]
    pub rate: Option<NonZeroU32>,
}

impl ImportArgs {
    /// Runs `dlq import`.
    ///
    /// # Errors
    /// AWS and file errors.
    pub async fn run(self, ctx: &Ctx, output: Output, stop: &CancellationToken) -> Result<Exit> {
        // A config key names the work queue here, not its DLQ.
        let q = if self.to.starts_with("http") {
            queues::resolve(ctx, &self.to).await?
        } else {
            let name = ctx
                .config
                .as_ref()
                .and_then(|c| c.queues.get(&self.to))
                .map_or_else(|| self.to.clone(), |q| q.name.clone());
            queues::resolve_name(ctx, &name).await?
        };
        import(ctx, &self.file, &q, self.rate, output, stop).await
    }
}

/// `dlq purge`.
#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    /// The queue (a config key names its DLQ).
    pub queue: String,
    /// Do not ask.
    #[arg(long)]
    pub yes: bool,
    /// Purge a work queue (not a `<queue>-dlq`): deletes jobs no worker has run yet.
    #[arg(long)]
    pub work_queue: bool,
}

impl PurgeArgs {
    /// Runs `dlq purge`.
    ///
    /// # Errors
    /// AWS errors; a work queue without `--work-queue`.
    pub async fn run(self, ctx: &Ctx, output: Output, _stop: &CancellationToken) -> Result<Exit> {
        let q = queues::resolve(ctx, &self.queue).await?;
        purge(ctx, &q, self.yes, self.work_queue, output).await
    }
}

/// `dlq export`.
///
/// # Errors
/// AWS and file errors; an existing file without `--force`.
pub async fn export(
    ctx: &Ctx,
    queue: &Queue,
    opts: &ExportOptions,
    output: Output,
    stop: &CancellationToken,
) -> Result<Exit> {
    let (file, max, delete, overwrite) =
        (opts.file.as_path(), opts.max, opts.delete, opts.overwrite);
    if file.exists() && !overwrite {
        return Err(CliError::Usage(format!(
            "{} exists: pick another file or pass --force to replace it",
            file.display()
        )));
    }
    let info = guard_reads(ctx, queue, false).await?;
    let bar = output::progress(
        output,
        Some(max.map_or(info.visible, |m| (m as u64).min(info.visible))),
        "exporting",
    );
    let mut reader = Reader::new(ctx, queue, Duration::from_secs(120));
    let mut report = ExportReport {
        queue: queue.name.clone(),
        file: file.display().to_string(),
        read: 0,
        exported: 0,
        deleted: 0,
        not_deleted: 0,
        lapsed: 0,
    };
    let written = stream_export(ctx, &mut reader, opts, &mut report, &bar, stop).await;
    report.lapsed = reader.lapsed();
    reader.finish().await;
    written?;
    if report.lapsed > 0 {
        tracing::warn!(
            lapsed = report.lapsed,
            "holds lapsed during the export: messages may have been missed; run it again"
        );
    }
    bar.finish_and_clear();
    match output {
        Output::Json => output::json(&report),
        Output::Table => {
            crate::outln!(
                "exported {} of {} messages from {} to {}",
                report.exported,
                report.read,
                report.queue,
                report.file
            );
            if delete {
                crate::outln!(
                    "deleted {} from the queue after the file was synced{}",
                    report.deleted,
                    if report.not_deleted > 0 {
                        format!(
                            "; {} could not be deleted and are still there",
                            report.not_deleted
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    Ok(if stop.is_cancelled() {
        Exit::Interrupted
    } else if report.not_deleted > 0 || report.lapsed > 0 {
        Exit::Partial
    } else {
        Exit::Ok
    })
}

/// With `--delete`, written messages are deleted in checkpoints of this many, each after the
/// file holding them is synced: the reader never holds more than this many chosen messages.
const DELETE_CHECKPOINT: usize = 1_000;

/// `<file>.tmp`, where an export writes before it renames into place.
fn temporary(file: &Path) -> std::path::PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".tmp");
    name.into()
}

/// Reads the queue batch by batch and writes each chosen message to `<file>.tmp` at once, so
/// memory stays flat however long the queue (only the ids of written messages awaiting their
/// checkpoint are kept). With `delete`, every [`DELETE_CHECKPOINT`] messages (and before
/// deciding the queue is exhausted) the file is synced and only then are they deleted. At the
/// end, or on Ctrl-C, the file is synced, renamed into place and its directory synced; then
/// the last checkpoint is deleted. `<file>.tmp` is created new: an earlier interrupted export's
/// is never overwritten, and an error after a deletion names it, since it then holds the only
/// copy of what was deleted.
async fn stream_export(
    ctx: &Ctx,
    reader: &mut Reader,
    opts: &ExportOptions,
    report: &mut ExportReport,
    bar: &indicatif::ProgressBar,
    stop: &CancellationToken,
) -> Result<()> {
    let (file, filter, max, delete) = (opts.file.as_path(), &opts.filter, opts.max, opts.delete);
    let tmp = temporary(file);
    let io = |what: &str, e: std::io::Error| CliError::Io(format!("{what} {}: {e}", tmp.display()));
    let mut w = BufWriter::new(create_temporary(file, &tmp)?);
    let result = async {
        let mut written: Vec<String> = Vec::new();
        let now = OffsetDateTime::now_utc();
        while !stop.is_cancelled() {
            let read = report.read as usize;
            if max.is_some_and(|m| read >= m) {
                break;
            }
            let want = max.map_or(10, |m| (m - read).min(10));
            let batch = reader.next(want).await?;
            if batch.is_empty() {
                // Held, undeleted messages block their FIFO group: free them first.
                if delete && !written.is_empty() {
                    checkpoint(&mut w, &tmp, reader, &mut written, report).await?;
                    continue;
                }
                if reader.exhausted(ctx).await? {
                    break;
                }
                continue;
            }
            for m in batch {
                report.read += 1;
                bar.inc(1);
                if !filter.matches(&m, now) {
                    continue;
                }
                serde_json::to_writer(&mut w, &m).map_err(|e| CliError::Io(e.to_string()))?;
                w.write_all(b"\n").map_err(|e| io("cannot write", e))?;
                report.exported += 1;
                if delete {
                    written.push(m.message_id);
                }
            }
            if delete && written.len() >= DELETE_CHECKPOINT {
                checkpoint(&mut w, &tmp, reader, &mut written, report).await?;
            }
        }
        finish_file(&mut w, &tmp, file)?;
        if delete {
            let ids: Vec<&str> = written.iter().map(String::as_str).collect();
            let failed = reader.delete_ids(&ids).await?;
            report.not_deleted += failed.len() as u64;
            report.deleted += (ids.len() - failed.len()) as u64;
        }
        Ok::<(), CliError>(())
    }
    .await;
    match result {
        Err(e) if report.deleted > 0 && tmp.exists() => Err(CliError::Io(format!(
            "{e}; {} messages already deleted from the queue are in {} (synced): keep it",
            report.deleted,
            tmp.display()
        ))),
        other => other,
    }
}

/// Creates `tmp`, the file an export writes before it is complete, never over an existing one
/// (an interrupted export's may hold the only copy of messages it deleted).
fn create_temporary(file: &Path, tmp: &Path) -> Result<File> {
    let handle = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CliError::Usage(format!(
                    "{} exists: an earlier export was interrupted and it may hold the only copy of messages it deleted; move it away (or import it) first",
                    tmp.display()
                ))
            } else {
                CliError::Io(format!("cannot create {}: {e}", tmp.display()))
            }
        })?;
    sync_dir(file)?;
    Ok(handle)
}

/// Flushes and syncs `tmp`, renames it to `file` and syncs the directory: the export is
/// complete and durable.
fn finish_file(w: &mut BufWriter<File>, tmp: &Path, file: &Path) -> Result<()> {
    let io = |what: &str, e: std::io::Error| CliError::Io(format!("{what} {}: {e}", tmp.display()));
    w.flush().map_err(|e| io("cannot write", e))?;
    w.get_ref().sync_all().map_err(|e| io("cannot sync", e))?;
    std::fs::rename(tmp, file).map_err(|e| io("cannot rename", e))?;
    sync_dir(file)
}

/// Syncs the file, deletes the messages written since the last checkpoint, and forgets them.
async fn checkpoint(
    w: &mut BufWriter<File>,
    tmp: &Path,
    reader: &mut Reader,
    written: &mut Vec<String>,
    report: &mut ExportReport,
) -> Result<()> {
    let io = |what: &str, e: std::io::Error| CliError::Io(format!("{what} {}: {e}", tmp.display()));
    w.flush().map_err(|e| io("cannot write", e))?;
    w.get_ref().sync_all().map_err(|e| io("cannot sync", e))?;
    let ids: Vec<&str> = written.iter().map(String::as_str).collect();
    let failed = reader.delete_ids(&ids).await?;
    report.not_deleted += failed.len() as u64;
    report.deleted += (ids.len() - failed.len()) as u64;
    reader.forget(written);
    written.clear();
    Ok(())
}

/// Fsyncs the directory of `file`, so that a created or renamed entry is durable.
fn sync_dir(file: &Path) -> Result<()> {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CliError::Io(format!("cannot sync the directory {}: {e}", dir.display())))
}

/// Reads an export file; every line must parse (the error names the line).
///
/// # Errors
/// File errors and lines that are not messages.
pub fn read_file(file: &Path) -> Result<Vec<DlqMessage>> {
    let f = File::open(file)
        .map_err(|e| CliError::Io(format!("cannot open {}: {e}", file.display())))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line =
            line.map_err(|e| CliError::Io(format!("cannot read {}: {e}", file.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let m: DlqMessage = serde_json::from_str(&line).map_err(|e| {
            CliError::Usage(format!(
                "{} line {}: not an exported message: {e}",
                file.display(),
                i + 1
            ))
        })?;
        m.sdk_attributes()
            .map_err(|e| CliError::Usage(format!("{} line {}: {e}", file.display(), i + 1)))?;
        out.push(m);
    }
    Ok(out)
}

/// What `import` did.
#[derive(Debug, Serialize)]
pub struct ImportReport {
    /// The file read.
    pub file: String,
    /// The destination queue.
    pub queue: String,
    /// Lines in the file.
    pub lines: u64,
    /// Messages sent.
    pub sent: u64,
    /// Messages SQS refused.
    pub failed: u64,
}

/// `dlq import`.
///
/// # Errors
/// AWS and file errors.
pub async fn import(
    ctx: &Ctx,
    file: &Path,
    to: &Queue,
    rate: Option<NonZeroU32>,
    output: Output,
    stop: &CancellationToken,
) -> Result<Exit> {
    let messages = read_file(file)?;
    let burst = rate.map_or(10, |r| r.get().min(10));
    let limiter = rate.map(|r| {
        RateLimiter::direct(
            Quota::per_second(r).allow_burst(NonZeroU32::new(burst).expect("non-zero")),
        )
    });
    let bar = output::progress(output, Some(messages.len() as u64), "importing");
    let mut report = ImportReport {
        file: file.display().to_string(),
        queue: to.name.clone(),
        lines: messages.len() as u64,
        sent: 0,
        failed: 0,
    };
    for chunk in messages.chunks(burst as usize) {
        if stop.is_cancelled() {
            break;
        }
        if let Some(l) = &limiter {
            l.until_n_ready(NonZeroU32::new(chunk.len() as u32).expect("non-empty"))
                .await
                .expect("within burst");
        }
        let now = OffsetDateTime::now_utc();
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let m = m.for_import(to.is_dlq(), &to.name, now, ctx.redrivers());
                let deduplication_id = m.deduplication_id().unwrap_or(&m.message_id).to_owned();
                m.batch_entry(i, to.fifo(), deduplication_id)
                    .map_err(CliError::Usage)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = ctx
            .sqs
            .send_message_batch()
            .queue_url(&to.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| CliError::aws(format!("sending to `{}`", to.name), &e))?;
        report.sent += out.successful().len() as u64;
        report.failed += out.failed().len() as u64;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    match output {
        Output::Json => output::json(&report),
        Output::Table => crate::outln!(
            "sent {} of {} messages from {} to {}{}",
            report.sent,
            report.lines,
            report.file,
            report.queue,
            if report.failed > 0 {
                format!("; {} refused", report.failed)
            } else {
                String::new()
            }
        ),
    }
    Ok(if stop.is_cancelled() {
        Exit::Interrupted
    } else if report.failed > 0 {
        Exit::Partial
    } else {
        Exit::Ok
    })
}

/// Whether `dlq purge` may empty this queue. A DLQ (the fleet names them `<queue>-dlq`) holds
/// dead letters; any other queue holds jobs still waiting for a worker, so it is refused unless
/// `--work-queue` says so explicitly. `--yes` only skips the confirmation: it never stands in
/// for `--work-queue`.
///
/// # Errors
/// A work queue without `--work-queue` (a usage error: exit code 2), saying why and what to pass.
pub fn purge_allowed(queue: &Queue, work_queue: bool) -> Result<()> {
    if queue.is_dlq() || work_queue {
        return Ok(());
    }
    Err(CliError::Usage(format!(
        "`{}` is not a DLQ (the fleet names its DLQs `<queue>-dlq`): it is a work queue, its messages are jobs still waiting for a worker, and purging deletes them for good; pass --work-queue to purge it anyway",
        queue.name
    )))
}

/// `dlq purge`: deletes every message of the queue, after a confirmation, and counts them. A
/// work queue only with `work_queue` ([`purge_allowed`]).
///
/// # Errors
/// A work queue without `--work-queue`; AWS errors; no confirmation.
pub async fn purge(
    ctx: &Ctx,
    queue: &Queue,
    yes: bool,
    work_queue: bool,
    output: Output,
) -> Result<Exit> {
    purge_allowed(queue, work_queue)?;
    let info = queues::info(ctx, queue).await?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::Usage(
                "purge deletes messages for good: confirm with --yes when not at a terminal".into(),
            ));
        }
        eprint!(
            "This deletes about {} messages from {} for good. Type the queue name to confirm: ",
            info.visible + info.in_flight,
            queue.name
        );
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .map_err(|e| CliError::Io(e.to_string()))?;
        if answer.trim() != queue.name {
            return Err(CliError::Usage("not confirmed: nothing was deleted".into()));
        }
    }
    let bar = output::progress(output, Some(info.visible), "purging");
    let mut reader = Reader::new(ctx, queue, Duration::from_secs(60));
    let mut deleted = 0u64;
    let result: Result<()> = async {
        loop {
            let batch = reader.next(10).await?;
            if batch.is_empty() {
                if reader.exhausted(ctx).await? {
                    return Ok(());
                }
                continue;
            }
            let refs: Vec<&DlqMessage> = batch.iter().collect();
            let failed = reader.delete(&refs).await?;
            deleted += (batch.len() - failed.len()) as u64;
            bar.inc(batch.len() as u64);
        }
    }
    .await;
    reader.finish().await;
    bar.finish_and_clear();
    result?;
    match output {
        Output::Json => {
            output::json(&serde_json::json!({ "queue": queue.name, "deleted": deleted }))
        }
        Output::Table => crate::outln!("deleted {deleted} messages from {}", queue.name),
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod purge_tests {
    use super::*;

    fn queue(name: &str) -> Queue {
        Queue {
            name: name.to_owned(),
            url: format!("https://sqs.eu-west-1.amazonaws.com/123456789012/{name}"),
        }
    }

    #[test]
    fn purge_takes_a_dlq_and_refuses_a_work_queue_without_the_flag() {
        for dlq in ["fleet-orders-dlq", "fleet-orders-dlq.fifo"] {
            assert!(purge_allowed(&queue(dlq), false).is_ok(), "{dlq}");
            assert!(purge_allowed(&queue(dlq), true).is_ok(), "{dlq}");
        }
        for work in ["fleet-orders", "fleet-ingest.fifo", "fleet-dlq-archive"] {
            let err = purge_allowed(&queue(work), false).expect_err(work);
            assert!(matches!(err, CliError::Usage(_)), "{work}: {err:?}");
            assert_eq!(err.exit(), Exit::Usage);
            let text = err.to_string();
            assert!(
                text.contains(&format!("`{work}` is not a DLQ"))
                    && text.contains("jobs still waiting for a worker")
                    && text.contains("pass --work-queue"),
                "the refusal says why and which flag to pass: {text}"
            );
            assert!(purge_allowed(&queue(work), true).is_ok(), "{work}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::message;

    #[test]
    fn an_export_file_reads_back_and_a_bad_line_is_named() {
        let dir = std::env::temp_dir().join(format!("dlq-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("out.jsonl");
        let a = message("a", "first\nline", None);
        let b = message("b", "{\"x\":\"é\"}", None);
        let lines: Vec<String> = [&a, &b]
            .iter()
            .map(|m| serde_json::to_string(m).unwrap())
            .collect();
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let back = read_file(&file).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].body, a.body);
        assert_eq!(back[1].body, b.body);
        std::fs::write(&file, "{\"message_id\":\"x\",\"body\":\"y\"}\nnot json\n").unwrap();
        let err = read_file(&file).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
