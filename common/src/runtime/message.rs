//! What a handler sees and returns: the received [`Message`], the [`Outcome`] with the messages
//! to forward, and the [`Handler`] traits (raw and typed).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::attribution::CORRELATION_ID;
use crate::failure::{HandlerError, Reason};

/// A message as received from SQS, decoded for handlers.
#[derive(Debug, Clone)]
pub struct Message {
    /// SQS message id.
    pub message_id: String,
    /// Receipt handle of this receive (acknowledge, heartbeat, release).
    pub receipt_handle: String,
    /// The body, as sent.
    pub body: String,
    /// String-typed message attributes, for handlers.
    pub attributes: BTreeMap<String, String>,
    /// All message attributes as SQS returned them, carried unchanged into the DLQ.
    pub raw_attributes: HashMap<String, MessageAttributeValue>,
    /// The correlation id attribute, when the message carries one.
    pub correlation_id: Option<String>,
    /// How many times SQS has handed this message out (1 on the first attempt).
    pub receive_count: u32,
    /// Attempts used before the message was deferred for its group's cap (a deferred message is
    /// a new message to SQS, with a receive count of its own): see [`Message::attempt`].
    pub prior_attempts: u32,
    /// How often the message was deferred for its group's cap.
    pub deferrals: u32,
    /// When SQS first handed it out.
    pub first_received_at: Option<OffsetDateTime>,
    /// When it was sent to the queue.
    pub sent_at: Option<OffsetDateTime>,
    /// FIFO message group.
    pub group_id: Option<String>,
    /// FIFO deduplication id.
    pub deduplication_id: Option<String>,
    /// When this process received it (SQS limits visibility to 12 hours from the receive).
    pub received: std::time::Instant,
    /// Who sent it, as SQS saw it (the `SenderId` system attribute): an IAM principal's
    /// unique id, which the sender cannot choose.
    pub sender_id: Option<String>,
    /// The `AWSTraceHeader` system attribute (X-Ray's trace context), when SQS carries one.
    pub aws_trace_header: Option<String>,
}

/// An id the fleet takes from outside (correlation id): 1–128 characters of letters, digits and
/// `._:-`, starting with a letter or digit, and no card number.
pub fn is_valid_id(s: &str) -> bool {
    s.len() <= 128
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c))
        // An id goes into every log line about the message: never a card number.
        && !crate::edge::holds_card_number(s)
}

