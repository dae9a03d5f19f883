//! The consumer: one queue, its pollers, its jobs, and graceful shutdown. By concern:
//!
//! - this file: the consumer's lifecycle (start, shutdown), its settings and shared state;
//! - [`poll`]: the long-poll loops, the in-flight cap and the adaptive limit, dispatch;
//! - [`job`]: a message (or a FIFO group) through its handler, heartbeat, settling;
//! - [`outgoing`]: forwards, FIFO deduplication ids, deferral for a group's cap;
//! - [`dead_letter`]: retry later, or the DLQ with the attribution of why;
//! - [`sqs_io`]: SQS batch calls entry by entry, visibility changes, with their mock tests.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, MessageSystemAttributeNameForSends,
    MessageSystemAttributeValue, SendMessageBatchRequestEntry,
};
use backon::{ExponentialBuilder, Retryable};
use futures::FutureExt;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error_span, info, warn, Instrument};

use super::batcher::{Batcher, EntryResult};
use super::concurrency::Concurrency;
use super::fairness::{self, carried_group_id, GroupLimits};
use super::message::{Handler, Message, Outcome, Outgoing};
use crate::attribution::{self, Attribution, CORRELATION_ID, RECEIVED_AT, REQUEST_ID, SOURCE};
use crate::config::WorkerConfig;
use crate::events;
use crate::failure::{retry_delay, FailureClass, HandlerError, Reason};
use crate::health::Health;
use crate::redact::redact;
use crate::redrive_ledger::{self, Ledger};
use crate::runtime::batching::{self, ArrivalRate};
use crate::topology::{QueuePair, QueueRef, Topology};

mod dead_letter;
mod job;
mod outgoing;
mod poll;
mod sqs_io;

use outgoing::string_attribute;
use sqs_io::{delete_batch, send_batch};

/// Entries per SQS batch call.
const SQS_BATCH: usize = 10;
/// The longest visibility SQS accepts.
const MAX_VISIBILITY: Duration = Duration::from_secs(43_200);
/// At least this long is given to the last acknowledgements at shutdown, even past the deadline.
const ACK_FLUSH_GRACE: Duration = Duration::from_millis(500);
/// How long a poller waits for enough free capacity to ask for a full batch.
const BATCH_FILL_WAIT: Duration = Duration::from_millis(250);

/// Counters of one consumer's run, for reports and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received.
    pub received: AtomicU64,
    /// Messages whose effect is done and whose acknowledgement (delete) is queued.
    pub succeeded: AtomicU64,
    /// Transient failures sent back for a retry.
    pub retried: AtomicU64,
    /// Messages the worker dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Messages released (made visible) at shutdown.
    pub released: AtomicU64,
    /// Handler runs throttled downstream and retried in place.
    pub throttled: AtomicU64,
    /// The lowest the adaptive concurrency limit went (0 = never lowered).
    pub lowest_concurrency_limit: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Kept between a visibility SQS caps at 12 hours from the receive and what is asked for.
const VISIBILITY_MARGIN: Duration = Duration::from_secs(5);

/// How running a handler through throttling ended.
enum Ran {
    /// A result to act on.
    Done(Result<Outcome, HandlerError>),
    /// Shutdown came while throttled: hand the message back, no attempt used.
    Stopped,
}

/// What became of a message after a handler run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// It left the queue: done, or in the DLQ.
    Left,
    /// It stays on the queue, hidden until its retry.
    Stays,
    /// The caller holds it and retries in place after this delay (FIFO groups).
    RetryIn(Duration),
}

/// The visibility, in whole seconds, that hides a message for `delay` when it was received
/// `held` ago: rounded up (a 300 ms delay must not become 0, an immediate redelivery), and
/// within SQS's limit of 12 hours from the receive, less a margin for the request itself.
fn retry_visibility(delay: Duration, held: Duration) -> i32 {
    let limit = MAX_VISIBILITY
        .saturating_sub(held)
        .saturating_sub(VISIBILITY_MARGIN);
    let secs = delay.min(limit).as_secs_f64().ceil();
    secs as i32
}

