//! Failure: a retry after a backoff, or the DLQ with the attribution of why (sized to SQS's
//! limits, masked when it held payment data, the redrive record kept).

#[allow(unused_imports)]
use super::*;

impl<H: Handler> Inner<H> {
    /// Retry later, or dead-letter; `attempt` is the attempt that failed. A transient failure
    /// with attempts left is hidden for its backoff (or, with `hold`, handed back to the caller
    /// to retry in place after it).
    pub(super) async fn fail(
        &self,
        message: &Message,
        attempt: u32,
        error: HandlerError,
        hold: bool,
    ) -> Settled {
        let queue = &self.pair.queue.name;
        let detail = redact(error.detail());
        let class = match &error {
            HandlerError::Transient {
                retry_after,
                reason,
                ..
            } if attempt < self.worker.max_attempts => {
                let delay = retry_after.unwrap_or_else(|| {
                    retry_delay(
                        attempt,
                        Duration::from_millis(self.worker.backoff_min_ms),
                        Duration::from_secs(self.worker.backoff_max_secs),
                    )
                });
                Stats::bump(&self.stats.retried, 1);
                events::retried(queue, reason.0, attempt, delay, &detail);
                let outcome = redrive_ledger::Outcome::Retrying { reason: reason.0 };
                self.record_redrive(message, outcome).await;
                return self.retry_later(message, delay, hold).await;
            }
            HandlerError::Transient { .. } => FailureClass::AttemptsExhausted,
            HandlerError::Permanent { .. } => FailureClass::Permanent,
        };
        let attribution = self.attribution(message, attempt, &error, class, detail);
        match self.dead_letter(message, &attribution).await {
            Ok(()) => {
                self.acknowledge(message).await;
                let outcome = redrive_ledger::Outcome::DeadLettered {
                    reason: &attribution.reason,
                };
                self.record_redrive(message, outcome).await;
                Stats::bump(&self.stats.dead_lettered, 1);
                events::dead_lettered(
                    queue,
                    &attribution.reason,
                    class,
                    attempt,
                    &attribution.detail,
                );
                Settled::Left
            }
            Err(e) => {
                events::dead_letter_failed(queue, &e);
                let delay = Duration::from_millis(self.worker.backoff_min_ms);
                self.retry_later(message, delay, hold).await
            }
        }
    }

    /// Another attempt after `delay`: by the caller, in place (`hold`, a FIFO group), or by SQS
    /// once the message's visibility ends.
    async fn retry_later(&self, message: &Message, delay: Duration, hold: bool) -> Settled {
        if hold {
            return Settled::RetryIn(delay);
        }
        let visibility = retry_visibility(delay, message.received.elapsed());
        self.set_visibility(&message.receipt_handle, visibility)
            .await;
        Settled::Stays
    }

    /// Why the message goes to the DLQ, as the attribution it carries there.
    fn attribution(
        &self,
        message: &Message,
        attempt: u32,
        error: &HandlerError,
        class: FailureClass,
        detail: String,
    ) -> Attribution {
        let now = OffsetDateTime::now_utc();
        Attribution {
            reason: error.reason().0.to_owned(),
            class,
            detail,
            worker: self.role.clone(),
            source_queue: self.pair.queue.name.clone(),
            attempts: attempt,
            first_failed_at: message.first_received_at.unwrap_or(now),
            last_failed_at: now,
            correlation_id: message.correlation_id.clone(),
            source_message_id: message.message_id.clone(),
            origin: message.attributes.get(SOURCE).cloned(),
            imported_at: None,
            version: Some(crate::build_info::VERSION.to_owned()),
            sender_id: message.first_sender(&self.redrivers),
        }
    }

