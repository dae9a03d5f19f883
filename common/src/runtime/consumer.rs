//! The consumer: pollers, the in-flight cap, FIFO group ordering, the visibility heartbeat,
//! batched acknowledgements and forwards, retry/DLQ decisions, and graceful shutdown.

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
use super::fairness::{self, carried_group_id, GroupLimits, MAX_DEFERRALS};
use super::message::{Handler, Message, Outcome, Outgoing};
use crate::attribution::{self, Attribution, CORRELATION_ID, RECEIVED_AT, REQUEST_ID, SOURCE};
use crate::config::WorkerConfig;
use crate::events;
use crate::failure::{retry_delay, FailureClass, HandlerError, Reason};
use crate::health::Health;
use crate::redact::redact;
use crate::topology::{QueuePair, QueueRef, Topology};

/// Entries per SQS batch call.
const SQS_BATCH: usize = 10;
/// The longest visibility SQS accepts.
const MAX_VISIBILITY: Duration = Duration::from_secs(43_200);
/// How long a poller waits for enough free capacity to ask for a full batch.
const BATCH_FILL_WAIT: Duration = Duration::from_millis(100);
/// How long a message deferred for its group's cap waits before it can be received again.
const GROUP_DEFER_SECS: i32 = 1;

/// Counters of one consumer's run, for reports and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received.
    pub received: AtomicU64,
    /// Messages whose effect is done and that were acknowledged.
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
}

/// A running consumer of one queue.
pub struct Consumer<H> {
    inner: Arc<Inner<H>>,
}

struct Inner<H> {
    /// The business logic.
    handler: H,
    sqs: aws_sdk_sqs::Client,
    role: String,
    /// The consumed queue and its DLQ.
    pair: QueuePair,
    worker: WorkerConfig,
    /// Forward targets by logical name.
    topology: Topology,
    /// The in-flight cap: one permit per message from receive to acknowledgement.
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
    stats: Arc<Stats>,
    health: Health,
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
        } = settings;
        let pair = topology.pair(&worker.queue).cloned().ok_or_else(|| {
            format!(
                "queue `{}` of worker `{role}` is not in the topology",
                worker.queue
            )
        })?;
        let linger = Duration::from_millis(worker.ack_flush_ms);
        let (acks, _) = {
            let sqs = sqs.clone();
            let queue = pair.queue.clone();
            Batcher::spawn(SQS_BATCH, linger, move |receipts| {
                delete_batch(sqs.clone(), queue.clone(), receipts)
            })
        };
        let (sends, _) = {
            let sqs = sqs.clone();
            Batcher::spawn(SQS_BATCH, linger, move |entries| {
                send_batch(sqs.clone(), entries, max_message_bytes)
            })
        };
        Ok(Self {
            inner: Arc::new(Inner {
                handler,
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
                stats: Arc::new(Stats::default()),
                health,
            }),
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
        let inner = self.inner;
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
        info!(worker = %inner.role, "consumer stopped");
    }
}