impl Message {
    /// Decodes an SQS message; `None` when it lacks a receipt handle (never sent by SQS).
    pub fn from_sqs(m: aws_sdk_sqs::types::Message) -> Option<Self> {
        let mut system = m.attributes.unwrap_or_default();
        let mut sys = |name: MessageSystemAttributeName| system.remove(&name);
        let millis = |v: Option<String>| {
            v.and_then(|v| v.parse::<i128>().ok())
                .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).ok())
        };
        let raw_attributes = m.message_attributes.unwrap_or_default();
        let attributes: BTreeMap<String, String> = raw_attributes
            .iter()
            .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_owned())))
            .collect();
        Some(Self {
            message_id: m.message_id.unwrap_or_default(),
            receipt_handle: m.receipt_handle?,
            body: m.body.unwrap_or_default(),
            // Only a well-formed id: it goes into every log line and attribution about the
            // message, and an upstream can put anything in an attribute.
            correlation_id: attributes
                .get(CORRELATION_ID)
                .filter(|c| is_valid_id(c))
                .cloned(),
            attributes,
            receive_count: sys(MessageSystemAttributeName::ApproximateReceiveCount)
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            prior_attempts: super::fairness::counter(&raw_attributes, super::fairness::ATTEMPTS),
            deferrals: super::fairness::counter(&raw_attributes, super::fairness::DEFERRALS),
            first_received_at: millis(sys(
                MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
            )),
            sent_at: millis(sys(MessageSystemAttributeName::SentTimestamp)),
            group_id: sys(MessageSystemAttributeName::MessageGroupId),
            deduplication_id: sys(MessageSystemAttributeName::MessageDeduplicationId),
            received: std::time::Instant::now(),
            sender_id: sys(MessageSystemAttributeName::SenderId),
            aws_trace_header: sys(MessageSystemAttributeName::AwsTraceHeader),
            raw_attributes,
        })
    }

    /// A message built in memory, for handler tests without a queue.
    pub fn for_test(body: impl Into<String>) -> Self {
        Self {
            message_id: uuid::Uuid::new_v4().to_string(),
            receipt_handle: "test-receipt".to_owned(),
            body: body.into(),
            attributes: BTreeMap::new(),
            raw_attributes: HashMap::new(),
            correlation_id: None,
            receive_count: 1,
            prior_attempts: 0,
            deferrals: 0,
            first_received_at: Some(OffsetDateTime::now_utc()),
            sent_at: Some(OffsetDateTime::now_utc()),
            group_id: None,
            deduplication_id: None,
            received: std::time::Instant::now(),
            sender_id: Some("000000000000".to_owned()),
            aws_trace_header: None,
        }
    }

    /// When the fleet first received the order or event this message carries (the edge's
    /// `fleet-received-at`), when it says so. Not at the edge, where `fleet-*` attributes are an
    /// upstream's and hidden.
    pub fn fleet_received_at(&self) -> Option<OffsetDateTime> {
        let at = self.attributes.get(crate::attribution::RECEIVED_AT)?;
        OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
    }

    /// How late the message already is at `now`: since the fleet first received what it
    /// carries (`fleet-received-at`), else since it was sent to this queue; zero when unknown.
    pub fn lag(&self, now: OffsetDateTime) -> Duration {
        let since = self.fleet_received_at().or(self.sent_at).unwrap_or(now);
        (now - since).try_into().unwrap_or(Duration::ZERO)
    }

    /// The `dlq redrive` run that last moved this message back, when it carries a record of
    /// one (logged with every line about the message).
    pub fn redrive_id(&self) -> Option<String> {
        self.redrive_record()?.id.filter(|id| is_valid_id(id))
    }

    /// The `fleet-redrive` record it carries, as received (the edge hides `fleet-*` attributes
    /// from handlers, not from the runtime).
    pub fn redrive_record(&self) -> Option<crate::attribution::RedriveRecord> {
        let record = self
            .raw_attributes
            .get(crate::attribution::REDRIVE)?
            .string_value()?;
        serde_json::from_str(record).ok()
    }

    /// Who sent the message to the fleet first, as far as the fleet can vouch for it: its SQS
    /// `SenderId`, unless that is one of `redrivers` (the operator redriving or importing it),
    /// whose redrive record then names the first sender (`None` if it does not). An upstream's
    /// own record is never believed.
    pub fn first_sender(&self, redrivers: &[String]) -> Option<String> {
        let actual = self.sender_id.as_deref()?;
        if !crate::config::matches_sender(redrivers, actual) {
            return Some(actual.to_owned());
        }
        self.redrive_record()?.sender_id
    }

    /// This attempt's number: the receives of this copy plus the attempts used before a
    /// deferral for its group's cap (1 on the first attempt).
    pub fn attempt(&self) -> u32 {
        self.receive_count.saturating_add(self.prior_attempts)
    }

    /// How long the message waited in the queue before this receive.
    pub fn age(&self) -> Option<Duration> {
        let sent = self.sent_at?;
        (OffsetDateTime::now_utc() - sent).try_into().ok()
    }
}

/// A message a handler wants sent on to another queue once its own effect is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Logical queue name (a key of `[queues]` in the config).
    pub queue: String,
    /// The body.
    pub body: String,
    /// Extra string attributes. The runtime adds the correlation id and the source metadata of
    /// the incoming message when these do not set them.
    pub attributes: BTreeMap<String, String>,
    /// FIFO group (required by FIFO targets).
    pub group_id: Option<String>,
    /// FIFO deduplication id (defaults to a hash of the body on content-deduplicated queues).
    pub deduplication_id: Option<String>,
}

impl Outgoing {
    /// A message for `queue` with `body`.
    pub fn new(queue: impl Into<String>, body: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            body: body.into(),
            attributes: BTreeMap::new(),
            group_id: None,
            deduplication_id: None,
        }
    }

    /// Sets a string attribute.
    #[must_use]
    pub fn with_attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }

    /// Sets the FIFO group and deduplication id.
    #[must_use]
    pub fn with_fifo(
        mut self,
        group_id: impl Into<String>,
        deduplication_id: impl Into<String>,
    ) -> Self {
        self.group_id = Some(group_id.into());
        self.deduplication_id = Some(deduplication_id.into());
        self
    }
}

/// What a successful handler asks the runtime to do after acknowledging.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Messages to send on; the incoming message is acknowledged only after they are sent.
    pub forward: Vec<Outgoing>,
}

impl Outcome {
    /// Done, nothing to send on.
    pub fn done() -> Self {
        Self::default()
    }

    /// Done, send `message` on.
    pub fn forward(message: Outgoing) -> Self {
        Self {
            forward: vec![message],
        }
    }
}

