//! What a redrive did, and the report for people.

#[allow(unused_imports)]
use super::*;

/// What became of the canary, as the workers wrote it in the redrive ledger.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CanaryOutcome {
    /// `--canary`.
    pub size: usize,
    /// Messages moved as the canary.
    pub moved: u64,
    /// Of which succeeded downstream.
    pub succeeded: u64,
    /// Failed at least once and wait for another attempt (they count against the canary).
    pub retrying: u64,
    /// Dead-lettered again.
    pub came_back: u64,
    /// No outcome yet (not picked up, or in the handler).
    pub no_outcome: u64,
    /// Retrying and dead-lettered again, as a percentage of those with an outcome.
    pub came_back_pct: f64,
    /// `--halt-above`.
    pub halt_above_pct: f64,
    /// How long it was watched (less than `--watch` when every message had settled).
    pub watched_ms: u64,
    /// Whether the redrive went on after it.
    pub passed: bool,
}

/// What a redrive did.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The DLQ.
    pub queue: String,
    /// This run's id: in the `fleet-redrive` record of every message it moved, and in the
    /// workers' log lines about them (`dlq attribute --by redrive` groups by it).
    pub redrive_id: String,
    /// `message-move-task`, `receive-send-delete`, or `dry-run`.
    pub path: &'static str,
    /// Why that path.
    pub path_reason: String,
    /// Messages read from the DLQ.
    pub read: u64,
    /// Of which matched the filters.
    pub matched: u64,
    /// Moved: sent to the destination and deleted from the DLQ.
    pub moved: u64,
    /// Sent but not deleted from the DLQ (they will be sent again by a re-run).
    pub not_deleted: u64,
    /// Not sent (still in the DLQ).
    pub failed: u64,
    /// Matched, but no destination could be found (pass --to).
    pub no_destination: u64,
    /// In flight elsewhere at the end (an interrupted run or a consumer holds them).
    pub in_flight_elsewhere: u64,
    /// The run stopped reading at the most messages SQS lets it hold (those it left alone
    /// included): what it did not read is left for another run.
    pub held_limit_reached: bool,
    /// Messages this run moved that were dead-lettered again while it ran (as the ledger says,
    /// and as read in the DLQ): left in the DLQ, never moved twice by one run.
    pub came_back: u64,
    /// Their reasons now (`moved_by_sqs`: their receives ran out, a crash or a timeout).
    pub came_back_reasons: BTreeMap<String, u64>,
    /// Succeeded downstream (from the redrive ledger; absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub succeeded: Option<u64>,
    /// Failed at least once and wait for another attempt (from the ledger).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrying: Option<u64>,
    /// Moved, with no outcome yet: waiting in the queue or in a handler (from the ledger).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
    /// Why it halted, with `halted`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halt_reason: Option<String>,
    /// Messages sent to the DLQ after the run started, without this run's record (a redrive
    /// record lost, a worker of an older build): left alone too, for a later run.
    pub arrived_during_run: u64,
    /// Moved and not back by the end of the run: applied, or still being retried downstream.
    pub not_back: u64,
    /// What became of the canary, with `--canary`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryOutcome>,
    /// Stopped on its own: more came back than `--halt-above` allows, or the outcomes stopped
    /// coming (see `halt_reason`). What was not moved is still in the DLQ.
    pub halted: bool,
    /// Messages per destination queue.
    pub destinations: BTreeMap<String, u64>,
    /// Reasons of the matched messages.
    pub reasons: BTreeMap<String, u64>,
    /// For `--dry-run`: the messages that would move.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub would_move: Vec<WouldMove>,
    /// Wall time of the moving.
    pub elapsed_ms: u64,
    /// Moved messages per second, first send to last.
    pub rate_per_sec: f64,
    /// The move task's handle, on that path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_handle: Option<String>,
    /// Stopped by Ctrl-C.
    pub interrupted: bool,
}

/// One message a dry run would move.
#[derive(Debug, Serialize)]
pub struct WouldMove {
    /// Its id in the DLQ.
    pub message_id: String,
    /// Where it would go.
    pub destination: Option<String>,
    /// Its attribution reason.
    pub reason: String,
    /// Its correlation id.
    pub correlation_id: Option<String>,
}

impl Report {
    /// The exit code this outcome deserves.
    pub fn exit(&self) -> Exit {
        if self.interrupted {
            Exit::Interrupted
        } else if self.halted
            || self.held_limit_reached
            || self.failed + self.not_deleted + self.no_destination + self.in_flight_elsewhere > 0
        {
            Exit::Partial
        } else {
            Exit::Ok
        }
    }
}

/// The outcome table's rows: with the ledger, what succeeded downstream, is retrying, came
/// back, or has no outcome yet; without it, what came back and what did not.
fn outcome_rows(report: &Report) -> Vec<(&'static str, u64)> {
    let mut rows = vec![("moved", report.moved)];
    match (report.succeeded, report.retrying, report.in_flight) {
        (Some(succeeded), Some(retrying), Some(in_flight)) => rows.extend([
            ("succeeded downstream", succeeded),
            ("retrying downstream", retrying),
            ("dead-lettered again (left in the DLQ)", report.came_back),
            ("still in flight (no outcome yet)", in_flight),
        ]),
        _ => rows.extend([
            ("dead-lettered again (left in the DLQ)", report.came_back),
            (
                "not back: applied, or still in flight (no ledger to tell)",
                report.not_back,
            ),
        ]),
    }
    rows.push((
        "matched, not moved (still in the DLQ)",
        report.matched.saturating_sub(report.moved),
    ));
    rows
}