impl<H: Handler> Inner<H> {
    async fn poll_loop(self: Arc<Self>, shutdown: CancellationToken, jobs: TaskTracker) {
        let mut failures: u32 = 0;
        let probe = self
            .health
            .poller(format!("{}/{}", self.role, self.pair.queue.name));
        loop {
            probe.waiting_for_room(true);
            let permits = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                permits = self.reserve_batch() => permits,
            };
            probe.waiting_for_room(false);
            let receive = self.receive(permits.num_permits());
            tokio::pin!(receive);
            let received = tokio::select! {
                biased;
                result = &mut receive => result,
                () = shutdown.cancelled() => {
                    // A receive already sent may bring messages: let it finish (bounded by the
                    // deadline) and hand those back at once, instead of leaving them invisible.
                    let bounded = tokio::time::timeout(self.worker.shutdown_deadline(), receive).await;
                    if let Ok(Ok(messages)) = bounded {
                        self.release(messages.into_iter().map(|m| m.receipt_handle).collect()).await;
                    }
                    break;
                }
            };
            match received {
                Ok(messages) => {
                    failures = 0;
                    probe.received();
                    let partial = !messages.is_empty() && messages.len() < permits.num_permits();
                    self.dispatch(messages, permits, &jobs);
                    if partial && self.worker.batch_window_ms > 0 {
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(self.worker.batch_window_ms)) => {}
                        }
                    }
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let backoff = retry_delay(
                        failures,
                        Duration::from_millis(200),
                        Duration::from_secs(20),
                    );
                    events::receive_failed(&self.pair.queue.name, &error, backoff);
                    drop(permits);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    /// Waits for room under the adaptive concurrency limit and for at least one free slot,
    /// then briefly (100 ms, or the batching window when it is longer) for enough to ask for a
    /// full batch, never more than the limit leaves room for.
    async fn reserve_batch(&self) -> OwnedSemaphorePermit {
        let max = self.worker.max_in_flight.get();
        let room = loop {
            let in_use = max - self.capacity.available_permits();
            let room = self.concurrency.room(in_use);
            if room > 0 {
                break room;
            }
            // Jobs finishing and the limit growing both make room: look again soon.
            self.concurrency
                .wait_for_room(Duration::from_millis(50))
                .await;
        };
        let want = (self.worker.batch_size as usize).min(max).min(room);
        let mut permits = Arc::clone(&self.capacity)
            .acquire_owned()
            .await
            .expect("capacity is never closed");
        if want > 1 {
            let more = Arc::clone(&self.capacity).acquire_many_owned((want - 1) as u32);
            let fill_wait = BATCH_FILL_WAIT.max(Duration::from_millis(self.worker.batch_window_ms));
            match tokio::time::timeout(fill_wait, more).await {
                Ok(Ok(more)) => permits.merge(more),
                _ => {
                    while permits.num_permits() < want {
                        match Arc::clone(&self.capacity).try_acquire_owned() {
                            Ok(one) => permits.merge(one),
                            Err(_) => break,
                        }
                    }
                }
            }
        }
        permits
    }

    async fn receive(&self, max: usize) -> Result<Vec<Message>, String> {
        // A long poll waits up to `receive_wait_secs` for messages before it answers: its
        // deadline is the client's per-request deadline plus that wait.
        let wait = Duration::from_secs(self.worker.receive_wait_secs.into());
        let deadline = self
            .sqs
            .config()
            .timeout_config()
            .and_then(|t| t.operation_attempt_timeout())
            .map(|t| t + wait);
        let mut override_timeouts = aws_sdk_sqs::config::Builder::default();
        if let Some(deadline) = deadline {
            override_timeouts = override_timeouts.timeout_config(
                aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(deadline)
                    .build(),
            );
        }
        let out = self
            .sqs
            .receive_message()
            .queue_url(&self.pair.queue.url)
            .max_number_of_messages(max as i32)
            .wait_time_seconds(self.worker.receive_wait_secs as i32)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .customize()
            .config_override(override_timeouts)
            .send()
            .await
            .map_err(|e| crate::sdk_error_message(&e))?;
        let mut messages: Vec<Message> = out
            .messages()
            .iter()
            .filter_map(Message::from_sqs)
            .collect();
        if self.untrusted_edge {
            for m in &mut messages {
                m.attributes.retain(|name, _| !name.starts_with("fleet-"));
            }
        }
        events::received(&self.pair.queue.name, messages.len());
        Stats::bump(&self.stats.received, messages.len() as u64);
        Ok(messages)
    }

    /// Starts a job per message (per FIFO group, in order, on FIFO queues), each holding one
    /// permit; surplus permits go back.
    fn dispatch(
        self: &Arc<Self>,
        messages: Vec<Message>,
        mut permits: OwnedSemaphorePermit,
        jobs: &TaskTracker,
    ) {
        let mut take_one = || permits.split(1).expect("one permit per received message");
        if self.pair.queue.fifo {
            let mut groups: BTreeMap<String, Vec<(Message, OwnedSemaphorePermit)>> =
                BTreeMap::new();
            for m in messages {
                let group = m.group_id.clone().unwrap_or_default();
                groups.entry(group).or_default().push((m, take_one()));
            }
            for (_, group) in groups {
                let this = Arc::clone(self);
                jobs.spawn(async move { this.run_group(group).await });
            }
        } else {
            for m in messages {
                let permit = take_one();
                let this = Arc::clone(self);
                let may_wait =
                    m.receive_count <= 1 && fairness::deferrals(&m.attributes) < MAX_DEFERRALS;
                match self.groups.try_enter(m.group_id.as_deref(), may_wait) {
                    Some(slot) => jobs.spawn(async move {
                        this.process(m).await;
                        drop((slot, permit));
                    }),
                    None => jobs.spawn(async move {
                        this.defer_for_group(m).await;
                        drop(permit);
                    }),
                };
            }
        }
        self.report_in_flight();
    }

    /// A FIFO group's messages of one receive, strictly in order. All of them are held, and
    /// heartbeated, until each is done: a transient failure is retried here, in place, after
    /// its backoff (counting the attempt), so that no later message overtakes it and none is
    /// handed back to SQS, where every new receive would raise its receive count toward the
    /// DLQ. Shutdown releases whatever is still held.
    async fn run_group(self: Arc<Self>, group: Vec<(Message, OwnedSemaphorePermit)>) {
        let held: Vec<String> = group
            .iter()
            .map(|(m, _)| m.receipt_handle.clone())
            .collect();
        {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            for (m, _) in &group {
                in_flight.insert(m.message_id.clone(), m.receipt_handle.clone());
            }
        }
        let held = Mutex::new(held);
        let ids: Vec<String> = group.iter().map(|(m, _)| m.message_id.clone()).collect();
        let received = group.first().map(|(m, _)| m.received);
        // Hands the rest of the group back to SQS: no longer heartbeated, visible at once.
        let hand_back = |left: Vec<String>| {
            held.lock().expect("held lock").clear();
            self.release(left)
        };
        let work = async {
            let mut rest = group.into_iter();
            while let Some((m, permit)) = rest.next() {
                if self.stopping.is_cancelled() {
                    // Shutdown: nothing more is started; the group goes back whole.
                    let left = std::iter::once(m.receipt_handle.clone())
                        .chain(rest.map(|(m, _)| m.receipt_handle))
                        .collect();
                    hand_back(left).await;
                    return;
                }
                let mut extra_attempts = 0;
                let span = self.message_span(&m);
                loop {
                    let attempt = m.receive_count + extra_attempts;
                    let ran = self.run_through_throttling(&m).instrument(span.clone());
                    let result = match ran.await {
                        Ran::Done(result) => result,
                        Ran::Stopped => {
                            let left = std::iter::once(m.receipt_handle.clone())
                                .chain(rest.map(|(m, _)| m.receipt_handle))
                                .collect();
                            hand_back(left).await;
                            return;
                        }
                    };
                    let settled = self.settle(&m, attempt, result, true);
                    match settled.instrument(span.clone()).await {
                        Settled::Left => break,
                        Settled::RetryIn(delay) => {
                            // Held no longer than SQS lets a receive stay invisible.
                            let fits =
                                m.received.elapsed() + delay + self.worker.handler_deadline()
                                    < MAX_VISIBILITY.saturating_sub(VISIBILITY_MARGIN);
                            if !fits {
                                let left = std::iter::once(m.receipt_handle.clone())
                                    .chain(rest.map(|(m, _)| m.receipt_handle))
                                    .collect();
                                hand_back(left).await;
                                return;
                            }
                            tokio::select! {
                                () = tokio::time::sleep(delay) => extra_attempts += 1,
                                () = self.stopping.cancelled() => {
                                    let left = std::iter::once(m.receipt_handle.clone())
                                        .chain(rest.map(|(m, _)| m.receipt_handle))
                                        .collect();
                                    hand_back(left).await;
                                    return;
                                }
                            }
                        }
                        Settled::Stays => {
                            let left = rest.map(|(m, _)| m.receipt_handle).collect();
                            hand_back(left).await;
                            return;
                        }
                    }
                }
                held.lock()
                    .expect("held lock")
                    .retain(|r| *r != m.receipt_handle);
                self.in_flight
                    .lock()
                    .expect("in-flight lock")
                    .remove(&m.message_id);
                drop(permit);
            }
        };
        let received = received.unwrap_or_else(std::time::Instant::now);
        tokio::select! {
            () = work => {}
            never = self.heartbeat(&held, received) => match never {},
        }
        // Done, dead-lettered or handed back: none of the group is this task's any more.
        let mut in_flight = self.in_flight.lock().expect("in-flight lock");
        for id in &ids {
            in_flight.remove(id);
        }
        drop(in_flight);
        self.report_in_flight();
    }

    fn report_in_flight(&self) {
        let in_use = self.worker.max_in_flight.get() - self.capacity.available_permits();
        events::in_flight(&self.pair.queue.name, in_use);
    }

    /// Runs the handler once, within its deadline; a panic is a transient failure.
    async fn run_handler(&self, message: &Message) -> Result<Outcome, HandlerError> {
        let deadline = self.worker.handler_deadline();
        let _job = self.health.job(self.pair.queue.name.clone(), deadline);
        let started = Instant::now();
        let work = AssertUnwindSafe(self.handler.handle(message)).catch_unwind();
        let result = match tokio::time::timeout(deadline, work).await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => Err(HandlerError::transient(
                Reason::HANDLER_PANIC,
                panic_text(&panic),
            )),
            Err(_) => {
                events::handler_deadline_exceeded(&self.pair.queue.name, deadline);
                Err(HandlerError::transient(
                    Reason::HANDLER_DEADLINE_EXCEEDED,
                    format!("the handler ran past its {} s deadline", deadline.as_secs()),
                ))
            }
        };
        events::handled(&self.pair.queue.name, started.elapsed(), message.age());
        result
    }

