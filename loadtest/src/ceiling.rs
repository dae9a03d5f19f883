//! What the backends on the target can serve, measured in the same run before the load: a raw
//! batch receive/delete loop for SQS, raw conditional writes for DynamoDB, and (locally) the
//! fleet's own DynamoDB work without queues, at the concurrency the fleet uses. The fleet cannot
//! go faster than these allow. The first fifth of each measurement warms up and is not counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use fleet_harness::scenario::Input;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

/// A backend's measured capacity.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Ceiling {
    /// Requests per second the loop achieved.
    pub requests_per_sec: f64,
    /// Messages (SQS) or items (DynamoDB) per second.
    pub units_per_sec: f64,
}

/// A measurement window of `secs`: its first fifth warms the backend up (connections, a freshly
/// started emulator's first requests) and is not counted.
#[derive(Clone, Copy)]
struct Window {
    counted_from: Instant,
    deadline: Instant,
}

impl Window {
    fn new(secs: u64) -> Self {
        let now = Instant::now();
        let total = Duration::from_secs(secs);
        Self {
            counted_from: now + total / 5,
            deadline: now + total,
        }
    }

    /// Whether to start another request.
    fn open(self) -> bool {
        Instant::now() < self.deadline
    }

    /// Whether a request that completes now counts.
    fn counts(self) -> bool {
        Instant::now() >= self.counted_from
    }

    /// `n` counted completions per second of the counted part.
    fn rate(self, n: &AtomicU64) -> f64 {
        n.load(Ordering::Relaxed) as f64 / self.counted_from.elapsed().as_secs_f64().max(0.001)
    }
}

/// Receives and deletes batches of ten from a scratch queue filled beforehand, with `loops`
/// concurrent loops, and times the middle of the drain: from the first 10% of the messages
/// deleted (warm-up) to 90% (before the queue runs dry, when receives come back short or
/// empty), or until `secs` have passed.
///
/// # Errors
/// AWS errors.
pub async fn sqs(
    sqs: &aws_sdk_sqs::Client,
    tag: &str,
    loops: usize,
    secs: u64,
) -> anyhow::Result<Ceiling> {
    let name = format!("loadtest-ceiling-{tag}");
    let url = sqs
        .create_queue()
        .queue_name(&name)
        .send()
        .await?
        .queue_url()
        .unwrap_or_default()
        .to_owned();
    let fill = (secs * 5_000).clamp(20_000, 100_000);
    fill_queue(sqs, &url, fill, 16, |_| {}).await?;
    let drain = Arc::new(Drain::new(fill));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            tokio::spawn(receive_delete(
                sqs.clone(),
                url.clone(),
                drain.clone(),
                deadline,
            ))
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let _ = sqs.delete_queue().queue_url(&url).send().await;
    Ok(drain.ceiling())
}

/// Sends `n` messages of `body_bytes` each to `url`, 16 batches of ten at a time, calling
/// `on_sent` with each batch's count.
pub(crate) async fn fill_queue(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    n: u64,
    body_bytes: usize,
    on_sent: impl Fn(u64),
) -> anyhow::Result<()> {
    let batches = n.div_ceil(10);
    let mut sends = futures::stream::iter(0..batches)
        .map(|b| async move {
            let batch: Vec<Input> = (0..10.min(n - b * 10))
                .map(|i| {
                    let tag = format!("message {b}/{i} ");
                    let pad = body_bytes.saturating_sub(tag.len());
                    Input {
                        body: tag + &"x".repeat(pad),
                        order_id: None,
                    }
                })
                .collect();
            fleet_harness::queues::send_batch(sqs, url, &batch)
                .await
                .map(|()| batch.len() as u64)
        })
        .buffer_unordered(16);
    while let Some(sent) = sends.try_next().await? {
        on_sent(sent);
    }
    Ok(())
}

/// The bare SDK loop: receive ten, delete them in one batch, until `deadline` or the drain is
/// done.
async fn receive_delete(
    sqs: aws_sdk_sqs::Client,
    url: String,
    drain: Arc<Drain>,
    deadline: Instant,
) {
    while Instant::now() < deadline && !drain.done() {
        if let Some(n) = receive_delete_once(&sqs, &url).await {
            // One receive and one delete for these n messages.
            drain.deleted(n, 2);
        }
    }
}

/// One round of the bare SDK loop: receive up to ten (a long poll of 1 s) and delete them in
/// one batch call; the number deleted, `None` when nothing came or a call failed.
pub(crate) async fn receive_delete_once(sqs: &aws_sdk_sqs::Client, url: &str) -> Option<u64> {
    let out = sqs
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .send()
        .await
        .ok()?;
    let entries: Vec<_> = out
        .messages()
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(m.receipt_handle()?)
                .build()
                .ok()
        })
        .collect();
    if entries.is_empty() {
        return None;
    }
    let n = entries.len() as u64;
    sqs.delete_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
        .ok()
        .map(|_| n)
}

