//! Warehouse packing: one TransactWriteItems per order takes the stock of every line and records
//! the packed order, all or nothing. The order's status (`accepted`) is the idempotency record: a
//! second attempt of the same message finds the order packed and only forwards it, so stock is
//! never taken twice, an order that fails half-way holds no stock, and nothing grows per order
//! outside the order itself. When products are short the transaction is cancelled with the
//! products as they stood (ALL_OLD); those lines are substituted (when the catalog names a
//! substitute) or removed, and the transaction is tried again with the new plan.
//!
//! A hot product's stock is split over shards (`stock_shards` in the catalog, recorded on the
//! order's lines): an order takes a line's units from one shard, chosen by the order id so that
//! orders spread over the shards, and moves to the next shard when that one is short; the line
//! is short only when every shard was. Each shard's condition (`stock >= :q`) keeps stock from
//! going below zero, and the order's status guard keeps the effect once. A line is not split
//! between shards: near the end of a product's stock, a line for more units than any one shard
//! still holds is short although the shards together hold them.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    CancellationReason, ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update,
};
use backon::{BackoffBuilder, ExponentialBuilder};
use fleet_common::contract::{Envelope, OrderRef, OrderStatus, ORDER_PACKED, SCHEMA_VERSION};
use fleet_common::failure::{HandlerError, Reason};
use fleet_common::role::Role;
use fleet_common::runtime::{Message, Outcome, Outgoing, TypedHandler};
use tracing::info;

use crate::store::{self, n, s, HistoryEntry, OrderRecord, Product, RecordLine, Store, WriteUnits};

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

impl TypedHandler for Warehouse {
    type Input = Envelope<OrderRef>;

