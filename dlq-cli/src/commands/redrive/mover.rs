//! The receive-send-delete path: a run's reading, moving, canary and guard, and what it saw
//! come back.

#[allow(unused_imports)]
use super::*;

/// A run of the receive-send-delete path: what it has read, moved and seen come back.
pub(super) struct Mover<'a> {
    ctx: &'a Ctx,
    dlq: &'a Queue,
    info: &'a QueueInfo,
    to: Option<&'a Queue>,
    opts: &'a Options,
    stop: &'a CancellationToken,
    reader: Reader,
    report: Report,
    bar: ProgressBar,
    burst: u32,
    limiter: Option<DefaultDirectRateLimiter>,
    destinations: HashMap<String, Queue>,
    /// The DLQ's only source queue (from the redrive policies), once looked up.
    sole_source: Option<Option<String>>,
    first_send: Option<Instant>,
    last_send: Instant,
    waited: Duration,
    /// When the run started: messages sent to the DLQ later are not its to move.
    started: OffsetDateTime,
    /// Matched messages read beyond the canary's size: moved first once it passes.
    held_back: Vec<Planned>,
    /// The ledger, once the run is open in it.
    ledger: Option<&'a Ledger>,
    /// The ids SQS gave the copies this run sent: only their entries in the ledger count.
    sent_ids: HashSet<String>,
    /// What the workers wrote in the ledger about them, as last read.
    entries: BTreeMap<String, Entry>,
    last_ledger_read: Option<Instant>,
    /// This run's messages read back in the DLQ, by reason.
    read_back: u64,
    read_back_reasons: BTreeMap<String, u64>,
    /// Of those, the ones SQS moved there itself (their receives ran out): their id in the DLQ is
    /// the id of the copy that was sent.
    moved_by_sqs: HashSet<String>,
}

/// Room kept under the reader's limit for one more receive.
const BATCH_ROOM: usize = 10;

/// How often the ledger is read while the run waits on outcomes.
const LEDGER_POLL: Duration = Duration::from_secs(1);

/// A matched message with the queue it goes to.
struct Planned {
    message: DlqMessage,
    destination: String,
}

impl<'a> Mover<'a> {
    pub(super) fn new(
        ctx: &'a Ctx,
        dlq: &'a Queue,
        info: &'a QueueInfo,
        to: Option<&'a Queue>,
        opts: &'a Options,
        output: Output,
        stop: &'a CancellationToken,
    ) -> Self {
        let burst = opts.rate.map_or(10, |r| r.get().min(10));
        let limiter = opts.rate.map(|r| {
            RateLimiter::direct(
                Quota::per_second(r).allow_burst(NonZeroU32::new(burst).expect("non-zero")),
            )
        });
        let expected = opts
            .max
            .map_or(info.visible, |m| (m as u64).min(info.visible));
        let bar = output::progress(
            output,
            Some(expected),
            if opts.dry_run { "reading" } else { "redriving" },
        );
        let started = OffsetDateTime::now_utc();
        Self {
            ctx,
            dlq,
            info,
            to,
            opts,
            stop,
            started,
            reader: Reader::new(ctx, dlq, opts.hold),
            report: Report {
                queue: dlq.name.clone(),
                redrive_id: new_redrive_id(started),
                path: if opts.dry_run {
                    "dry-run"
                } else {
                    "receive-send-delete"
                },
                ..Report::default()
            },
            bar,
            burst,
            limiter,
            destinations: HashMap::new(),
            sole_source: None,
            first_send: None,
            last_send: Instant::now(),
            waited: Duration::ZERO,
            held_back: Vec::new(),
            ledger: None,
            sent_ids: HashSet::new(),
            entries: BTreeMap::new(),
            last_ledger_read: None,
            read_back: 0,
            read_back_reasons: BTreeMap::new(),
            moved_by_sqs: HashSet::new(),
        }
    }

