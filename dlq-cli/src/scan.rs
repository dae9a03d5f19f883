//! Reading a queue without consuming it: received messages are held invisible (their
//! visibility extended while the command runs) and released, made visible again at once, when
//! the command is done with them — or deleted once their copy is safe elsewhere.
//!
//! Every receive increments a message's ApproximateReceiveCount. On a DLQ that has no redrive
//! policy of its own nothing else follows; on a queue with a redrive policy, enough reads would
//! move messages to its DLQ, so commands refuse such queues unless told `--force`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::error::{CliError, Result};
use crate::queues::{Ctx, Queue};
use crate::record::DlqMessage;

const BATCH: usize = 10;

/// The most messages a reader holds at once: SQS refuses receives past 120,000 messages in
/// flight on a standard queue, and others (the workers, another operator) hold some too.
pub const MAX_HELD: usize = 100_000;

/// Visibility extensions in flight at once while holding.
const HEARTBEAT_CALLS: usize = 32;

/// Holds what it received until released or deleted.
pub struct Reader {
    sqs: aws_sdk_sqs::Client,
    queue: Queue,
    hold: Duration,
    /// Receipt of every held message, by message id.
    held: Arc<Mutex<HashMap<String, String>>>,
    seen: HashSet<String>,
    empty_receives: u32,
    /// Messages received again after they were read: their hold lapsed.
    lapsed: u64,
    stop_heartbeat: CancellationToken,
}

impl Reader {
    /// Starts reading `queue`, holding messages for `hold` at a time (extended every third of it).
    pub fn new(ctx: &Ctx, queue: &Queue, hold: Duration) -> Self {
        let held: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let stop_heartbeat = CancellationToken::new();
        {
            let (sqs, url, held, stop) = (
                ctx.sqs.clone(),
                queue.url.clone(),
                held.clone(),
                stop_heartbeat.clone(),
            );
            tokio::spawn(async move {
                let every = (hold / 3).max(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(every) => {}
                    }
                    let receipts: Vec<String> =
                        held.lock().expect("held lock").values().cloned().collect();
                    // Many calls at once: tens of thousands held must all be extended well
                    // within a hold.
                    futures::stream::iter(receipts.chunks(BATCH))
                        .for_each_concurrent(HEARTBEAT_CALLS, |chunk| {
                            let (sqs, url) = (&sqs, &url);
                            async move {
                                let _ =
                                    change_visibility(sqs, url, chunk, hold.as_secs() as i32).await;
                            }
                        })
                        .await;
                }
            });
        }
        Self {
            sqs: ctx.sqs.clone(),
            queue: queue.clone(),
            hold,
            held,
            seen: HashSet::new(),
            empty_receives: 0,
            lapsed: 0,
            stop_heartbeat,
        }
    }

    /// Resets the count of empty polls (after waiting for messages that
    /// were in flight elsewhere).
    pub fn reset_polls(&mut self) {
        self.empty_receives = 0;
    }

    /// The queue being read.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Messages received again after they had been read: their hold lapsed (a command that
    /// must see each message once, like an export, cannot be sure it saw them all).
    pub fn lapsed(&self) -> u64 {
        self.lapsed
    }

    /// Forgets messages that are gone (deleted): they cannot come back, and a long read need
    /// not remember them.
    pub fn forget(&mut self, ids: &[String]) {
        for id in ids {
            self.seen.remove(id);
        }
    }

    /// Messages held now.
    pub fn held(&self) -> usize {
        self.held.lock().expect("held lock").len()
    }

    /// One receive of up to `max` (≤ 10) messages not seen before. An empty result does not mean
    /// the queue is exhausted: see [`Reader::exhausted`].
    ///
    /// # Errors
    /// AWS errors.
    pub async fn next(&mut self, max: usize) -> Result<Vec<DlqMessage>> {
        if self.held() >= MAX_HELD {
            return Err(CliError::Usage(format!(
                "{MAX_HELD} messages of `{}` are held at once, near SQS's limit of 120,000 in flight: narrow the read (--max, filters) or, for export, use --delete (which frees messages as it goes)",
                self.queue.name
            )));
        }
        let out = self
            .sqs
            .receive_message()
            .queue_url(&self.queue.url)
            .max_number_of_messages(max.clamp(1, BATCH) as i32)
            .wait_time_seconds(1)
            .visibility_timeout(self.hold.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| CliError::aws(format!("receiving from `{}`", self.queue.name), &e))?;
        let mut fresh = Vec::new();
        {
            let mut held = self.held.lock().expect("held lock");
            for m in out.messages().iter().filter_map(DlqMessage::from_sdk) {
                held.insert(m.message_id.clone(), m.receipt_handle.clone());
                if self.seen.insert(m.message_id.clone()) {
                    fresh.push(m);
                } else {
                    self.lapsed += 1;
                }
            }
        }
        self.empty_receives = if fresh.is_empty() {
            self.empty_receives + 1
        } else {
            0
        };
        Ok(fresh)
    }

    /// After an empty receive: whether nothing more can be read now — the queue reports no
    /// visible message, or three long polls in a row came back empty (messages behind held ones
    /// in a FIFO group cannot be read until those are released).
    ///
    /// # Errors
    /// AWS errors.
    pub async fn exhausted(&self, ctx: &Ctx) -> Result<bool> {
        if self.empty_receives >= 3 {
            return Ok(true);
        }
        Ok(crate::queues::info(ctx, &self.queue).await?.visible == 0)
    }

    /// Makes messages visible again at once.
    pub async fn release(&self, messages: &[DlqMessage]) {
        let receipts = self.take(messages.iter().map(|m| m.message_id.as_str()));
        for chunk in receipts.chunks(BATCH) {
            if let Err(e) = change_visibility(&self.sqs, &self.queue.url, chunk, 0).await {
                tracing::warn!(queue = %self.queue.name, error = %e, "could not release messages; they become visible when their hold ends");
            }
        }
    }

    /// Deletes messages; returns the ids of those that could not be deleted (they stay held
    /// until the end, then become visible again).
    ///
    /// # Errors
    /// AWS errors of a whole batch request.
    pub async fn delete(&self, messages: &[&DlqMessage]) -> Result<Vec<String>> {
        let ids: Vec<&str> = messages.iter().map(|m| m.message_id.as_str()).collect();
        self.delete_ids(&ids).await
    }

    /// Deletes held messages by id, each with its latest receipt (a message received again
    /// has a new one; SQS ignores a delete with an old one); returns the ids that could not be
    /// deleted.
    ///
    /// # Errors
    /// AWS errors of a whole batch request.
    pub async fn delete_ids(&self, ids: &[&str]) -> Result<Vec<String>> {
        let mut failed = Vec::new();
        for chunk in ids.chunks(BATCH) {
            let receipts: Vec<Option<String>> = {
                let held = self.held.lock().expect("held lock");
                chunk.iter().map(|id| held.get(*id).cloned()).collect()
            };
            let entries: Vec<_> = chunk
                .iter()
                .zip(&receipts)
                .enumerate()
                .filter_map(|(i, (_, receipt))| {
                    let receipt = receipt.as_ref()?;
                    Some(
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(receipt)
                            .build()
                            .expect("id and receipt set"),
                    )
                })
                .collect();
            // A message no longer held cannot be deleted by this reader.
            failed.extend(
                chunk
                    .iter()
                    .zip(&receipts)
                    .filter(|(_, r)| r.is_none())
                    .map(|(id, _)| (*id).to_owned()),
            );
            if entries.is_empty() {
                continue;
            }
            let out = self
                .sqs
                .delete_message_batch()
                .queue_url(&self.queue.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| CliError::aws(format!("deleting from `{}`", self.queue.name), &e))?;
            let bad: HashSet<usize> = out
                .failed()
                .iter()
                .filter_map(|f| f.id().parse().ok())
                .collect();
            let ok = chunk
                .iter()
                .zip(&receipts)
                .enumerate()
                .filter(|(i, (_, r))| r.is_some() && !bad.contains(i))
                .map(|(_, (id, _))| *id);
            self.take(ok);
            failed.extend(bad.iter().map(|i| chunk[*i].to_owned()));
        }
        Ok(failed)
    }

    /// Releases everything still held and stops the heartbeat.
    pub async fn finish(self) {
        self.stop_heartbeat.cancel();
        let receipts: Vec<String> = self
            .held
            .lock()
            .expect("held lock")
            .drain()
            .map(|(_, r)| r)
            .collect();
        for chunk in receipts.chunks(BATCH) {
            let _ = change_visibility(&self.sqs, &self.queue.url, chunk, 0).await;
        }
    }

    fn take<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Vec<String> {
        let mut held = self.held.lock().expect("held lock");
        ids.filter_map(|id| held.remove(id)).collect()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop_heartbeat.cancel();
    }
}