    /// Runs the handler, with a heartbeat, until the message is settled: done (acknowledged),
    /// retried later, or dead-lettered. Throttling is retried here, in place, while the
    /// consumer's concurrency limit shrinks, for up to `throttle_patience_secs`: throttling
    /// alone does not use up the message's attempts. Returns whether the message left the
    /// queue.
    /// The span of one message's handling: every line logged in it carries the correlation id;
    /// with tracing on it is the message's span in the order's trace.
    fn message_span(&self, message: &Message) -> tracing::Span {
        let correlation_id = message
            .correlation_id
            .clone()
            .unwrap_or_else(|| format!("msg-{}", message.message_id));
        // ERROR level so that the span, and with it the correlation id on every line logged
        // inside it, survives any log filter (a span disabled by the filter carries no fields).
        let span = error_span!(
            "message",
            correlation_id = %correlation_id,
            message_id = %message.message_id,
            worker = %self.role,
            queue = %self.pair.queue.name,
            attempt = message.receive_count,
            redrive = message.redrive_id().unwrap_or_default(),
            version = crate::build_info::VERSION,
        );
        crate::trace::attach(&span, message);
        span
    }

    async fn process(&self, message: Message) -> bool {
        let span = self.message_span(&message);
        async {
            self.in_flight
                .lock()
                .expect("in-flight lock")
                .insert(message.message_id.clone(), message.receipt_handle.clone());
            let held = Mutex::new(vec![message.receipt_handle.clone()]);
            let ran = tokio::select! {
                ran = self.run_through_throttling(&message) => ran,
                never = self.heartbeat(&held, message.received) => match never {},
            };
            let left_queue = match ran {
                Ran::Done(result) => matches!(
                    self.settle(&message, message.receive_count, result, false)
                        .await,
                    Settled::Left
                ),
                Ran::Stopped => {
                    // Shutdown while throttled: back to the queue at once, no attempt used.
                    self.release(vec![message.receipt_handle.clone()]).await;
                    false
                }
            };
            self.in_flight
                .lock()
                .expect("in-flight lock")
                .remove(&message.message_id);
            left_queue
        }
        .instrument(span)
        .await
    }

