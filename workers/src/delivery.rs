//! Delivery updates: a packed order starts awaiting the carrier; carrier status events move the
//! shipment along a state machine that never moves backwards, whatever order they arrive in.
//! Each event is applied at most once (its id is recorded in the order by the same write); a
//! late, lower-ranked event is kept in the history without changing the status. The warehouse's
//! hand-off (`awaiting_carrier`) is an event like the others, so the order's history holds the
//! same entries whatever the order of arrival. An event may be early: one for an order not
//! recorded yet, or not packed yet, is retried before it is dead-lettered (`unknown_order`,
//! `order_not_packed`); the same event id with another payload is `idempotency_conflict`.

use aws_sdk_dynamodb::types::{ReturnValue, ReturnValuesOnConditionCheckFailure};
use fleet_common::contract::{
    DeliveryStatus, DeliveryStatusReported, Envelope, OrderRef, OrderStatus,
    DELIVERY_STATUS_REPORTED, ORDER_PACKED,
};
use fleet_common::failure::{HandlerError, Reason};
use fleet_common::role::Role;
use fleet_common::runtime::{describe_json_error, Message, Outcome, TypedHandler};
use tracing::info;

use crate::store::{self, n, s, HistoryEntry, OrderRecord, Store, WriteUnits};

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
                let fingerprint = fleet_common::contract::fingerprint(&envelope.payload);
                let event = Event {
                    event_id: &envelope.event_id,
                    order_id: &envelope.payload.order_id,
                    status: envelope.payload.status,
                    fingerprint: &fingerprint,
                };
                self.apply(&event, None).await?;
            }
            _ => {
                return Err(HandlerError::permanent(
                    Reason::UNKNOWN_TYPE,
                    "delivery takes order.packed and delivery.status_reported",
                ))
            }
        }
        Ok(Outcome::done())
    }
}

