//! What the backends on the target can serve, measured in the same run before the load: a raw
//! batch receive/delete loop for SQS and raw conditional writes for DynamoDB, at the same
//! concurrency the fleet uses. The fleet cannot go faster than these allow.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
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

/// Receives and deletes batches of ten from a scratch queue filled beforehand, with `loops`
/// concurrent loops, for `secs`.
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
    let fill = (loops as u64 * secs * 400).clamp(2_000, 100_000);
    futures::stream::iter(0..fill / 10)
        .map(|b| {
            let (sqs, url) = (sqs.clone(), url.clone());
            async move {
                let entries = (0..10)
                    .map(|i| {
                        SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(format!("ceiling {b}/{i}"))
                            .build()
                            .expect("entry")
                    })
                    .collect();
                sqs.send_message_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    let requests = Arc::new(AtomicU64::new(0));
    let messages = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (sqs, url, requests, messages) =
                (sqs.clone(), url.clone(), requests.clone(), messages.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let Ok(out) = sqs
                        .receive_message()
                        .queue_url(&url)
                        .max_number_of_messages(10)
                        .wait_time_seconds(1)
                        .send()
                        .await
                    else {
                        continue;
                    };
                    requests.fetch_add(1, Ordering::Relaxed);
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
                        continue;
                    }
                    let n = entries.len() as u64;
                    if sqs
                        .delete_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries))
                        .send()
                        .await
                        .is_ok()
                    {
                        requests.fetch_add(1, Ordering::Relaxed);
                        messages.fetch_add(n, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = sqs.delete_queue().queue_url(&url).send().await;
    Ok(Ceiling {
        requests_per_sec: requests.load(Ordering::Relaxed) as f64 / elapsed,
        units_per_sec: messages.load(Ordering::Relaxed) as f64 / elapsed,
    })
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
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
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
                while Instant::now() < deadline {
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
                    if put.send().await.is_ok() {
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let per_sec = writes.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    Ok(Ceiling {
        requests_per_sec: per_sec,
        units_per_sec: per_sec,
    })
}

/// The fleet's own DynamoDB work without queues: `inputs` taken in at the edge and through every
/// stage by the handlers chained in memory ([`workers::fleet::Inline`]), `loops` at a time, for
/// `secs` or until the inputs run out. Messages handled per second (in `units_per_sec`; its
/// `requests_per_sec` is the same figure). The fleet, which adds SQS between the stages, cannot
/// go faster than this on the same tables.
///
/// # Errors
/// A loop that panicked.
pub async fn workload(
    inline: Arc<workers::fleet::Inline>,
    inputs: Vec<String>,
    loops: usize,
    secs: u64,
) -> anyhow::Result<Ceiling> {
    let handled = Arc::new(AtomicU64::new(0));
    let inputs = Arc::new(std::sync::Mutex::new(inputs.into_iter()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (inline, inputs, handled) = (inline.clone(), inputs.clone(), handled.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let next = inputs.lock().expect("inputs lock").next();
                    let Some(body) = next else { break };
                    let n = inline.run(body).await;
                    handled.fetch_add(n as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let per_sec = handled.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    Ok(Ceiling {
        requests_per_sec: per_sec,
        units_per_sec: per_sec,
    })
}
