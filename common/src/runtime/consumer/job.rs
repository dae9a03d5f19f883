//! The job: one message (or one FIFO group) through its handler, within a deadline, with the
//! visibility heartbeat, throttling retried in place, and the result settled: acknowledged,
//! retried later, or dead-lettered.

#[allow(unused_imports)]
use super::*;

/// What a FIFO group does after one of its messages.
enum GroupStep {
    /// The message is done (or dead-lettered): on to the next.
    Done,
    /// Hand this message and the rest back to SQS (shutdown, or held too long).
    HandBackWithThis,
    /// This message stays on the queue for its retry: hand the rest back.
    HandBackAfterThis,
}

impl<H: Handler> Inner<H> {
    /// A FIFO group's messages of one receive, strictly in order. All of them are held, and
    /// heartbeated, until each is done: a transient failure is retried here, in place, after
    /// its backoff (counting the attempt), so that no later message overtakes it and none is
    /// handed back to SQS, where every new receive would raise its receive count toward the
    /// DLQ. Shutdown releases whatever is still held.
    pub(super) async fn run_group(self: Arc<Self>, group: Vec<(Message, OwnedSemaphorePermit)>) {
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
                let step = if self.stopping.is_cancelled() {
                    // Shutdown: nothing more is started; the group goes back whole.
                    GroupStep::HandBackWithThis
                } else {
                    self.run_in_group(&m).await
                };
                match step {
                    GroupStep::Done => {}
                    GroupStep::HandBackWithThis => {
                        let left = std::iter::once(m.receipt_handle.clone())
                            .chain(rest.map(|(m, _)| m.receipt_handle))
                            .collect();
                        hand_back(left).await;
                        return;
                    }
                    GroupStep::HandBackAfterThis => {
                        hand_back(rest.map(|(m, _)| m.receipt_handle).collect()).await;
                        return;
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

    /// One message of a FIFO group through its handler, a transient failure retried here, in
    /// place, after its backoff (counting the attempt): what the group does next.
    async fn run_in_group(&self, m: &Message) -> GroupStep {
        let span = self.message_span(m);
        let mut extra_attempts = 0;
        loop {
            let attempt = m.attempt() + extra_attempts;
            let result = match self
                .run_through_throttling(m)
                .instrument(span.clone())
                .await
            {
                Ran::Done(result) => result,
                Ran::Stopped => return GroupStep::HandBackWithThis,
            };
            match self
                .settle(m, attempt, result, true)
                .instrument(span.clone())
                .await
            {
                Settled::Left => return GroupStep::Done,
                // Failed and hidden for its retry by SQS: the rest must not overtake it.
                Settled::Stays => return GroupStep::HandBackAfterThis,
                Settled::RetryIn(delay) => {
                    // Held no longer than SQS lets a receive stay invisible.
                    let fits = m.received.elapsed() + delay + self.worker.handler_deadline()
                        < MAX_VISIBILITY.saturating_sub(VISIBILITY_MARGIN);
                    if !fits {
                        return GroupStep::HandBackWithThis;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => extra_attempts += 1,
                        () = self.stopping.cancelled() => return GroupStep::HandBackWithThis,
                    }
                }
            }
        }
    }

    /// Runs the handler once, within its deadline; a panic is a transient failure.
    pub(super) async fn run_handler(&self, message: &Message) -> Result<Outcome, HandlerError> {
        let deadline = self.worker.handler_deadline();
        let _job = self.health.job(Arc::clone(&self.queue_name), deadline);
        let started = Instant::now();
        // Boxed, like every cold path of a job (failing, releasing, heartbeats, the redrive
        // ledger): a job's future stays small, so moving the not yet started futures of a
        // receive's batch into their task copies little (measured with `loadtest --runtime`).
        let work = AssertUnwindSafe(Box::pin(self.handler.handle(message))).catch_unwind();
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
        self.metrics.handled(started.elapsed(), message.age());
        result
    }

    /// The span of one message's handling: every line logged in it carries the correlation id;
    /// with tracing on it is the message's span in the order's trace.
    pub(super) fn message_span(&self, message: &Message) -> tracing::Span {
        let correlation_id = CorrelationId(message);
        // ERROR level so that the span, and with it the correlation id on every line logged
        // inside it, survives any log filter (a span disabled by the filter carries no fields).
        // The build's version is not a field here: every JSON line carries it already.
        let span = error_span!(
            "message",
            correlation_id = %correlation_id,
            message_id = %message.message_id,
            worker = %self.role,
            queue = %self.pair.queue.name,
            attempt = message.attempt(),
            redrive = tracing::field::Empty,
        );
        if let Some(run) = message.redrive_id() {
            span.record("redrive", run);
        }
        crate::trace::attach(&span, message);
        span
    }

    /// Runs the handler, with a heartbeat, until the message is settled: done (acknowledged),
    /// retried later, or dead-lettered. Throttling is retried here, in place, while the
    /// consumer's concurrency limit shrinks, for up to `throttle_patience_secs`: throttling
    /// alone does not use up the message's attempts. Returns whether the message left the
    /// queue.
    pub(super) async fn process(&self, message: Message) -> bool {
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
                    self.settle(&message, message.attempt(), result, false)
                        .await,
                    Settled::Left
                ),
                Ran::Stopped => {
                    // Shutdown while throttled: back to the queue at once, no attempt used.
                    Box::pin(self.release(vec![message.receipt_handle.clone()])).await;
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
    pub(super) async fn run_through_throttling(&self, message: &Message) -> Ran {
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
    pub(super) async fn settle(
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
                        self.record_redrive(message, redrive_ledger::Outcome::Succeeded)
                            .await;
                        let before = self.concurrency.limit();
                        let after = self.concurrency.succeeded();
                        if after != before {
                            events::concurrency_limit(&self.pair.queue.name, after);
                        }
                        Stats::bump(&self.stats.succeeded, 1);
                        self.metrics.succeeded(started.elapsed());
                        Settled::Left
                    }
                    Err(e) => {
                        Box::pin(self.fail(
                            message,
                            attempt,
                            HandlerError::transient(Reason::FORWARD_FAILED, e),
                            hold,
                        ))
                        .await
                    }
                }
            }
            Err(error) => Box::pin(self.fail(message, attempt, error, hold)).await,
        }
    }

    /// The visibility a heartbeat asks for: the queue's timeout, within what is left of the 12
    /// hours SQS allows from the receive; `None` when nothing is left.
    pub(super) fn extension(&self, received: std::time::Instant) -> Option<i32> {
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
    pub(super) async fn heartbeat(
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
                let ok = Box::pin(self.change_visibility(chunk, extend_to))
                    .await
                    .is_ok();
                events::heartbeat(&self.pair.queue.name, ok);
            }
        }
    }

