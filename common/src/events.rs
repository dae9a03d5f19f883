//! One function per observable event of the runtime: each writes its log line and updates its
//! metric with the same labels, so logs and metrics never disagree.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use tracing::{debug, info, warn};

use crate::failure::FailureClass;

/// The metrics of one queue's hot path (every receive, every message), registered once: a
/// `counter!` with labels builds its key and looks it up in the recorder on every call, which
/// `loadtest --runtime` measured as a share of the runtime's cost per message.
pub struct QueueMetrics {
    queue: String,
    received: Counter,
    receives: Counter,
    empty_receives: Counter,
    handler_seconds: Histogram,
    age_seconds: Histogram,
    succeeded: Counter,
    in_flight: Gauge,
}

impl QueueMetrics {
    /// The handles of `queue`'s metrics in the recorder installed now (install it first).
    pub fn new(queue: &str) -> Self {
        let q = || queue.to_owned();
        Self {
            queue: q(),
            received: metrics::counter!("fleet_messages_received_total", "queue" => q()),
            receives: metrics::counter!("fleet_receives_total", "queue" => q(), "empty" => "false"),
            empty_receives: metrics::counter!("fleet_receives_total", "queue" => q(), "empty" => "true"),
            handler_seconds: metrics::histogram!("fleet_handler_seconds", "queue" => q()),
            age_seconds: metrics::histogram!("fleet_message_age_seconds", "queue" => q()),
            succeeded: metrics::counter!("fleet_messages_succeeded_total", "queue" => q()),
            in_flight: metrics::gauge!("fleet_in_flight", "queue" => q()),
        }
    }

    /// A receive returned `count` messages.
    pub fn received(&self, count: usize) {
        self.received.increment(count as u64);
        if count == 0 {
            self.empty_receives.increment(1);
        } else {
            self.receives.increment(1);
        }
    }

    /// The handler took `elapsed` on a message that had waited `age` in the queue.
    pub fn handled(&self, elapsed: Duration, age: Option<Duration>) {
        self.handler_seconds.record(elapsed.as_secs_f64());
        if let Some(age) = age {
            self.age_seconds.record(age.as_secs_f64());
        }
    }

    /// The message's effect is durable and its acknowledgement is on its way.
    pub fn succeeded(&self, elapsed: Duration) {
        self.succeeded.increment(1);
        debug!(
            queue = %self.queue,
            elapsed_ms = elapsed.as_millis() as u64,
            "message done"
        );
    }

    /// Messages in flight in this process.
    pub fn in_flight(&self, count: usize) {
        self.in_flight.set(count as f64);
    }
}

/// A receive failed; the poll loop backs off and goes on.
pub fn receive_failed(queue: &str, error: &str, backoff: Duration) {
    metrics::counter!("fleet_receive_errors_total", "queue" => queue.to_owned()).increment(1);
    warn!(
        queue,
        error,
        backoff_ms = backoff.as_millis() as u64,
        "receive failed; backing off"
    );
}

/// A transient failure: the message is hidden for `delay`, then retried.
pub fn retried(queue: &str, reason: &str, attempt: u32, delay: Duration, detail: &str) {
    metrics::counter!("fleet_messages_retried_total", "queue" => queue.to_owned(), "reason" => reason.to_owned())
        .increment(1);
    warn!(
        queue,
        reason,
        attempt,
        delay_ms = delay.as_millis() as u64,
        detail,
        "transient failure; will retry"
    );
}

/// The message went to the DLQ with its attribution.
pub fn dead_lettered(queue: &str, reason: &str, class: FailureClass, attempts: u32, detail: &str) {
    metrics::counter!(
        "fleet_messages_dead_lettered_total",
        "queue" => queue.to_owned(),
        "reason" => reason.to_owned(),
        "class" => class.to_string()
    )
    .increment(1);
    warn!(queue, reason, class = %class, attempts, detail, "message dead-lettered");
}