/// Everything a consumer needs besides its handler.
pub struct ConsumerSettings {
    /// The worker role (for logs, metrics and attribution).
    pub role: String,
    /// The role's settings.
    pub worker: WorkerConfig,
    /// The queues: the consumed one is `worker.queue`; forwards may target any.
    pub topology: Topology,
    /// SQS's limit on a message and a batch (`aws.sqs_max_message_bytes`).
    pub max_message_bytes: usize,
    /// The queue is the untrusted edge: the `fleet-*` attributes an upstream sets are not the
    /// fleet's, so handlers and attributions never see them (they still travel, as received,
    /// into a DLQ).
    pub untrusted_edge: bool,
    /// Write the trace context also as the `AWSTraceHeader` system attribute (real SQS; the
    /// local emulator does not keep it).
    pub aws_trace_header: bool,
    /// Where the outcome of each redriven message is written (`[tables.redrives]`); `None`
    /// writes nothing.
    pub ledger: Option<Ledger>,
    /// The SenderIds that redrive into this queue (`ingestion.redrivers`): a dead letter's
    /// attribution names the first sender their redrive record vouches for, not them.
    pub redrivers: Vec<String>,
}

/// A running consumer of one queue.
pub struct Consumer<H> {
    inner: Arc<Inner<H>>,
    /// The acknowledgement batcher's task: it ends once every job is gone and its last
    /// batch is deleted.
    acks_flushed: tokio::task::JoinHandle<()>,
}

struct Inner<H> {
    /// The business logic.
    handler: H,
    sqs: aws_sdk_sqs::Client,
    /// `sqs` for long polls: each attempt's deadline is the client's plus the poll's wait.
    receiver: aws_sdk_sqs::Client,
    role: String,
    /// The consumed queue and its DLQ.
    pair: QueuePair,
    /// The consumed queue's name, shared by the health probes of its jobs.
    queue_name: Arc<str>,
    worker: WorkerConfig,
    /// Forward targets by logical name.
    topology: Topology,
    /// The in-flight cap: one permit per message from receive until its acknowledgement is
    /// queued (the ack batcher's queue and its bounded flushes hold the rest).
    capacity: Arc<Semaphore>,
    /// The adaptive limit under the cap: halved by throttling, grown back by successes.
    concurrency: Concurrency,
    /// Running messages per message group, under `max_in_flight_per_group`.
    groups: GroupLimits,
    /// Cancelled when shutdown starts: throttled jobs stop retrying in place.
    stopping: CancellationToken,
    /// Receipt handles of messages in flight, to release them at shutdown.
    in_flight: Mutex<HashMap<String, String>>,
    acks: Batcher<String>,
    sends: Batcher<SendEntry>,
    max_message_bytes: usize,
    untrusted_edge: bool,
    aws_trace_header: bool,
    ledger: Option<Ledger>,
    redrivers: Vec<String>,
    stats: Arc<Stats>,
    /// The hot path's metric handles.
    metrics: events::QueueMetrics,
    health: Health,
    /// Messages a second this consumer receives, for adaptive batching.
    arrivals: ArrivalRate,
}

/// One message to send in a batch.
#[derive(Debug, Clone)]
struct SendEntry {
    queue_url: String,
    body: String,
    attributes: HashMap<String, MessageAttributeValue>,
    group_id: Option<String>,
    deduplication_id: Option<String>,
    /// Seconds before the message can be received (a deferral).
    delay_seconds: Option<i32>,
    /// The `AWSTraceHeader` system attribute (on AWS: the trace context without an attribute).
    aws_trace_header: Option<String>,
}

impl SendEntry {
    /// The size SQS counts: the body and every attribute's name, type and value.
    fn size(&self) -> usize {
        self.body.len() + attributes_size(&self.attributes)
    }
}

