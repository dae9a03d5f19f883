//! Delivery updates: a packed order starts awaiting the carrier; carrier status events move the
//! shipment along a state machine that never moves backwards, whatever order they arrive in.
//! Each event is applied at most once (its id is recorded in the order by the same write); a
//! late, lower-ranked event is kept in the history without changing the status. An event for an
//! unknown order is dead-lettered with that reason.

use aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure;
use fleet_common::contract::{
    DeliveryStatus, DeliveryStatusReported, Envelope, OrderRef, DELIVERY_STATUS_REPORTED,
    ORDER_PACKED,
};
use fleet_common::failure::{HandlerError, Reason};
use fleet_common::runtime::{describe_json_error, Message, Outcome, TypedHandler};
use tracing::info;

use crate::store::{self, n, s, HistoryEntry, OrderRecord, Store};

/// The delivery worker.
pub struct Delivery {
    store: Store,
}

impl Delivery {
    /// A delivery worker on `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// Reads an order (strongly consistent).
///
/// # Errors
/// A transient error when DynamoDB fails.
pub async fn read_order(
    store: &Store,
    order_id: &str,
) -> Result<Option<OrderRecord>, HandlerError> {
    let get = || {
        store
            .client
            .get_item()
            .table_name(&store.tables.orders)
            .key("pk", s(store::order_key(order_id)))
            .consistent_read(true)
            .send()
    };
    let out = store
        .call(0, get)
        .await
        .map_err(|e| store::failure("reading the order", &e))?;
    out.item().cloned().map(store::from_item).transpose()
}

/// The most carrier events one order takes: each adds to the order's history and event map,
/// and so to the item's size (toward DynamoDB's 400 KB) and to the cost of every later write.
/// A shipment's real life is a handful of events; past this, a chatty or hostile sender is cut
/// off with a permanent `too_many_events`.
pub const MAX_CARRIER_EVENTS: usize = 50;

/// What a carrier event does to an order whose shipment is at `current`.
#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    /// The event was applied before.
    AlreadyApplied,
    /// The status moves forward.
    Advance,
    /// The event is older news: recorded in the history, status unchanged.
    RecordOnly,
    /// The event id was applied before with another payload.
    Conflict,
    /// The order holds [`MAX_CARRIER_EVENTS`] already.
    TooMany,
}

/// How an applied carrier event is recorded in `delivery_events`: its status and a short
/// fingerprint of its payload, so that a reuse of the id with another payload is seen.
pub fn event_record(status: DeliveryStatus, fingerprint: &str) -> String {
    format!(
        "{}#{}",
        status.as_str(),
        &fingerprint[..fingerprint.len().min(16)]
    )
}

/// Decides a carrier event (id, status, payload fingerprint) against the order (pure: the
/// state machine).
pub fn transition(
    order: &OrderRecord,
    event_id: &str,
    status: DeliveryStatus,
    fingerprint: &str,
) -> Transition {
    if let Some(recorded) = order.delivery_events.get(event_id) {
        let same = match recorded.split_once('#') {
            Some(_) => *recorded == event_record(status, fingerprint),
            // Recorded before fingerprints were kept: the status is what can be compared.
            None => recorded == status.as_str(),
        };
        return if same {
            Transition::AlreadyApplied
        } else {
            Transition::Conflict
        };
    }
    if order.delivery_events.len() >= MAX_CARRIER_EVENTS {
        Transition::TooMany
    } else if order.delivery_rank.is_none_or(|rank| status.rank() > rank) {
        Transition::Advance
    } else {
        Transition::RecordOnly
    }
}

impl TypedHandler for Delivery {
    type Input = serde_json::Value;

