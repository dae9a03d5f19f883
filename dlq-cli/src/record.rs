//! A dead-lettered message as the CLI sees it: body, message attributes and system attributes,
//! with the fleet's metadata (correlation id, attribution, redrive record) read out of them.
//! The same type is the line format of `export` and `import` (JSON Lines), so a round trip keeps
//! every byte of the body and of every attribute.

use std::collections::BTreeMap;

use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    MessageAttributeValue, MessageSystemAttributeName, MessageSystemAttributeNameForSends,
    MessageSystemAttributeValue,
};
use fleet_common::attribution::{self, Attribution, RedriveRecord};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One message attribute, as SQS types it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttributeValue {
    /// `String`, `Number`, `Binary`, or one of those with a custom suffix (`String.json`).
    pub data_type: String,
    /// The value of a String or Number attribute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string_value: Option<String>,
    /// The value of a Binary attribute, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_value: Option<String>,
}

impl AttributeValue {
    /// A String attribute.
    pub fn string(value: impl Into<String>) -> Self {
        Self {
            data_type: "String".into(),
            string_value: Some(value.into()),
            binary_value: None,
        }
    }

    fn from_sdk(v: &MessageAttributeValue) -> Self {
        Self {
            data_type: v.data_type().to_owned(),
            string_value: v.string_value().map(str::to_owned),
            binary_value: v
                .binary_value()
                .map(|b| aws_smithy_types::base64::encode(b.as_ref())),
        }
    }

    /// The SDK form, for sending.
    ///
    /// # Errors
    /// A binary value that is not base64.
    pub fn to_sdk(&self) -> Result<MessageAttributeValue, String> {
        let mut builder = MessageAttributeValue::builder().data_type(&self.data_type);
        if let Some(s) = &self.string_value {
            builder = builder.string_value(s);
        }
        if let Some(b) = &self.binary_value {
            let bytes = aws_smithy_types::base64::decode(b)
                .map_err(|e| format!("binary value is not base64: {e}"))?;
            builder = builder.binary_value(Blob::new(bytes));
        }
        builder.build().map_err(|e| e.to_string())
    }
}

/// A message read from a queue (or from an export file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqMessage {
    /// The SQS message id in the queue it was read from.
    pub message_id: String,
    /// The body, exactly as SQS holds it.
    pub body: String,
    /// MD5 of the body, as SQS computed it (a check for the export file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5_of_body: Option<String>,
    /// Message attributes, by name.
    #[serde(default)]
    pub attributes: BTreeMap<String, AttributeValue>,
    /// System attributes (SentTimestamp, ApproximateReceiveCount, MessageGroupId, …), by name.
    #[serde(default)]
    pub system_attributes: BTreeMap<String, String>,
    /// The receipt of this receive; never exported.
    #[serde(skip)]
    pub receipt_handle: String,
}

