//! Polling and capacity: the long-poll loops, the in-flight cap and the adaptive concurrency
//! limit they reserve under, the receive itself, and dispatch of what it brought: a job per
//! message (within its group's cap), or per FIFO group.

#[allow(unused_imports)]
use super::*;

impl<H: Handler> Inner<H> {
    pub(super) async fn poll_loop(self: Arc<Self>, shutdown: CancellationToken, jobs: TaskTracker) {
        let mut failures: u32 = 0;
        // The last receive brought all it asked for: more are waiting.
        let mut after_full = false;
        let probe = self
            .health
            .poller(format!("{}/{}", self.role, self.pair.queue.name));
        loop {
            probe.waiting_for_room(true);
            let permits = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                permits = self.reserve_batch(after_full) => permits,
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
                    after_full = !messages.is_empty() && messages.len() >= permits.num_permits();
                    let wait = self.wait_before_next(&messages, permits.num_permits());
                    self.dispatch(messages, permits, &jobs);
                    if !wait.is_zero() {
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                Err(error) => {
                    after_full = false;
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

    /// How long to wait before the next receive, after one that brought `messages` of `asked`:
    /// nothing after a full or an empty one; after a partial one the batching window when one
    /// is configured, else what adaptive batching decides (see [`batching`]).
    fn wait_before_next(&self, messages: &[Message], asked: usize) -> Duration {
        let per_sec = self
            .arrivals
            .record(messages.len(), std::time::Instant::now());
        if messages.is_empty() || messages.len() >= asked {
            return Duration::ZERO;
        }
        if self.worker.batch_window_ms > 0 {
            return Duration::from_millis(self.worker.batch_window_ms);
        }
        let now = time::OffsetDateTime::now_utc();
        let freshest = |age: &dyn Fn(&Message) -> Duration| {
            messages.iter().map(age).min().unwrap_or(Duration::ZERO)
        };
        let lag = freshest(&|m| m.lag(now));
        let queued = freshest(&|m| {
            m.sent_at.map_or(Duration::ZERO, |at| {
                (now - at).try_into().unwrap_or(Duration::ZERO)
            })
        });
        let wait = batching::wait_after(batching::Partial {
            asked,
            pollers: self.worker.pollers.get(),
            per_sec,
            lag,
            queued,
            max: Duration::from_millis(self.worker.batch_wait_max_ms),
        });
        tracing::debug!(
            queue = %self.pair.queue.name,
            received = messages.len(),
            asked,
            per_sec,
            lag_ms = lag.as_millis() as u64,
            queued_ms = queued.as_millis() as u64,
            wait_ms = wait.as_millis() as u64,
            "partial receive"
        );
        wait
    }

    /// Waits for room under the adaptive concurrency limit and for at least one free slot.
    /// After a full receive (messages are waiting) it then waits briefly (250 ms, or the
    /// batching window when it is longer) for room for a full batch: at the in-flight cap
    /// slots free one by one, and a receive per freed slot would cost a request per message.
    /// Otherwise it asks for what is free now, so that a trickle never waits here. No more than
    /// the adaptive limit leaves room for, even when it falls during the wait (but one: a
    /// poller that waited keeps one slot, so in flight may pass a lowered limit by one per
    /// poller until jobs finish).
    pub(super) async fn reserve_batch(&self, after_full: bool) -> OwnedSemaphorePermit {
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
        let fill = after_full && self.concurrency.limit() >= max;
        let want = (self.worker.batch_size as usize)
            .min(max)
            .min(if fill { max } else { room });
        let mut permits = Arc::clone(&self.capacity)
            .acquire_owned()
            .await
            .expect("capacity is never closed");
        if want > 1 {
            let fill_wait = if fill {
                BATCH_FILL_WAIT.max(Duration::from_millis(self.worker.batch_window_ms))
            } else {
                Duration::from_millis(self.worker.batch_window_ms)
            };
            let more = async {
                if fill_wait.is_zero() {
                    return None;
                }
                let more = Arc::clone(&self.capacity).acquire_many_owned((want - 1) as u32);
                tokio::time::timeout(fill_wait, more).await.ok()?.ok()
            };
            match more.await {
                Some(more) => permits.merge(more),
                None => {
                    while permits.num_permits() < want {
                        match Arc::clone(&self.capacity).try_acquire_owned() {
                            Ok(one) => permits.merge(one),
                            Err(_) => break,
                        }
                    }
                }
            }
        }
        // Throttled while waiting: keep only what the lowered limit leaves room for.
        if self.concurrency.limit() < max {
            let others = max - self.capacity.available_permits() - permits.num_permits();
            let room = self.concurrency.room(others).max(1);
            if permits.num_permits() > room {
                drop(permits.split(permits.num_permits() - room));
            }
        }
        permits
    }

    pub(super) async fn receive(&self, max: usize) -> Result<Vec<Message>, String> {
        let mut request = self
            .receiver
            .receive_message()
            .queue_url(&self.pair.queue.url)
            .max_number_of_messages(max as i32)
            .wait_time_seconds(self.worker.receive_wait_secs as i32)
            .message_attribute_names("All");
        // Only the system attributes a message is read with (see `Message::from_sqs`).
        for name in SYSTEM_ATTRIBUTES {
            request = request.message_system_attribute_names(name.clone());
        }
        let out = request
            .send()
            .await
            .map_err(|e| crate::sdk_error_message(&e))?;
        let mut messages: Vec<Message> = out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(Message::from_sqs)
            .collect();
        if self.untrusted_edge {
            for m in &mut messages {
                m.attributes.retain(|name, _| !name.starts_with("fleet-"));
                // The group cap never defers at the edge: counters there are an upstream's.
                m.prior_attempts = 0;
                m.deferrals = 0;
            }
        }
        self.metrics.received(messages.len());
        Stats::bump(&self.stats.received, messages.len() as u64);
        Ok(messages)
    }

    /// Starts a job per message (per FIFO group, in order, on FIFO queues), each holding one
    /// permit; surplus permits go back.
    pub(super) fn dispatch(
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
            // One task for the receive's messages, each its own job inside it (run concurrently,
            // its permit given back the moment it is done): a task per message cost a spawn and
            // cross-thread wake-ups per message, the runtime's largest overhead (measured with
            // `loadtest --runtime`).
            // Each job's future is built in place, in one pass, and kept small (its cold paths
            // are boxed): moving a batch of large futures was a copy of kilobytes per message.
            let batch = messages.into_iter().map(|m| {
                let permit = take_one();
                let slot = self.groups.try_enter(m.group_id.as_deref(), m.deferrals);
                let this = Arc::clone(self);
                async move {
                    let job = AssertUnwindSafe(async {
                        match slot {
                            Some(slot) => {
                                this.process(m).await;
                                drop(slot);
                            }
                            None => Box::pin(this.defer_for_group(m)).await,
                        }
                    });
                    // A panic that escapes a job's own guard ends that job only, not its
                    // siblings.
                    if let Err(panic) = job.catch_unwind().await {
                        tracing::error!(queue = %this.pair.queue.name, error = %job::panic_text(&panic), "a job panicked outside its handler; its message comes back after its visibility timeout");
                    }
                    drop(permit);
                }
            });
            jobs.spawn(futures::future::join_all(batch));
        }
        self.report_in_flight();
    }

    pub(super) fn report_in_flight(&self) {
        let in_use = self.worker.max_in_flight.get() - self.capacity.available_permits();
        self.metrics.in_flight(in_use);
    }
}