async fn change_visibility(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    receipts: &[String],
    secs: i32,
) -> std::result::Result<(), String> {
    let entries: Vec<_> = receipts
        .iter()
        .enumerate()
        .map(|(i, r)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(r)
                .visibility_timeout(secs)
                .build()
                .expect("id and receipt set")
        })
        .collect();
    sqs.change_message_visibility_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| fleet_common::sdk_error_message(&e))
}

/// Reads up to `max` messages (all when `None`), calling `each` with every message read, and
/// keeps them held. Stops early when `stop` is cancelled. Returns the messages.
///
/// # Errors
/// AWS errors.
pub async fn read_all(
    ctx: &Ctx,
    reader: &mut Reader,
    max: Option<usize>,
    stop: &CancellationToken,
    mut each: impl FnMut(&DlqMessage),
) -> Result<Vec<DlqMessage>> {
    let mut all = Vec::new();
    scan(ctx, reader, max, stop, |m| {
        each(&m);
        all.push(m);
    })
    .await?;
    Ok(all)
}

/// Reads up to `max` messages (all when `None`), handing each to `each` and keeping none:
/// memory stays flat however long the queue (the reader holds only receipts). Stops early when
/// `stop` is cancelled. Returns how many were read.
///
/// # Errors
/// AWS errors; more than [`MAX_HELD`] messages held.
pub async fn scan(
    ctx: &Ctx,
    reader: &mut Reader,
    max: Option<usize>,
    stop: &CancellationToken,
    mut each: impl FnMut(DlqMessage),
) -> Result<usize> {
    let mut read = 0;
    while max.is_none_or(|m| read < m) && !stop.is_cancelled() {
        let want = max.map_or(BATCH, |m| (m - read).min(BATCH));
        let batch = reader.next(want).await?;
        if batch.is_empty() {
            if reader.exhausted(ctx).await? {
                break;
            }
            continue;
        }
        read += batch.len();
        for m in batch {
            each(m);
        }
    }
    Ok(read)
}
