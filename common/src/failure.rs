//! The failure taxonomy: what a handler's error tells the runtime to do next.
//!
//! - [`HandlerError::Transient`]: retry later. The runtime hides the message for a backoff delay
//!   (exponential with jitter, via `backon`) by changing its visibility; after the worker's
//!   `max_attempts` it is dead-lettered as [`FailureClass::AttemptsExhausted`].
//! - [`HandlerError::Permanent`]: retrying cannot help (bad input, a conflict). Dead-lettered at
//!   once, on the first attempt.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A stable, machine-readable reason code (`snake_case`), used for grouping and filtering in the
/// DLQ CLI. The human text goes in the error's `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason(pub &'static str);

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Reason {
    /// The body is not valid JSON or not of the expected shape.
    pub const MALFORMED_BODY: Reason = Reason("malformed_body");
    /// The same idempotency key arrived with a different payload.
    pub const IDEMPOTENCY_CONFLICT: Reason = Reason("idempotency_conflict");
    /// A downstream service throttled or was unavailable.
    pub const DOWNSTREAM_UNAVAILABLE: Reason = Reason("downstream_unavailable");
    /// The handler panicked; treated as transient, since the cause is unknown.
    pub const HANDLER_PANIC: Reason = Reason("handler_panic");
    /// Forwarding to the next queue failed.
    pub const FORWARD_FAILED: Reason = Reason("forward_failed");
    /// DynamoDB throttled the request (also inside a transaction). The runtime slows down and
    /// retries in place: throttling alone does not use up a message's attempts.
    pub const THROTTLED: Reason = Reason("throttled");
    /// A downstream call did not answer within its deadline.
    pub const DOWNSTREAM_TIMEOUT: Reason = Reason("downstream_timeout");
    /// The handler ran past `handler_deadline_secs`.
    pub const HANDLER_DEADLINE_EXCEEDED: Reason = Reason("handler_deadline_exceeded");
    /// DynamoDB refused the request as invalid (permanent: retrying sends the same request).
    pub const INVALID_REQUEST: Reason = Reason("invalid_request");
    /// An item would exceed DynamoDB's 400 KB item limit.
    pub const ITEM_TOO_LARGE: Reason = Reason("item_too_large");
    /// The worker's role may not do what the handler asked (a deployment fault: fix the grant,
    /// then redrive).
    pub const ACCESS_DENIED: Reason = Reason("access_denied");
    /// A table the handler writes does not exist (a deployment fault).
    pub const TABLE_NOT_FOUND: Reason = Reason("table_not_found");
    /// A stored record does not read as its type (transient: a newer writer may be mid-deploy).
    pub const CORRUPT_RECORD: Reason = Reason("corrupt_record");

    // Refused at the edge (ingestion): an upstream's message the fleet will not take in.
    /// The body is larger than the edge accepts.
    pub const BODY_TOO_LARGE: Reason = Reason("body_too_large");
    /// The body is not JSON.
    pub const MALFORMED_JSON: Reason = Reason("malformed_json");
    /// A JSON object names the same key twice.
    pub const DUPLICATE_KEY: Reason = Reason("duplicate_key");
    /// The body looks like card data (a PAN); it is stored only redacted.
    pub const PAYMENT_DATA: Reason = Reason("payment_data");
    /// The JSON does not match its event type's schema.
    pub const SCHEMA_VIOLATION: Reason = Reason("schema_violation");
    /// The sender is not on the edge's allow-list for the event type.
    pub const SENDER_NOT_ALLOWED: Reason = Reason("sender_not_allowed");
    /// The event type is not one the stage handles.
    pub const UNKNOWN_TYPE: Reason = Reason("unknown_type");
    /// The body's `schema_version` is not the one this fleet speaks.
    pub const UNSUPPORTED_SCHEMA_VERSION: Reason = Reason("unsupported_schema_version");

    // Refused by a stage: the order is not in a state the event applies to.
    /// No such order: permanent for the warehouse; retried first by delivery, since a carrier
    /// event may arrive before the order.
    pub const UNKNOWN_ORDER: Reason = Reason("unknown_order");
    /// The warehouse was asked to pack an order that was rejected.
    pub const ORDER_NOT_PACKABLE: Reason = Reason("order_not_packable");
    /// An order has more lines than one packing transaction can hold.
    pub const ORDER_TOO_LARGE: Reason = Reason("order_too_large");
    /// Stock kept changing under every packing attempt (retried with the queue's backoff).
    pub const PACKING_UNSETTLED: Reason = Reason("packing_unsettled");
    /// A carrier event for an order the warehouse has not packed yet (retried).
    pub const ORDER_NOT_PACKED: Reason = Reason("order_not_packed");
    /// A carrier event for an order that will never ship (rejected or unpackable).
    pub const ORDER_NOT_SHIPPED: Reason = Reason("order_not_shipped");
    /// An order already holds as many carrier events as its item may.
    pub const TOO_MANY_EVENTS: Reason = Reason("too_many_events");
    /// Other writers kept changing the order under every attempt (retried).
    pub const CONTENDED_ORDER: Reason = Reason("contended_order");

    /// Every reason code the fleet writes in an attribution.
    pub const ALL: [Reason; 29] = [
        Self::MALFORMED_BODY,
        Self::IDEMPOTENCY_CONFLICT,
        Self::DOWNSTREAM_UNAVAILABLE,
        Self::HANDLER_PANIC,
        Self::FORWARD_FAILED,
        Self::THROTTLED,
        Self::DOWNSTREAM_TIMEOUT,
        Self::HANDLER_DEADLINE_EXCEEDED,
        Self::INVALID_REQUEST,
        Self::ITEM_TOO_LARGE,
        Self::ACCESS_DENIED,
        Self::TABLE_NOT_FOUND,
        Self::CORRUPT_RECORD,
        Self::BODY_TOO_LARGE,
        Self::MALFORMED_JSON,
        Self::DUPLICATE_KEY,
        Self::PAYMENT_DATA,
        Self::SCHEMA_VIOLATION,
        Self::SENDER_NOT_ALLOWED,
        Self::UNKNOWN_TYPE,
        Self::UNSUPPORTED_SCHEMA_VERSION,
        Self::UNKNOWN_ORDER,
        Self::ORDER_NOT_PACKABLE,
        Self::ORDER_TOO_LARGE,
        Self::PACKING_UNSETTLED,
        Self::ORDER_NOT_PACKED,
        Self::ORDER_NOT_SHIPPED,
        Self::TOO_MANY_EVENTS,
        Self::CONTENDED_ORDER,
    ];

    /// The code as written in attributions and metrics.
    pub const fn as_str(self) -> &'static str {
        self.0
    }
}

