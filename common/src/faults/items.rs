//! Faults decided by the items a DynamoDB write touches, not by a dice roll: the partition limit
//! (`item_limit=UNITS`: one item takes at most UNITS write units a second, as DynamoDB caps one
//! partition at 1,000) and transaction conflicts (`conflict`: a transaction that meets another
//! request on one of its items while that request is under way is cancelled, as DynamoDB does).
//! Both are read from the requests' own keys, so a flash sale on one product meets them where
//! real DynamoDB would: on that product's item.
//!
//! Keys are taken from `Key` (UpdateItem, DeleteItem, and their forms inside a transaction) or
//! from the `pk`/`sk` attributes of `Item` (PutItem): the fleet's tables are keyed on those.
//! Units: one per write of an item under 1 KB (by the size of the JSON sent), doubled inside a
//! transaction; a condition check takes no write units but does meet conflicts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One item a write request touches, and what it costs.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Touch {
    /// `table/key`, the key as canonical JSON.
    pub key: String,
    /// Write units charged to the item (0 for a condition check).
    pub units: f64,
}

/// The items a DynamoDB request writes (or checks, in a transaction), in request order; empty
/// for reads and for requests this does not model (BatchWriteItem).
pub(super) fn touches(operation: &str, body: &serde_json::Value) -> Vec<Touch> {
    let single = |table: Option<&serde_json::Value>,
                  key: Option<serde_json::Value>,
                  units: f64|
     -> Option<Touch> {
        Some(Touch {
            key: format!("{}/{}", table?.as_str()?, key?),
            units,
        })
    };
    match operation {
        "PutItem" | "UpdateItem" | "DeleteItem" => single(
            body.get("TableName"),
            key_of(body),
            size_units(body.get("Item")),
        )
        .into_iter()
        .collect(),
        "TransactWriteItems" => body
            .get("TransactItems")
            .and_then(|t| t.as_array())
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| {
                        let (kind, inner) = item.as_object()?.iter().next()?;
                        let units = match kind.as_str() {
                            "ConditionCheck" => 0.0,
                            _ => 2.0 * size_units(inner.get("Item")),
                        };
                        single(inner.get("TableName"), key_of(inner), units)
                    })
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The key of a write: `Key`, or the `pk`/`sk` attributes of `Item`.
fn key_of(request: &serde_json::Value) -> Option<serde_json::Value> {
    if let Some(key) = request.get("Key") {
        return Some(key.clone());
    }
    let item = request.get("Item")?.as_object()?;
    let key: serde_json::Map<String, serde_json::Value> = ["pk", "sk"]
        .iter()
        .filter_map(|k| Some(((*k).to_owned(), item.get(*k)?.clone())))
        .collect();
    (!key.is_empty()).then_some(serde_json::Value::Object(key))
}

/// Write units of an item by the size of its JSON (1 per started KB, at least 1).
fn size_units(item: Option<&serde_json::Value>) -> f64 {
    let bytes = item.map_or(0, |i| i.to_string().len());
    bytes.div_ceil(1024).max(1) as f64
}

/// A token bucket per item: `limit` units a second, holding at most one second's worth.
#[derive(Debug, Default)]
pub(super) struct ItemBuckets {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl ItemBuckets {
    /// Takes every touch's units if every item has them, and returns `None`; otherwise takes
    /// nothing (a throttled request consumes no capacity) and returns the index of the first
    /// item over its limit.
    pub(super) fn take(&self, limit: f64, touches: &[Touch]) -> Option<usize> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("item buckets lock");
        // Units per item over the whole request (an item named twice pays twice).
        let mut wanted: HashMap<&str, f64> = HashMap::new();
        for t in touches {
            *wanted.entry(t.key.as_str()).or_default() += t.units;
        }
        // A bucket holds a second's worth, or one request's worth when a request costs more
        // (a large item, or a transaction's two units at a limit under two): it passes when
        // the bucket is full, as DynamoDB lets a large write through at the limit.
        let mut level = |key: &str, want: f64| {
            let cap = limit.max(want);
            let (tokens, at) = buckets.entry(key.to_owned()).or_insert((cap, now));
            *tokens = (*tokens + limit * now.duration_since(*at).as_secs_f64()).min(cap);
            *at = now;
            *tokens
        };
        if let Some(i) = touches.iter().position(|t| {
            let want = wanted[t.key.as_str()];
            t.units > 0.0 && level(&t.key, want) < want
        }) {
            return Some(i);
        }
        for (key, units) in wanted {
            if let Some((tokens, _)) = buckets.get_mut(key) {
                *tokens -= units;
            }
        }
        None
    }
}

/// Requests under way, by item: transactions and single writes.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    items: Arc<Mutex<HashMap<String, (u32, u32)>>>,
}

/// Holds a request's items as under way until dropped (the answer came, or the call was
/// abandoned).
#[derive(Debug)]
pub(super) struct Held {
    items: Arc<Mutex<HashMap<String, (u32, u32)>>>,
    keys: Vec<String>,
    transaction: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut items = self.items.lock().expect("in-flight lock");
        for key in &self.keys {
            if let Some(entry) = items.get_mut(key) {
                if self.transaction {
                    entry.0 -= 1;
                } else {
                    entry.1 -= 1;
                }
                if *entry == (0, 0) {
                    items.remove(key);
                }
            }
        }
    }
}

