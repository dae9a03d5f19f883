//! Queue probes and senders shared by the demo, the tests and the load harness: sending
//! generated inputs, counting what is queued, waiting for the fleet to go idle, and counting
//! what each DLQ holds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use fleet_common::attribution::{Attribution, ATTRIBUTION};
use fleet_common::failure::Reason;
use fleet_common::topology::Topology;

use crate::scenario::Input;

/// Sends inputs in batches of ten.
///
/// # Errors
/// When SQS refuses a send.
pub async fn send_all(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    inputs: &[Input],
) -> anyhow::Result<()> {
    for chunk in inputs.chunks(10) {
        send_batch(sqs, url, chunk).await?;
    }
    Ok(())
}

/// Sends up to ten inputs in one SendMessageBatch.
///
/// # Errors
/// When SQS refuses the request or any message of it.
pub async fn send_batch(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    batch: &[Input],
) -> anyhow::Result<()> {
    let entries = batch
        .iter()
        .enumerate()
        .map(|(i, input)| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(&input.body)
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let out = sqs
        .send_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await?;
    anyhow::ensure!(
        out.failed().is_empty(),
        "SQS refused {} messages",
        out.failed().len()
    );
    Ok(())
}

/// The messages of one queue: visible, in flight (received, not yet deleted) and delayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// ApproximateNumberOfMessages.
    pub visible: u64,
    /// ApproximateNumberOfMessagesNotVisible.
    pub in_flight: u64,
    /// ApproximateNumberOfMessagesDelayed.
    pub delayed: u64,
}

impl Depth {
    /// Every message of the queue.
    pub fn total(self) -> u64 {
        self.visible + self.in_flight + self.delayed
    }
}

/// The depth of the queue at `url`.
///
/// # Errors
/// When SQS cannot be asked.
pub async fn depth(sqs: &aws_sdk_sqs::Client, url: &str) -> anyhow::Result<Depth> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await?;
    let attrs = out.attributes().cloned().unwrap_or_default();
    let get = |k: QueueAttributeName| attrs.get(&k).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(Depth {
        visible: get(QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        delayed: get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    })
}

/// Messages visible, in flight or delayed on every work queue.
///
/// # Errors
/// When SQS cannot be asked.
pub async fn queued(sqs: &aws_sdk_sqs::Client, topology: &Topology) -> anyhow::Result<u64> {
    let mut total = 0;
    for pair in topology.queues.values() {
        total += depth(sqs, &pair.queue.url).await?.total();
    }
    Ok(total)
}

/// Waits until every work queue has been empty for three checks in a row.
///
/// # Errors
/// When that does not happen within `limit`.
pub async fn wait_idle(
    sqs: &aws_sdk_sqs::Client,
    topology: &Topology,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut quiet = 0;
    while quiet < 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the queues did not drain within {} s",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        quiet = if queued(sqs, topology).await? == 0 {
            quiet + 1
        } else {
            0
        };
    }
    Ok(())
}

/// Every distinct input in every DLQ: (logical queue, reason) → count. Messages are left in place.
///
/// # Errors
/// When SQS cannot be read.
pub async fn dead_letters(
    sqs: &aws_sdk_sqs::Client,
    topology: &Topology,
) -> anyhow::Result<BTreeMap<(String, String), u64>> {
    let mut counts = BTreeMap::new();
    for (key, pair) in &topology.queues {
        let mut seen = std::collections::BTreeSet::new();
        let mut empty = 0;
        while empty < 2 {
            let out = sqs
                .receive_message()
                .queue_url(&pair.dlq.url)
                .max_number_of_messages(10)
                .visibility_timeout(30)
                .wait_time_seconds(0)
                .message_attribute_names(ATTRIBUTION)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await?;
            if out.messages().is_empty() {
                empty += 1;
            }
            for m in out.messages() {
                let attribution = m
                    .message_attributes()
                    .and_then(|a| a.get(ATTRIBUTION))
                    .and_then(|v| v.string_value())
                    .and_then(|j| serde_json::from_str::<Attribution>(j).ok());
                // One input is one dead letter. Delivery is at least once, so one input can be
                // dead-lettered more than once: a worker killed between its DLQ send and the
                // delete from the source sends it again (same source message id), and a
                // message forwarded twice (a delete that failed after the forward) reaches the
                // next stage as two messages (same event id). Count each event once.
                let event_id = m
                    .body()
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
                    .and_then(|v| {
                        v.get("event_id")
                            .and_then(|e| e.as_str())
                            .map(str::to_owned)
                    });
                // A message refused for payment data is kept with its digits masked: its
                // event id no longer tells it apart, its source message id does.
                let event_id = event_id.filter(|_| {
                    attribution
                        .as_ref()
                        .is_none_or(|a| a.reason != Reason::PAYMENT_DATA.as_str())
                });
                let input = event_id.map_or_else(
                    || {
                        attribution.as_ref().map_or_else(
                            || m.message_id().unwrap_or_default().to_owned(),
                            |a| a.source_message_id.clone(),
                        )
                    },
                    |e| format!("event:{e}"),
                );
                if !seen.insert(input) {
                    continue;
                }
                let reason = attribution.map_or_else(|| "queue_redrive".to_owned(), |a| a.reason);
                *counts.entry((key.clone(), reason)).or_default() += 1;
            }
        }
    }
    Ok(counts)
}

/// How many dead letters differ from the expected counts (missing ones and extra ones).
pub fn dead_letter_mismatches(
    found: &BTreeMap<(String, String), u64>,
    expected: &BTreeMap<(String, String), u64>,
) -> u64 {
    let keys: std::collections::BTreeSet<_> = found.keys().chain(expected.keys()).collect();
    keys.into_iter()
        .map(|k| {
            found
                .get(k)
                .copied()
                .unwrap_or(0)
                .abs_diff(expected.get(k).copied().unwrap_or(0))
        })
        .sum()
}