    /// Runs the handler; throttling is retried here, in place, after a growing pause, while the
    /// consumer's concurrency limit shrinks, for up to `throttle_patience_secs` (and never past
    /// what SQS lets a receive stay invisible): throttling alone uses no attempt. `Stopped`
    /// when shutdown came during a throttled pause.
    async fn run_through_throttling(&self, message: &Message) -> Ran {
        let mut first_throttle: Option<Instant> = None;
        let mut rounds = 0;
        loop {
            let result = self.run_handler(message).await;
            if !matches!(&result, Err(e) if e.is_throttled()) {
                return Ran::Done(result);
            }
            let since = *first_throttle.get_or_insert_with(Instant::now);
            rounds += 1;
            let pause = retry_delay(rounds, Duration::from_millis(200), Duration::from_secs(10));
            let limit = self.concurrency.throttled();
            Stats::bump(&self.stats.throttled, 1);
            let lowest = &self.stats.lowest_concurrency_limit;
            let current = lowest.load(Ordering::Relaxed);
            if current == 0 || (limit as u64) < current {
                lowest.store(limit as u64, Ordering::Relaxed);
            }
            events::concurrency_limit(&self.pair.queue.name, limit);
            if self.stopping.is_cancelled() {
                return Ran::Stopped;
            }
            let within_patience = since.elapsed() + pause <= self.worker.throttle_patience();
            let within_visibility =
                message.received.elapsed() + pause + self.worker.handler_deadline()
                    < MAX_VISIBILITY.saturating_sub(VISIBILITY_MARGIN);
            if !within_patience || !within_visibility {
                return Ran::Done(result);
            }
            events::throttled(&self.pair.queue.name, limit, pause);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stopping.cancelled() => return Ran::Stopped,
            }
        }
    }

    /// Acts on a handler's result: forwards and acknowledges, or fails the message (attempt
    /// number `attempt`). `hold`: a transient failure is retried by the caller in place (FIFO)
    /// instead of by changing the message's visibility.
    async fn settle(
        &self,
        message: &Message,
        attempt: u32,
        result: Result<Outcome, HandlerError>,
        hold: bool,
    ) -> Settled {
        match result {
            Ok(outcome) => {
                let started = Instant::now();
                match self.forward(message, outcome).await {
                    Ok(()) => {
                        self.acknowledge(message).await;
                        let before = self.concurrency.limit();
                        let after = self.concurrency.succeeded();
                        if after != before {
                            events::concurrency_limit(&self.pair.queue.name, after);
                        }
                        Stats::bump(&self.stats.succeeded, 1);
                        events::succeeded(&self.pair.queue.name, started.elapsed());
                        Settled::Left
                    }
                    Err(e) => {
                        self.fail(
                            message,
                            attempt,
                            HandlerError::transient(Reason::FORWARD_FAILED, e),
                            hold,
                        )
                        .await
                    }
                }
            }
            Err(error) => self.fail(message, attempt, error, hold).await,
        }
    }

    /// The visibility a heartbeat asks for: the queue's timeout, within what is left of the 12
    /// hours SQS allows from the receive; `None` when nothing is left.
    fn extension(&self, received: std::time::Instant) -> Option<i32> {
        let full = Duration::from_secs(self.pair.settings.visibility_timeout_secs.into());
        let left = MAX_VISIBILITY
            .saturating_sub(received.elapsed())
            .saturating_sub(VISIBILITY_MARGIN);
        let secs = full.min(left).as_secs();
        (secs > 0).then_some(secs as i32)
    }

    /// Extends the visibility of every message in `held` (one message, or a FIFO group's) every
    /// heartbeat interval, for as long as it is polled, never past SQS's 12 hours from the
    /// receive.
    async fn heartbeat(
        &self,
        held: &Mutex<Vec<String>>,
        received: std::time::Instant,
    ) -> std::convert::Infallible {
        let every = self.worker.heartbeat_interval();
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        loop {
            ticks.tick().await;
            let Some(extend_to) = self.extension(received) else {
                continue;
            };
            let receipts = held.lock().expect("held lock").clone();
            for chunk in receipts.chunks(SQS_BATCH) {
                let ok = self.change_visibility(chunk, extend_to).await.is_ok();
                events::heartbeat(&self.pair.queue.name, ok);
            }
        }
    }

    /// Sends the handler's outgoing messages, with the correlation id and source metadata of the
    /// incoming one.
    async fn forward(&self, incoming: &Message, outcome: Outcome) -> Result<(), String> {
        let sends = outcome.forward.into_iter().map(|out| {
            let entry = self.send_entry(incoming, out);
            async move { self.sends.submit(entry?).await }
        });
        futures::future::join_all(sends).await.into_iter().collect()
    }

    fn send_entry(&self, incoming: &Message, out: Outgoing) -> Result<SendEntry, String> {
        let target = self
            .topology
            .pair(&out.queue)
            .ok_or_else(|| format!("forward target `{}` is not a configured queue", out.queue))?;
        let mut attributes = out.attributes;
        for name in [CORRELATION_ID, SOURCE, REQUEST_ID, RECEIVED_AT] {
            if let Some(value) = incoming.attributes.get(name) {
                attributes
                    .entry(name.to_owned())
                    .or_insert_with(|| value.clone());
            }
        }
        // The order's trace: this message's span is the parent of the next stage's.
        let trace = crate::trace::outgoing(incoming);
        let aws_trace_header = if self.aws_trace_header {
            trace
                .first()
                .and_then(|(_, parent)| crate::trace::traceparent_to_xray(parent))
        } else {
            None
        };
        for (name, value) in trace {
            attributes.insert(name.to_owned(), value);
        }
        let mut attributes: HashMap<String, MessageAttributeValue> = attributes
            .into_iter()
            .map(|(k, v)| (k, string_attribute(v)))
            .collect();
        let dropped = attribution::fit_attributes(&mut attributes);
        if !dropped.is_empty() {
            warn!(?dropped, target = %out.queue, "message attributes over SQS's limit of 10 were not forwarded");
        }
        let fifo = target.queue.fifo;
        Ok(SendEntry {
            queue_url: target.queue.url.clone(),
            // The tenant's group travels with everything derived from its message, on standard
            // queues too (fair queues), unless the handler names another.
            group_id: carried_group_id(
                fifo,
                out.group_id.as_deref().or(incoming.group_id.as_deref()),
            ),
            delay_seconds: None,
            aws_trace_header,
            // Derived from what a retry does not change, so a retried forward is deduplicated
            // by a FIFO target (a body holds times that change from one attempt to the next).
            deduplication_id: fifo.then(|| {
                out.deduplication_id
                    .unwrap_or_else(|| stable_deduplication_id(incoming, &out.queue, &out.body))
            }),
            body: out.body,
            attributes,
        })
    }

    /// A first attempt whose group is at its cap in this task: sent again to the queue with a
    /// short delay, unchanged (body, every attribute, group), then deleted; no attempt is used.
    /// If the send fails, the message goes back to the queue after the same delay instead
    /// (that receive then counts as an attempt).
    async fn defer_for_group(&self, message: Message) {
        let queue = &self.pair.queue.name;
        let mut attributes = message.raw_attributes.clone();
        attributes.insert(
            fairness::DEFERRALS.to_owned(),
            string_attribute((fairness::deferrals(&message.attributes) + 1).to_string()),
        );
        attribution::fit_attributes(&mut attributes);
        let again = SendEntry {
            queue_url: self.pair.queue.url.clone(),
            body: message.body.clone(),
            attributes,
            group_id: message.group_id.clone(),
            deduplication_id: None,
            delay_seconds: Some(GROUP_DEFER_SECS),
            aws_trace_header: message.aws_trace_header.clone(),
        };
        match self.sends.submit(again).await {
            Ok(()) => {
                self.acknowledge(&message).await;
                events::deferred_for_group(queue);
            }
            Err(e) => {
                warn!(queue = %queue, error = %e, "could not defer a message over its group's cap; it comes back after its visibility");
                self.set_visibility(&message.receipt_handle, GROUP_DEFER_SECS)
                    .await;
            }
        }
    }

    async fn acknowledge(&self, message: &Message) {
        // A failed delete is not a lost message: SQS delivers it again and the handler's
        // idempotency absorbs it. The batcher has already logged and counted the failure.
        let _ = self.acks.submit(message.receipt_handle.clone()).await;
    }

    /// Retry later, or dead-letter; `attempt` is the attempt that failed. A transient failure
    /// with attempts left is hidden for its backoff (or, with `hold`, handed back to the caller
    /// to retry in place after it).
    async fn fail(
        &self,
        message: &Message,
        attempt: u32,
        error: HandlerError,
        hold: bool,
    ) -> Settled {
        let queue = &self.pair.queue.name;
        let detail = redact(error.detail());
        let class = match &error {
            HandlerError::Transient {
                retry_after,
                reason,
                ..
            } if attempt < self.worker.max_attempts => {
                let delay = retry_after.unwrap_or_else(|| {
                    retry_delay(
                        attempt,
                        Duration::from_millis(self.worker.backoff_min_ms),
                        Duration::from_secs(self.worker.backoff_max_secs),
                    )
                });
                Stats::bump(&self.stats.retried, 1);
                events::retried(queue, reason.0, attempt, delay, &detail);
                if hold {
                    return Settled::RetryIn(delay);
                }
                let visibility = retry_visibility(delay, message.received.elapsed());
                self.set_visibility(&message.receipt_handle, visibility)
                    .await;
                return Settled::Stays;
            }
            HandlerError::Transient { .. } => FailureClass::AttemptsExhausted,
            HandlerError::Permanent { .. } => FailureClass::Permanent,
        };
        let now = OffsetDateTime::now_utc();
        let attribution = Attribution {
            reason: error.reason().0.to_owned(),
            class,
            detail,
            worker: self.role.clone(),
            source_queue: queue.clone(),
            attempts: attempt,
            first_failed_at: message.first_received_at.unwrap_or(now),
            last_failed_at: now,
            correlation_id: message.correlation_id.clone(),
            source_message_id: message.message_id.clone(),
            origin: message.attributes.get(SOURCE).cloned(),
            imported_at: None,
            version: Some(crate::build_info::VERSION.to_owned()),
        };
        match self.dead_letter(message, &attribution).await {
            Ok(()) => {
                self.acknowledge(message).await;
                Stats::bump(&self.stats.dead_lettered, 1);
                events::dead_lettered(
                    queue,
                    &attribution.reason,
                    class,
                    attempt,
                    &attribution.detail,
                );
                Settled::Left
            }
            Err(e) => {
                events::dead_letter_failed(queue, &e);
                let delay = Duration::from_millis(self.worker.backoff_min_ms);
                if hold {
                    return Settled::RetryIn(delay);
                }
                self.set_visibility(
                    &message.receipt_handle,
                    retry_visibility(delay, message.received.elapsed()),
                )
                .await;
                Settled::Stays
            }
        }
    }

    /// Sends the message, unchanged, with its attribution, to the DLQ.
    async fn dead_letter(
        &self,
        message: &Message,
        attribution: &Attribution,
    ) -> Result<(), String> {
        // The redrive record stays: the `dlq redrive` run that moved this message knows it for
        // one of its own and leaves it here (a run moves each message once), and the next
        // redrive counts on from it (a FIFO deduplication id new for each redrive).
        let mut attributes = message.raw_attributes.clone();
        // Only a record that is one (at the edge an upstream may set anything), kept whole
        // below: masking digits or trimming it away would let the redrive run that moved this
        // message take it again.
        let redrive = attributes
            .remove(attribution::REDRIVE)
            .and_then(|v| v.string_value().and_then(kept_redrive_record));
        // A message refused for payment data is kept without a digit: the DLQ (kept for days,
        // exported, read by people) must not store what the edge refused to let in.
        let payment_data = attribution.reason == "payment_data";
        if payment_data {
            for value in attributes.values_mut() {
                if let Some(text) = value.string_value() {
                    *value = string_attribute(crate::edge::mask_digits(text));
                }
            }
        }
        if let Some(record) = redrive {
            attributes.insert(attribution::REDRIVE.to_owned(), string_attribute(record));
        }
        let body = if payment_data {
            crate::edge::mask_digits(&message.body)
        } else {
            message.body.clone()
        };
        let json = serde_json::to_string(attribution).map_err(|e| e.to_string())?;
        attributes.insert(attribution::ATTRIBUTION.to_owned(), string_attribute(json));
        let mut dropped = attribution::fit_attributes(&mut attributes);
        // Within SQS's size limit too, or the send fails on every attempt: the upstream's own
        // attributes go first, the largest first; then the attribution's detail is cut.
        let limit = self.max_message_bytes;
        let over =
            |a: &HashMap<String, MessageAttributeValue>| body.len() + attributes_size(a) > limit;
        let bytes = |(k, v): &(&String, &MessageAttributeValue)| {
            k.len()
                + v.string_value().map_or(0, str::len)
                + v.binary_value().map_or(0, |b| b.as_ref().len())
        };
        // The upstream's own attributes go first, then any but the attribution (at the edge an
        // upstream may have set `fleet-*` or a huge correlation id itself), the largest first.
        let ours = |k: &str| k.starts_with("fleet-") || k == CORRELATION_ID;
        for any in [false, true] {
            while over(&attributes) {
                let largest = attributes
                    .iter()
                    .filter(|(k, _)| {
                        k.as_str() != attribution::ATTRIBUTION
                            && k.as_str() != attribution::REDRIVE
                            && (any || !ours(k))
                    })
                    .max_by_key(bytes)
                    .map(|(k, _)| k.clone());
                let Some(name) = largest else { break };
                attributes.remove(&name);
                dropped.push(name);
            }
        }
        if over(&attributes) {
            let mut cut = attribution.clone();
            cut.detail = "(cut: the message is at SQS's size limit)".to_owned();
            let json = serde_json::to_string(&cut).map_err(|e| e.to_string())?;
            attributes.insert(attribution::ATTRIBUTION.to_owned(), string_attribute(json));
        }
        if !dropped.is_empty() {
            warn!(
                ?dropped,
                "message attributes over the SQS limits were not carried into the DLQ"
            );
        }
        let dlq = &self.pair.dlq;
        self.sends
            .submit(SendEntry {
                queue_url: dlq.url.clone(),
                body,
                attributes,
                group_id: carried_group_id(dlq.fifo, message.group_id.as_deref()),
                delay_seconds: None,
                aws_trace_header: message.aws_trace_header.clone(),
                deduplication_id: dlq.fifo.then(|| {
                    message
                        .deduplication_id
                        .clone()
                        .unwrap_or_else(|| message.message_id.clone())
                }),
            })
            .await
    }

    async fn set_visibility(&self, receipt: &str, visibility_secs: i32) {
        let result = self
            .sqs
            .change_message_visibility()
            .queue_url(&self.pair.queue.url)
            .receipt_handle(receipt)
            .visibility_timeout(visibility_secs)
            .send()
            .await;
        if let Err(e) = result {
            warn!(error = %crate::sdk_error_message(&e), "could not change visibility; SQS redelivers after the visibility timeout");
        }
    }

    /// One ChangeMessageVisibilityBatch of up to ten receipts to `secs`; `Err` when the request
    /// or any entry failed.
    async fn change_visibility(&self, receipts: &[String], secs: i32) -> Result<(), String> {
        let entries = receipts
            .iter()
            .enumerate()
            .map(|(i, r)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(secs)
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        let out = self
            .sqs
            .change_message_visibility_batch()
            .queue_url(&self.pair.queue.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| crate::sdk_error_message(&e))?;
        match out.failed().first() {
            None => Ok(()),
            Some(f) => Err(format!(
                "{} entries failed ({})",
                out.failed().len(),
                f.code()
            )),
        }
    }

    /// Makes messages visible again at once.
    async fn release(&self, receipts: Vec<String>) {
        if receipts.is_empty() {
            return;
        }
        let count = receipts.len();
        for chunk in receipts.chunks(SQS_BATCH) {
            if let Err(e) = self.change_visibility(chunk, 0).await {
                warn!(error = %e, "release failed; SQS redelivers after the visibility timeout");
            }
        }
        Stats::bump(&self.stats.released, count as u64);
        events::released(&self.pair.queue.name, count);
    }
}