impl InFlight {
    /// Registers a request on its items, or returns the index of the first item it conflicts
    /// on: a transaction conflicts with any request under way on one of its items, a single
    /// write with a transaction under way on its item (single writes of one item are applied
    /// one after the other).
    pub(super) fn enter(&self, touches: &[Touch], transaction: bool) -> Result<Held, usize> {
        let mut items = self.items.lock().expect("in-flight lock");
        let clash = touches.iter().position(|t| {
            items.get(&t.key).is_some_and(|&(transactions, singles)| {
                transactions > 0 || (transaction && singles > 0)
            })
        });
        if let Some(i) = clash {
            return Err(i);
        }
        let mut keys: Vec<String> = touches.iter().map(|t| t.key.clone()).collect();
        keys.sort();
        keys.dedup();
        for key in &keys {
            let entry = items.entry(key.clone()).or_default();
            if transaction {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
        Ok(Held {
            items: Arc::clone(&self.items),
            keys,
            transaction,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn transaction(order: &str, skus: &[&str]) -> serde_json::Value {
        let mut items = vec![
            json!({"Update": {"TableName": "orders", "Key": {"pk": {"S": order}}, "UpdateExpression": "SET x = :x"}}),
        ];
        items.extend(skus.iter().map(|sku| {
            json!({"Update": {"TableName": "catalog", "Key": {"pk": {"S": sku}}, "UpdateExpression": "SET stock = stock - :q"}})
        }));
        json!({ "TransactItems": items })
    }

    #[test]
    fn writes_are_read_from_keys_and_items_and_transactions_cost_double() {
        let t = touches("TransactWriteItems", &transaction("order#1", &["HOT", "B"]));
        assert_eq!(t.len(), 3);
        assert_eq!(t[1].key, r#"catalog/{"pk":{"S":"HOT"}}"#);
        assert!(t.iter().all(|t| t.units == 2.0));
        let put = json!({"TableName": "orders", "Item": {"pk": {"S": "order#9"}, "blob": {"S": "x".repeat(3000)}}});
        let t = touches("PutItem", &put);
        assert_eq!(t[0].key, r#"orders/{"pk":{"S":"order#9"}}"#);
        assert_eq!(t[0].units, 3.0, "3 KB cost three units");
        assert!(touches("GetItem", &put).is_empty());
        let check = json!({"TransactItems": [{"ConditionCheck": {"TableName": "t", "Key": {"pk": {"S": "a"}}}}]});
        assert_eq!(touches("TransactWriteItems", &check)[0].units, 0.0);
    }

    #[test]
    fn an_item_takes_its_limit_a_second_and_a_throttled_request_takes_nothing() {
        let buckets = ItemBuckets::default();
        let order = |i: usize, sku: &str| {
            touches(
                "TransactWriteItems",
                &transaction(&format!("order#{i}"), &[sku]),
            )
        };
        // 10 units a second: five transactions of 2 units each on the hot item, then throttled.
        for i in 0..5 {
            assert_eq!(buckets.take(10.0, &order(i, "HOT")), None);
        }
        assert_eq!(
            buckets.take(10.0, &order(5, "HOT")),
            Some(1),
            "the hot item is the one throttled"
        );
        // The throttled request took nothing from its order's item, and other products are not
        // held back by the hot one.
        for _ in 0..5 {
            assert_eq!(buckets.take(10.0, &order(5, "COLD")), None);
        }
        assert_eq!(buckets.take(10.0, &order(5, "COLD")), Some(0));
        // A request over a second's worth passes once the bucket is full.
        let big = ItemBuckets::default();
        let costly = order(7, "BIG");
        assert_eq!(big.take(1.0, &costly), None);
        assert_eq!(big.take(1.0, &order(8, "BIG")), Some(1));
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert_eq!(
            buckets.take(10.0, &order(6, "HOT")),
            None,
            "refilled at the limit's rate"
        );
    }

    #[test]
    fn a_transaction_conflicts_with_anything_under_way_on_its_items_until_that_ends() {
        let in_flight = InFlight::default();
        let a = touches("TransactWriteItems", &transaction("order#1", &["HOT", "A"]));
        let b = touches("TransactWriteItems", &transaction("order#1", &["B", "HOT"]));
        let held = in_flight.enter(&a, true).unwrap();
        assert_eq!(
            in_flight.enter(&b, true).unwrap_err(),
            0,
            "same order item first"
        );
        let c = touches("TransactWriteItems", &transaction("order#3", &["C"]))
            .into_iter()
            .skip(1)
            .collect::<Vec<_>>();
        let other = in_flight.enter(&c, true).expect("no shared item");
        let single = touches(
            "UpdateItem",
            &json!({"TableName": "catalog", "Key": {"pk": {"S": "HOT"}}}),
        );
        assert_eq!(in_flight.enter(&single, false).unwrap_err(), 0);
        drop(held);
        let s1 = in_flight
            .enter(&single, false)
            .expect("the transaction ended");
        let _s2 = in_flight
            .enter(&single, false)
            .expect("single writes of one item queue, they do not conflict");
        assert!(
            in_flight.enter(&a[1..], true).is_err(),
            "a transaction meets the single write"
        );
        drop((s1, _s2, other));
        assert!(in_flight.enter(&a, true).is_ok());
    }
}