/// Processes one message. Implementations must be idempotent: SQS delivers at least once.
pub trait Handler: Send + Sync + 'static {
    /// Handles `message`; the error's variant decides retry or DLQ.
    fn handle(
        &self,
        message: &Message,
    ) -> impl Future<Output = Result<Outcome, HandlerError>> + Send;
}

/// A shared handler is a handler (tests keep a clone to look at what it did).
impl<H: Handler> Handler for std::sync::Arc<H> {
    fn handle(
        &self,
        message: &Message,
    ) -> impl Future<Output = Result<Outcome, HandlerError>> + Send {
        (**self).handle(message)
    }
}

/// A handler of a typed (serde) body. Wrap it in [`Json`] to run it on a queue.
pub trait TypedHandler: Send + Sync + 'static {
    /// The body's type.
    type Input: DeserializeOwned + Send;

    /// Handles a decoded body; `message` gives the metadata.
    fn handle(
        &self,
        input: Self::Input,
        message: &Message,
    ) -> impl Future<Output = Result<Outcome, HandlerError>> + Send;
}

/// Runs a [`TypedHandler`] on JSON bodies; a body that does not decode is a permanent failure.
#[derive(Debug, Clone)]
pub struct Json<H>(pub H);

impl<H: TypedHandler> Handler for Json<H> {
    async fn handle(&self, message: &Message) -> Result<Outcome, HandlerError> {
        let input: H::Input = serde_json::from_str(&message.body).map_err(|e| {
            HandlerError::permanent(Reason::MALFORMED_BODY, describe_json_error(&e))
        })?;
        self.0.handle(input, message).await
    }
}

/// A serde_json error without the data that caused it (which may be personal): the quoted
/// values are dropped, the category, field names and position stay.
pub fn describe_json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let mut out = String::with_capacity(text.len());
    let mut in_quote = false;
    for c in text.chars() {
        match (c, in_quote) {
            ('"', false) => {
                in_quote = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                in_quote = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Ping {
        n: u32,
    }
    struct Echo;
    impl TypedHandler for Echo {
        type Input = Ping;
        async fn handle(&self, input: Ping, _m: &Message) -> Result<Outcome, HandlerError> {
            Ok(Outcome::forward(Outgoing::new("next", input.n.to_string())))
        }
    }

    #[test]
    fn the_first_sender_is_the_sender_unless_a_redriver_sent_it_with_a_record() {
        let redrivers = ["AROAOPERATOR".to_owned()];
        let with_record = |sender: &str, claimed: Option<&str>| {
            let mut m = Message::for_test("{}");
            m.sender_id = Some(sender.into());
            if let Some(claimed) = claimed {
                let record = crate::attribution::RedriveRecord {
                    count: 1,
                    at: OffsetDateTime::UNIX_EPOCH,
                    from_queue: "q-dlq".into(),
                    previous_reason: None,
                    id: None,
                    sender_id: Some(claimed.into()),
                    copy_of: None,
                };
                m.raw_attributes.insert(
                    crate::attribution::REDRIVE.into(),
                    MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(serde_json::to_string(&record).unwrap())
                        .build()
                        .unwrap(),
                );
            }
            m
        };
        let upstream = with_record("AROACARRIER:hook", Some("AROASTOREFRONT"));
        assert_eq!(
            upstream.first_sender(&redrivers).as_deref(),
            Some("AROACARRIER:hook"),
            "an upstream's own record is not believed"
        );
        let redriven = with_record("AROAOPERATOR:ops", Some("AROASTOREFRONT"));
        assert_eq!(
            redriven.first_sender(&redrivers).as_deref(),
            Some("AROASTOREFRONT")
        );
        assert_eq!(
            with_record("AROAOPERATOR:ops", None).first_sender(&redrivers),
            None
        );
    }

    #[tokio::test]
    async fn typed_handlers_run_without_a_queue() {
        let out = Json(Echo)
            .handle(&Message::for_test(r#"{"n": 4}"#))
            .await
            .unwrap();
        assert_eq!(out.forward[0].body, "4");
    }

    #[tokio::test]
    async fn an_undecodable_body_is_permanent_and_its_values_are_not_repeated() {
        let err = Json(Echo)
            .handle(&Message::for_test(r#"{"n": "jane@example.com"}"#))
            .await
            .unwrap_err();
        assert!(
            matches!(err, HandlerError::Permanent { reason, .. } if reason == Reason::MALFORMED_BODY)
        );
        assert!(!err.detail().contains("jane"), "{}", err.detail());
        assert!(err.detail().contains("invalid type"), "{}", err.detail());
    }
}
