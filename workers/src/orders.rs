//! Order processing: checks every product and price against the catalog, and writes the order
//! (accepted or rejected, with reasons) with one conditional put keyed by the order id. An
//! accepted order is handed to the warehouse.

use std::collections::{BTreeSet, HashMap};

use aws_sdk_dynamodb::types::{KeysAndAttributes, ReturnValuesOnConditionCheckFailure};
use fleet_common::contract::{
    self, Envelope, OrderRef, OrderStatus, OrderSubmitted, ORDER_ACCEPTED, SCHEMA_VERSION,
};
use fleet_common::failure::{HandlerError, Reason};
use fleet_common::role::Role;
use fleet_common::runtime::{Message, Outcome, Outgoing, TypedHandler};
use tracing::info;

use crate::store::{self, s, HistoryEntry, OrderRecord, Product, RecordLine, Store, WriteUnits};

/// The order-processing worker.
pub struct Orders {
    store: Store,
}

impl Orders {
    /// An order worker on `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// The checks of an order against the catalog: empty when it is acceptable.
pub fn check_order(order: &OrderSubmitted, catalog: &HashMap<String, Product>) -> Vec<String> {
    let mut reasons = Vec::new();
    if order.lines.len() > crate::store::MAX_PRODUCTS_PER_ORDER {
        // One packing transaction takes stock from at most this many products.
        reasons.push(format!("too_many_lines:{}", order.lines.len()));
    }
    let mut seen = BTreeSet::new();
    for line in &order.lines {
        if !seen.insert(&line.sku) {
            reasons.push(format!("duplicate_sku:{}", line.sku));
            continue;
        }
        match catalog.get(&line.sku) {
            None => reasons.push(format!("unknown_sku:{}", line.sku)),
            Some(product) if product.price != line.unit_price => {
                reasons.push(format!("price_mismatch:{}", line.sku))
            }
            Some(_) => {}
        }
    }
    reasons
}

impl TypedHandler for Orders {
    type Input = Envelope<OrderSubmitted>;

    async fn handle(
        &self,
        envelope: Envelope<OrderSubmitted>,
        _message: &Message,
    ) -> Result<Outcome, HandlerError> {
        let order = &envelope.payload;
        let catalog = self
            .products(order.lines.iter().map(|l| l.sku.clone()).collect())
            .await?;
        let reasons = check_order(order, &catalog);
        let status = if reasons.is_empty() {
            OrderStatus::Accepted
        } else {
            OrderStatus::Rejected
        };
        let correlation_id = envelope.correlation_id.clone().unwrap_or_default();
        let record = OrderRecord {
            pk: store::order_key(&order.order_id),
            order_id: order.order_id.clone(),
            user_id: order.user_id.clone(),
            status,
            rejection_reasons: reasons.clone(),
            lines: order
                .lines
                .iter()
                .map(|l| RecordLine {
                    sku: l.sku.clone(),
                    name: catalog
                        .get(&l.sku)
                        .map(|p| p.name.clone())
                        .unwrap_or_default(),
                    quantity: l.quantity,
                    unit_price: l.unit_price,
                    substituted_for: None,
                    stock_shards: catalog.get(&l.sku).and_then(|p| p.shards),
                })
                .collect(),
            delivery_address: order.delivery_address.clone(),
            email: order.email.clone(),
            payment_reference: order.payment_reference.clone(),
            correlation_id: correlation_id.clone(),
            event_id: envelope.event_id.clone(),
            payload_hash: contract::fingerprint(order),
            source: envelope.metadata.as_ref().map(|m| m.source.clone()),
            history: vec![HistoryEntry {
                at: store::now_rfc3339(),
                stage: Role::Orders.as_str().to_owned(),
                event: status.as_str().to_owned(),
                note: (!reasons.is_empty()).then(|| reasons.join(",")),
                event_id: envelope.event_id.clone(),
            }],
            delivery_status: None,
            delivery_rank: None,
            delivery_events: Default::default(),
            version: 1,
        };
        let status = self.create(&record).await?;
        info!(order_id = %order.order_id, %status, "order recorded");
        if status != OrderStatus::Accepted {
            return Ok(Outcome::done());
        }
        let next = Envelope {
            kind: ORDER_ACCEPTED.to_owned(),
            schema_version: SCHEMA_VERSION,
            event_id: format!("{ORDER_ACCEPTED}:{}", order.order_id),
            occurred_at: store::now_rfc3339(),
            correlation_id: Some(correlation_id),
            metadata: envelope.metadata,
            payload: OrderRef {
                order_id: order.order_id.clone(),
            },
        };
        Ok(Outcome::forward(Outgoing::new(
            "warehouse",
            serde_json::to_string(&next).expect("envelopes serialize"),
        )))
    }
}

impl Orders {
    /// The catalog entries of `skus` (reads, not writes).
    async fn products(
        &self,
        skus: BTreeSet<String>,
    ) -> Result<HashMap<String, Product>, HandlerError> {
        let mut found = HashMap::new();
        let mut pending: Vec<HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> = skus
            .into_iter()
            .map(|sku| HashMap::from([("pk".to_owned(), s(sku))]))
            .collect();
        // 100 keys per request; a batch may come back partly unprocessed (DynamoDB's answer
        // to throttling inside a batch): ask again for those after a growing pause.
        for round in 0..5u32 {
            if pending.is_empty() {
                break;
            }
            if round > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(50 << round)).await;
            }
            let chunk: Vec<_> = pending.drain(..pending.len().min(100)).collect();
            let keys = KeysAndAttributes::builder()
                .set_keys(Some(chunk))
                .consistent_read(true)
                .build()
                .expect("keys are set");
            let request = || {
                self.store
                    .client
                    .batch_get_item()
                    .request_items(&self.store.tables.catalog, keys.clone())
                    .send()
            };
            let out = self
                .store
                .call(None, request)
                .await
                .map_err(|e| store::failure("reading the catalog", &e))?;
            for item in out
                .responses()
                .and_then(|r| r.get(&self.store.tables.catalog))
                .into_iter()
                .flatten()
            {
                let product: Product = store::from_item(item.clone())?;
                found.insert(product.pk.clone(), product);
            }
            if let Some(left) = out
                .unprocessed_keys()
                .and_then(|u| u.get(&self.store.tables.catalog))
            {
                pending.extend(left.keys().iter().cloned());
            }
        }
        if !pending.is_empty() {
            // Unprocessed keys are throttling: the runtime slows down and retries in place.
            return Err(HandlerError::throttled("catalog reads left unprocessed"));
        }
        Ok(found)
    }

    /// Creates the order if absent (one write). Returns the status the order has: its own, or,
    /// when the same event was already applied, the recorded one.
    async fn create(&self, record: &OrderRecord) -> Result<OrderStatus, HandlerError> {
        let item = store::to_item(record);
        let put = || {
            self.store
                .client
                .put_item()
                .table_name(&self.store.tables.orders)
                .set_item(Some(item.clone()))
                .condition_expression("attribute_not_exists(pk)")
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .send()
        };
        match self.store.call(Some(WriteUnits::of_item(&item)), put).await {
            Ok(_) => Ok(record.status),
            Err(e) => {
                let Some(old) = store::condition_failed_item(&e) else {
                    return Err(store::failure("writing the order", &e));
                };
                let old: OrderRecord = store::from_item(old)?;
                if old.event_id == record.event_id && old.payload_hash == record.payload_hash {
                    metrics::counter!("fleet_duplicates_dropped_total", "stage" => "orders")
                        .increment(1);
                    Ok(first_status(&old))
                } else {
                    Err(HandlerError::permanent(
                        Reason::IDEMPOTENCY_CONFLICT,
                        format!(
                            "order {} already exists from event {}",
                            record.order_id, old.event_id
                        ),
                    ))
                }
            }
        }
    }
}