    async fn handle(
        &self,
        body: serde_json::Value,
        _message: &Message,
    ) -> Result<Outcome, HandlerError> {
        let malformed = |e: serde_json::Error| {
            HandlerError::permanent(Reason::MALFORMED_BODY, describe_json_error(&e))
        };
        match body.get("type").and_then(|t| t.as_str()) {
            Some(ORDER_PACKED) => {
                let envelope: Envelope<OrderRef> =
                    serde_json::from_value(body).map_err(malformed)?;
                self.await_carrier(&envelope).await?;
            }
            Some(DELIVERY_STATUS_REPORTED) => {
                let envelope: Envelope<DeliveryStatusReported> =
                    serde_json::from_value(body).map_err(malformed)?;
                self.apply(&envelope).await?;
            }
            _ => {
                return Err(HandlerError::permanent(
                    Reason("unknown_type"),
                    "delivery takes order.packed and delivery.status_reported",
                ))
            }
        }
        Ok(Outcome::done())
    }
}

impl Delivery {
    /// A packed order starts awaiting the carrier, unless a carrier event got there first.
    async fn await_carrier(&self, envelope: &Envelope<OrderRef>) -> Result<(), HandlerError> {
        let status = DeliveryStatus::AwaitingCarrier;
        let entry = history(&envelope.event_id, status.as_str(), None);
        let update = || {
            self.store
                .client
                .update_item()
                .table_name(&self.store.tables.orders)
                .key("pk", s(store::order_key(&envelope.payload.order_id)))
                .update_expression("SET delivery_status = :s, delivery_rank = :r, #history = list_append(#history, :h), #version = #version + :one")
                // A record written before optional fields were left out holds delivery_rank as NULL.
                .condition_expression("attribute_exists(pk) AND (attribute_not_exists(delivery_rank) OR attribute_type(delivery_rank, :null))")
                .expression_attribute_names("#history", "history")
                .expression_attribute_names("#version", "version")
                .expression_attribute_values(":s", s(status.as_str()))
                .expression_attribute_values(":r", n(status.rank()))
                .expression_attribute_values(":h", serde_dynamo::to_attribute_value(vec![entry.clone()]).expect("history serializes"))
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":null", s("NULL"))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
        };
        match self.store.call(1, update).await {
            Ok(_) => Ok(()),
            Err(e) => match store::condition_failed_item(&e) {
                Some(old) if old.is_empty() => Err(unknown_order(&envelope.payload.order_id)),
                Some(_) => Ok(()), // already awaiting or further along
                None => Err(store::failure(
                    "marking the order as awaiting the carrier",
                    &e,
                )),
            },
        }
    }

    /// Applies a carrier event; a race with another event of the same order is re-decided on
    /// the order as it now stands.
    async fn apply(&self, envelope: &Envelope<DeliveryStatusReported>) -> Result<(), HandlerError> {
        let event = &envelope.payload;
        let fingerprint = fleet_common::contract::fingerprint(event);
        for _ in 0..5 {
            let order = read_order(&self.store, &event.order_id)
                .await?
                .ok_or_else(|| unknown_order(&event.order_id))?;
            if order.status != "packed" {
                return Err(HandlerError::permanent(
                    Reason("order_not_shipped"),
                    format!("order {} is {}, not packed", event.order_id, order.status),
                ));
            }
            let decision = transition(&order, &envelope.event_id, event.status, &fingerprint);
            match decision {
                Transition::AlreadyApplied => {
                    metrics::counter!("fleet_duplicates_dropped_total", "stage" => "delivery")
                        .increment(1);
                    return Ok(());
                }
                Transition::Conflict => {
                    return Err(HandlerError::permanent(
                        Reason::IDEMPOTENCY_CONFLICT,
                        format!(
                            "carrier event {} was applied to order {} with another payload",
                            envelope.event_id, event.order_id
                        ),
                    ))
                }
                Transition::TooMany => {
                    return Err(HandlerError::permanent(
                        Reason("too_many_events"),
                        format!(
                            "order {} holds {MAX_CARRIER_EVENTS} carrier events already",
                            event.order_id
                        ),
                    ))
                }
                Transition::Advance | Transition::RecordOnly => {}
            }
            if self
                .write(&order, envelope, &decision, &fingerprint)
                .await?
            {
                info!(order_id = %event.order_id, status = event.status.as_str(), ?decision, "carrier event applied");
                return Ok(());
            }
        }
        Err(HandlerError::transient(
            Reason("contended_order"),
            format!("order {} kept changing", event.order_id),
        ))
    }

    /// One conditional update; `false` when the order changed since it was read.
    async fn write(
        &self,
        order: &OrderRecord,
        envelope: &Envelope<DeliveryStatusReported>,
        decision: &Transition,
        fingerprint: &str,
    ) -> Result<bool, HandlerError> {
        let event = &envelope.payload;
        let advance = *decision == Transition::Advance;
        let note = (!advance).then(|| {
            format!(
                "late event, status stays {}",
                order.delivery_status.as_deref().unwrap_or("none")
            )
        });
        let entry = history(&envelope.event_id, event.status.as_str(), note);
        let update = || {
            let mut request = self
                .store
                .client
                .update_item()
                .table_name(&self.store.tables.orders)
                .key("pk", s(&order.pk))
                .expression_attribute_names("#history", "history")
                .expression_attribute_names("#version", "version")
                .expression_attribute_names("#event", &envelope.event_id)
                .expression_attribute_values(":event", s(event_record(event.status, fingerprint)))
                .expression_attribute_values(
                    ":h",
                    serde_dynamo::to_attribute_value(vec![entry.clone()])
                        .expect("history serializes"),
                )
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":v", n(order.version));
            request = if advance {
                request
                    .update_expression("SET delivery_status = :s, delivery_rank = :r, delivery_events.#event = :event, #history = list_append(#history, :h), #version = #version + :one")
                    .expression_attribute_values(":s", s(event.status.as_str()))
                    .expression_attribute_values(":r", n(event.status.rank()))
            } else {
                request.update_expression("SET delivery_events.#event = :event, #history = list_append(#history, :h), #version = #version + :one")
            };
            // Guarded by the version read: the decision holds only for the order as read.
            request
                .condition_expression(
                    "#version = :v AND attribute_not_exists(delivery_events.#event)",
                )
                .send()
        };
        match self.store.call(1, update).await {
            Ok(_) => Ok(true),
            Err(e) if store::condition_failed_item(&e).is_some() => Ok(false),
            Err(e) => Err(store::failure("applying the carrier event", &e)),
        }
    }
}