    /// Sends the message, unchanged, with its attribution, to the DLQ.
    pub(super) async fn dead_letter(
        &self,
        message: &Message,
        attribution: &Attribution,
    ) -> Result<(), String> {
        // The redrive record stays: the `dlq redrive` run that moved this message knows it for
        // one of its own and leaves it here (a run moves each message once), and the next
        // redrive counts on from it (a FIFO deduplication id new for each redrive).
        let mut raw = message.raw_attributes.clone();
        // The group cap's counters are this queue's business: a redriven message starts afresh.
        raw.remove(fairness::DEFERRALS);
        raw.remove(fairness::ATTEMPTS);
        // Only a record that is one (at the edge an upstream may set anything), kept whole
        // below: masking digits or trimming it away would let the redrive run that moved this
        // message take it again.
        let redrive = raw
            .remove(attribution::REDRIVE)
            .and_then(|v| v.string_value().and_then(kept_redrive_record));
        // A message refused for payment data is kept without a digit: the DLQ (kept for days,
        // exported, read by people) must not store what the edge refused to let in.
        let payment_data = attribution.reason == Reason::PAYMENT_DATA.as_str();
        let mut attributes = masked(raw, payment_data);
        if let Some(record) = redrive {
            attributes.insert(attribution::REDRIVE.to_owned(), string_attribute(record));
        }
        let body = if payment_data {
            crate::edge::mask_digits(&message.body)
        } else {
            message.body.clone()
        };
        let json = serde_json::to_string(attribution).map_err(|e| e.to_string())?;
        attributes.insert(attribution::ATTRIBUTION.to_owned(), string_attribute(json));
        let mut dropped = attribution::fit_attributes(&mut attributes);
        dropped.extend(fit_size(&body, &mut attributes, self.max_message_bytes));
        if body.len() + attributes_size(&attributes) > self.max_message_bytes {
            // Still over: the attribution's detail is cut.
            let mut cut = attribution.clone();
            cut.detail = "(cut: the message is at SQS's size limit)".to_owned();
            let json = serde_json::to_string(&cut).map_err(|e| e.to_string())?;
            attributes.insert(attribution::ATTRIBUTION.to_owned(), string_attribute(json));
        }
        if !dropped.is_empty() {
            warn!(
                ?dropped,
                "message attributes over the SQS limits were not carried into the DLQ"
            );
        }
        let dlq = &self.pair.dlq;
        let group = message.group_id.as_deref().map(|g| {
            if payment_data || crate::edge::holds_card_number(g) {
                crate::edge::mask_digits(g)
            } else {
                g.to_owned()
            }
        });
        self.sends
            .submit(SendEntry {
                queue_url: dlq.url.clone(),
                body,
                attributes,
                group_id: carried_group_id(dlq.fifo, group.as_deref()),
                delay_seconds: None,
                aws_trace_header: message.aws_trace_header.clone(),
                deduplication_id: dlq.fifo.then(|| {
                    message
                        .deduplication_id
                        .clone()
                        .unwrap_or_else(|| message.message_id.clone())
                }),
            })
            .await
    }
}

/// Drops attributes until the body and the attributes fit SQS's size `limit` (or the send fails
/// on every attempt): the upstream's own first, then any but the attribution and the redrive
/// record (at the edge an upstream may have set `fleet-*` or a huge correlation id itself), the
/// largest first. Returns the names dropped.
fn fit_size(
    body: &str,
    attributes: &mut HashMap<String, MessageAttributeValue>,
    limit: usize,
) -> Vec<String> {
    let over = |a: &HashMap<String, MessageAttributeValue>| body.len() + attributes_size(a) > limit;
    let bytes = |(k, v): &(&String, &MessageAttributeValue)| {
        k.len()
            + v.string_value().map_or(0, str::len)
            + v.binary_value().map_or(0, |b| b.as_ref().len())
    };
    let ours = |k: &str| k.starts_with("fleet-") || k == CORRELATION_ID;
    let mut dropped = Vec::new();
    for any in [false, true] {
        while over(attributes) {
            let largest = attributes
                .iter()
                .filter(|(k, _)| {
                    k.as_str() != attribution::ATTRIBUTION
                        && k.as_str() != attribution::REDRIVE
                        && (any || !ours(k))
                })
                .max_by_key(bytes)
                .map(|(k, _)| k.clone());
            let Some(name) = largest else { break };
            attributes.remove(&name);
            dropped.push(name);
        }
    }
    dropped
}

/// The redrive record a dead-lettered message keeps: a well-formed record, rewritten from its
/// fields (a few hundred bytes at most), its texts masked when they hold a card number, its id
/// kept only when valid. `None` for anything else.
pub(super) fn kept_redrive_record(raw: &str) -> Option<String> {
    if raw.len() > 2048 {
        return None;
    }
    let mut record: attribution::RedriveRecord = serde_json::from_str(raw).ok()?;
    let clean = |text: &str, max: usize| -> String {
        let text: String = text.chars().take(max).collect();
        if crate::edge::holds_card_number(&text) {
            crate::edge::mask_digits(&text)
        } else {
            text
        }
    };
    record.id = record.id.filter(|id| crate::runtime::is_valid_id(id));
    // Ids only, never a card number (an upstream may write anything in a record).
    record.sender_id = record
        .sender_id
        .filter(|id| crate::runtime::is_valid_id(id));
    record.copy_of = record.copy_of.filter(|id| crate::runtime::is_valid_id(id));
    record.from_queue = clean(&record.from_queue, 256);
    record.previous_reason = record.previous_reason.map(|r| clean(&r, 128));
    serde_json::to_string(&record).ok()
}