/// Prints a report for people.
pub fn print(report: &Report) {
    let path = match report.path {
        "message-move-task" => format!(
            "path: SQS message move task {} ({})",
            report.task_handle.as_deref().unwrap_or(""),
            report.path_reason
        ),
        "dry-run" => "dry run: nothing moved".to_owned(),
        _ => format!("path: receive, send, then delete ({})", report.path_reason),
    };
    crate::outln!("{path}");
    let rows = report
        .destinations
        .iter()
        .map(|(d, n)| vec![d.clone(), n.to_string()]);
    crate::outln!(
        "{}",
        output::table(
            &[
                if report.path == "dry-run" {
                    "would go to"
                } else {
                    "sent to"
                },
                "messages"
            ],
            rows
        )
    );
    if !report.reasons.is_empty() {
        let rows = report
            .reasons
            .iter()
            .map(|(r, n)| vec![r.clone(), n.to_string()]);
        crate::outln!("{}", output::table(&["reason", "messages"], rows));
    }
    if report.path == "dry-run" {
        crate::outln!(
            "{} of {} messages read would move; every message read is visible again.",
            report.matched,
            report.read
        );
        return;
    }
    crate::outln!(
        "redrive {}: moved {} of {} matching ({} read) in {:.1}s, {:.1} msg/s",
        report.redrive_id,
        report.moved,
        report.matched,
        report.read,
        report.elapsed_ms as f64 / 1000.0,
        report.rate_per_sec
    );
    if let Some(c) = &report.canary {
        crate::outln!("{}", canary_line(report, c));
    }
    crate::outln!(
        "{}",
        output::table(
            &["outcome", "messages"],
            outcome_rows(report)
                .into_iter()
                .map(|(what, n)| vec![what.to_owned(), n.to_string()])
        )
    );
    if !report.came_back_reasons.is_empty() {
        let rows = report
            .came_back_reasons
            .iter()
            .map(|(r, n)| vec![r.clone(), n.to_string()]);
        crate::outln!(
            "{}",
            output::table(&["came back with reason", "messages"], rows)
        );
    }
    for note in notes(report) {
        crate::outln!("{note}");
    }
}

/// What became of the canary, in a line.
fn canary_line(report: &Report, c: &CanaryOutcome) -> String {
    format!(
        "canary: {} moved: {} succeeded, {} retrying, {} came back, {} without an outcome ({:.0}% bad, halt above {:.0}%) within {:.0}s: {}",
        c.moved,
        c.succeeded,
        c.retrying,
        c.came_back,
        c.no_outcome,
        c.came_back_pct,
        c.halt_above_pct,
        c.watched_ms as f64 / 1000.0,
        if c.passed {
            "passed"
        } else if report.halted {
            "halted"
        } else {
            "interrupted"
        }
    )
}

/// What the operator should know or do after the run, one line each.
fn notes(report: &Report) -> Vec<String> {
    let mut notes = Vec::new();
    if report.arrived_during_run > 0 {
        notes.push(format!(
            "{} arrived in the DLQ after the run started: left for a later run",
            report.arrived_during_run
        ));
    }
    if report.held_limit_reached {
        notes.push(format!(
            "stopped reading at {MAX_HELD} held messages (SQS's limit is near): run again for the rest"
        ));
    }
    if report.halted {
        notes.push(format!(
            "halted: {}; the rest is still in the DLQ. Fix the cause (`dlq attribute {} --by redrive,reason`), then run again.",
            report.halt_reason.as_deref().unwrap_or("too many came back"),
            report.queue
        ));
    }
    if report.failed > 0 {
        notes.push(format!(
            "{} could not be sent and are still in the DLQ: run again",
            report.failed
        ));
    }
    if report.not_deleted > 0 {
        notes.push(format!("{} were sent but not deleted from the DLQ: a re-run sends them again (the fleet ignores the duplicate)", report.not_deleted));
    }
    if report.no_destination > 0 {
        notes.push(format!(
            "{} have no known source queue: pass --to",
            report.no_destination
        ));
    }
    if report.in_flight_elsewhere > 0 {
        notes.push(format!("{} are in flight elsewhere (an interrupted run holds them until their visibility ends): run again later", report.in_flight_elsewhere));
    }
    if report.interrupted {
        notes.push(
            "interrupted: what was read and not moved is visible again; run again to finish"
                .to_owned(),
        );
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_halted_run_says_why_and_what_to_do_and_a_clean_one_says_nothing_more() {
        assert!(notes(&Report::default()).is_empty());
        let halted = Report {
            queue: "fleet-ingest-dlq".into(),
            halted: true,
            halt_reason: Some("of the canary's 5: 5 came back".into()),
            failed: 2,
            ..Report::default()
        };
        let notes = notes(&halted);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("halted: of the canary's 5: 5 came back;"));
        assert!(notes[0].contains("dlq attribute fleet-ingest-dlq --by redrive,reason"));
        assert!(notes[1].contains("2 could not be sent"));
    }
}