/// The bytes SQS counts for message attributes.
fn attributes_size(attributes: &HashMap<String, MessageAttributeValue>) -> usize {
    attributes
        .iter()
        .map(|(k, v)| {
            crate::edge::attribute_bytes(
                k,
                v.data_type(),
                v.string_value().map_or(0, str::len)
                    + v.binary_value().map_or(0, |b| b.as_ref().len()),
            )
        })
        .sum()
}

/// How long acknowledgements wait to fill a batch: `ack_flush_ms`, at most a tenth of the
/// visibility timeout and half of what a heartbeat may leave of it (a message waiting for its
/// delete must not become visible again); on a FIFO queue no longer than forwards wait (a
/// group's next messages are not delivered until these are deleted).
fn ack_linger(worker: &WorkerConfig, pair: &QueuePair) -> Duration {
    let visibility = Duration::from_secs(pair.settings.visibility_timeout_secs.into());
    let mut linger = Duration::from_millis(worker.ack_flush_ms)
        .min(visibility / 10)
        .min(visibility.saturating_sub(worker.heartbeat_interval()) / 2);
    if pair.queue.fifo {
        linger = linger.min(Duration::from_millis(worker.forward_flush_ms));
    }
    linger
}

/// The system attributes a receive asks for: those `Message::from_sqs` reads.
const SYSTEM_ATTRIBUTES: [MessageSystemAttributeName; 7] = [
    MessageSystemAttributeName::ApproximateReceiveCount,
    MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
    MessageSystemAttributeName::SentTimestamp,
    MessageSystemAttributeName::MessageGroupId,
    MessageSystemAttributeName::MessageDeduplicationId,
    MessageSystemAttributeName::SenderId,
    MessageSystemAttributeName::AwsTraceHeader,
];

/// `sqs` with room for a long poll: a receive waits up to `wait_secs` before it answers, so its
/// attempt deadline is the client's plus that wait. Built once, not overridden per request
/// (a per-request override rebuilt the client's runtime components on every receive).
fn long_poll_client(sqs: &aws_sdk_sqs::Client, wait_secs: u32) -> aws_sdk_sqs::Client {
    let config = sqs.config();
    let Some(timeouts) = config.timeout_config() else {
        return sqs.clone();
    };
    let Some(attempt) = timeouts.operation_attempt_timeout() else {
        return sqs.clone();
    };
    let mut timeouts = timeouts.to_builder();
    timeouts.set_operation_attempt_timeout(Some(attempt + Duration::from_secs(wait_secs.into())));
    aws_sdk_sqs::Client::from_conf(config.to_builder().timeout_config(timeouts.build()).build())
}

impl<H: Handler> Consumer<H> {
    /// Creates a consumer of `settings.worker.queue`.
    ///
    /// # Errors
    /// When the worker's queue is not in the topology.
    pub fn new(
        sqs: aws_sdk_sqs::Client,
        handler: H,
        settings: ConsumerSettings,
        health: Health,
    ) -> Result<Self, String> {
        let ConsumerSettings {
            role,
            worker,
            topology,
            max_message_bytes,
            untrusted_edge,
            aws_trace_header,
            ledger,
            redrivers,
        } = settings;
        let pair = topology.pair(&worker.queue).cloned().ok_or_else(|| {
            format!(
                "queue `{}` of worker `{role}` is not in the topology",
                worker.queue
            )
        })?;
        let (acks, acks_flushed) = {
            let sqs = sqs.clone();
            let queue = pair.queue.clone();
            Batcher::spawn(SQS_BATCH, ack_linger(&worker, &pair), move |receipts| {
                delete_batch(sqs.clone(), queue.clone(), receipts)
            })
        };
        let (sends, _) = {
            let sqs = sqs.clone();
            Batcher::spawn(
                SQS_BATCH,
                Duration::from_millis(worker.forward_flush_ms),
                move |entries| send_batch(sqs.clone(), entries, max_message_bytes),
            )
        };
        let receiver = long_poll_client(&sqs, worker.receive_wait_secs);
        let metrics = events::QueueMetrics::new(&pair.queue.name);
        Ok(Self {
            inner: Arc::new(Inner {
                handler,
                receiver,
                queue_name: Arc::from(pair.queue.name.as_str()),
                sqs,
                capacity: Arc::new(Semaphore::new(worker.max_in_flight.get())),
                concurrency: Concurrency::new(worker.max_in_flight.get()),
                groups: GroupLimits::new(worker.max_in_flight_per_group),
                stopping: CancellationToken::new(),
                role,
                pair,
                worker,
                topology,
                in_flight: Mutex::new(HashMap::new()),
                acks,
                sends,
                max_message_bytes,
                untrusted_edge,
                aws_trace_header,
                ledger,
                redrivers,
                stats: Arc::new(Stats::default()),
                metrics,
                health,
                arrivals: ArrivalRate::new(std::time::Instant::now()),
            }),
            acks_flushed,
        })
    }

