//! Outgoing messages: the handler's forwards with the incoming message's correlation,
//! source, trace and group carried, their FIFO deduplication ids, and deferral of a message
//! over its group's cap.

#[allow(unused_imports)]
use super::*;

impl<H: Handler> Inner<H> {
    /// Sends the handler's outgoing messages, with the correlation id and source metadata of the
    /// incoming one.
    /// They wait for a batch to fill at most a tenth of how late the incoming message already is
    /// (up to `forward_flush_ms`): a fresh order is forwarded at once.
    pub(super) async fn forward(&self, incoming: &Message, outcome: Outcome) -> Result<(), String> {
        if outcome.forward.is_empty() {
            return Ok(());
        }
        let linger = batching::linger_for(
            incoming.lag(time::OffsetDateTime::now_utc()),
            Duration::from_millis(self.worker.forward_flush_ms),
        );
        let sends = outcome.forward.into_iter().map(|out| {
            let entry = self.send_entry(incoming, out);
            async move { self.sends.submit_within(entry?, Some(linger)).await }
        });
        futures::future::join_all(sends).await.into_iter().collect()
    }

    pub(super) fn send_entry(
        &self,
        incoming: &Message,
        out: Outgoing,
    ) -> Result<SendEntry, String> {
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

    /// A message whose group is at its cap in this task: sent again to the queue, unchanged
    /// (body, every attribute, group), with the attempts it used and a delay that doubles with
    /// each deferral, then deleted; no attempt is used. If the send fails, the message goes back
    /// to the queue after the same delay instead (that receive then counts as an attempt).
    pub(super) async fn defer_for_group(&self, message: Message) {
        let queue = &self.pair.queue.name;
        let delay = fairness::defer_delay(message.deferrals);
        let mut attributes = message.raw_attributes.clone();
        attributes.insert(
            fairness::DEFERRALS.to_owned(),
            string_attribute(message.deferrals.saturating_add(1).to_string()),
        );
        // A redriven message's outcome stays under the id the redrive sent it with.
        if let Some(mut record) = message.redrive_record() {
            record
                .copy_of
                .get_or_insert_with(|| message.message_id.clone());
            let json = serde_json::to_string(&record).expect("a record serializes");
            attributes.insert(attribution::REDRIVE.to_owned(), string_attribute(json));
        }
        // This receive ran nothing: the copy has used what this one had used before it.
        let used = message.attempt().saturating_sub(1);
        if used > 0 {
            attributes.insert(
                fairness::ATTEMPTS.to_owned(),
                string_attribute(used.to_string()),
            );
        } else {
            attributes.remove(fairness::ATTEMPTS);
        }
        attribution::fit_attributes(&mut attributes);
        let again = SendEntry {
            queue_url: self.pair.queue.url.clone(),
            body: message.body.clone(),
            attributes,
            group_id: message.group_id.clone(),
            deduplication_id: None,
            delay_seconds: Some(delay),
            aws_trace_header: message.aws_trace_header.clone(),
        };
        match self.sends.submit(again).await {
            Ok(()) => {
                self.acknowledge(&message).await;
                events::deferred_for_group(queue);
            }
            Err(e) => {
                warn!(queue = %queue, error = %e, "could not defer a message over its group's cap; it comes back after its visibility");
                self.set_visibility(&message.receipt_handle, delay).await;
            }
        }
    }
}

/// A FIFO deduplication id for a forward of `incoming` to `queue`: SHA-256 of the target, the
/// outgoing envelope's event id and its payload (not its times or metadata), the same on every
/// attempt and every redrive, and different for an event id reused with another payload (which
/// the next stage then sees, and calls a conflict). Without an event id: the incoming
/// message's id and the target.
pub(super) fn stable_deduplication_id(incoming: &Message, queue: &str, body: &str) -> String {
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

pub(super) fn string_attribute(value: String) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("data type is set")
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