    /// Writes what became of a redriven message under its `dlq redrive` run, in the ledger
    /// (best effort, and bounded: the message never waits long for it nor fails because of it).
    pub(super) async fn record_redrive(
        &self,
        message: &Message,
        outcome: redrive_ledger::Outcome<'_>,
    ) {
        let (Some(ledger), Some(run)) = (&self.ledger, message.redrive_id()) else {
            return;
        };
        // A later copy (deferred for its group's cap) writes under the id the redrive sent;
        // never at the edge, where the record is an upstream's word.
        let key = match message.redrive_record().and_then(|r| r.copy_of) {
            Some(first) if !self.untrusted_edge => first,
            _ => message.message_id.clone(),
        };
        let now = OffsetDateTime::now_utc();
        let write = Box::pin(ledger.record(&run, &key, outcome, now));
        let result = match tokio::time::timeout(redrive_ledger::WRITE_TIMEOUT, write).await {
            Ok(result) => result,
            Err(_) => Err(redrive_ledger::LedgerError::Aws(format!(
                "no answer within {} s",
                redrive_ledger::WRITE_TIMEOUT.as_secs()
            ))),
        };
        events::redrive_outcome_recorded(&self.pair.queue.name, &run, &result);
    }

    pub(super) async fn acknowledge(&self, message: &Message) {
        // A failed delete is not a lost message: SQS delivers it again and the handler's
        // idempotency absorbs it. The batcher has already logged and counted the failure.
        // Not waited for: the delete goes in the next batch, and the message's permit is free
        // for the next receive meanwhile (shutdown waits for the last batch).
        let _ = self.acks.enqueue(message.receipt_handle.clone()).await;
    }
}

/// A message's correlation id for its span, formatted in place: the one it carries, else one
/// made from its message id.
struct CorrelationId<'a>(&'a Message);

impl std::fmt::Display for CorrelationId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0.correlation_id {
            Some(id) => f.write_str(id),
            None => write!(f, "msg-{}", self.0.message_id),
        }
    }
}

pub(super) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned());
    format!("handler panicked: {text}")
}