    /// The run's counters.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.inner.stats)
    }

    /// Polls until `shutdown` is cancelled, then stops polling, lets in-flight jobs finish
    /// within the worker's shutdown deadline, releases what is left to the queue at once, and
    /// returns. Work already accepted is never cancelled mid-handler by this function.
    pub async fn run(self, shutdown: CancellationToken) {
        let inner = Arc::clone(&self.inner);
        drop(self.inner);
        let jobs = TaskTracker::new();
        let pollers = TaskTracker::new();
        info!(
            worker = %inner.role,
            queue = %inner.pair.queue.name,
            pollers = inner.worker.pollers.get(),
            max_in_flight = inner.worker.max_in_flight.get(),
            "consumer started"
        );
        inner.health.set_ready(true);
        events::concurrency_limit(&inner.pair.queue.name, inner.concurrency.limit());
        for _ in 0..inner.worker.pollers.get() {
            pollers.spawn(Arc::clone(&inner).poll_loop(shutdown.clone(), jobs.clone()));
        }
        pollers.close();

        shutdown.cancelled().await;
        inner.stopping.cancel();
        inner.health.set_ready(false);
        let deadline = Instant::now() + inner.worker.shutdown_deadline();
        info!(worker = %inner.role, deadline_secs = inner.worker.shutdown_deadline_secs, "shutting down: polling stops, in-flight jobs finish");
        let _ = tokio::time::timeout_at(deadline, pollers.wait()).await;
        jobs.close();
        if tokio::time::timeout_at(deadline, jobs.wait())
            .await
            .is_err()
        {
            let left: Vec<String> = inner
                .in_flight
                .lock()
                .expect("in-flight lock")
                .values()
                .cloned()
                .collect();
            warn!(worker = %inner.role, unfinished = left.len(), "shutdown deadline reached; releasing unfinished messages");
            inner.release(left).await;
        }
        // The last acknowledgements go out at once (a job still running past the deadline may
        // hold a handle: its message was released above and comes back).
        let role = inner.role.clone();
        inner.acks.close();
        drop(inner);
        let flush_by = deadline.max(Instant::now() + ACK_FLUSH_GRACE);
        if tokio::time::timeout_at(flush_by, self.acks_flushed)
            .await
            .is_err()
        {
            warn!(worker = %role, "acknowledgements still pending at shutdown; those messages are delivered again");
        }
        info!(worker = %role, "consumer stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_linger_well_inside_the_visibility_timeout() {
        let config = crate::config::FleetConfig::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/fleet.toml"
        )))
        .unwrap();
        let mut worker = config.worker("orders").unwrap().clone();
        let queue = |visibility_timeout_secs, fifo| QueuePair {
            queue: QueueRef {
                key: "q".into(),
                name: "q".into(),
                url: "u".into(),
                fifo,
            },
            dlq: QueueRef {
                key: "q-dlq".into(),
                name: "q-dlq".into(),
                url: "d".into(),
                fifo,
            },
            settings: crate::config::QueueConfig {
                visibility_timeout_secs,
                ..config.queues["orders"].clone()
            },
        };
        worker.ack_flush_ms = 500;
        worker.forward_flush_ms = 50;
        worker.heartbeat_interval_secs = 1;
        assert_eq!(
            ack_linger(&worker, &queue(30, false)),
            Duration::from_millis(500)
        );
        assert_eq!(
            ack_linger(&worker, &queue(2, false)),
            Duration::from_millis(200)
        );
        assert_eq!(
            ack_linger(&worker, &queue(30, true)),
            Duration::from_millis(50)
        );
        // A heartbeat every 29 s of a 30 s visibility may leave 1 s: half of it at most.
        worker.heartbeat_interval_secs = 29;
        worker.ack_flush_ms = 2000;
        assert_eq!(
            ack_linger(&worker, &queue(30, false)),
            Duration::from_millis(500)
        );
        worker.ack_flush_ms = 5000;
        assert_eq!(
            ack_linger(&worker, &queue(60, false)),
            Duration::from_millis(5000)
        );
        assert_eq!(
            ack_linger(&worker, &queue(30, false)),
            Duration::from_millis(500)
        );
        worker.ack_flush_ms = 0;
        assert_eq!(ack_linger(&worker, &queue(30, false)), Duration::ZERO);
    }

    #[test]
    fn retry_visibility_rounds_up_and_stays_within_twelve_hours_of_the_receive() {
        assert_eq!(
            retry_visibility(Duration::from_millis(300), Duration::ZERO),
            1
        );
        assert_eq!(
            retry_visibility(Duration::from_millis(1500), Duration::ZERO),
            2
        );
        assert_eq!(
            retry_visibility(Duration::from_secs(60), Duration::ZERO),
            60
        );
        // Held for 11 h 59 min: at most what is left of the 12 hours, less the margin.
        let held = MAX_VISIBILITY - Duration::from_secs(60);
        assert_eq!(retry_visibility(Duration::from_secs(3600), held), 55);
        assert_eq!(
            retry_visibility(Duration::from_secs(3600), MAX_VISIBILITY),
            0,
            "past the limit: visible again at once rather than refused"
        );
    }
}