/// Sending a message to the DLQ failed: the message stays on its queue and is retried.
pub fn dead_letter_failed(queue: &str, error: &str) {
    metrics::counter!("fleet_dead_letter_errors_total", "queue" => queue.to_owned()).increment(1);
    warn!(
        queue,
        error, "could not dead-letter; the message stays on its queue"
    );
}

/// Some entries of a DeleteMessageBatch failed.
pub fn delete_partially_failed(queue: &str, code: &str, count: usize, will_retry: bool) {
    metrics::counter!("fleet_delete_failures_total", "queue" => queue.to_owned(), "code" => code.to_owned())
        .increment(count as u64);
    warn!(
        queue,
        code, count, will_retry, "DeleteMessageBatch entries failed"
    );
}

/// A visibility heartbeat extended a long job.
pub fn heartbeat(queue: &str, ok: bool) {
    metrics::counter!("fleet_heartbeats_total", "queue" => queue.to_owned(), "ok" => ok.to_string()).increment(1);
    if !ok {
        warn!(
            queue,
            "visibility heartbeat failed; the job may be delivered twice"
        );
    }
}

/// Unfinished messages were made visible again at shutdown.
pub fn released(queue: &str, count: usize) {
    metrics::counter!("fleet_released_total", "queue" => queue.to_owned()).increment(count as u64);
    info!(queue, count, "released unfinished messages to the queue");
}

/// A downstream throttled a message's handler: the consumer's concurrency limit is now
/// `limit`, and the message is tried again in place after `pause` (its attempts untouched).
pub fn throttled(queue: &str, limit: usize, pause: Duration) {
    metrics::counter!("fleet_throttled_total", "queue" => queue.to_owned()).increment(1);
    concurrency_limit(queue, limit);
    info!(
        queue,
        limit,
        pause_ms = pause.as_millis() as u64,
        "throttled downstream; slowing down and retrying in place"
    );
}

/// A message deferred because its group had `max_in_flight_per_group` running in this task.
pub fn deferred_for_group(queue: &str) {
    metrics::counter!("fleet_messages_deferred_for_group_total", "queue" => queue.to_owned())
        .increment(1);
}

/// The consumer's adaptive concurrency limit (AIMD) is now `limit`.
pub fn concurrency_limit(queue: &str, limit: usize) {
    metrics::gauge!("fleet_concurrency_limit", "queue" => queue.to_owned()).set(limit as f64);
}

/// A handler ran past its deadline and was stopped.
pub fn handler_deadline_exceeded(queue: &str, deadline: Duration) {
    metrics::counter!("fleet_handler_deadline_exceeded_total", "queue" => queue.to_owned())
        .increment(1);
    warn!(
        queue,
        deadline_secs = deadline.as_secs(),
        "handler ran past its deadline; the attempt fails"
    );
}

/// The outcome of a redriven message written to the redrive ledger, or why not: an unknown run
/// (a forged record or one past the ledger's retention: nothing written) or a failure (the
/// message goes on without it).
pub fn redrive_outcome_recorded(
    queue: &str,
    run: &str,
    result: &Result<(), crate::redrive_ledger::LedgerError>,
) {
    use crate::redrive_ledger::LedgerError;
    let label = match result {
        Ok(()) => "written",
        Err(LedgerError::UnknownRun(_)) => "unknown_run",
        Err(_) => "failed",
    };
    metrics::counter!("fleet_redrive_ledger_writes_total", "queue" => queue.to_owned(), "result" => label)
        .increment(1);
    match result {
        Ok(()) => {}
        Err(e @ LedgerError::UnknownRun(_)) => {
            debug!(queue, redrive = run, error = %e, "redrive outcome not written");
        }
        Err(e) => {
            warn!(queue, redrive = run, error = %e, "could not write a redriven message's outcome to the ledger; the message goes on")
        }
    }
}