/// What went wrong in a handler, and so what the runtime does with the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// Worth retrying: throttling, a timeout, an unavailable dependency.
    #[error("transient failure ({reason}): {detail}")]
    Transient {
        /// Reason code.
        reason: Reason,
        /// What happened, without personal data (it is redacted again before it leaves).
        detail: String,
        /// A delay the handler knows better than the backoff (e.g. a Retry-After).
        retry_after: Option<Duration>,
    },
    /// Never worth retrying: the message goes to the DLQ now.
    #[error("permanent failure ({reason}): {detail}")]
    Permanent {
        /// Reason code.
        reason: Reason,
        /// What happened, without personal data (it is redacted again before it leaves).
        detail: String,
    },
}

impl HandlerError {
    /// A transient failure with the backoff's delay.
    pub fn transient(reason: Reason, detail: impl Into<String>) -> Self {
        Self::Transient {
            reason,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Throttled by a downstream service: transient, and handled apart (see
    /// [`Reason::THROTTLED`]).
    pub fn throttled(detail: impl Into<String>) -> Self {
        Self::transient(Reason::THROTTLED, detail)
    }

    /// Whether this is a throttling failure.
    pub fn is_throttled(&self) -> bool {
        matches!(self, Self::Transient { reason, .. } if *reason == Reason::THROTTLED)
    }

    /// A permanent failure.
    pub fn permanent(reason: Reason, detail: impl Into<String>) -> Self {
        Self::Permanent {
            reason,
            detail: detail.into(),
        }
    }

    /// The reason code.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Transient { reason, .. } | Self::Permanent { reason, .. } => *reason,
        }
    }

    /// The detail text.
    pub fn detail(&self) -> &str {
        match self {
            Self::Transient { detail, .. } | Self::Permanent { detail, .. } => detail,
        }
    }
}

/// Why a message is in a DLQ, as the attribution records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The handler said retrying cannot help.
    Permanent,
    /// Transient failures until the worker's attempts ran out.
    AttemptsExhausted,
    /// SQS moved it by its redrive policy: the worker crashed or timed out on it (no attribution).
    QueueRedrive,
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Permanent => "permanent",
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::QueueRedrive => "queue_redrive",
        })
    }
}

/// The delay before retry number `attempt` (1 = the first retry): exponential from `min`,
/// doubled each time, with jitter, bounded by `max`.
pub fn retry_delay(attempt: u32, min: Duration, max: Duration) -> Duration {
    use backon::BackoffBuilder;
    let nth = attempt.max(1) as usize;
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(nth)
        .build()
        .nth(nth - 1)
        .unwrap_or(max)
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_code_is_listed_once_in_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for reason in Reason::ALL {
            let code = reason.as_str();
            assert!(seen.insert(code), "{code} listed twice");
            assert!(
                !code.is_empty()
                    && code
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{code} is not snake_case"
            );
        }
        // Every code declared above is in the list.
        let declared = include_str!("failure.rs")
            .lines()
            .filter(|l| l.trim_start().starts_with("pub const") && l.contains(": Reason = "))
            .count();
        assert_eq!(declared, Reason::ALL.len());
    }

    #[test]
    fn delays_grow_and_stay_bounded() {
        let min = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        // Jitter adds up to one delay on top, so compare ranges, not values.
        for attempt in 1..=5u32 {
            let base = min * 2u32.pow(attempt - 1);
            let d = retry_delay(attempt, min, max);
            assert!(
                d >= base.min(max) && d <= (base * 2).min(max),
                "attempt {attempt}: {d:?}"
            );
        }
        assert_eq!(retry_delay(30, min, max), max);
    }

    #[test]
    fn the_taxonomy_exposes_reason_and_detail() {
        let e = HandlerError::permanent(Reason::MALFORMED_BODY, "missing field `order_id`");
        assert_eq!(e.reason(), Reason::MALFORMED_BODY);
        assert_eq!(e.detail(), "missing field `order_id`");
        assert!(e.to_string().contains("permanent"));
    }
}