impl DlqMessage {
    /// Reads an SDK message; `None` when SQS left out the id or the receipt.
    pub fn from_sdk(m: &aws_sdk_sqs::types::Message) -> Option<Self> {
        Some(Self {
            message_id: m.message_id()?.to_owned(),
            receipt_handle: m.receipt_handle()?.to_owned(),
            body: m.body().unwrap_or_default().to_owned(),
            md5_of_body: m.md5_of_body().map(str::to_owned),
            attributes: m
                .message_attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.clone(), AttributeValue::from_sdk(v)))
                        .collect()
                })
                .unwrap_or_default(),
            system_attributes: m
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn string_attribute(&self, name: &str) -> Option<&str> {
        self.attributes.get(name)?.string_value.as_deref()
    }

    /// The correlation id: the message attribute, else the attribution's.
    pub fn correlation_id(&self) -> Option<String> {
        self.string_attribute(attribution::CORRELATION_ID)
            .map(str::to_owned)
            .or_else(|| self.attribution().and_then(|a| a.correlation_id))
    }

    /// Why the fleet dead-lettered it; `None` when SQS moved it by itself (or the attribute is
    /// not the fleet's JSON). An attribution the message carried from an earlier stay in a DLQ
    /// (see [`Attribution::explains`]) does not explain this one: the message is shown as moved
    /// by SQS, and the old attribution stays readable with [`Self::stored_attribution`].
    pub fn attribution(&self) -> Option<Attribution> {
        let a = self.stored_attribution()?;
        // On AWS, SQS stamps DeadLetterQueueSourceArn only on a message its redrive policy
        // moved: whatever attribution it carries, the fleet did not send it here.
        if self.dead_letter_source_arn().is_some() {
            return None;
        }
        match self.sent_at() {
            Some(sent) if !a.explains(sent) => None,
            _ => Some(a),
        }
    }

    /// The attribution attribute as stored, current or stale.
    pub fn stored_attribution(&self) -> Option<Attribution> {
        serde_json::from_str(self.string_attribute(attribution::ATTRIBUTION)?).ok()
    }

    /// An attribution carried from an earlier stay in a DLQ, if the message holds one.
    pub fn stale_attribution(&self) -> Option<Attribution> {
        self.attribution()
            .is_none()
            .then(|| self.stored_attribution())
            .flatten()
    }

    /// The message as it goes into a queue by `dlq import`: into a DLQ its attribution is
    /// marked as imported now (still current there); into a work queue the attribution is
    /// replaced by a redrive record, as a redrive does, so that it cannot go stale. Either way
    /// no record goes on that the CLI did not compute: who sent the message first is what the
    /// fleet vouches for ([`Self::original_sender`]), never what a record in the file says.
    pub fn for_import(
        &self,
        into_dlq: bool,
        queue: &str,
        now: OffsetDateTime,
        redrivers: &[String],
    ) -> Self {
        let mut out = self.clone();
        let first = self.original_sender(redrivers);
        let set_record = |out: &mut Self, record: &RedriveRecord| {
            out.attributes.insert(
                attribution::REDRIVE.to_owned(),
                AttributeValue::string(serde_json::to_string(record).expect("record serializes")),
            );
        };
        if into_dlq {
            if let Some(mut record) = self.redrive() {
                record.sender_id = first;
                record.copy_of = None;
                set_record(&mut out, &record);
            }
            // A stale attribution in the file stays stale, with its old times.
            if let (Some(mut a), true) = (self.stored_attribution(), self.attribution().is_some()) {
                a.imported_at = Some(now);
                out.attributes.insert(
                    attribution::ATTRIBUTION.to_owned(),
                    AttributeValue::string(
                        serde_json::to_string(&a).expect("attribution serializes"),
                    ),
                );
            }
            return out;
        }
        let record = RedriveRecord {
            count: self.redrive().map_or(1, |p| p.count + 1),
            at: now,
            from_queue: format!("import into {queue}"),
            previous_reason: Some(
                self.stored_attribution()
                    .map_or_else(|| "none".to_owned(), |a| a.reason),
            ),
            id: None,
            sender_id: first,
            copy_of: None,
        };
        out.attributes.remove(attribution::ATTRIBUTION);
        set_record(&mut out, &record);
        out
    }

    /// The last redrive of this message by the CLI, if any.
    pub fn redrive(&self) -> Option<RedriveRecord> {
        serde_json::from_str(self.string_attribute(attribution::REDRIVE)?).ok()
    }

    /// When the message was sent to the queue it was read from.
    pub fn sent_at(&self) -> Option<OffsetDateTime> {
        self.system_millis(MessageSystemAttributeName::SentTimestamp)
    }

    /// When this message failed first: the attribution's time, else when it was sent.
    pub fn first_failed_at(&self) -> Option<OffsetDateTime> {
        self.attribution()
            .map(|a| a.first_failed_at)
            .or_else(|| self.sent_at())
    }

    /// How many times it has been received (this receive included).
    pub fn receive_count(&self) -> Option<u32> {
        self.system(MessageSystemAttributeName::ApproximateReceiveCount)?
            .parse()
            .ok()
    }

    /// The FIFO message group id.
    pub fn group_id(&self) -> Option<&str> {
        self.system(MessageSystemAttributeName::MessageGroupId)
    }

    /// The FIFO deduplication id.
    pub fn deduplication_id(&self) -> Option<&str> {
        self.system(MessageSystemAttributeName::MessageDeduplicationId)
    }

    /// The queue SQS moved it from (real AWS stamps this; the emulator does not).
    pub fn dead_letter_source_arn(&self) -> Option<&str> {
        self.system(MessageSystemAttributeName::DeadLetterQueueSourceArn)
    }

    /// Who sent the message to the fleet first (an SQS `SenderId`), for the edge to check when
    /// it comes back from the operator: what the attribution of the worker that gave up on it
    /// says (the worker believes a redrive record only of a redriver), or for a message SQS
    /// moved here itself (no attribution) its own `SenderId` (a move keeps it); when that sender
    /// is one of `redrivers` (the operator's copy), what the copy's redrive record says. An
    /// upstream's own record is never believed. Without `redrivers` (no `--config`), an
    /// operator's copy names the operator, whom the edge refuses.
    pub fn original_sender(&self, redrivers: &[String]) -> Option<String> {
        let is_redriver = |id: &str| fleet_common::config::matches_sender(redrivers, id);
        let sender = match self.attribution() {
            // The worker's word; a worker that did not know the redrivers wrote the operator.
            Some(a) => a.sender_id?,
            None => self
                .system(MessageSystemAttributeName::SenderId)?
                .to_owned(),
        };
        if is_redriver(&sender) {
            // The copy came from the operator: its record is the CLI's own.
            self.redrive().and_then(|r| r.sender_id)
        } else {
            Some(sender)
        }
    }

    /// The X-Ray trace header SQS keeps as a system attribute (on AWS: the trace context of a
    /// message that carries no `traceparent` attribute).
    pub fn aws_trace_header(&self) -> Option<&str> {
        self.system(MessageSystemAttributeName::AwsTraceHeader)
    }

    /// The system attributes a send can carry on: `AWSTraceHeader`, so that a redriven or
    /// imported message continues its trace.
    pub fn sdk_system_attributes(
        &self,
    ) -> Option<
        std::collections::HashMap<MessageSystemAttributeNameForSends, MessageSystemAttributeValue>,
    > {
        let header = self.aws_trace_header()?;
        let value = MessageSystemAttributeValue::builder()
            .data_type("String")
            .string_value(header)
            .build()
            .ok()?;
        Some(std::collections::HashMap::from([(
            MessageSystemAttributeNameForSends::AwsTraceHeader,
            value,
        )]))
    }

    fn system(&self, name: MessageSystemAttributeName) -> Option<&str> {
        self.system_attributes
            .get(name.as_str())
            .map(String::as_str)
    }

    fn system_millis(&self, name: MessageSystemAttributeName) -> Option<OffsetDateTime> {
        let ms: i128 = self.system(name)?.parse().ok()?;
        OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).ok()
    }

    /// The message as one entry of a SendMessageBatch: its body, its attributes (within SQS's 10,
    /// the fleet's own kept first, a group cap's counters dropped), its trace header, the tenant's group (on standard queues
    /// too: fair queues) and, on a FIFO queue, `deduplication_id`.
    ///
    /// # Errors
    /// An attribute that cannot be rebuilt, or an entry SQS's builder refuses.
    pub fn batch_entry(
        &self,
        id: usize,
        fifo: bool,
        deduplication_id: String,
    ) -> Result<aws_sdk_sqs::types::SendMessageBatchRequestEntry, String> {
        let mut attributes = self.sdk_attributes()?;
        // A group cap's counters belong to the queue that deferred the message: it starts
        // afresh wherever it goes.
        attributes.remove(fleet_common::runtime::DEFERRALS);
        attributes.remove(fleet_common::runtime::ATTEMPTS);
        attribution::fit_attributes(&mut attributes);
        aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
            .id(id.to_string())
            .message_body(&self.body)
            .set_message_attributes(Some(attributes))
            .set_message_system_attributes(self.sdk_system_attributes())
            .set_message_group_id(fleet_common::runtime::carried_group_id(
                fifo,
                self.group_id(),
            ))
            .set_message_deduplication_id(fifo.then_some(deduplication_id))
            .build()
            .map_err(|e| e.to_string())
    }

    /// The message attributes in SDK form, for sending.
    ///
    /// # Errors
    /// An attribute that cannot be rebuilt (a binary value that is not base64).
    pub fn sdk_attributes(
        &self,
    ) -> Result<std::collections::HashMap<String, MessageAttributeValue>, String> {
        self.attributes
            .iter()
            .map(|(k, v)| {
                v.to_sdk()
                    .map(|v| (k.clone(), v))
                    .map_err(|e| format!("attribute {k}: {e}"))
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fleet_common::failure::FailureClass;

    pub fn attribution(reason: &str, worker: &str, class: FailureClass) -> Attribution {
        Attribution {
            reason: reason.into(),
            class,
            detail: "detail".into(),
            worker: worker.into(),
            source_queue: format!("fleet-{worker}"),
            attempts: 1,
            first_failed_at: time::macros::datetime!(2026-11-20 10:15 UTC),
            last_failed_at: time::macros::datetime!(2026-11-20 10:16 UTC),
            correlation_id: Some("corr-1".into()),
            source_message_id: "src-1".into(),
            origin: Some("storefront".into()),
            imported_at: None,
            version: Some("0.1.0+abc".into()),
            sender_id: Some("AROASTOREFRONT:s-1".into()),
        }
    }

    pub fn message(id: &str, body: &str, attribution: Option<&Attribution>) -> DlqMessage {
        let mut attributes = BTreeMap::new();
        if let Some(a) = attribution {
            attributes.insert(
                fleet_common::attribution::ATTRIBUTION.to_owned(),
                AttributeValue::string(serde_json::to_string(a).unwrap()),
            );
        }
        DlqMessage {
            message_id: id.into(),
            body: body.into(),
            md5_of_body: None,
            attributes,
            system_attributes: BTreeMap::from([
                ("SentTimestamp".to_owned(), "1763633700000".to_owned()),
                ("ApproximateReceiveCount".to_owned(), "2".to_owned()),
            ]),
            receipt_handle: format!("rh-{id}"),
        }
    }

    #[test]
    fn the_fleets_metadata_is_read_from_the_attributes() {
        let a = attribution("malformed_body", "ingestion", FailureClass::Permanent);
        let m = message("m1", "{}", Some(&a));
        assert_eq!(m.attribution(), Some(a));
        assert_eq!(m.correlation_id().as_deref(), Some("corr-1"));
        assert_eq!(m.receive_count(), Some(2));
        assert_eq!(m.sent_at().unwrap().unix_timestamp(), 1_763_633_700);
        let bare = message("m2", "{}", None);
        assert_eq!(bare.attribution(), None);
        assert_eq!(bare.first_failed_at(), bare.sent_at());
    }

    #[test]
    fn a_line_of_the_export_format_round_trips_with_binary_attributes() {
        let mut m = message("m1", "body \u{1F4E6} with \"quotes\"\n", None);
        m.attributes.insert(
            "blob".into(),
            AttributeValue {
                data_type: "Binary.gz".into(),
                string_value: None,
                binary_value: Some(aws_smithy_types::base64::encode([0u8, 255, 7])),
            },
        );
        let line = serde_json::to_string(&m).unwrap();
        assert!(!line.contains("rh-m1"), "receipts are not exported");
        let back: DlqMessage = serde_json::from_str(&line).unwrap();
        assert_eq!(back.body, m.body);
        assert_eq!(back.attributes, m.attributes);
        let sdk = back.sdk_attributes().unwrap();
        assert_eq!(sdk["blob"].binary_value().unwrap().as_ref(), &[0u8, 255, 7]);
    }

    #[test]
    fn an_attribution_from_an_earlier_stay_is_stale() {
        let a = attribution(
            "downstream_unavailable",
            "orders",
            FailureClass::AttemptsExhausted,
        );
        let failed = a.last_failed_at;
        let mut m = message("m-1", "{}", Some(&a));
        let sent = |at: OffsetDateTime| (at.unix_timestamp_nanos() / 1_000_000).to_string();
        m.system_attributes.insert(
            "SentTimestamp".into(),
            sent(failed + time::Duration::seconds(2)),
        );
        assert_eq!(
            m.attribution(),
            Some(a.clone()),
            "sent by the worker that attributed it"
        );
        // Moved back by a move task an hour later, then moved here by SQS after a crash.
        m.system_attributes.insert(
            "SentTimestamp".into(),
            sent(failed + time::Duration::hours(1)),
        );
        assert_eq!(m.attribution(), None, "stale: shown as moved by SQS");
        assert_eq!(m.stale_attribution(), Some(a.clone()));
        assert_eq!(m.stored_attribution(), Some(a.clone()));
        // Imported into a DLQ (a restore): a current attribution stays current in its new
        // stay; a stale one stays stale.
        let now = failed + time::Duration::hours(1);
        let mut fresh = message("m-2", "{}", Some(&a));
        fresh.system_attributes.insert(
            "SentTimestamp".into(),
            sent(failed + time::Duration::seconds(2)),
        );
        let mut restored = fresh.for_import(true, "fleet-orders-dlq", now, &[]);
        restored.system_attributes.insert(
            "SentTimestamp".into(),
            sent(now + time::Duration::seconds(1)),
        );
        assert!(
            restored.attribution().is_some(),
            "an import into a DLQ keeps it current"
        );
        let mut still_stale = m.for_import(true, "fleet-orders-dlq", now, &[]);
        still_stale.system_attributes.insert(
            "SentTimestamp".into(),
            sent(now + time::Duration::seconds(1)),
        );
        assert_eq!(
            still_stale.attribution(),
            None,
            "a stale one is not made current"
        );
        // On AWS, SQS's own stamp says it moved the message: stale whatever the times.
        let mut moved = fresh.clone();
        moved.system_attributes.insert(
            "DeadLetterQueueSourceArn".into(),
            "arn:aws:sqs:eu-west-1:123456789012:fleet-orders".into(),
        );
        assert_eq!(moved.attribution(), None);
        // Imported into a work queue: a redrive record instead, nothing left to go stale.
        let replayed = m.for_import(false, "fleet-orders-dlq", now, &[]);
        assert_eq!(replayed.stored_attribution(), None);
        assert_eq!(
            replayed.redrive().unwrap().previous_reason.as_deref(),
            Some("downstream_unavailable")
        );
    }

    #[test]
    fn a_batch_entry_carries_the_message_but_not_a_group_caps_counters() {
        let mut m = message("m-1", r#"{"x":1}"#, None);
        m.system_attributes
            .insert("MessageGroupId".into(), "tenant-7".into());
        for name in [
            fleet_common::runtime::DEFERRALS,
            fleet_common::runtime::ATTEMPTS,
        ] {
            m.attributes
                .insert(name.into(), AttributeValue::string("3"));
        }
        m.attributes
            .insert("correlation-id".into(), AttributeValue::string("corr-1"));
        let standard = m.batch_entry(4, false, "d-1".into()).unwrap();
        assert_eq!(standard.id(), "4");
        assert_eq!(standard.message_body(), r#"{"x":1}"#);
        assert_eq!(standard.message_group_id(), Some("tenant-7"));
        assert_eq!(standard.message_deduplication_id(), None);
        let attributes = standard.message_attributes().unwrap();
        assert_eq!(attributes["correlation-id"].string_value(), Some("corr-1"));
        assert!(!attributes.contains_key(fleet_common::runtime::DEFERRALS));
        assert!(!attributes.contains_key(fleet_common::runtime::ATTEMPTS));
        let fifo = m.batch_entry(0, true, "d-1".into()).unwrap();
        assert_eq!(fifo.message_deduplication_id(), Some("d-1"));
    }

    #[test]
    fn an_import_never_carries_a_record_it_did_not_compute() {
        let redrivers = ["AROAOPERATOR".to_owned()];
        // SQS moved an upstream's message (no attribution) that carried a planted record
        // naming another sender, a run and a copy.
        let mut m = message("m-1", "{}", None);
        m.system_attributes
            .insert("SenderId".into(), "AROACARRIER:hook".into());
        let planted = RedriveRecord {
            count: 1,
            at: time::macros::datetime!(2026-11-20 10:00 UTC),
            from_queue: "x".into(),
            previous_reason: None,
            id: Some("20261120T100000Z-0a1b2c3d".into()),
            sender_id: Some("AROASTOREFRONT".into()),
            copy_of: Some("victim".into()),
        };
        m.attributes.insert(
            attribution::REDRIVE.into(),
            AttributeValue::string(serde_json::to_string(&planted).unwrap()),
        );
        let now = time::macros::datetime!(2026-11-21 10:00 UTC);
        for into_dlq in [false, true] {
            let imported = m.for_import(into_dlq, "fleet-ingest", now, &redrivers);
            let record = imported.redrive().unwrap();
            assert_eq!(
                record.sender_id.as_deref(),
                Some("AROACARRIER:hook"),
                "the sender SQS kept, not the planted one (into a DLQ: {into_dlq})"
            );
            assert_eq!(record.copy_of, None);
        }
        // Into a work queue, a message with neither attribution nor record gets one, so the
        // edge can check who sent it first.
        let mut bare = message("m-2", "{}", None);
        bare.system_attributes
            .insert("SenderId".into(), "AROACARRIER:hook".into());
        let imported = bare.for_import(false, "fleet-ingest", now, &redrivers);
        assert_eq!(
            imported.redrive().unwrap().sender_id.as_deref(),
            Some("AROACARRIER:hook")
        );
        // A worker of an earlier build wrote the operator as the sender of a redriven copy:
        // the copy's record (the CLI's own) names the first sender.
        let mut a = attribution(
            "dependency_unavailable",
            "ingestion",
            FailureClass::AttemptsExhausted,
        );
        a.sender_id = Some("AROAOPERATOR:ops-alice".into());
        let mut redriven = message("m-3", "{}", Some(&a));
        let ours = RedriveRecord {
            sender_id: Some("AROASTOREFRONT:s-1".into()),
            copy_of: None,
            ..planted
        };
        redriven.attributes.insert(
            attribution::REDRIVE.into(),
            AttributeValue::string(serde_json::to_string(&ours).unwrap()),
        );
        assert_eq!(
            redriven.original_sender(&redrivers).as_deref(),
            Some("AROASTOREFRONT:s-1")
        );
    }
}