/// The attributes a dead letter carries: every digit masked (names too) when the message was
/// refused for payment data; otherwise any name or value that holds a card number without its
/// digits (a message refused before the edge looked for cards, for its size or its JSON, or
/// trace context, which the edge lets in whatever its digits), but a well-formed `traceparent`.
fn masked(
    attributes: HashMap<String, MessageAttributeValue>,
    payment_data: bool,
) -> HashMap<String, MessageAttributeValue> {
    let card = |text: &str| payment_data || crate::edge::holds_card_number(text);
    attributes
        .into_iter()
        .map(|(name, value)| {
            let value = match value.string_value() {
                // A well-formed traceparent is ids, kept unless the message was refused.
                Some(text)
                    if card(text)
                        && (payment_data
                            || name != crate::trace::TRACEPARENT
                            || !crate::edge::is_w3c_traceparent(text)) =>
                {
                    string_attribute(crate::edge::mask_digits(text))
                }
                _ => value,
            };
            let name = if card(&name) {
                crate::edge::mask_digits(&name)
            } else {
                name
            };
            (name, value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_no_card_in_attribute_names_or_trace_state() {
        let attributes = HashMap::from([
            (
                "4111-1111-1111-1111".to_owned(),
                string_attribute("x".into()),
            ),
            (
                crate::trace::TRACESTATE.to_owned(),
                string_attribute("nr=4111111111111111".into()),
            ),
            ("note".to_owned(), string_attribute("order 12".into())),
        ]);
        let refused = masked(attributes.clone(), true);
        assert!(refused.contains_key("####-####-####-####"));
        assert_eq!(refused["note"].string_value(), Some("order ##"));
        // Dead-lettered for another reason: only the card-like trace state loses its digits.
        let other = masked(attributes, false);
        assert_eq!(
            other[crate::trace::TRACESTATE].string_value(),
            Some("nr=################")
        );
        assert_eq!(other["note"].string_value(), Some("order 12"));
        assert!(
            other.contains_key("####-####-####-####"),
            "a name never keeps a card"
        );
        // A well-formed traceparent keeps its ids whatever digits they hold; one that is not
        // W3C is text like any other.
        let ids = "00-41111111111111110000000000000000-00f067aa0ba902b7-01";
        let parents = masked(
            HashMap::from([(
                crate::trace::TRACEPARENT.to_owned(),
                string_attribute(ids.into()),
            )]),
            false,
        );
        assert_eq!(parents[crate::trace::TRACEPARENT].string_value(), Some(ids));
        let text = masked(
            HashMap::from([(
                crate::trace::TRACEPARENT.to_owned(),
                string_attribute("4111 1111 1111 1111".into()),
            )]),
            false,
        );
        assert_eq!(
            text[crate::trace::TRACEPARENT].string_value(),
            Some("#### #### #### ####")
        );
    }

    #[test]
    fn a_dead_lettered_message_keeps_a_well_formed_redrive_record_without_card_digits() {
        let record = r#"{"count":2,"at":"2026-11-25T04:20:00Z","from_queue":"fleet-ingest-t0c6-dlq","previous_reason":"malformed_json","id":"20261125T042000Z-3f9a1c2b"}"#;
        let kept: serde_json::Value =
            serde_json::from_str(&kept_redrive_record(record).unwrap()).unwrap();
        assert_eq!(kept["id"], "20261125T042000Z-3f9a1c2b");
        assert_eq!(kept["count"], 2);
        assert_eq!(
            kept["from_queue"], "fleet-ingest-t0c6-dlq",
            "no card, unchanged"
        );
        // Forged at the edge: a card number in a text, an id that is not one.
        let forged = r#"{"count":1,"at":"2026-11-25T04:20:00Z","from_queue":"4111 1111 1111 1111","previous_reason":null,"id":"x y"}"#;
        let kept: serde_json::Value =
            serde_json::from_str(&kept_redrive_record(forged).unwrap()).unwrap();
        assert_eq!(kept["from_queue"], "#### #### #### ####");
        assert!(kept.get("id").is_none());
        assert_eq!(kept_redrive_record("not a record"), None);
        assert_eq!(kept_redrive_record(&"x".repeat(5000)), None);
    }
}
