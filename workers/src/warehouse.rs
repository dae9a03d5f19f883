//! Warehouse packing: reserves stock for each line (a reservation keyed by order and line inside
//! the stock item, so a second attempt finds it instead of reserving twice); a line that cannot
//! be packed is substituted when the catalog names a substitute, else removed; the order is
//! modified with its history by one write guarded by its status, then handed to delivery.

use aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure;
use fleet_common::contract::{Envelope, OrderRef, ORDER_PACKED, SCHEMA_VERSION};
use fleet_common::failure::{HandlerError, Reason};
use fleet_common::runtime::{Message, Outcome, Outgoing, TypedHandler};
use tracing::info;

use crate::store::{self, n, s, HistoryEntry, OrderRecord, Product, RecordLine, Store};

/// The packing worker.
pub struct Warehouse {
    store: Store,
}

impl Warehouse {
    /// A packing worker on `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// The result of one reservation attempt.
enum Reservation {
    /// Reserved now or by an earlier attempt.
    Held(Product),
    /// Not enough stock; the product (for its substitute).
    Short(Product),
    /// No such product.
    Unknown,
}

impl TypedHandler for Warehouse {
    type Input = Envelope<OrderRef>;

    async fn handle(
        &self,
        envelope: Envelope<OrderRef>,
        _message: &Message,
    ) -> Result<Outcome, HandlerError> {
        let order_id = &envelope.payload.order_id;
        let order = crate::delivery::read_order(&self.store, order_id)
            .await?
            .ok_or_else(|| {
                HandlerError::permanent(
                    Reason("unknown_order"),
                    format!("order {order_id} does not exist"),
                )
            })?;
        let packed = match order.status.as_str() {
            "accepted" => self.pack(&order, &envelope.event_id).await?,
            "packed" => true,
            "unpackable" => false,
            other => {
                return Err(HandlerError::permanent(
                    Reason("order_not_packable"),
                    format!("order {order_id} is {other}"),
                ))
            }
        };
        if !packed {
            return Ok(Outcome::done());
        }
        let next = Envelope {
            kind: ORDER_PACKED.to_owned(),
            schema_version: SCHEMA_VERSION,
            event_id: format!("{ORDER_PACKED}:{order_id}"),
            occurred_at: store::now_rfc3339(),
            correlation_id: envelope.correlation_id,
            metadata: envelope.metadata,
            payload: OrderRef {
                order_id: order_id.clone(),
            },
        };
        Ok(Outcome::forward(Outgoing::new(
            "delivery",
            serde_json::to_string(&next).expect("envelopes serialize"),
        )))
    }
}

impl Warehouse {
    /// Reserves every line and records the result. Returns whether anything was packed.
    async fn pack(&self, order: &OrderRecord, event_id: &str) -> Result<bool, HandlerError> {
        let mut lines = Vec::new();
        let mut history = Vec::new();
        let now = store::now_rfc3339();
        let entry = |event: &str, note: String| HistoryEntry {
            at: now.clone(),
            stage: "warehouse".to_owned(),
            event: event.to_owned(),
            note: Some(note),
            event_id: event_id.to_owned(),
        };
        for (number, line) in order.lines.iter().enumerate() {
            let key = format!("{}/{number}", order.order_id);
            let substitute = match self.reserve(&line.sku, &key, line.quantity).await? {
                Reservation::Held(_) => {
                    lines.push(line.clone());
                    continue;
                }
                Reservation::Short(product) => product.substitute,
                Reservation::Unknown => None,
            };
            let replaced = match substitute {
                Some(sub) => match self.reserve(&sub, &key, line.quantity).await? {
                    Reservation::Held(product) => Some(product),
                    _ => None,
                },
                None => None,
            };
            match replaced {
                Some(product) => {
                    history.push(entry(
                        "line_substituted",
                        format!("{} -> {}", line.sku, product.pk),
                    ));
                    lines.push(RecordLine {
                        sku: product.pk.clone(),
                        name: product.name.clone(),
                        quantity: line.quantity,
                        // The customer pays what they were charged for the original.
                        unit_price: line.unit_price,
                        substituted_for: Some(line.sku.clone()),
                    });
                }
                None => history.push(entry("line_removed", line.sku.clone())),
            }
        }
        let status = if lines.is_empty() {
            "unpackable"
        } else {
            "packed"
        };
        history.push(entry(
            status,
            format!("{} of {} lines", lines.len(), order.lines.len()),
        ));
        let update = || {
            self.store
                .client
                .update_item()
                .table_name(&self.store.tables.orders)
                .key("pk", s(store::order_key(&order.order_id)))
                .update_expression("SET #status = :status, #lines = :lines, #history = list_append(#history, :history), #version = #version + :one")
                .condition_expression("#status = :accepted")
                .expression_attribute_names("#status", "status")
                .expression_attribute_names("#lines", "lines")
                .expression_attribute_names("#history", "history")
                .expression_attribute_names("#version", "version")
                .expression_attribute_values(":status", s(status))
                .expression_attribute_values(":accepted", s("accepted"))
                .expression_attribute_values(":lines", serde_dynamo::to_attribute_value(&lines).expect("lines serialize"))
                .expression_attribute_values(":history", serde_dynamo::to_attribute_value(&history).expect("history serializes"))
                .expression_attribute_values(":one", n(1))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
        };
        match self.store.call(true, update).await {
            Ok(_) => {
                info!(order_id = %order.order_id, status, lines = lines.len(), "order packed");
                Ok(status == "packed")
            }
            Err(e) => {
                let Some(old) = store::condition_failed_item(&e) else {
                    return Err(store::transient("recording the packing", &e));
                };
                // Another attempt got there first; its result stands.
                let old: OrderRecord = store::from_item(old)?;
                Ok(old.status == "packed")
            }
        }
    }

    /// Takes `quantity` of `sku` for `key` unless `key` already holds it (one write).
    async fn reserve(
        &self,
        sku: &str,
        key: &str,
        quantity: u32,
    ) -> Result<Reservation, HandlerError> {
        let update = || {
            self.store
                .client
                .update_item()
                .table_name(&self.store.tables.catalog)
                .key("pk", s(sku))
                .update_expression("SET stock = stock - :q, reservations.#key = :q")
                .condition_expression("attribute_exists(pk) AND stock >= :q AND attribute_not_exists(reservations.#key)")
                .expression_attribute_names("#key", key)
                .expression_attribute_values(":q", n(quantity))
                .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
        };
        match self.store.call(true, update).await {
            Ok(out) => Ok(Reservation::Held(store::from_item(
                out.attributes().cloned().unwrap_or_default(),
            )?)),
            Err(e) => {
                let Some(old) = store::condition_failed_item(&e) else {
                    return Err(store::transient("reserving stock", &e));
                };
                if old.is_empty() {
                    return Ok(Reservation::Unknown);
                }
                let product: Product = store::from_item(old)?;
                if product.reservations.contains_key(key) {
                    Ok(Reservation::Held(product))
                } else {
                    Ok(Reservation::Short(product))
                }
            }
        }
    }
}