impl Delivery {
    /// A packed order starts awaiting the carrier: one conditional update when nothing got
    /// there first (the usual case). When a carrier event did (the hand-off was delayed), the
    /// hand-off is recorded like any late event, so the order's history holds it whatever the
    /// order of arrival.
    async fn await_carrier(&self, envelope: &Envelope<OrderRef>) -> Result<(), HandlerError> {
        let status = DeliveryStatus::AwaitingCarrier;
        let order_id = &envelope.payload.order_id;
        let fingerprint = fleet_common::contract::fingerprint(&envelope.payload);
        let entry = history(&envelope.event_id, status.as_str(), None);
        let update = || {
            self.store
                .client
                .update_item()
                .table_name(&self.store.tables.orders)
                .key("pk", s(store::order_key(order_id)))
                .update_expression("SET delivery_status = :s, delivery_rank = :r, delivery_events.#event = :event, #history = list_append(#history, :h), #version = #version + :one")
                // A record written before optional fields were left out holds delivery_rank as NULL.
                .condition_expression("attribute_exists(pk) AND (attribute_not_exists(delivery_rank) OR attribute_type(delivery_rank, :null))")
                .expression_attribute_names("#history", "history")
                .expression_attribute_names("#version", "version")
                .expression_attribute_names("#event", &envelope.event_id)
                .expression_attribute_values(":s", s(status.as_str()))
                .expression_attribute_values(":r", n(status.rank()))
                .expression_attribute_values(":event", s(event_record(status, &fingerprint)))
                .expression_attribute_values(":h", serde_dynamo::to_attribute_value(vec![entry.clone()]).expect("history serializes"))
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":null", s("NULL"))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                // The item as written, for its write units (no capacity of its own).
                .return_values(ReturnValue::AllNew)
                .send()
        };
        // Its units are known once the item is seen: counted then.
        let old = match self.store.call(Some(WriteUnits::default()), update).await {
            Ok(out) => {
                if let Some(item) = out.attributes() {
                    self.store.count_units(WriteUnits::of_item(item));
                }
                return Ok(());
            }
            // A failed condition still costs the item's units (one when it does not exist).
            Err(e) => match store::condition_failed_item(&e).inspect(|old| {
                self.store.count_units(WriteUnits::of_item(old));
            }) {
                Some(old) if old.is_empty() => {
                    return Err(HandlerError::permanent(
                        Reason::UNKNOWN_ORDER,
                        format!("order {order_id} does not exist"),
                    ))
                }
                Some(old) => store::from_item::<OrderRecord>(old)?,
                None => {
                    return Err(store::failure(
                        "marking the order as awaiting the carrier",
                        &e,
                    ))
                }
            },
        };
        // Already awaiting, or a carrier event came first: decide on the order as it stands
        // (returned by the failed update, no read needed).
        let event = Event {
            event_id: &envelope.event_id,
            order_id,
            status,
            fingerprint: &fingerprint,
        };
        self.apply(&event, Some(old)).await
    }

    /// Applies an event to its order; a race with another event of the same order is
    /// re-decided on the order as it now stands. `first`: the order as already read.
    async fn apply(
        &self,
        event: &Event<'_>,
        first: Option<OrderRecord>,
    ) -> Result<(), HandlerError> {
        let mut known = first;
        for _ in 0..5 {
            let order = match known.take() {
                Some(order) => order,
                None => store::read_order(&self.store, event.order_id)
                    .await?
                    .ok_or_else(|| not_yet_known(event.order_id))?,
            };
            match order.status {
                OrderStatus::Packed => {}
                // The warehouse may be behind: an early event waits, with the queue's backoff.
                OrderStatus::Accepted => {
                    return Err(HandlerError::transient(
                        Reason::ORDER_NOT_PACKED,
                        format!("order {} is not packed yet", event.order_id),
                    ))
                }
                other @ (OrderStatus::Rejected | OrderStatus::Unpackable) => {
                    return Err(HandlerError::permanent(
                        Reason::ORDER_NOT_SHIPPED,
                        format!("order {} is {other}, not packed", event.order_id),
                    ))
                }
            }
            let decision = transition(&order, event.event_id, event.status, event.fingerprint);
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
                            "event {} was applied to order {} with another payload",
                            event.event_id, event.order_id
                        ),
                    ))
                }
                Transition::TooMany => {
                    return Err(HandlerError::permanent(
                        Reason::TOO_MANY_EVENTS,
                        format!(
                            "order {} holds {MAX_CARRIER_EVENTS} delivery events already",
                            event.order_id
                        ),
                    ))
                }
                Transition::Advance | Transition::RecordOnly => {}
            }
            if self.write(&order, event, &decision).await? {
                info!(order_id = %event.order_id, status = event.status.as_str(), ?decision, "delivery event applied");
                return Ok(());
            }
        }
        Err(HandlerError::transient(
            Reason::CONTENDED_ORDER,
            format!("order {} kept changing", event.order_id),
        ))
    }

    /// One conditional update; `false` when the order changed since it was read.
    async fn write(
        &self,
        order: &OrderRecord,
        event: &Event<'_>,
        decision: &Transition,
    ) -> Result<bool, HandlerError> {
        let advance = *decision == Transition::Advance;
        let note = (!advance).then(|| {
            format!(
                "late event, status stays {}",
                order.delivery_status.as_deref().unwrap_or("none")
            )
        });
        let entry = history(event.event_id, event.status.as_str(), note);
        let mut after = order.clone();
        after.delivery_events.insert(
            event.event_id.to_owned(),
            event_record(event.status, event.fingerprint),
        );
        after.history.push(entry.clone());
        after.version += 1;
        if advance {
            after.delivery_status = Some(event.status.as_str().to_owned());
            after.delivery_rank = Some(event.status.rank());
        }
        let units = WriteUnits::of_update(order, &after);
        let update = || {
            let mut request = self
                .store
                .client
                .update_item()
                .table_name(&self.store.tables.orders)
                .key("pk", s(&order.pk))
                .expression_attribute_names("#history", "history")
                .expression_attribute_names("#version", "version")
                .expression_attribute_names("#event", event.event_id)
                .expression_attribute_values(
                    ":event",
                    s(event_record(event.status, event.fingerprint)),
                )
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
        match self.store.call(Some(units), update).await {
            Ok(_) => Ok(true),
            Err(e) if store::condition_failed_item(&e).is_some() => Ok(false),
            Err(e) => Err(store::failure("applying the delivery event", &e)),
        }
    }
}

/// A delivery event as the state machine takes it: a carrier's status report, or the
/// warehouse's hand-off (`awaiting_carrier`).
#[derive(Debug)]
struct Event<'a> {
    event_id: &'a str,
    order_id: &'a str,
    status: DeliveryStatus,
    fingerprint: &'a str,
}

fn history(event_id: &str, event: &str, note: Option<String>) -> HistoryEntry {
    HistoryEntry {
        at: store::now_rfc3339(),
        stage: Role::Delivery.as_str().to_owned(),
        event: event.to_owned(),
        note,
        event_id: event_id.to_owned(),
    }
}

/// A carrier event for an order not recorded (yet): it may be early (the order's submission is
/// still on its way or being retried), so it is retried before it is dead-lettered as
/// `unknown_order`.
fn not_yet_known(order_id: &str) -> HandlerError {
    HandlerError::transient(
        Reason::UNKNOWN_ORDER,
        format!("order {order_id} does not exist"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packed order `o` with no lines, at delivery `rank`, with `events` applied.
    fn order(rank: Option<u8>, events: &[&str]) -> OrderRecord {
        let mut order = store::tests::packed_order();
        order.delivery_rank = rank;
        order.delivery_events = events
            .iter()
            .map(|e| {
                (
                    (*e).to_owned(),
                    event_record(DeliveryStatus::LabelCreated, "f"),
                )
            })
            .collect();
        order
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