    async fn handle(
        &self,
        envelope: Envelope<OrderRef>,
        _message: &Message,
    ) -> Result<Outcome, HandlerError> {
        let order_id = &envelope.payload.order_id;
        let order = store::read_order(&self.store, order_id)
            .await?
            .ok_or_else(|| {
                HandlerError::permanent(
                    Reason::UNKNOWN_ORDER,
                    format!("order {order_id} does not exist"),
                )
            })?;
        let packed = match order.status {
            OrderStatus::Accepted => self.pack(&order, &envelope.event_id).await?,
            OrderStatus::Packed => true,
            OrderStatus::Unpackable => false,
            other @ OrderStatus::Rejected => {
                return Err(HandlerError::permanent(
                    Reason::ORDER_NOT_PACKABLE,
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

/// How one ordered line is being packed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Planned {
    /// The line as it will be recorded (the substitute's sku and name once substituted).
    line: RecordLine,
    /// The sku the customer ordered.
    ordered: String,
    /// `Some(sku)` while waiting for the substitute's product to be read.
    pending: Option<String>,
    /// Out of the order: no stock and no (usable) substitute.
    removed: bool,
}

/// The packing plan of one order: which product (and which of its stock shards) each line
/// takes its stock from. Pure logic; the transaction's answers move it forward.
#[derive(Debug, Clone)]
struct Plan {
    lines: Vec<Planned>,
    /// Spreads orders over a sharded product's shards.
    order_id: String,
    /// Per sharded product: the shards found short so far.
    dry: BTreeMap<String, Vec<u32>>,
}

impl Plan {
    fn new(order_id: &str, lines: &[RecordLine]) -> Self {
        Self {
            lines: lines
                .iter()
                .map(|line| Planned {
                    line: line.clone(),
                    ordered: line.sku.clone(),
                    pending: None,
                    removed: false,
                })
                .collect(),
            order_id: order_id.to_owned(),
            dry: BTreeMap::new(),
        }
    }

    /// How many shards `sku`'s stock is split over, as its lines recorded.
    fn shards(&self, sku: &str) -> u32 {
        self.lines
            .iter()
            .filter(|p| p.line.sku == sku)
            .filter_map(|p| p.line.stock_shards)
            .max()
            .unwrap_or(1)
            .clamp(1, store::MAX_STOCK_SHARDS)
    }

    /// The shard `sku` takes from now: the order's own shard (a hash of the order id and the
    /// sku), or the next one after it not found short.
    fn shard(&self, sku: &str) -> u32 {
        let n = self.shards(sku);
        if n == 1 {
            return 0;
        }
        let first = fnv1a(&[self.order_id.as_bytes(), b"\0", sku.as_bytes()]) % u64::from(n);
        let dry = self.dry.get(sku).map(Vec::as_slice).unwrap_or_default();
        (0..n)
            .map(|k| ((first + u64::from(k)) % u64::from(n)) as u32)
            .find(|k| !dry.contains(k))
            .unwrap_or(0)
    }

    /// The item `sku`'s units are taken from now.
    fn stock_item(&self, sku: &str) -> String {
        store::stock_item(sku, self.shard(sku))
    }

    /// `sku`'s current shard was short: moves to another shard and returns true, or returns
    /// false when every shard was short (the product is short).
    fn next_shard(&mut self, sku: &str) -> bool {
        let n = self.shards(sku);
        if n == 1 {
            return false;
        }
        let current = self.shard(sku);
        let dry = self.dry.entry(sku.to_owned()).or_default();
        if !dry.contains(&current) {
            dry.push(current);
        }
        dry.len() < n as usize
    }

    /// Units to take per product for the lines still in (lines on one product are summed: a
    /// transaction names each item once).
    fn takes(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for p in self.lines.iter().filter(|p| !p.removed) {
            *out.entry(p.line.sku.clone()).or_default() += u64::from(p.line.quantity);
        }
        out
    }

    /// `sku` could not give its units (`product` as it stood; `None` when it does not exist).
    /// Each line on it moves to the product's substitute if it has not been substituted yet,
    /// else out. Returns the substitutes whose products must be read before the next attempt.
    fn short(&mut self, sku: &str, product: Option<&Product>) -> Vec<String> {
        let substitute = product
            .and_then(|p| p.substitute.clone())
            .filter(|sub| sub != sku);
        let mut wanted = Vec::new();
        for p in self
            .lines
            .iter_mut()
            .filter(|p| !p.removed && p.line.sku == sku)
        {
            match &substitute {
                Some(sub) if p.line.substituted_for.is_none() => {
                    p.pending = Some(sub.clone());
                    if !wanted.contains(sub) {
                        wanted.push(sub.clone());
                    }
                }
                _ => p.removed = true,
            }
        }
        wanted
    }

    /// The substitute `sku` read as `product`: the lines waiting for it take it, or leave the
    /// order when it does not exist.
    fn substitute(&mut self, sku: &str, product: Option<&Product>) {
        for p in self
            .lines
            .iter_mut()
            .filter(|p| p.pending.as_deref() == Some(sku))
        {
            p.pending = None;
            match product {
                Some(product) => {
                    p.line = RecordLine {
                        sku: product.pk.clone(),
                        name: product.name.clone(),
                        quantity: p.line.quantity,
                        // The customer pays what they were charged for the original.
                        unit_price: p.line.unit_price,
                        substituted_for: Some(p.ordered.clone()),
                        stock_shards: product.shards,
                    };
                }
                None => p.removed = true,
            }
        }
        // New demand on `sku`: shards found short for other lines may hold enough for this one.
        self.dry.remove(sku);
    }

    /// The lines to record, and (event, note) for the history: substitutions and removals in
    /// line order.
    fn outcome(&self) -> (Vec<RecordLine>, Vec<(&'static str, String)>) {
        let mut lines = Vec::new();
        let mut events = Vec::new();
        for p in &self.lines {
            if p.removed {
                events.push(("line_removed", p.ordered.clone()));
            } else {
                if p.line.substituted_for.is_some() {
                    events.push((
                        "line_substituted",
                        format!("{} -> {}", p.ordered, p.line.sku),
                    ));
                }
                lines.push(p.line.clone());
            }
        }
        (lines, events)
    }
}

impl Warehouse {
    /// Packs the order in one transaction, re-planned while products are short. Returns whether
    /// anything was packed.
    async fn pack(&self, order: &OrderRecord, event_id: &str) -> Result<bool, HandlerError> {
        let mut plan = Plan::new(&order.order_id, &order.lines);
        let products = plan.takes().len();
        if products > store::MAX_PRODUCTS_PER_ORDER {
            return Err(HandlerError::permanent(
                Reason::ORDER_TOO_LARGE,
                format!(
                    "order {} takes stock from {products} products; one transaction holds {}",
                    order.order_id,
                    store::MAX_PRODUCTS_PER_ORDER
                ),
            ));
        }
        // A transaction that meets another on a hot product is cancelled (TransactionConflict):
        // try again here after a short jittered pause, before handing it back to the queue.
        let mut conflicts = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_millis(500))
            .with_max_times(4)
            .with_jitter()
            .build();
        // A short round substitutes or removes at least one line (a line moves at most twice),
        // or only moves sharded products to shards not tried yet (finite: a product has at most
        // MAX_STOCK_SHARDS, and a product's tried shards are forgotten only when a line is
        // substituted onto it).
        let mut line_rounds = 0;
        let mut shard_rounds = 0;
        let shard_cap = 2 * order.lines.len() * (store::MAX_STOCK_SHARDS as usize + 1);
        while line_rounds <= 2 * order.lines.len() + 1 && shard_rounds <= shard_cap {
            let shortages = match self.commit(order, &plan, event_id).await? {
                Commit::Recorded(packed) => return Ok(packed),
                Commit::Conflict(error) => match conflicts.next() {
                    Some(pause) => {
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                    // Contention on a product, like throttling: the runtime slows down and
                    // tries again in place, without using one of the message's attempts.
                    None => return Err(HandlerError::throttled(error.detail().to_owned())),
                },
                Commit::Short(shortages) => shortages,
            };
            let mut lines_moved = false;
            let mut wanted = Vec::new();
            for (sku, product) in shortages {
                if plan.next_shard(&sku) {
                    continue;
                }
                lines_moved = true;
                // Every shard was short: the product is. A shard's item is not the product:
                // read the product for its substitute.
                let product = if plan.shards(&sku) > 1 {
                    self.product(&sku).await?
                } else {
                    product
                };
                wanted.extend(plan.short(&sku, product.as_ref()));
            }
            for sku in wanted {
                let product = self.product(&sku).await?;
                plan.substitute(&sku, product.as_ref());
            }
            if lines_moved {
                line_rounds += 1;
            } else {
                shard_rounds += 1;
            }
        }
        Err(HandlerError::transient(
            Reason::PACKING_UNSETTLED,
            format!(
                "order {} kept changing stock between attempts",
                order.order_id
            ),
        ))
    }

    /// One attempt: takes the plan's units from every product and records the order, or
    /// reports which products were short.
    async fn commit(
        &self,
        order: &OrderRecord,
        plan: &Plan,
        event_id: &str,
    ) -> Result<Commit, HandlerError> {
        let (items, status, lines, units) = self.packing(order, plan, event_id);
        let request = || {
            self.store
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
        };
        let e = match self.store.call(Some(units), request).await {
            Ok(_) => {
                info!(order_id = %order.order_id, %status, lines, "order packed");
                return Ok(Commit::Recorded(status == OrderStatus::Packed));
            }
            Err(e) => e,
        };
        match e.as_service_error() {
            Some(TransactWriteItemsError::TransactionCanceledException(c)) => cancelled(
                plan,
                c.cancellation_reasons(),
                store::failure("packing the order", &e),
            ),
            _ => Err(store::failure("packing the order", &e)),
        }
    }

    /// The packing transaction: the order recorded (`packed`, or `unpackable` with no line
    /// left) only if still `accepted`, and each product's units taken only if there are enough;
    /// with the status, the number of lines packed and the write units it costs.
    fn packing(
        &self,
        order: &OrderRecord,
        plan: &Plan,
        event_id: &str,
    ) -> (Vec<TransactWriteItem>, OrderStatus, usize, WriteUnits) {
        let (lines, events) = plan.outcome();
        let status = if lines.is_empty() {
            OrderStatus::Unpackable
        } else {
            OrderStatus::Packed
        };
        let now = store::now_rfc3339();
        let entry = |event: &str, note: String| HistoryEntry {
            at: now.clone(),
            stage: Role::Warehouse.as_str().to_owned(),
            event: event.to_owned(),
            note: Some(note),
            event_id: event_id.to_owned(),
        };
        let mut history: Vec<HistoryEntry> = events
            .into_iter()
            .map(|(event, note)| entry(event, note))
            .collect();
        history.push(entry(
            status.as_str(),
            format!("{} of {} lines", lines.len(), order.lines.len()),
        ));
        let record = Update::builder()
            .table_name(&self.store.tables.orders)
            .key("pk", s(store::order_key(&order.order_id)))
            .update_expression("SET #status = :status, #lines = :lines, #history = list_append(#history, :history), #version = #version + :one")
            .condition_expression("#status = :accepted")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#lines", "lines")
            .expression_attribute_names("#history", "history")
            .expression_attribute_names("#version", "version")
            .expression_attribute_values(":status", s(status.as_str()))
            .expression_attribute_values(":accepted", s(OrderStatus::Accepted.as_str()))
            .expression_attribute_values(":lines", serde_dynamo::to_attribute_value(&lines).expect("lines serialize"))
            .expression_attribute_values(":history", serde_dynamo::to_attribute_value(&history).expect("history serializes"))
            .expression_attribute_values(":one", n(1))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("table, key and expression set");
        let mut after = order.clone();
        after.status = status;
        after.lines.clone_from(&lines);
        after.history.extend(history.iter().cloned());
        after.version += 1;
        let mut units = WriteUnits::of_update(order, &after).transactional();
        let mut items = vec![TransactWriteItem::builder().update(record).build()];
        for (sku, quantity) in &plan.takes() {
            let take = Update::builder()
                .table_name(&self.store.tables.catalog)
                .key("pk", s(plan.stock_item(sku)))
                .update_expression("SET stock = stock - :q")
                .condition_expression("attribute_exists(pk) AND stock >= :q")
                .expression_attribute_values(":q", n(quantity))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .build()
                .expect("table, key and expression set");
            items.push(TransactWriteItem::builder().update(take).build());
            units = units + WriteUnits::SMALL_EFFECT.transactional();
        }
        (items, status, lines.len(), units)
    }

    /// Reads a product (consistent read); `None` when it does not exist.
    async fn product(&self, sku: &str) -> Result<Option<Product>, HandlerError> {
        let request = || {
            self.store
                .client
                .get_item()
                .table_name(&self.store.tables.catalog)
                .key("pk", s(sku))
                .consistent_read(true)
                .send()
        };
        let out = self
            .store
            .call(None, request)
            .await
            .map_err(|e| store::failure("reading a product", &e))?;
        out.item().cloned().map(store::from_item).transpose()
    }
}

/// FNV-1a over some byte strings: a stable spread of orders over shards (the same order meets
/// the same shard on every attempt and in every process).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// What one packing attempt came to.
enum Commit {
    /// The order is recorded (by this attempt or an earlier one); whether it is packed.
    Recorded(bool),
    /// These products were short (as they stood; `None`: no such product).
    Short(Vec<(String, Option<Product>)>),
    /// Cancelled by a concurrent transaction on one of its items; nothing was written.
    Conflict(HandlerError),
}

/// What a cancelled packing transaction (see `Warehouse::packing`) says: the order recorded by
/// another attempt first (its result stands), products short, throttling, a conflict with
/// another transaction, or another failure (`error`).
fn cancelled(
    plan: &Plan,
    reasons: &[CancellationReason],
    error: HandlerError,
) -> Result<Commit, HandlerError> {
    let failed = |i: usize| {
        reasons
            .get(i)
            .filter(|r| r.code() == Some("ConditionalCheckFailed"))
    };
    if let Some(reason) = failed(0) {
        // Another attempt recorded the order first; its result stands.
        let old: OrderRecord = store::from_item(reason.item().cloned().unwrap_or_default())?;
        return Ok(Commit::Recorded(old.status == OrderStatus::Packed));
    }
    let mut shortages = Vec::new();
    for (i, sku) in plan.takes().keys().enumerate() {
        if let Some(reason) = failed(i + 1) {
            // A shard's item holds only its stock, not the product: `pack` reads the product
            // when every shard was short.
            let old = reason
                .item()
                .cloned()
                .filter(|item| !item.is_empty() && plan.shards(sku) == 1);
            shortages.push((sku.clone(), old.map(store::from_item).transpose()?));
        }
    }
    if !shortages.is_empty() {
        return Ok(Commit::Short(shortages));
    }
    if reasons
        .iter()
        .any(|r| store::is_throttling_reason(r.code()))
    {
        // Throttling inside a transaction is throttling: the runtime slows down and tries
        // again in place.
        return Err(HandlerError::throttled(
            "packing the order: TransactionCanceled (ThrottlingError)",
        ));
    }
    if reasons
        .iter()
        .any(|r| r.code() == Some("TransactionConflict"))
    {
        return Ok(Commit::Conflict(error));
    }
    // Anything else: the queue tries again later.
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
    use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsOutput;
    use aws_sdk_dynamodb::types::error::TransactionCanceledException;
    use aws_sdk_dynamodb::types::CancellationReason;
    use aws_smithy_mocks::{mock, mock_client, RuleMode};
    use fleet_common::contract::{Currency, Money};

    fn line(sku: &str, quantity: u32) -> RecordLine {
        RecordLine {
            sku: sku.to_owned(),
            name: format!("{sku} name"),
            quantity,
            unit_price: Money {
                amount_minor: 500,
                currency: Currency::try_from("EUR".to_owned()).unwrap(),
            },
            substituted_for: None,
            stock_shards: None,
        }
    }

    fn product(sku: &str, substitute: Option<&str>) -> Product {
        Product {
            pk: sku.to_owned(),
            name: format!("{sku} name"),
            price: line(sku, 1).unit_price,
            stock: 0,
            substitute: substitute.map(str::to_owned),
            shards: None,
        }
    }

    #[test]
    fn a_sharded_line_spreads_over_the_shards_and_moves_on_when_one_is_short() {
        let mut hot = line("HOT", 1);
        hot.stock_shards = Some(4);
        let used: std::collections::BTreeSet<u32> = (0..200)
            .map(|i| Plan::new(&format!("o{i}"), &[hot.clone()]).shard("HOT"))
            .collect();
        assert_eq!(used.len(), 4, "orders spread over every shard");
        let mut plan = Plan::new("o1", &[hot.clone(), line("A", 1)]);
        let first = plan.stock_item("HOT");
        assert_eq!(
            first,
            plan.stock_item("HOT"),
            "the same order meets the same shard"
        );
        let mut seen = vec![first];
        for _ in 0..3 {
            assert!(plan.next_shard("HOT"));
            let next = plan.stock_item("HOT");
            assert!(!seen.contains(&next), "{next} was short already");
            seen.push(next);
        }
        seen.sort();
        assert_eq!(seen, ["HOT", "HOT#s1", "HOT#s2", "HOT#s3"]);
        assert!(!plan.next_shard("HOT"), "every shard short: the product is");
        // An unsharded product is its own item, and short at once.
        assert_eq!(plan.stock_item("A"), "A");
        assert!(!plan.next_shard("A"));
    }

    #[test]
    fn a_line_substituted_onto_a_sharded_product_tries_every_shard_again() {
        // C's line (5 units) found every shard of C short; A's line (1 unit) moves onto C and
        // may still find a shard with one unit.
        let mut c = line("C", 5);
        c.stock_shards = Some(4);
        let mut plan = Plan::new("o", &[c, line("A", 1)]);
        while plan.next_shard("C") {}
        assert!(plan.short("C", Some(&product("C", None))).is_empty());
        assert_eq!(plan.short("A", Some(&product("A", Some("C")))), ["C"]);
        let mut sharded = product("C", None);
        sharded.shards = Some(4);
        plan.substitute("C", Some(&sharded));
        assert_eq!(plan.takes(), BTreeMap::from([("C".to_owned(), 1)]));
        for _ in 0..3 {
            assert!(plan.next_shard("C"), "shards untried for the new line");
        }
        assert!(!plan.next_shard("C"));
    }

    #[test]
    fn lines_on_one_product_are_taken_together() {
        let plan = Plan::new("o", &[line("A", 2), line("B", 1), line("A", 3)]);
        assert_eq!(
            plan.takes(),
            BTreeMap::from([("A".to_owned(), 5), ("B".to_owned(), 1)])
        );
    }

    #[test]
    fn a_short_line_takes_its_substitute_at_the_price_charged_then_leaves_if_that_is_short() {
        let mut plan = Plan::new("o", &[line("A", 2), line("B", 1)]);
        assert_eq!(plan.short("A", Some(&product("A", Some("C")))), ["C"]);
        plan.substitute("C", Some(&product("C", Some("D"))));
        assert_eq!(
            plan.takes(),
            BTreeMap::from([("B".to_owned(), 1), ("C".to_owned(), 2)])
        );
        let (lines, events) = plan.outcome();
        assert_eq!(lines[0].sku, "C");
        assert_eq!(lines[0].substituted_for.as_deref(), Some("A"));
        assert_eq!(lines[0].unit_price.amount_minor, 500);
        assert_eq!(events, [("line_substituted", "A -> C".to_owned())]);

        // A substitute is not substituted in turn.
        assert!(plan.short("C", Some(&product("C", Some("D")))).is_empty());
        let (lines, events) = plan.outcome();
        assert_eq!(lines.len(), 1);
        assert_eq!(events, [("line_removed", "A".to_owned())]);
    }

    #[test]
    fn unknown_products_and_missing_substitutes_remove_the_line() {
        let mut plan = Plan::new("o", &[line("A", 1), line("B", 1), line("E", 1)]);
        assert!(plan.short("A", None).is_empty());
        assert_eq!(plan.short("B", Some(&product("B", Some("GONE")))), ["GONE"]);
        plan.substitute("GONE", None);
        assert!(plan.short("E", Some(&product("E", Some("E")))).is_empty());
        let (lines, events) = plan.outcome();
        assert!(lines.is_empty());
        assert!(plan.takes().is_empty());
        assert_eq!(
            events.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
            ["line_removed"; 3]
        );
    }

    #[test]
    fn a_substitute_already_on_the_order_is_taken_once_with_both_quantities() {
        let mut plan = Plan::new("o", &[line("A", 1), line("C", 2)]);
        assert_eq!(plan.short("A", Some(&product("A", Some("C")))), ["C"]);
        plan.substitute("C", Some(&product("C", None)));
        assert_eq!(plan.takes(), BTreeMap::from([("C".to_owned(), 3)]));
        // Both leave when C runs short: the substituted line has had its chance, C has none.
        assert!(plan.short("C", Some(&product("C", None))).is_empty());
        assert!(plan.outcome().0.is_empty());
    }

    fn accepted(lines: &[RecordLine]) -> OrderRecord {
        let mut order = store::tests::packed_order();
        order.status = OrderStatus::Accepted;
        order.lines = lines.to_vec();
        order
    }

    fn warehouse(client: aws_sdk_dynamodb::Client) -> Warehouse {
        let tables = store::Tables {
            orders: "orders".into(),
            catalog: "catalog".into(),
        };
        Warehouse::new(Store::new(client, tables, "warehouse", None))
    }

    fn envelope() -> Envelope<OrderRef> {
        Envelope {
            kind: fleet_common::contract::ORDER_ACCEPTED.to_owned(),
            schema_version: SCHEMA_VERSION,
            event_id: "order.accepted:o".into(),
            occurred_at: "2026-11-23T10:00:00Z".into(),
            correlation_id: Some("c-1".into()),
            metadata: None,
            payload: OrderRef {
                order_id: "o".into(),
            },
        }
    }

    fn cancelled(reasons: Vec<CancellationReason>) -> TransactWriteItemsError {
        TransactWriteItemsError::TransactionCanceledException(
            TransactionCanceledException::builder()
                .set_cancellation_reasons(Some(reasons))
                .build(),
        )
    }

    fn passed() -> CancellationReason {
        CancellationReason::builder().code("None").build()
    }

    fn failed(item: store::Item) -> CancellationReason {
        CancellationReason::builder()
            .code("ConditionalCheckFailed")
            .set_item(Some(item))
            .build()
    }

    /// The (table, key) of each item of a transaction request.
    fn targets(
        req: &aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsInput,
    ) -> Vec<(String, String)> {
        req.transact_items()
            .iter()
            .filter_map(|i| i.update())
            .map(|u| {
                let key = u.key().get("pk").and_then(|k| k.as_s().ok()).cloned();
                (u.table_name().to_owned(), key.unwrap_or_default())
            })
            .collect()
    }

    /// GetItem of the order answers `order`.
    fn order_read(order: &OrderRecord) -> aws_smithy_mocks::Rule {
        let item = store::to_item(order);
        mock!(aws_sdk_dynamodb::Client::get_item)
            .match_requests(|req| req.table_name() == Some("orders"))
            .then_output(move || {
                GetItemOutput::builder()
                    .set_item(Some(item.clone()))
                    .build()
            })
    }

    /// A transaction of the order and exactly these products succeeds.
    fn packs(skus: &'static [&'static str]) -> aws_smithy_mocks::Rule {
        mock!(aws_sdk_dynamodb::Client::transact_write_items)
            .match_requests(move |req| {
                let mut want = vec![("orders".to_owned(), "order#o".to_owned())];
                want.extend(skus.iter().map(|k| ("catalog".to_owned(), (*k).to_owned())));
                targets(req) == want
            })
            .then_output(|| TransactWriteItemsOutput::builder().build())
    }

    #[tokio::test]
    async fn an_order_is_packed_by_one_transaction_of_the_order_and_its_products() {
        let get = order_read(&accepted(&[line("A", 2), line("B", 1), line("A", 1)]));
        let pack = packs(&["A", "B"]);
        let client = mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&get, &pack]);
        let out = warehouse(client)
            .handle(envelope(), &Message::for_test(""))
            .await
            .unwrap();
        assert_eq!(pack.num_calls(), 1, "one write request for the whole order");
        assert_eq!(out.forward.len(), 1);
        assert_eq!(out.forward[0].queue, "delivery");
    }

    #[tokio::test]
    async fn a_short_product_is_replaced_by_its_substitute_and_the_order_tried_again() {
        let get_order = order_read(&accepted(&[line("A", 2), line("B", 1)]));
        let get_substitute = mock!(aws_sdk_dynamodb::Client::get_item)
            .match_requests(|req| {
                req.table_name() == Some("catalog")
                    && req.key().and_then(|k| k.get("pk")) == Some(&s("C"))
            })
            .then_output(|| {
                GetItemOutput::builder()
                    .set_item(Some(store::to_item(&product("C", None))))
                    .build()
            });
        let short = mock!(aws_sdk_dynamodb::Client::transact_write_items)
            .match_requests(|req| targets(req).iter().any(|(_, k)| k == "A"))
            .then_error(|| {
                cancelled(vec![
                    passed(),
                    failed(store::to_item(&product("A", Some("C")))),
                    passed(),
                ])
            });
        let packed = packs(&["B", "C"]);
        let client = mock_client!(
            aws_sdk_dynamodb,
            RuleMode::MatchAny,
            [&get_order, &get_substitute, &short, &packed]
        );
        let out = warehouse(client)
            .handle(envelope(), &Message::for_test(""))
            .await
            .unwrap();
        assert_eq!((short.num_calls(), packed.num_calls()), (1, 1));
        assert_eq!(get_substitute.num_calls(), 1);
        assert_eq!(out.forward.len(), 1, "the substituted order goes on");
    }

    #[tokio::test]
    async fn an_order_another_attempt_packed_is_forwarded_without_taking_stock_again() {
        let order = accepted(&[line("A", 1)]);
        let mut done = order.clone();
        done.status = OrderStatus::Packed;
        let done_item = store::to_item(&done);
        let get = order_read(&order);
        let pack = mock!(aws_sdk_dynamodb::Client::transact_write_items)
            .then_error(move || cancelled(vec![failed(done_item.clone()), passed()]));
        let client = mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&get, &pack]);
        let out = warehouse(client)
            .handle(envelope(), &Message::for_test(""))
            .await
            .unwrap();
        assert_eq!(pack.num_calls(), 1, "no second attempt");
        assert_eq!(out.forward.len(), 1);
    }

    fn conflict() -> TransactWriteItemsError {
        cancelled(vec![
            passed(),
            CancellationReason::builder()
                .code("TransactionConflict")
                .build(),
        ])
    }

    #[tokio::test]
    async fn a_transaction_conflict_is_tried_again_at_once_then_handed_back_as_contention() {
        let order = accepted(&[line("A", 1)]);
        let get = order_read(&order);
        let conflicted = mock!(aws_sdk_dynamodb::Client::transact_write_items).then_error(conflict);
        let pack = packs(&["A"]);
        let client = mock_client!(
            aws_sdk_dynamodb,
            RuleMode::Sequential,
            [&get, &conflicted, &pack]
        );
        let out = warehouse(client)
            .handle(envelope(), &Message::for_test(""))
            .await
            .unwrap();
        assert_eq!((conflicted.num_calls(), pack.num_calls()), (1, 1));
        assert_eq!(out.forward.len(), 1);

        // A conflict that does not clear is contention, like throttling: the runtime slows down
        // and tries again in place without using an attempt. As a plain transient failure it
        // used the message's attempts, and a flash sale dead-lettered orders it could pack
        // (loadtest --flash-share 50 --stock-shards 8: 11 of 1,500).
        let get = order_read(&order);
        let always = mock!(aws_sdk_dynamodb::Client::transact_write_items).then_error(conflict);
        let client = mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&get, &always]);
        let err = warehouse(client)
            .handle(envelope(), &Message::for_test(""))
            .await
            .unwrap_err();
        assert!(err.is_throttled(), "{err:?}");
        assert_eq!(
            always.num_calls(),
            5,
            "the first attempt and four quick retries"
        );
    }

    #[tokio::test]
    async fn throttling_inside_the_transaction_is_reported_as_throttling() {
        let order = accepted(&[line("A", 1)]);
        let get = order_read(&order);
        let throttled = mock!(aws_sdk_dynamodb::Client::transact_write_items).then_error(|| {
            cancelled(vec![
                CancellationReason::builder()
                    .code("ThrottlingError")
                    .build(),
                CancellationReason::builder().code("None").build(),
            ])
        });
        let client = mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&get, &throttled]);
        let err = warehouse(client)
            .handle(envelope(), &Message::for_test(""))
            .await
            .unwrap_err();
        assert!(err.is_throttled(), "{err:?}");
    }

    #[tokio::test]
    async fn an_order_too_large_for_one_transaction_is_dead_lettered_without_writing() {
        let lines: Vec<RecordLine> = (0..=store::MAX_PRODUCTS_PER_ORDER)
            .map(|i| line(&format!("P{i}"), 1))
            .collect();
        let get = order_read(&accepted(&lines));
        let pack = packs(&[]);
        let client = mock_client!(aws_sdk_dynamodb, RuleMode::MatchAny, [&get, &pack]);
        let err = warehouse(client)
            .handle(envelope(), &Message::for_test(""))
            .await
            .unwrap_err();
        assert!(matches!(err, HandlerError::Permanent { .. }), "{err:?}");
        assert_eq!(err.reason().0, "order_too_large");
        assert_eq!(pack.num_calls(), 0);
    }
}