fn history(event_id: &str, event: &str, note: Option<String>) -> HistoryEntry {
    HistoryEntry {
        at: store::now_rfc3339(),
        stage: "delivery".to_owned(),
        event: event.to_owned(),
        note,
        event_id: event_id.to_owned(),
    }
}

fn unknown_order(order_id: &str) -> HandlerError {
    HandlerError::permanent(
        Reason("unknown_order"),
        format!("order {order_id} does not exist"),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fleet_common::contract::Address;

    /// A packed order `o` with no lines, at delivery `rank`, with `events` applied.
    pub(crate) fn order(rank: Option<u8>, events: &[&str]) -> OrderRecord {
        OrderRecord {
            pk: "order#o".into(),
            order_id: "o".into(),
            user_id: "u".into(),
            status: "packed".into(),
            rejection_reasons: vec![],
            lines: vec![],
            delivery_address: Address {
                name: "n".into(),
                line1: "l".into(),
                line2: None,
                city: "c".into(),
                postal_code: "p".into(),
                country: "FR".into(),
                phone: None,
            },
            email: None,
            payment_reference: "p".into(),
            correlation_id: "c".into(),
            event_id: "e".into(),
            payload_hash: "h".into(),
            source: None,
            history: vec![],
            delivery_status: None,
            delivery_rank: rank,
            delivery_events: events
                .iter()
                .map(|e| {
                    (
                        (*e).to_owned(),
                        event_record(DeliveryStatus::LabelCreated, "f"),
                    )
                })
                .collect(),
            version: 1,
        }
    }

    #[test]
    fn the_state_machine_never_moves_backwards() {
        use DeliveryStatus::*;
        assert_eq!(
            transition(&order(None, &[]), "e1", LabelCreated, "f"),
            Transition::Advance
        );
        assert_eq!(
            transition(&order(Some(InTransit.rank()), &[]), "e2", Delivered, "f"),
            Transition::Advance
        );
        assert_eq!(
            transition(&order(Some(Delivered.rank()), &[]), "e3", InTransit, "f"),
            Transition::RecordOnly
        );
        assert_eq!(
            transition(&order(Some(InTransit.rank()), &[]), "e4", InTransit, "f"),
            Transition::RecordOnly
        );
        assert_eq!(
            transition(
                &order(Some(LabelCreated.rank()), &["e5"]),
                "e5",
                LabelCreated,
                "f"
            ),
            Transition::AlreadyApplied
        );
    }

    #[test]
    fn the_same_event_id_with_another_payload_is_a_conflict() {
        use DeliveryStatus::*;
        let o = order(Some(LabelCreated.rank()), &["e5"]);
        assert_eq!(transition(&o, "e5", Delivered, "f"), Transition::Conflict);
        assert_eq!(
            transition(&o, "e5", LabelCreated, "another"),
            Transition::Conflict,
            "same status, another time or reference"
        );
        // Recorded before fingerprints: the status decides.
        let mut legacy = order(Some(LabelCreated.rank()), &[]);
        legacy
            .delivery_events
            .insert("e6".into(), "label_created".into());
        assert_eq!(
            transition(&legacy, "e6", LabelCreated, "any"),
            Transition::AlreadyApplied
        );
        assert_eq!(
            transition(&legacy, "e6", Delivered, "any"),
            Transition::Conflict
        );
    }

    #[test]
    fn an_order_takes_a_bounded_number_of_carrier_events() {
        let ids: Vec<String> = (0..MAX_CARRIER_EVENTS).map(|i| format!("e{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let full = order(Some(DeliveryStatus::InTransit.rank()), &refs);
        assert_eq!(
            transition(&full, "one-more", DeliveryStatus::Delivered, "f"),
            Transition::TooMany
        );
        assert_eq!(
            transition(&full, "e0", DeliveryStatus::LabelCreated, "f"),
            Transition::AlreadyApplied,
            "a repeat of an applied event is still absorbed"
        );
        let room = order(
            Some(DeliveryStatus::InTransit.rank()),
            &refs[..MAX_CARRIER_EVENTS - 1],
        );
        assert_eq!(
            transition(&room, "last", DeliveryStatus::Delivered, "f"),
            Transition::Advance
        );
    }

    #[test]
    fn any_arrival_order_ends_at_the_highest_status() {
        use DeliveryStatus::*;
        let events = [
            (LabelCreated, "a"),
            (InTransit, "b"),
            (OutForDelivery, "c"),
            (Delivered, "d"),
        ];
        // Every permutation of four events.
        let mut idx = [0usize, 1, 2, 3];
        let mut permutations = vec![idx];
        while next_permutation(&mut idx) {
            permutations.push(idx);
        }
        assert_eq!(permutations.len(), 24);
        for perm in permutations {
            let mut o = order(Some(AwaitingCarrier.rank()), &[]);
            for &i in perm.iter().chain(perm.iter()) {
                let (status, id) = events[i];
                match transition(&o, id, status, "f") {
                    Transition::Advance => {
                        o.delivery_rank = Some(status.rank());
                        o.delivery_status = Some(status.as_str().into());
                        o.delivery_events
                            .insert(id.into(), event_record(status, "f"));
                    }
                    Transition::RecordOnly => {
                        o.delivery_events
                            .insert(id.into(), event_record(status, "f"));
                    }
                    Transition::AlreadyApplied => {}
                    other => panic!("{other:?} for {id}"),
                }
            }
            assert_eq!(o.delivery_status.as_deref(), Some("delivered"), "{perm:?}");
            assert_eq!(
                o.delivery_events.len(),
                4,
                "each event applied once: {perm:?}"
            );
        }
    }

    fn next_permutation(a: &mut [usize]) -> bool {
        let Some(i) = (1..a.len()).rev().find(|&i| a[i - 1] < a[i]) else {
            return false;
        };
        let j = (i..a.len()).rev().find(|&j| a[j] > a[i - 1]).unwrap();
        a.swap(i - 1, j);
        a[i..].reverse();
        true
    }
}