/// A FIFO deduplication id for a forward of `incoming` to `queue`: SHA-256 of the target, the
/// outgoing envelope's event id and its payload (not its times or metadata), the same on every
/// attempt and every redrive, and different for an event id reused with another payload (which
/// the next stage then sees, and calls a conflict). Without an event id: the incoming
/// message's id and the target.
fn stable_deduplication_id(incoming: &Message, queue: &str, body: &str) -> String {
    let envelope = serde_json::from_str::<serde_json::Value>(body).ok();
    let event_id = envelope.as_ref().and_then(|v| {
        v.get("event_id")
            .and_then(|e| e.as_str())
            .map(str::to_owned)
    });
    match (event_id, envelope) {
        (Some(id), Some(v)) => crate::contract::fingerprint(&(queue, id, &v["payload"])),
        _ => crate::contract::fingerprint(&(queue, &incoming.message_id)),
    }
}

/// The redrive record a dead-lettered message keeps: a well-formed record, rewritten from its
/// fields (a few hundred bytes at most), its texts masked when they hold a card number, its id
/// kept only when valid. `None` for anything else.
fn kept_redrive_record(raw: &str) -> Option<String> {
    if raw.len() > 2048 {
        return None;
    }
    let mut record: attribution::RedriveRecord = serde_json::from_str(raw).ok()?;
    let clean = |text: &str, max: usize| -> String {
        let text: String = text.chars().take(max).collect();
        if crate::edge::holds_card_number(&text) {
            crate::edge::mask_digits(&text)
        } else {
            text
        }
    };
    record.id = record.id.filter(|id| super::message::is_valid_id(id));
    record.from_queue = clean(&record.from_queue, 256);
    record.previous_reason = record.previous_reason.map(|r| clean(&r, 128));
    serde_json::to_string(&record).ok()
}