/// The status the orders stage gave an order (later stages move it on).
fn first_status(order: &OrderRecord) -> OrderStatus {
    order
        .history
        .iter()
        .find(|h| h.stage == Role::Orders.as_str())
        .and_then(|h| OrderStatus::parse(&h.event))
        .unwrap_or(order.status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_common::contract::{Currency, Money, OrderLine};

    fn eur(amount_minor: i64) -> Money {
        Money {
            amount_minor,
            currency: Currency::try_from("EUR".to_owned()).unwrap(),
        }
    }

    fn product(sku: &str, price: i64) -> (String, Product) {
        (
            sku.to_owned(),
            Product {
                pk: sku.to_owned(),
                name: sku.to_owned(),
                price: eur(price),
                stock: 10,
                substitute: None,
                shards: None,
            },
        )
    }

    fn order(lines: &[(&str, i64)]) -> OrderSubmitted {
        OrderSubmitted {
            order_id: "o-1".into(),
            user_id: "u-1".into(),
            email: None,
            lines: lines
                .iter()
                .map(|(sku, price)| OrderLine {
                    sku: (*sku).into(),
                    quantity: 1,
                    unit_price: eur(*price),
                })
                .collect(),
            delivery_address: crate::store::tests::address(),
            payment_reference: "pay".into(),
        }
    }

    #[test]
    fn orders_are_checked_against_catalog_and_prices() {
        let catalog: HashMap<_, _> = [product("A", 100), product("B", 250)].into_iter().collect();
        assert!(check_order(&order(&[("A", 100), ("B", 250)]), &catalog).is_empty());
        assert_eq!(
            check_order(&order(&[("A", 100), ("Z", 1)]), &catalog),
            vec!["unknown_sku:Z"]
        );
        assert_eq!(
            check_order(&order(&[("B", 249)]), &catalog),
            vec!["price_mismatch:B"]
        );
        assert_eq!(
            check_order(&order(&[("A", 100), ("A", 100)]), &catalog),
            vec!["duplicate_sku:A"]
        );
    }

    #[test]
    fn an_order_one_packing_transaction_cannot_hold_is_rejected() {
        let skus: Vec<String> = (0..=crate::store::MAX_PRODUCTS_PER_ORDER)
            .map(|i| format!("P{i}"))
            .collect();
        let catalog: HashMap<_, _> = skus.iter().map(|s| product(s, 100)).collect();
        let lines: Vec<(&str, i64)> = skus.iter().map(|s| (s.as_str(), 100)).collect();
        assert_eq!(
            check_order(&order(&lines), &catalog),
            vec![format!("too_many_lines:{}", lines.len())]
        );
        assert!(check_order(&order(&lines[1..]), &catalog).is_empty());
    }
}