/// The timed middle of a queue's drain: messages 10%–90% of `total`.
struct Drain {
    from: u64,
    to: u64,
    deleted: AtomicU64,
    requests: AtomicU64,
    messages: AtomicU64,
    span: std::sync::Mutex<(Option<Instant>, Option<Instant>)>,
}

impl Drain {
    fn new(total: u64) -> Self {
        Self {
            from: total / 10,
            to: total * 9 / 10,
            deleted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            span: std::sync::Mutex::new((None, None)),
        }
    }

    /// `n` messages deleted with `requests` requests.
    fn deleted(&self, n: u64, requests: u64) {
        let before = self.deleted.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        let mut span = self.span.lock().expect("drain lock");
        if before < self.from && after >= self.from {
            span.0 = Some(Instant::now());
        } else if before >= self.from && before < self.to {
            self.requests.fetch_add(requests, Ordering::Relaxed);
            self.messages.fetch_add(n, Ordering::Relaxed);
            span.1 = Some(Instant::now());
        }
    }

    fn done(&self) -> bool {
        self.deleted.load(Ordering::Relaxed) >= self.to
    }

    fn ceiling(&self) -> Ceiling {
        let span = *self.span.lock().expect("drain lock");
        let secs = match span {
            (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
            _ => return Ceiling::default(),
        };
        Ceiling {
            requests_per_sec: self.requests.load(Ordering::Relaxed) as f64 / secs,
            units_per_sec: self.messages.load(Ordering::Relaxed) as f64 / secs,
        }
    }
}

/// Conditional puts (create-if-absent, as the fleet writes) of fresh items into `table` with
/// `loops` concurrent loops for `secs`. The items expire through the table's TTL attribute.
///
/// # Errors
/// AWS errors.
pub async fn dynamodb(
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    ttl_attribute: Option<&str>,
    loops: usize,
    secs: u64,
) -> anyhow::Result<Ceiling> {
    let writes = Arc::new(AtomicU64::new(0));
    let window = Window::new(secs);
    let expires = (time::OffsetDateTime::now_utc().unix_timestamp() + 3600).to_string();
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (ddb, table, writes, ttl, expires) = (
                ddb.clone(),
                table.to_owned(),
                writes.clone(),
                ttl_attribute.map(str::to_owned),
                expires.clone(),
            );
            tokio::spawn(async move {
                while window.open() {
                    let mut put = ddb
                        .put_item()
                        .table_name(&table)
                        .item(
                            "pk",
                            AttributeValue::S(format!("loadtest-ceiling#{}", uuid::Uuid::new_v4())),
                        )
                        .condition_expression("attribute_not_exists(pk)");
                    if let Some(attr) = &ttl {
                        put = put.item(attr, AttributeValue::N(expires.clone()));
                    }
                    if put.send().await.is_ok() && window.counts() {
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let per_sec = window.rate(&writes);
    Ok(Ceiling {
        requests_per_sec: per_sec,
        units_per_sec: per_sec,
    })
}

/// The fleet's own DynamoDB work without queues: `inputs` taken in at the edge and through every
/// stage by the handlers chained in memory ([`fleet_harness::chain::Inline`]), `loops` at a time, for
/// `secs` or until the inputs run out. Messages handled per second (in `units_per_sec`; its
/// `requests_per_sec` is the same figure). The fleet, which adds SQS between the stages, cannot
/// go faster than this on the same tables.
///
/// # Errors
/// A loop that panicked.
pub async fn workload(
    inline: Arc<fleet_harness::chain::Inline>,
    inputs: Vec<String>,
    loops: usize,
    secs: u64,
) -> anyhow::Result<Ceiling> {
    let handled = Arc::new(AtomicU64::new(0));
    let inputs = Arc::new(std::sync::Mutex::new(inputs.into_iter()));
    let window = Window::new(secs);
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (inline, inputs, handled) = (inline.clone(), inputs.clone(), handled.clone());
            tokio::spawn(async move {
                while window.open() {
                    let next = inputs.lock().expect("inputs lock").next();
                    let Some(body) = next else { break };
                    let n = inline.run(body).await;
                    if window.counts() {
                        handled.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let per_sec = window.rate(&handled);
    Ok(Ceiling {
        requests_per_sec: per_sec,
        units_per_sec: per_sec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_counts_only_its_middle() {
        let drain = Drain::new(100);
        for _ in 0..10 {
            drain.deleted(10, 2);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(drain.done());
        // Batches that start at 10, 20, … 80: the warm-up and the dry tail are left out.
        assert_eq!(drain.messages.load(Ordering::Relaxed), 80);
        assert_eq!(drain.requests.load(Ordering::Relaxed), 16);
        let c = drain.ceiling();
        assert!(c.units_per_sec > 0.0);
        assert!((c.units_per_sec / c.requests_per_sec - 5.0).abs() < 1e-9);
    }

    #[test]
    fn a_drain_that_never_left_warm_up_measures_nothing() {
        let drain = Drain::new(1_000);
        drain.deleted(10, 2);
        assert_eq!(drain.ceiling().units_per_sec, 0.0);
    }
}