fn string_attribute(value: String) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("data type is set")
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned());
    format!("handler panicked: {text}")
}

fn sdk_retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(4)
        .with_jitter()
}

/// Whether an SDK error is worth repeating: throttling, a server error, a timeout or a broken
/// connection.
fn is_retryable<E>(
    error: &aws_sdk_sqs::error::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> bool
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata,
{
    use aws_sdk_sqs::error::SdkError;
    match error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(e) => {
            let code = e.err().code().unwrap_or_default();
            e.raw().status().is_server_error()
                || matches!(
                    code,
                    "ThrottlingException"
                        | "RequestThrottled"
                        | "Throttling"
                        | "ServiceUnavailable"
                        | "InternalError"
                        | "KmsThrottled"
                )
        }
        _ => false,
    }
}

/// One DeleteMessageBatch, entry by entry: failed entries that SQS marks as its own fault are
/// tried again; sender faults (a stale receipt handle) are reported and left to redelivery.
async fn delete_batch(
    sqs: aws_sdk_sqs::Client,
    queue: QueueRef,
    receipts: Vec<String>,
) -> Vec<EntryResult> {
    let mut results: Vec<EntryResult> = vec![Err("not attempted".to_owned()); receipts.len()];
    let mut pending: Vec<usize> = (0..receipts.len()).collect();
    for round in 0..3 {
        if pending.is_empty() {
            break;
        }
        let entries: Vec<_> = pending
            .iter()
            .map(|&i| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&receipts[i])
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        let call = || {
            sqs.delete_message_batch()
                .queue_url(&queue.url)
                .set_entries(Some(entries.clone()))
                .send()
        };
        let out = match call.retry(sdk_retry_policy()).when(is_retryable).await {
            Ok(out) => out,
            Err(e) => {
                let text = crate::sdk_error_message(&e);
                events::delete_partially_failed(
                    &queue.name,
                    "request_failed",
                    pending.len(),
                    false,
                );
                for &i in &pending {
                    results[i] = Err(text.clone());
                }
                return results;
            }
        };
        for ok in out.successful() {
            if let Ok(i) = ok.id().parse::<usize>() {
                results[i] = Ok(());
            }
        }
        let mut retry = Vec::new();
        for failed in out.failed() {
            let Ok(i) = failed.id().parse::<usize>() else {
                continue;
            };
            let will_retry = !failed.sender_fault() && round < 2;
            events::delete_partially_failed(&queue.name, failed.code(), 1, will_retry);
            results[i] = Err(format!(
                "{}: {}",
                failed.code(),
                failed.message().unwrap_or_default()
            ));
            if will_retry {
                retry.push(i);
            }
        }
        pending = retry;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50 << round)).await;
        }
    }
    results
}

