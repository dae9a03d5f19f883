//! What the fleet writes on messages: the attribute names that carry correlation and source
//! metadata between stages, and the attribution stamped on every message the fleet dead-letters.
//!
//! SQS allows at most 10 message attributes per message. The fleet uses at most five of its own
//! ([`CORRELATION_ID`], [`SOURCE`], [`REQUEST_ID`], [`RECEIVED_AT`], and on DLQ messages
//! [`ATTRIBUTION`] or, after a redrive, [`REDRIVE`]); [`fit_attributes`] keeps a message within
//! the limit.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::failure::FailureClass;

/// The correlation id, set at the edge and carried on every message after it.
pub const CORRELATION_ID: &str = "correlation-id";
/// Who sent the message into the fleet (storefront, carrier-webhook…), stamped by ingestion.
pub const SOURCE: &str = "fleet-source";
/// The upstream's request id, stamped by ingestion.
pub const REQUEST_ID: &str = "fleet-request-id";
/// When the fleet first received the message (RFC 3339), stamped by ingestion.
pub const RECEIVED_AT: &str = "fleet-received-at";
/// JSON [`Attribution`]: why the message is in a DLQ.
pub const ATTRIBUTION: &str = "fleet-attribution";
/// JSON [`RedriveRecord`]: when and by whom it was redriven last.
pub const REDRIVE: &str = "fleet-redrive";
/// The SQS limit of message attributes per message.
pub const MAX_MESSAGE_ATTRIBUTES: usize = 10;

/// Why a message is in a DLQ. Free text is redacted before it is stored here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    /// Reason code (`malformed_body`, `unknown_order`, …).
    pub reason: String,
    /// Permanent, or attempts exhausted.
    pub class: FailureClass,
    /// What happened, redacted.
    pub detail: String,
    /// The worker role that gave up.
    pub worker: String,
    /// The queue it was consumed from (name).
    pub source_queue: String,
    /// Receives of the message when the worker gave up.
    pub attempts: u32,
    /// First receive of the message (SQS's ApproximateFirstReceiveTimestamp), RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    pub first_failed_at: OffsetDateTime,
    /// When the worker gave up, RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    pub last_failed_at: OffsetDateTime,
    /// The correlation id, when the message had one.
    pub correlation_id: Option<String>,
    /// The SQS message id in the source queue.
    pub source_message_id: String,
    /// The sender that the edge stamped (`fleet-source`), when known.
    pub origin: Option<String>,
    /// When `dlq import` put this message (back) into a DLQ, RFC 3339: the attribution is as
    /// current as that, not only as `last_failed_at`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub imported_at: Option<OffsetDateTime>,
    /// The build of the worker that gave up ([`crate::build_info::VERSION`]: crate version and git
    /// revision), so that a DLQ spike after a release points at the release. Absent on
    /// attributions written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The SQS `SenderId` of the message the worker gave up on (at the edge: its upstream), so
    /// that a redrive can tell the edge who sent it first. Absent on attributions written
    /// before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
}

impl Attribution {
    /// How long after its attribution a message may have been sent to the DLQ holding it: the
    /// worker sends it within seconds, or minutes with retried sends and a skewed clock. (On
    /// AWS, DeadLetterQueueSourceArn tells a move by SQS apart without a window.)
    pub const SENT_WITHIN: std::time::Duration = std::time::Duration::from_secs(900);

    /// Whether this attribution explains a message sent to its queue at `sent_at`. A message
    /// sent long after its attribution was written left the DLQ since (a StartMessageMoveTask
    /// or an import into a work queue carry attributes unchanged) and came back another way
    /// (SQS's redrive policy, after a crash or a timeout): the attribution is stale.
    pub fn explains(&self, sent_at: OffsetDateTime) -> bool {
        let written = self
            .imported_at
            .map_or(self.last_failed_at, |i| i.max(self.last_failed_at));
        sent_at <= written + Self::SENT_WITHIN
    }
}

/// Recorded on a message each time the DLQ CLI redrives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedriveRecord {
    /// How many times it has been redriven.
    pub count: u32,
    /// When it was redriven last, RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The DLQ it came from.
    pub from_queue: String,
    /// The attribution it carried in that DLQ (the reason it was there).
    pub previous_reason: Option<String>,
    /// The redrive run that moved it (`dlq redrive` prints it). The workers keep this record on
    /// a message they dead-letter again, so the run knows the message for one it moved and
    /// does not move it a second time. Absent on records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Who sent the message to the fleet first (its SQS `SenderId` at the edge). A redrive
    /// comes from the operator, not from the upstream: the edge checks this sender instead, but
    /// only for a message the operator sent (`ingestion.redrivers`), never on an upstream's word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
    /// The id of the copy the redrive sent, on a later copy of it (a worker sends a message
    /// over its group's cap again to its queue): the ledger keys the outcome by that id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_of: Option<String>,
}

impl RedriveRecord {
    /// Whether this record names the redrive run `id`.
    pub fn is_from_run(&self, id: &str) -> bool {
        self.id.as_deref() == Some(id)
    }
}

/// Drops attributes beyond the SQS limit, keeping the fleet's own first, then the others in name
/// order; returns the names dropped so the caller can log them.
pub fn fit_attributes<V>(attributes: &mut std::collections::HashMap<String, V>) -> Vec<String> {
    if attributes.len() <= MAX_MESSAGE_ATTRIBUTES {
        return Vec::new();
    }
    const OURS: [&str; 10] = [
        CORRELATION_ID,
        ATTRIBUTION,
        REDRIVE,
        crate::runtime::ATTEMPTS,
        crate::trace::TRACEPARENT,
        SOURCE,
        REQUEST_ID,
        RECEIVED_AT,
        crate::trace::TRACESTATE,
        crate::runtime::DEFERRALS,
    ];
    let mut names: Vec<String> = attributes.keys().cloned().collect();
    names.sort_by_key(|n| {
        (
            OURS.iter().position(|o| o == n).unwrap_or(OURS.len()),
            n.clone(),
        )
    });
    let dropped = names.split_off(MAX_MESSAGE_ATTRIBUTES);
    for name in &dropped {
        attributes.remove(name);
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn attributes_beyond_ten_are_dropped_keeping_the_fleets_own() {
        let mut attrs: HashMap<String, u8> = (0..12).map(|i| (format!("x-{i:02}"), 0)).collect();
        attrs.insert(ATTRIBUTION.into(), 1);
        attrs.insert(CORRELATION_ID.into(), 1);
        let dropped = fit_attributes(&mut attrs);
        assert_eq!(attrs.len(), 10);
        assert_eq!(dropped.len(), 4);
        assert!(attrs.contains_key(ATTRIBUTION) && attrs.contains_key(CORRELATION_ID));
    }

    #[test]
    fn attribution_round_trips_as_json() {
        let a = Attribution {
            reason: "malformed_body".into(),
            class: FailureClass::Permanent,
            detail: "expected value".into(),
            worker: "ingestion".into(),
            source_queue: "fleet-ingest".into(),
            attempts: 1,
            first_failed_at: OffsetDateTime::UNIX_EPOCH,
            last_failed_at: OffsetDateTime::UNIX_EPOCH,
            correlation_id: Some("c-1".into()),
            source_message_id: "m-1".into(),
            origin: None,
            imported_at: None,
            version: Some(crate::build_info::VERSION.into()),
            sender_id: None,
        };
        let json = serde_json::to_string(&a).unwrap();
        assert!(json.contains(r#""class":"permanent""#));
        assert_eq!(serde_json::from_str::<Attribution>(&json).unwrap(), a);
    }
}