#[cfg(test)]
mod fairness_tests {
    //! A task under a per-group cap, with SQS mocked (the emulator takes a MessageGroupId on a
    //! standard queue but does not return it): the noisy group gets its cap, the quiet one runs
    //! at once, and the overflow goes back to the queue with its group, no attempt used.

    use std::collections::BTreeMap;
    use std::num::NonZeroUsize;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use aws_sdk_sqs::operation::change_message_visibility_batch::ChangeMessageVisibilityBatchOutput;
    use aws_sdk_sqs::operation::delete_message_batch::DeleteMessageBatchOutput;
    use aws_sdk_sqs::operation::get_queue_url::GetQueueUrlOutput;
    use aws_sdk_sqs::operation::receive_message::ReceiveMessageOutput;
    use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchOutput;
    use aws_sdk_sqs::types::{
        DeleteMessageBatchResultEntry, Message as SqsMessage, MessageSystemAttributeName,
        SendMessageBatchResultEntry,
    };
    use aws_smithy_mocks::{mock, mock_client, RuleMode};
    use tokio_util::sync::CancellationToken;

    use crate::config::FleetConfig;
    use crate::failure::HandlerError;
    use crate::health::Health;
    use crate::runtime::{Consumer, ConsumerSettings, Handler, Message, Outcome, Outgoing};
    use crate::topology::Topology;

    /// Records the groups it runs, and forwards each message to the warehouse queue.
    #[derive(Default)]
    struct Recorder {
        ran: Mutex<Vec<String>>,
    }

    impl Handler for Recorder {
        async fn handle(&self, message: &Message) -> Result<Outcome, HandlerError> {
            let group = message.group_id.clone().unwrap_or_default();
            self.ran.lock().unwrap().push(group);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(Outcome::forward(Outgoing::new("warehouse", "{}")))
        }
    }

    fn sqs_message(id: &str, group: &str) -> SqsMessage {
        sqs_message_received(id, group, 1)
    }