/// SendMessageBatch calls, one per destination queue and size-bounded chunk; each entry learns
/// its own outcome.
async fn send_batch(
    sqs: aws_sdk_sqs::Client,
    entries: Vec<SendEntry>,
    max_batch_bytes: usize,
) -> Vec<EntryResult> {
    let mut results: Vec<EntryResult> = vec![Err("not attempted".to_owned()); entries.len()];
    let mut by_queue: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_queue.entry(e.queue_url.as_str()).or_default().push(i);
    }
    for (url, indices) in by_queue {
        for chunk in chunk_by_size(&indices, |i| entries[i].size(), max_batch_bytes) {
            let request: Vec<_> = chunk
                .iter()
                .map(|&i| {
                    let e = &entries[i];
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(&e.body)
                        .set_message_attributes(
                            Some(e.attributes.clone()).filter(|a| !a.is_empty()),
                        )
                        .set_message_group_id(e.group_id.clone())
                        .set_message_deduplication_id(e.deduplication_id.clone())
                        .set_delay_seconds(e.delay_seconds)
                        .set_message_system_attributes(e.aws_trace_header.as_ref().map(|h| {
                            HashMap::from([(
                                MessageSystemAttributeNameForSends::AwsTraceHeader,
                                MessageSystemAttributeValue::builder()
                                    .data_type("String")
                                    .string_value(h)
                                    .build()
                                    .expect("data type is set"),
                            )])
                        }))
                        .build()
                        .expect("id and body are set")
                })
                .collect();
            let call = || {
                sqs.send_message_batch()
                    .queue_url(url)
                    .set_entries(Some(request.clone()))
                    .send()
            };
            match call.retry(sdk_retry_policy()).when(is_retryable).await {
                Ok(out) => {
                    for ok in out.successful() {
                        if let Ok(i) = ok.id().parse::<usize>() {
                            results[i] = Ok(());
                        }
                    }
                    for failed in out.failed() {
                        if let Ok(i) = failed.id().parse::<usize>() {
                            results[i] = Err(format!(
                                "{}: {}",
                                failed.code(),
                                failed.message().unwrap_or_default()
                            ));
                        }
                    }
                }
                Err(e) => {
                    let text = crate::sdk_error_message(&e);
                    for &i in &chunk {
                        results[i] = Err(text.clone());
                    }
                }
            }
        }
    }
    results
}