    /// Opens the run in the ledger, moves what matches (canary first when asked), then
    /// releases what it still holds and tallies what became of what moved.
    pub(super) async fn run(mut self) -> Result<Report> {
        tracing::info!(redrive = %self.report.redrive_id, queue = %self.dlq.name, "redrive started");
        let canary = self.opts.canary.is_some() && !self.opts.dry_run;
        if let (Some(ledger), false) = (&self.ctx.ledger, self.opts.dry_run) {
            match ledger
                .open_run(&self.report.redrive_id, &self.dlq.name, self.started)
                .await
            {
                Ok(()) => self.ledger = Some(ledger),
                // The canary decides on the ledger: without it, nothing moves.
                Err(e) if canary => {
                    return Err(CliError::Aws {
                        doing: "opening the run in the redrive ledger (--canary needs it)".into(),
                        detail: e.to_string(),
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not open the run in the redrive ledger: the report will not say what succeeded downstream");
                }
            }
        }
        let result = self.move_all().await;
        if result.is_ok() && self.ledger.is_some() && self.report.moved > 0 {
            // A last look, so that the table is as fresh as it can be.
            if let Err(e) = self.refresh_outcomes(true).await {
                tracing::warn!(error = %e, "could not read the redrive ledger at the end");
            }
        }
        self.tally();
        self.reader.finish().await;
        self.bar.finish_and_clear();
        result?;
        let report = &mut self.report;
        report.interrupted = self.stop.is_cancelled();
        if let Some(first) = self.first_send {
            let secs = self.last_send.duration_since(first).as_secs_f64();
            report.elapsed_ms = (secs * 1000.0) as u64;
            // The first batch goes at once (the limiter's burst); the rate is over what followed.
            let after_first = report.moved.saturating_sub(u64::from(self.burst));
            report.rate_per_sec = if secs > 0.0 {
                after_first as f64 / secs
            } else {
                report.moved as f64
            };
        }
        tracing::info!(redrive = %report.redrive_id, moved = report.moved, came_back = report.came_back, halted = report.halted, "redrive ended");
        Ok(self.report)
    }

    /// The outcome table: from the ledger when the run is in one, else from what was read
    /// back in the DLQ.
    fn tally(&mut self) {
        let o = self.outcomes();
        let report = &mut self.report;
        report.came_back = o.dead_lettered;
        report.came_back_reasons = o.dead_lettered_reasons.clone();
        if self.ledger.is_some() {
            report.succeeded = Some(o.succeeded);
            report.retrying = Some(o.retrying);
            report.in_flight = Some(report.moved.saturating_sub(o.known()));
        }
        report.not_back = report.moved.saturating_sub(report.came_back);
    }

    /// What became of what this run sent: the ledger's entries of the copies it sent (nobody
    /// else's), those SQS moved to the DLQ itself counted as come back whatever the ledger
    /// last said, and never fewer come back than were read back in the DLQ (a ledger write
    /// can fail).
    fn outcomes(&self) -> RunOutcomes {
        outcomes_of_run(
            &self.entries,
            &self.sent_ids,
            &self.moved_by_sqs,
            (self.read_back, &self.read_back_reasons),
        )
    }

    /// Messages sent to their destination (deleted from the DLQ or not).
    fn sent(&self) -> u64 {
        self.report.moved + self.report.not_deleted
    }

    async fn move_all(&mut self) -> Result<()> {
        let Some(c) = self.opts.canary.filter(|_| !self.opts.dry_run) else {
            return self.move_until(None, None).await;
        };
        if self.ledger.is_none() {
            return Err(CliError::Usage(format!(
                "--canary decides on what the workers write in the redrive ledger: pass --config with a [tables.{}] section (config/fleet.toml has one)",
                fleet_common::redrive_ledger::TABLE_KEY
            )));
        }
        self.move_until(Some(c.size as u64), None).await?;
        if self.stop.is_cancelled() || self.sent() == 0 {
            return Ok(());
        }
        if !self.watch_canary(c).await {
            return Ok(());
        }
        self.move_until(None, Some(c)).await?;
        if !self.stop.is_cancelled() && !self.report.halted {
            // The last of it is watched too, so that the table tells what became of it.
            self.wait_for_outcomes(c).await;
        }
        Ok(())
    }

    /// Moves matching messages until `limit` have been sent (the canary) or none are left.
    /// With `guard` (after the canary passed), each batch waits for its go: no further ahead of
    /// the outcomes than they allow, and a halt when too many come back.
    async fn move_until(&mut self, limit: Option<u64>, guard: Option<Canary>) -> Result<()> {
        if limit.is_none() {
            let mut held = std::mem::take(&mut self.held_back);
            while !held.is_empty() && !self.stop.is_cancelled() {
                if let Some(c) = guard {
                    if !self.keep_going(c).await {
                        return Ok(());
                    }
                }
                let chunk: Vec<Planned> =
                    held.drain(..held.len().min(self.burst as usize)).collect();
                self.send_planned(chunk).await?;
            }
        }
        while !self.stop.is_cancelled() {
            if limit.is_some_and(|l| self.sent() >= l) || self.max_reached() {
                break;
            }
            let Some(batch) = self.next_batch().await? else {
                break;
            };
            let mut planned = self.plan(batch).await?;
            if let Some(l) = limit {
                let room = l.saturating_sub(self.sent()) as usize;
                self.held_back
                    .extend(planned.split_off(room.min(planned.len())));
            }
            if let (Some(c), false) = (guard, planned.is_empty()) {
                if !self.keep_going(c).await {
                    // Still held: released, visible again in the DLQ, when the run ends.
                    self.held_back.extend(planned);
                    return Ok(());
                }
            }
            self.send_planned(planned).await?;
        }
        Ok(())
    }

    fn max_reached(&self) -> bool {
        self.opts
            .max
            .is_some_and(|m| self.report.matched as usize >= m)
    }

    /// Reads the ledger (at most every [`LEDGER_POLL`] unless `now`).
    async fn refresh_outcomes(&mut self, now: bool) -> std::result::Result<(), String> {
        let Some(ledger) = self.ledger else {
            return Ok(());
        };
        if !now
            && self
                .last_ledger_read
                .is_some_and(|t| t.elapsed() < LEDGER_POLL)
        {
            return Ok(());
        }
        self.entries = ledger
            .entries(&self.report.redrive_id)
            .await
            .map_err(|e| e.to_string())?;
        self.last_ledger_read = Some(Instant::now());
        Ok(())
    }

    /// Reads the ledger; a failure halts the run (it cannot judge what it cannot see).
    async fn refresh_or_halt(&mut self, now: bool) -> bool {
        match self.refresh_outcomes(now).await {
            Ok(()) => true,
            Err(e) => {
                self.halt(format!("cannot read the redrive ledger ({e})"));
                false
            }
        }
    }

    fn halt(&mut self, why: String) {
        tracing::warn!(redrive = %self.report.redrive_id, reason = %why, "redrive halted");
        self.report.halted = true;
        self.report.halt_reason = Some(why);
    }

    /// After the canary, before each batch: whether to send it (see [`guard`]). While the
    /// outcomes lag it waits; when none comes for `--watch` it halts.
    async fn keep_going(&mut self, c: Canary) -> bool {
        let mut seen = None;
        let mut since = Instant::now();
        loop {
            if !self.refresh_or_halt(false).await {
                return false;
            }
            let o = self.outcomes();
            let sent = self.sent();
            match guard(c, sent, &o) {
                Guard::Go => return true,
                Guard::Halt => {
                    self.halt(format!(
                        "{} came back and {} are retrying, of the {} of {sent} moved messages with an outcome (more than {}%)",
                        o.dead_lettered,
                        o.retrying,
                        o.known(),
                        c.halt_above_pct
                    ));
                    return false;
                }
                Guard::Wait => {}
            }
            let progress = (o.succeeded, o.retrying, o.dead_lettered);
            if seen != Some(progress) {
                seen = Some(progress);
                since = Instant::now();
            } else if since.elapsed() >= c.watch {
                self.halt(format!(
                    "no new outcome for {} while {} moved messages had none: are the workers running?",
                    humantime::format_duration(c.watch),
                    sent.saturating_sub(o.known())
                ));
                return false;
            }
            self.bar.set_message(format!(
                "waiting for outcomes: {} of {sent} known",
                o.known()
            ));
            tokio::select! {
                () = tokio::time::sleep(LEDGER_POLL) => {}
                () = self.stop.cancelled() => return false,
            }
        }
    }

    /// After the last batch: waits until everything sent has succeeded or come back, for at
    /// most `--watch`, then judges the whole run as the guard would.
    async fn wait_for_outcomes(&mut self, c: Canary) {
        let started = Instant::now();
        while started.elapsed() < c.watch && !self.stop.is_cancelled() {
            if !self.refresh_or_halt(true).await {
                return;
            }
            let o = self.outcomes();
            if o.settled() >= self.sent() {
                break;
            }
            self.bar.set_message(format!(
                "watching the last: {} of {} settled",
                o.settled(),
                self.sent()
            ));
            tokio::select! {
                () = tokio::time::sleep(LEDGER_POLL) => {}
                () = self.stop.cancelled() => {}
            }
        }
        let o = self.outcomes();
        let sent = self.sent();
        let no_outcome = sent.saturating_sub(o.known());
        if c.over(o.dead_lettered + o.retrying + no_outcome, sent) {
            self.halt(format!(
                "in the end, of the {sent} moved: {} came back, {} are retrying, {no_outcome} have no outcome (more than {}%)",
                o.dead_lettered, o.retrying, c.halt_above_pct
            ));
        }
    }

    /// Watches the canary for `--watch`, or until each of its messages has settled, or until
    /// more came back than the threshold allows whatever the rest does. It passes when at most
    /// `--halt-above` percent of it came back, is retrying, or has no outcome at all.
    async fn watch_canary(&mut self, c: Canary) -> bool {
        let started = Instant::now();
        let moved = self.sent();
        self.bar.set_message(format!(
            "canary: {moved} moved, watching for {}",
            humantime::format_duration(c.watch)
        ));
        while started.elapsed() < c.watch && !self.stop.is_cancelled() {
            if !self.refresh_or_halt(true).await {
                return false;
            }
            let o = self.outcomes();
            if o.settled() >= moved || c.over(o.dead_lettered, moved) {
                break;
            }
            self.bar.set_message(format!(
                "canary: {moved} moved, {} settled, {} came back",
                o.settled(),
                o.dead_lettered
            ));
            tokio::select! {
                () = tokio::time::sleep(LEDGER_POLL) => {}
                () = self.stop.cancelled() => {}
            }
        }
        let o = self.outcomes();
        let no_outcome = moved.saturating_sub(o.known());
        let bad = o.dead_lettered + o.retrying + no_outcome;
        let stopped = self.stop.is_cancelled();
        let passed = o.known() > 0 && !c.over(bad, moved) && !stopped;
        if !passed && !stopped {
            self.halt(if o.known() == 0 {
                format!(
                    "no outcome for the canary within {}: are the workers running? (a longer --watch waits longer)",
                    humantime::format_duration(c.watch)
                )
            } else {
                format!(
                    "of the canary's {moved}: {} came back, {} are retrying, {no_outcome} have no outcome (more than {}%)",
                    o.dead_lettered, o.retrying, c.halt_above_pct
                )
            });
        }
        self.report.canary = Some(CanaryOutcome {
            size: c.size,
            moved,
            succeeded: o.succeeded,
            retrying: o.retrying,
            came_back: o.dead_lettered,
            no_outcome,
            came_back_pct: percent(bad, moved),
            halt_above_pct: c.halt_above_pct,
            watched_ms: started.elapsed().as_millis() as u64,
            passed,
        });
        passed
    }

    /// The next batch of messages not seen before; `None` when nothing more can be read (after
    /// waiting for messages in flight elsewhere, up to `--wait-in-flight`), or when the reader
    /// holds as many as SQS lets it (the rest is left for another run, and said so).
    async fn next_batch(&mut self) -> Result<Option<Vec<DlqMessage>>> {
        loop {
            if self.stop.is_cancelled() {
                return Ok(None);
            }
            if self.reader.held() + BATCH_ROOM >= MAX_HELD {
                self.report.held_limit_reached = true;
                return Ok(None);
            }
            let want = self.opts.max.map_or(self.burst as usize, |m| {
                (m - self.report.matched as usize).min(self.burst as usize)
            });
            let batch = self.reader.next(want).await?;
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
            if !self.reader.exhausted(self.ctx).await? {
                continue;
            }
            let elsewhere = queues::info(self.ctx, self.dlq)
                .await?
                .in_flight
                .saturating_sub(self.reader.held() as u64);
            self.report.in_flight_elsewhere = elsewhere;
            if elsewhere == 0 || self.waited >= self.opts.wait_in_flight {
                return Ok(None);
            }
            self.bar.set_message(format!(
                "waiting for {elsewhere} messages in flight elsewhere"
            ));
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.waited += Duration::from_secs(1);
            self.reader.reset_polls();
        }
    }

    /// Sorts a batch: messages this run moved that came back are counted and left alone (a run
    /// moves each message once); of the others, those that match get a destination. A dry run
    /// records them instead.
    async fn plan(&mut self, batch: Vec<DlqMessage>) -> Result<Vec<Planned>> {
        self.report.read += batch.len() as u64;
        let stamp = OffsetDateTime::now_utc();
        let mut planned = Vec::new();
        for m in batch {
            let attribution = m.attribution();
            let reason = attribution
                .as_ref()
                .map_or_else(|| "none".into(), |a| a.reason.clone());
            if m.redrive()
                .is_some_and(|r| r.is_from_run(&self.report.redrive_id))
            {
                self.read_back += 1;
                let reason = if attribution.is_none() {
                    // No current attribution: SQS moved it (its receives ran out) under the id
                    // this run's copy had; the workers wrote nothing about that.
                    self.moved_by_sqs.insert(m.message_id.clone());
                    "moved_by_sqs".to_owned()
                } else {
                    reason
                };
                *self.read_back_reasons.entry(reason).or_default() += 1;
                continue;
            }
            // Sent to the DLQ after the run started (by this machine's clock): not in the DLQ
            // when the run began, so not this run's, whatever record it lost on the way.
            if m.sent_at().is_some_and(|sent| sent > self.started) {
                self.report.arrived_during_run += 1;
                continue;
            }
            if self.max_reached() || !self.opts.filter.matches(&m, stamp) {
                continue;
            }
            self.report.matched += 1;
            *self.report.reasons.entry(reason.clone()).or_default() += 1;
            let destination = self.destination_of(&m).await?;
            if self.opts.dry_run {
                self.report.would_move.push(WouldMove {
                    message_id: m.message_id.clone(),
                    destination: destination.clone(),
                    reason,
                    correlation_id: m.correlation_id(),
                });
                *self
                    .report
                    .destinations
                    .entry(destination.unwrap_or_else(|| "(none: pass --to)".into()))
                    .or_default() += 1;
                self.bar.inc(1);
                continue;
            }
            match destination {
                Some(destination) => planned.push(Planned {
                    message: m,
                    destination,
                }),
                None => self.report.no_destination += 1,
            }
        }
        Ok(planned)
    }

    /// `--to`, else the message's source queue, else the DLQ's only source.
    async fn destination_of(&mut self, m: &DlqMessage) -> Result<Option<String>> {
        if let Some(q) = self.to {
            return Ok(Some(q.name.clone()));
        }
        if let Some(source) = source_of(m) {
            return Ok(Some(source));
        }
        if self.sole_source.is_none() {
            let account = queues::account(self.ctx, None).await?;
            let sources = queues::sources_by_dlq(&account)
                .remove(&self.info.arn)
                .unwrap_or_default();
            self.sole_source = Some((sources.len() == 1).then(|| sources[0].clone()));
        }
        Ok(self.sole_source.clone().flatten())
    }

    /// Sends planned messages, by destination, then deletes from the DLQ what was sent.
    async fn send_planned(&mut self, planned: Vec<Planned>) -> Result<()> {
        let mut by_destination: BTreeMap<String, Vec<DlqMessage>> = BTreeMap::new();
        for p in planned {
            by_destination
                .entry(p.destination)
                .or_default()
                .push(p.message);
        }
        for (name, messages) in by_destination {
            for chunk in messages.chunks(self.burst as usize) {
                // What is not sent stays held and is released (visible again) at the end.
                if self.stop.is_cancelled() || self.report.halted {
                    return Ok(());
                }
                self.send_chunk(&name, chunk).await?;
            }
        }
        Ok(())
    }

    async fn send_chunk(&mut self, name: &str, messages: &[DlqMessage]) -> Result<()> {
        let queue = match self.destinations.get(name) {
            Some(q) => q.clone(),
            None => {
                let q = match self.to {
                    Some(q) => q.clone(),
                    None => queues::resolve_name(self.ctx, name).await?,
                };
                self.destinations.insert(name.to_owned(), q.clone());
                q
            }
        };
        if let Some(l) = &self.limiter {
            let n = NonZeroU32::new(messages.len() as u32).expect("non-empty batch");
            l.until_n_ready(n).await.expect("batch within the burst");
        }
        self.first_send.get_or_insert_with(Instant::now);
        let refs: Vec<&DlqMessage> = messages.iter().collect();
        let sent = send(
            self.ctx,
            &queue,
            &self.dlq.name,
            &self.report.redrive_id,
            &refs,
        )
        .await?;
        self.last_send = Instant::now();
        self.sent_ids.extend(sent.values().cloned());
        let (ok, failed): (Vec<&DlqMessage>, Vec<&DlqMessage>) =
            refs.iter().partition(|m| sent.contains_key(&m.message_id));
        self.report.failed += failed.len() as u64;
        let not_deleted = self.reader.delete(&ok).await?;
        self.report.not_deleted += not_deleted.len() as u64;
        self.report.moved += (ok.len() - not_deleted.len()) as u64;
        *self.report.destinations.entry(name.to_owned()).or_default() += ok.len() as u64;
        self.bar.inc(ok.len() as u64);
        if !failed.is_empty() {
            let failed: Vec<DlqMessage> = failed.into_iter().cloned().collect();
            self.reader.release(&failed).await;
        }
        Ok(())
    }
}

/// What became of what a run sent (see [`Mover::outcomes`]): of the ledger's `entries`, only the
/// copies it sent (`sent`); those SQS moved to the DLQ itself (`moved_by_sqs`) as come back,
/// whatever the ledger last said; and never fewer come back than were read back in the DLQ.
pub(super) fn outcomes_of_run(
    entries: &BTreeMap<String, Entry>,
    sent: &HashSet<String>,
    moved_by_sqs: &HashSet<String>,
    (read_back, read_back_reasons): (u64, &BTreeMap<String, u64>),
) -> RunOutcomes {
    let by_sqs = Entry::moved_by_sqs();
    let mut latest: BTreeMap<&str, &Entry> = entries
        .iter()
        .filter(|(id, _)| sent.contains(*id))
        .map(|(id, e)| (id.as_str(), e))
        .collect();
    for id in moved_by_sqs.iter().filter(|id| sent.contains(*id)) {
        latest.insert(id, &by_sqs);
    }
    let mut o = RunOutcomes::of(latest.into_values());
    if read_back > o.dead_lettered {
        // The ledger missed some (a failed write); one last written as retrying then counts
        // twice, against the run: the guard errs on the side of halting.
        o.dead_lettered = read_back;
        o.dead_lettered_reasons = read_back_reasons.clone();
    }
    o
}

/// What a guarded redrive does next, after its canary passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Guard {
    /// Send the next batch.
    Go,
    /// Wait for more outcomes first: more messages have none than have one.
    Wait,
    /// Stop: too many came back or are retrying.
    Halt,
}

/// Decides on `sent` messages with outcomes `o`: halt when more than `--halt-above` percent of
/// everything sent came back (whatever the rest does), or, once at least the canary's size have
/// an outcome, when more than that of those came back or are retrying; otherwise go on while no
/// more messages are without an outcome than have one (at least the canary's size may be), else
/// wait.
pub(super) fn guard(c: Canary, sent: u64, o: &RunOutcomes) -> Guard {
    let known = o.known();
    let bad = o.dead_lettered + o.retrying;
    if c.over(o.dead_lettered, sent) || (known >= c.size as u64 && c.over(bad, known)) {
        Guard::Halt
    } else if sent.saturating_sub(known) <= (c.size as u64).max(known) {
        Guard::Go
    } else {
        Guard::Wait
    }
}