    /// `n3`, a redriven message on its third receive.
    fn redriven_retry() -> SqsMessage {
        let record = r#"{"count":1,"at":"2026-12-02T10:00:00Z","from_queue":"q-dlq","id":"run-1"}"#;
        SqsMessage::builder()
            .message_id("n3")
            .receipt_handle("receipt-n3")
            .body(r#"{"id":"n3"}"#)
            .attributes(MessageSystemAttributeName::MessageGroupId, "noisy")
            .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "3")
            .message_attributes(
                crate::attribution::REDRIVE,
                aws_sdk_sqs::types::MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(record)
                    .build()
                    .unwrap(),
            )
            .build()
    }

    fn sqs_message_received(id: &str, group: &str, receives: u32) -> SqsMessage {
        SqsMessage::builder()
            .message_id(id)
            .receipt_handle(format!("receipt-{id}"))
            .body(format!("{{\"id\":\"{id}\"}}"))
            .attributes(MessageSystemAttributeName::MessageGroupId, group)
            .attributes(
                MessageSystemAttributeName::ApproximateReceiveCount,
                receives.to_string(),
            )
            .build()
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Sent {
        queue: String,
        group: Option<String>,
        delay: Option<i32>,
        deferrals: Option<String>,
        attempts: Option<String>,
        redrive: Option<String>,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_noisy_group_gets_its_cap_the_quiet_one_runs_and_the_overflow_waits_in_the_queue() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/fleet.toml");
        let config = FleetConfig::load(std::path::Path::new(path)).unwrap();
        let mut worker = config.workers["orders"].clone();
        worker.max_in_flight_per_group = NonZeroUsize::new(1);
        worker.pollers = NonZeroUsize::new(1).unwrap();
        worker.receive_wait_secs = 0;
        worker.ack_flush_ms = 1;

        let urls = mock!(aws_sdk_sqs::Client::get_queue_url).then_compute_output(|r| {
            GetQueueUrlOutput::builder()
                .queue_url(format!("https://sqs.test/{}", r.queue_name().unwrap()))
                .build()
        });
        let receives = Arc::new(Mutex::new(0));
        let receive = {
            let receives = Arc::clone(&receives);
            mock!(aws_sdk_sqs::Client::receive_message).then_compute_output(move |_| {
                let mut n = receives.lock().unwrap();
                *n += 1;
                let messages = if *n == 1 {
                    vec![
                        sqs_message("n1", "noisy"),
                        sqs_message("n2", "noisy"),
                        // A retry (its third receive) over the cap waits too, keeping
                        // the two attempts it used.
                        redriven_retry(),
                        sqs_message("q1", "quiet"),
                    ]
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                    Vec::new()
                };
                ReceiveMessageOutput::builder()
                    .set_messages(Some(messages))
                    .build()
            })
        };
        let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
        let send = {
            let sent = Arc::clone(&sent);
            mock!(aws_sdk_sqs::Client::send_message_batch).then_compute_output(move |r| {
                let mut out = SendMessageBatchOutput::builder().set_failed(Some(vec![]));
                for e in r.entries() {
                    sent.lock().unwrap().push(Sent {
                        queue: r
                            .queue_url()
                            .unwrap()
                            .rsplit('/')
                            .next()
                            .unwrap()
                            .to_owned(),
                        group: e.message_group_id().map(str::to_owned),
                        delay: e.delay_seconds(),
                        deferrals: e
                            .message_attributes()
                            .and_then(|a| a.get(crate::runtime::DEFERRALS))
                            .and_then(|v| v.string_value())
                            .map(str::to_owned),
                        attempts: e
                            .message_attributes()
                            .and_then(|a| a.get(crate::runtime::ATTEMPTS))
                            .and_then(|v| v.string_value())
                            .map(str::to_owned),
                        redrive: e
                            .message_attributes()
                            .and_then(|a| a.get(crate::attribution::REDRIVE))
                            .and_then(|v| v.string_value())
                            .map(str::to_owned),
                    });
                    out = out.successful(
                        SendMessageBatchResultEntry::builder()
                            .id(e.id())
                            .message_id("new")
                            .md5_of_message_body("x")
                            .build()
                            .unwrap(),
                    );
                }
                out.build().unwrap()
            })
        };
        let deleted: Arc<Mutex<Vec<String>>> = Arc::default();
        let delete = {
            let deleted = Arc::clone(&deleted);
            mock!(aws_sdk_sqs::Client::delete_message_batch).then_compute_output(move |r| {
                let mut out = DeleteMessageBatchOutput::builder().set_failed(Some(vec![]));
                for e in r.entries() {
                    deleted.lock().unwrap().push(e.receipt_handle().to_owned());
                    out = out.successful(
                        DeleteMessageBatchResultEntry::builder()
                            .id(e.id())
                            .build()
                            .unwrap(),
                    );
                }
                out.build().unwrap()
            })
        };
        let visibility =
            mock!(aws_sdk_sqs::Client::change_message_visibility_batch).then_output(|| {
                ChangeMessageVisibilityBatchOutput::builder()
                    .set_successful(Some(vec![]))
                    .set_failed(Some(vec![]))
                    .build()
                    .unwrap()
            });
        let sqs = mock_client!(
            aws_sdk_sqs,
            RuleMode::MatchAny,
            [&urls, &receive, &send, &delete, &visibility]
        );
        let topology = Topology::resolve(&sqs, &config).await.unwrap();
        let orders = topology.pair("orders").unwrap().queue.name.clone();
        let warehouse = topology.pair("warehouse").unwrap().queue.name.clone();
        let handler = Arc::new(Recorder::default());
        let consumer = Consumer::new(
            sqs,
            Arc::clone(&handler),
            ConsumerSettings {
                role: "orders".into(),
                worker,
                topology,
                max_message_bytes: 256 * 1024,
                untrusted_edge: false,
                aws_trace_header: false,
                ledger: None,
                redrivers: Vec::new(),
            },
            Health::default(),
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(consumer.run(shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        shutdown.cancel();
        run.await.unwrap();

        let mut ran = handler.ran.lock().unwrap().clone();
        ran.sort();
        assert_eq!(
            ran,
            ["noisy", "quiet"],
            "one of the noisy group, and the quiet one"
        );
        let sent = sent.lock().unwrap().clone();
        let mut by_queue: BTreeMap<String, Vec<Sent>> = BTreeMap::new();
        for s in sent {
            by_queue.entry(s.queue.clone()).or_default().push(s);
        }
        let deferred = &by_queue[&orders];
        assert_eq!(deferred.len(), 2, "two over the cap go back to their queue");
        for d in deferred {
            assert_eq!(d.group.as_deref(), Some("noisy"), "with their group");
            assert_eq!(d.delay, Some(1), "a first deferral waits a second");
            assert_eq!(
                d.deferrals.as_deref(),
                Some("1"),
                "counted: the next deferral waits longer"
            );
        }
        let mut attempts: Vec<Option<&str>> =
            deferred.iter().map(|d| d.attempts.as_deref()).collect();
        attempts.sort_unstable();
        assert_eq!(
            attempts,
            [None, Some("2")],
            "the retry's copy keeps the attempts it used; the first attempt's has none"
        );
        // A redriven message's copy keeps the id its redrive sent it with, for the ledger.
        let record = deferred
            .iter()
            .find_map(|d| d.redrive.clone())
            .expect("the redriven message's copy carries its record");
        let record: crate::attribution::RedriveRecord = serde_json::from_str(&record).unwrap();
        assert_eq!(record.id.as_deref(), Some("run-1"));
        assert_eq!(record.copy_of.as_deref(), Some("n3"));
        let mut forwarded: Vec<Option<String>> = by_queue[&warehouse]
            .iter()
            .map(|s| s.group.clone())
            .collect();
        forwarded.sort();
        assert_eq!(
            forwarded,
            [Some("noisy".to_owned()), Some("quiet".to_owned())],
            "a forward to a standard queue carries its tenant's group"
        );
        assert_eq!(
            deleted.lock().unwrap().len(),
            4,
            "every received message left the queue once"
        );
    }
}