/// Splits `items` into runs of at most ten whose summed `size` stays within `limit`.
fn chunk_by_size(items: &[usize], size: impl Fn(usize) -> usize, limit: usize) -> Vec<Vec<usize>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for &i in items {
        let s = size(i);
        if !current.is_empty() && (current.len() == SQS_BATCH || bytes + s > limit) {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += s;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::operation::delete_message_batch::DeleteMessageBatchOutput;
    use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchOutput;
    use aws_sdk_sqs::types::{
        BatchResultErrorEntry, DeleteMessageBatchResultEntry, SendMessageBatchResultEntry,
    };
    use aws_smithy_mocks::{mock, mock_client, RuleMode};

    fn queue() -> QueueRef {
        QueueRef {
            key: "orders".into(),
            name: "fleet-orders".into(),
            url: "http://sqs.local/000/fleet-orders".into(),
            fifo: false,
        }
    }

    fn ok_entry(id: &str) -> DeleteMessageBatchResultEntry {
        DeleteMessageBatchResultEntry::builder()
            .id(id)
            .build()
            .unwrap()
    }

    fn failed_entry(id: &str, code: &str, sender_fault: bool) -> BatchResultErrorEntry {
        BatchResultErrorEntry::builder()
            .id(id)
            .code(code)
            .sender_fault(sender_fault)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_partly_failed_delete_batch_retries_only_the_server_side_failures() {
        let first = mock!(aws_sdk_sqs::Client::delete_message_batch).then_output(|| {
            DeleteMessageBatchOutput::builder()
                .successful(ok_entry("0"))
                .failed(failed_entry("1", "InternalError", false))
                .failed(failed_entry("2", "ReceiptHandleIsInvalid", true))
                .build()
                .unwrap()
        });
        // The retry carries only entry 1.
        let second = mock!(aws_sdk_sqs::Client::delete_message_batch)
            .match_requests(|r| r.entries().len() == 1 && r.entries()[0].id() == "1")
            .then_output(|| {
                DeleteMessageBatchOutput::builder()
                    .successful(ok_entry("1"))
                    .set_failed(Some(vec![]))
                    .build()
                    .unwrap()
            });
        let sqs = mock_client!(aws_sdk_sqs, RuleMode::Sequential, [&first, &second]);
        let results = delete_batch(sqs, queue(), vec!["r0".into(), "r1".into(), "r2".into()]).await;
        assert_eq!(results[0], Ok(()));
        assert_eq!(results[1], Ok(()), "a server-side failure is retried");
        assert!(results[2]
            .as_ref()
            .unwrap_err()
            .contains("ReceiptHandleIsInvalid"));
        assert_eq!(second.num_calls(), 1);
    }

    #[tokio::test]
    async fn a_throttled_delete_batch_is_retried_with_backoff() {
        let throttled = mock!(aws_sdk_sqs::Client::delete_message_batch).then_http_response(|| {
            aws_smithy_runtime_api::http::Response::new(
                aws_smithy_runtime_api::http::StatusCode::try_from(400).unwrap(),
                aws_smithy_types::body::SdkBody::from(
                    r#"{"__type":"com.amazonaws.sqs#RequestThrottled","message":"Rate exceeded"}"#,
                ),
            )
        });
        let ok = mock!(aws_sdk_sqs::Client::delete_message_batch).then_output(|| {
            DeleteMessageBatchOutput::builder()
                .successful(ok_entry("0"))
                .set_failed(Some(vec![]))
                .build()
                .unwrap()
        });
        let sqs = mock_client!(aws_sdk_sqs, RuleMode::Sequential, [&throttled, &ok]);
        let results = delete_batch(sqs, queue(), vec!["r0".into()]).await;
        assert_eq!(results, vec![Ok(())]);
        assert!(throttled.num_calls() >= 1);
    }

    #[tokio::test]
    async fn a_delete_batch_that_keeps_failing_reports_every_entry() {
        let down = mock!(aws_sdk_sqs::Client::delete_message_batch).then_http_response(|| {
            aws_smithy_runtime_api::http::Response::new(
                aws_smithy_runtime_api::http::StatusCode::try_from(500).unwrap(),
                aws_smithy_types::body::SdkBody::from(
                    r#"{"__type":"com.amazonaws.sqs#InternalError"}"#,
                ),
            )
        });
        let sqs = mock_client!(aws_sdk_sqs, RuleMode::MatchAny, [&down]);
        let results = delete_batch(sqs, queue(), vec!["r0".into(), "r1".into()]).await;
        assert!(results.iter().all(Result::is_err));
    }

    #[tokio::test]
    async fn send_batches_report_each_entry_and_split_by_queue() {
        let send = mock!(aws_sdk_sqs::Client::send_message_batch).then_output(|| {
            SendMessageBatchOutput::builder()
                .successful(
                    SendMessageBatchResultEntry::builder()
                        .id("0")
                        .message_id("m")
                        .md5_of_message_body("x")
                        .build()
                        .unwrap(),
                )
                .failed(failed_entry("1", "InvalidMessageContents", true))
                .build()
                .unwrap()
        });
        let sqs = mock_client!(aws_sdk_sqs, RuleMode::MatchAny, [&send]);
        let entry = |url: &str| SendEntry {
            queue_url: url.into(),
            body: "{}".into(),
            attributes: HashMap::new(),
            group_id: None,
            deduplication_id: None,
            delay_seconds: None,
            aws_trace_header: None,
        };
        let results = send_batch(sqs, vec![entry("a"), entry("a"), entry("b")], 256 * 1024).await;
        assert_eq!(results[0], Ok(()));
        assert!(results[1].is_err());
        assert_eq!(send.num_calls(), 2, "one call per destination queue");
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

    #[test]
    fn a_dead_lettered_message_keeps_a_well_formed_redrive_record_without_card_digits() {
        let record = r#"{"count":2,"at":"2026-11-25T04:20:00Z","from_queue":"fleet-ingest-t0c6-dlq","previous_reason":"malformed_json","id":"20261125T042000Z-3f9a1c2b"}"#;
        let kept: serde_json::Value =
            serde_json::from_str(&kept_redrive_record(record).unwrap()).unwrap();
        assert_eq!(kept["id"], "20261125T042000Z-3f9a1c2b");
        assert_eq!(kept["count"], 2);
        assert_eq!(
            kept["from_queue"], "fleet-ingest-t0c6-dlq",
            "no card, unchanged"
        );
        // Forged at the edge: a card number in a text, an id that is not one.
        let forged = r#"{"count":1,"at":"2026-11-25T04:20:00Z","from_queue":"4111 1111 1111 1111","previous_reason":null,"id":"x y"}"#;
        let kept: serde_json::Value =
            serde_json::from_str(&kept_redrive_record(forged).unwrap()).unwrap();
        assert_eq!(kept["from_queue"], "#### #### #### ####");
        assert!(kept.get("id").is_none());
        assert_eq!(kept_redrive_record("not a record"), None);
        assert_eq!(kept_redrive_record(&"x".repeat(5000)), None);
    }

    #[test]
    fn forward_deduplication_ids_do_not_change_with_the_body_of_a_retry() {
        let incoming = Message::for_test("{}");
        let first = r#"{"type":"order.accepted","event_id":"order.accepted:o-1","occurred_at":"2026-11-25T10:00:00Z"}"#;
        let retry = r#"{"type":"order.accepted","event_id":"order.accepted:o-1","occurred_at":"2026-11-25T10:00:07Z"}"#;
        assert_eq!(
            stable_deduplication_id(&incoming, "warehouse", first),
            stable_deduplication_id(&incoming, "warehouse", retry)
        );
        let mut redriven = Message::for_test("{}");
        redriven.message_id = "another".into();
        assert_eq!(
            stable_deduplication_id(&incoming, "warehouse", first),
            stable_deduplication_id(&redriven, "warehouse", retry),
            "a redriven copy forwards the same event"
        );
        assert_ne!(
            stable_deduplication_id(&incoming, "warehouse", first),
            stable_deduplication_id(&incoming, "delivery", first)
        );
        let other_payload = r#"{"type":"order.accepted","event_id":"order.accepted:o-1","payload":{"order_id":"o-2"}}"#;
        assert_ne!(
            stable_deduplication_id(&incoming, "warehouse", first),
            stable_deduplication_id(&incoming, "warehouse", other_payload),
            "an event id reused with another payload is not deduplicated away"
        );
    }

    #[test]
    fn chunks_respect_count_and_size() {
        let items: Vec<usize> = (0..25).collect();
        let chunks = chunk_by_size(&items, |_| 1, usize::MAX);
        assert_eq!(
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        let chunks = chunk_by_size(&items[..4], |_| 100_000, 256 * 1024);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2]);
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
        SqsMessage::builder()
            .message_id(id)
            .receipt_handle(format!("receipt-{id}"))
            .body(format!("{{\"id\":\"{id}\"}}"))
            .attributes(MessageSystemAttributeName::MessageGroupId, group)
            .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "1")
            .build()
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Sent {
        queue: String,
        group: Option<String>,
        delay: Option<i32>,
        deferrals: Option<String>,
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
                        sqs_message("n3", "noisy"),
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
            assert_eq!(d.delay, Some(super::GROUP_DEFER_SECS));
            assert_eq!(
                d.deferrals.as_deref(),
                Some("1"),
                "counted, to bound deferral"
            );
        }
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
