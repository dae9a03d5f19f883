//! DynamoDB access shared by the workers: the records, the table names, a rate limiter and
//! throttling backoff in front of every call (threat D-4), and a count of write requests per
//! stage so that the cost of each effect is measured.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use backon::{ExponentialBuilder, Retryable};
use fleet_common::config::FleetConfig;
use fleet_common::contract::{Address, Money, OrderStatus};
use fleet_common::failure::{HandlerError, Reason};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

/// A DynamoDB item.
pub type Item = HashMap<String, AttributeValue>;

/// The tables of the fleet, by role.
#[derive(Debug, Clone)]
pub struct Tables {
    /// Orders: the source of truth (pk `order#<id>`).
    pub orders: String,
    /// Catalog and inventory (pk = sku).
    pub catalog: String,
}

impl Tables {
    /// Reads the table names from the config.
    ///
    /// # Errors
    /// When a table is not configured.
    pub fn from_config(config: &FleetConfig) -> Result<Self, fleet_common::config::ConfigError> {
        Ok(Self {
            orders: config.table("orders")?.name.clone(),
            catalog: config.table("catalog")?.name.clone(),
        })
    }
}

/// DynamoDB for one worker: client, tables, limiter.
#[derive(Clone)]
pub struct Store {
    /// The client.
    pub client: aws_sdk_dynamodb::Client,
    /// The tables.
    pub tables: Tables,
    /// Caps requests per second when configured.
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    /// The stage, for the write counter.
    stage: &'static str,
}

impl Store {
    /// A store for `stage`, limited to `rate` requests per second when given.
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        tables: Tables,
        stage: &'static str,
        rate: Option<NonZeroU32>,
    ) -> Self {
        Self {
            client,
            tables,
            limiter: rate.map(|r| Arc::new(RateLimiter::direct(Quota::per_second(r)))),
            stage,
        }
    }

    /// Runs one DynamoDB request: waits for the rate limiter, retries what is worth retrying
    /// (throttling, a server error, a timeout, a dropped connection) with jittered backoff,
    /// counts write requests and the write units they cost, by purpose (`units`: `None` for a
    /// read; see [`WriteUnits`]). Conditional-check failures are returned as they are, for the
    /// caller.
    ///
    /// This is the only retry layer under a handler (the workers' SDK clients retry nothing,
    /// see `Clients::for_workers`): at most [`CALL_ATTEMPTS`] HTTP requests per call, each
    /// bounded by `aws.attempt_timeout_ms`. Throttling that outlasts them goes back to the
    /// runtime as [`HandlerError::throttled`], which slows the consumer and retries in place.
    ///
    /// # Errors
    /// The SDK error after retries.
    pub async fn call<T, E, F, Fut>(
        &self,
        units: Option<WriteUnits>,
        request: F,
    ) -> Result<T, SdkError<E, DynamoResponse>>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E, DynamoResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let attempt = || async {
            if let Some(limiter) = &self.limiter {
                limiter.until_ready().await;
            }
            if let Some(units) = units {
                metrics::counter!("fleet_ddb_write_requests_total", "stage" => self.stage)
                    .increment(1);
                self.count_units(units);
            }
            request().await
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(25))
                    .with_max_delay(Duration::from_secs(1))
                    .with_max_times(CALL_ATTEMPTS - 1)
                    .with_jitter(),
            )
            .when(is_retryable)
            .await
    }
}

impl Store {
    /// Counts write units spent, by purpose (`fleet_ddb_write_units_total{stage, purpose}`).
    pub fn count_units(&self, units: WriteUnits) {
        for (purpose, n) in units.by_purpose() {
            if n > 0 {
                metrics::counter!("fleet_ddb_write_units_total", "stage" => self.stage, "purpose" => purpose)
                    .increment(u64::from(n));
            }
        }
    }
}

/// The write units one write costs, by what they pay for. DynamoDB charges a single-item write
/// one unit per started KB of the item (for an update, of the larger of the item before and
/// after it), and a transaction twice that per item. Units are split at the margin: `effect`
/// is what the item would cost with only the attributes the effect needs (status, lines,
/// address, stock…), `idempotency` what the exactly-once bookkeeping adds (event id, payload
/// hash, applied carrier events, version), `history` what the order's history adds on top.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteUnits {
    /// Units the effect needs.
    pub effect: u32,
    /// Units the idempotency bookkeeping adds.
    pub idempotency: u32,
    /// Units the history adds.
    pub history: u32,
}

/// DynamoDB's unit of write size.
const WRITE_UNIT_BYTES: usize = 1024;

impl WriteUnits {
    /// A single-item write of `item` (for an update: the item as it will be after it).
    pub fn of_item(item: &Item) -> Self {
        let mut bytes = [0usize; 3];
        for (name, value) in item {
            let slot = match name.as_str() {
                "history" => 2,
                "event_id" | "payload_hash" | "delivery_events" | "version" => 1,
                _ => 0,
            };
            bytes[slot] += name.len() + value_bytes(value);
        }
        let units =
            |b: usize| u32::try_from(b.div_ceil(WRITE_UNIT_BYTES).max(1)).unwrap_or(u32::MAX);
        let effect = units(bytes[0]);
        let with_idempotency = units(bytes[0] + bytes[1]);
        Self {
            effect,
            idempotency: with_idempotency - effect,
            history: units(bytes[0] + bytes[1] + bytes[2]) - with_idempotency,
        }
    }

    /// A single-item write of the order as it will be after it.
    pub fn of_order(after: &OrderRecord) -> Self {
        Self::of_item(&to_item(after))
    }

    /// An update of an order from `before` to `after`: DynamoDB charges the larger item.
    pub fn of_update(before: &OrderRecord, after: &OrderRecord) -> Self {
        let (before, after) = (Self::of_order(before), Self::of_order(after));
        if before.total() > after.total() {
            before
        } else {
            after
        }
    }

    /// One small item's write that is all effect (a stock counter: under 1 KB).
    pub const SMALL_EFFECT: Self = Self {
        effect: 1,
        idempotency: 0,
        history: 0,
    };

    /// The same write inside a transaction: twice the units (prepare and commit).
    #[must_use]
    pub fn transactional(self) -> Self {
        Self {
            effect: self.effect * 2,
            idempotency: self.idempotency * 2,
            history: self.history * 2,
        }
    }

    /// All the units.
    pub fn total(self) -> u32 {
        self.effect + self.idempotency + self.history
    }

    /// The units by purpose label.
    pub fn by_purpose(self) -> [(&'static str, u32); 3] {
        [
            ("effect", self.effect),
            ("idempotency", self.idempotency),
            ("history", self.history),
        ]
    }
}

impl std::ops::Add for WriteUnits {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self {
            effect: self.effect + other.effect,
            idempotency: self.idempotency + other.idempotency,
            history: self.history + other.history,
        }
    }
}

/// The size DynamoDB counts for an attribute value: strings and binaries by length, a number
/// by its significant digits (one byte per two, plus one), booleans and nulls one byte, lists
/// and maps 3 bytes plus one per element (and a map's keys).
fn value_bytes(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(v) => v.len(),
        AttributeValue::N(v) => number_bytes(v),
        AttributeValue::B(v) => v.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::L(items) => 3 + items.iter().map(|v| value_bytes(v) + 1).sum::<usize>(),
        AttributeValue::M(map) => {
            3 + map
                .iter()
                .map(|(k, v)| k.len() + value_bytes(v) + 1)
                .sum::<usize>()
        }
        AttributeValue::Ss(set) => set.iter().map(String::len).sum(),
        AttributeValue::Ns(set) => set.iter().map(|v| number_bytes(v)).sum(),
        AttributeValue::Bs(set) => set.iter().map(|b| b.as_ref().len()).sum(),
        _ => 0,
    }
}

/// A number's size: its significant digits (leading and trailing zeros trimmed), one byte
/// per two, plus one.
fn number_bytes(v: &str) -> usize {
    let digits: String = v.chars().filter(char::is_ascii_digit).collect();
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
    significant.div_ceil(2) + 1
}

/// HTTP requests at most per [`Store::call`]: the first and four retries.
pub const CALL_ATTEMPTS: usize = 5;

/// The SDK's raw response type, as it appears in `SdkError`.
pub use aws_sdk_dynamodb::config::http::HttpResponse as DynamoResponse;

fn is_throttling<E: ProvideErrorMetadata>(e: &SdkError<E, DynamoResponse>) -> bool {
    matches!(
        e.code(),
        Some(
            "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded"
                // A single write that met a transaction under way on its item: contention,
                // retried and slowed down like throttling.
                | "TransactionConflictException"
        )
    )
}

/// Worth another attempt: throttling, a server error, a timeout, a dropped connection or an
/// unreadable answer. A conditional-check failure, a validation error or a denial is not.
fn is_retryable<E: ProvideErrorMetadata>(e: &SdkError<E, DynamoResponse>) -> bool {
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => {
            is_throttling(e)
                || s.raw().status().is_server_error()
                || matches!(
                    e.code(),
                    Some(
                        "InternalServerError"
                            | "ServiceUnavailable"
                            | "TransactionInProgressException"
                    )
                )
        }
        _ => false,
    }
}

/// A throttling cancellation reason inside a TransactionCanceledException.
pub fn is_throttling_reason(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("ThrottlingError" | "ProvisionedThroughputExceeded" | "RequestLimitExceeded")
    )
}

/// A DynamoDB failure (other than a conditional-check failure, which callers read themselves)
/// as a handler error, classified: throttling is [`HandlerError::throttled`]; a request
/// DynamoDB refuses as invalid (an item over 400 KB among them), a denied request and a missing
/// table are permanent, each with its reason, since sending it again cannot help; the rest
/// (timeouts, server errors, dropped connections) is transient. Details go to logs only.
pub fn failure<E>(what: &str, e: &SdkError<E, DynamoResponse>) -> HandlerError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = e.code().unwrap_or("request failed");
    let detail = format!("{what}: {code}");
    if is_throttling(e) {
        return HandlerError::throttled(detail);
    }
    match (e, e.code()) {
        (SdkError::TimeoutError(_), _) => {
            HandlerError::transient(Reason::DOWNSTREAM_TIMEOUT, format!("{what}: timed out"))
        }
        (_, Some("ValidationException")) => {
            let message = e.message().unwrap_or_default().to_ascii_lowercase();
            if message.contains("item size") || message.contains("size has exceeded") {
                HandlerError::permanent(Reason::ITEM_TOO_LARGE, detail)
            } else {
                HandlerError::permanent(Reason::INVALID_REQUEST, detail)
            }
        }
        (_, Some("AccessDeniedException")) => {
            HandlerError::permanent(Reason::ACCESS_DENIED, detail)
        }
        (_, Some("ResourceNotFoundException")) => {
            HandlerError::permanent(Reason::TABLE_NOT_FOUND, detail)
        }
        _ => HandlerError::transient(Reason::DOWNSTREAM_UNAVAILABLE, detail),
    }
}

/// The item of a conditional-check failure (ReturnValuesOnConditionCheckFailure = ALL_OLD),
/// or `None` when the error is something else.
pub fn condition_failed_item<E>(e: &SdkError<E, DynamoResponse>) -> Option<Item>
where
    E: ProvideErrorMetadata + 'static,
    E: ConditionalFailure,
{
    e.as_service_error().and_then(ConditionalFailure::old_item)
}

/// Errors that may be a conditional-check failure carrying the old item.
pub trait ConditionalFailure {
    /// `Some(old item)` (possibly empty) for a conditional-check failure.
    fn old_item(&self) -> Option<Item>;
}

impl ConditionalFailure for aws_sdk_dynamodb::operation::put_item::PutItemError {
    fn old_item(&self) -> Option<Item> {
        match self {
            Self::ConditionalCheckFailedException(c) => Some(c.item().cloned().unwrap_or_default()),
            _ => None,
        }
    }
}

impl ConditionalFailure for aws_sdk_dynamodb::operation::update_item::UpdateItemError {
    fn old_item(&self) -> Option<Item> {
        match self {
            Self::ConditionalCheckFailedException(c) => Some(c.item().cloned().unwrap_or_default()),
            _ => None,
        }
    }
}

/// A string attribute.
pub fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// A number attribute.
pub fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// Converts a record to an item.
pub fn to_item<T: Serialize>(value: &T) -> Item {
    serde_dynamo::to_item(value).expect("records serialize to items")
}

/// Converts an item to a record.
///
/// # Errors
/// When the item does not have the record's shape.
pub fn from_item<T: for<'de> Deserialize<'de>>(item: Item) -> Result<T, HandlerError> {
    serde_dynamo::from_item(item)
        .map_err(|e| HandlerError::transient(Reason::CORRUPT_RECORD, e.to_string()))
}

/// The key of an order.
pub fn order_key(order_id: &str) -> String {
    format!("order#{order_id}")
}

/// The order record: the source of truth for an order. Holds personal data (address, e-mail)
/// at rest (encrypted); never logged.
///
/// An absent optional field is left out of the item, never written as DynamoDB NULL: the
/// stages' conditions test `attribute_not_exists(...)`, which a NULL attribute fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// `order#<id>`.
    pub pk: String,
    /// The order's id.
    pub order_id: String,
    /// The customer.
    pub user_id: String,
    /// Where the order stands.
    pub status: OrderStatus,
    /// Why it was rejected, when it was (left out of the item when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejection_reasons: Vec<String>,
    /// The lines as they stand (replicated from the catalog; modified by packing).
    pub lines: Vec<RecordLine>,
    /// Replicated delivery address.
    pub delivery_address: Address,
    /// Customer e-mail, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The payment provider's reference.
    pub payment_reference: String,
    /// The flow's correlation id.
    pub correlation_id: String,
    /// The submitting event's id (idempotency).
    pub event_id: String,
    /// Fingerprint of the submitted payload (conflict detection).
    pub payload_hash: String,
    /// Source of the submission (R-2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What happened to the order, in order.
    pub history: Vec<HistoryEntry>,
    /// Where the shipment is, once packed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_status: Option<String>,
    /// Rank of `delivery_status`; a status never replaces a higher one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_rank: Option<u8>,
    /// Carrier events applied, by event id (idempotency of delivery updates).
    #[serde(default)]
    pub delivery_events: BTreeMap<String, String>,
    /// Bumped on every change.
    pub version: u32,
}

/// A line of an order record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordLine {
    /// The product shipped.
    pub sku: String,
    /// Its name at the time of the order.
    pub name: String,
    /// How many.
    pub quantity: u32,
    /// Price per unit at the time of the order.
    pub unit_price: Money,
    /// The product this line replaced, when substituted at packing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substituted_for: Option<String>,
    /// How many items the product's stock is split over (a hot product's, see
    /// [`stock_item`]), as the catalog said when the line was recorded; absent: one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stock_shards: Option<u32>,
}

/// One entry of an order's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When, RFC 3339.
    pub at: String,
    /// The stage that wrote it.
    pub stage: String,
    /// What happened (`accepted`, `line_substituted`, `in_transit`…).
    pub event: String,
    /// Details (ids and codes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The event that caused it.
    pub event_id: String,
}

/// A product in the catalog, with its stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// The sku.
    pub pk: String,
    /// Display name.
    pub name: String,
    /// Current price.
    pub price: Money,
    /// Units available to reserve.
    pub stock: u64,
    /// A product that may replace this one when it is out of stock.
    #[serde(default)]
    pub substitute: Option<String>,
    /// A hot product's stock is split over this many items, this one and
    /// [`stock_item`]`(pk, 1..shards)`, so that no single item takes every order's write
    /// (DynamoDB takes at most 1,000 write units a second on one item). Absent: one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
}

/// The most items one product's stock may be split over.
pub const MAX_STOCK_SHARDS: u32 = 64;

/// The key of a product's stock shard `shard`: the product's own item for shard 0, else
/// `<sku>#s<shard>` (an item holding only `pk` and `stock`).
pub fn stock_item(sku: &str, shard: u32) -> String {
    if shard == 0 {
        sku.to_owned()
    } else {
        format!("{sku}#s{shard}")
    }
}

/// The product a stock item belongs to, and the shard: the inverse of [`stock_item`].
pub fn stock_item_owner(key: &str) -> (&str, u32) {
    match key.rsplit_once("#s") {
        Some((sku, shard)) => match shard.parse() {
            Ok(n) if n > 0 => (sku, n),
            _ => (key, 0),
        },
        None => (key, 0),
    }
}

/// Now, RFC 3339 to the millisecond: history times are stored in every order item, and
/// nanoseconds would add six bytes per entry to every later write of it.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_millisecond(now.millisecond())
        .expect("a millisecond of now is valid")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("now formats")
}

/// The most products one order can take stock from: a TransactWriteItems holds 100 items, the
/// order and one per product. The orders stage rejects larger orders.
pub const MAX_PRODUCTS_PER_ORDER: usize = 99;

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
            .key("pk", s(order_key(order_id)))
            .consistent_read(true)
            .send()
    };
    let out = store
        .call(None, get)
        .await
        .map_err(|e| failure("reading the order", &e))?;
    out.item().cloned().map(from_item).transpose()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fleet_common::faults::FaultPlan;

    /// A delivery address for tests.
    pub(crate) fn address() -> Address {
        Address {
            name: "n".into(),
            line1: "l".into(),
            line2: None,
            city: "c".into(),
            postal_code: "p".into(),
            country: "FR".into(),
            phone: None,
        }
    }

    /// A packed order `o` with no lines, not yet with the carrier: the fixture every handler's
    /// tests start from.
    pub(crate) fn packed_order() -> OrderRecord {
        OrderRecord {
            pk: "order#o".into(),
            order_id: "o".into(),
            user_id: "u".into(),
            status: OrderStatus::Packed,
            rejection_reasons: vec![],
            lines: vec![],
            delivery_address: address(),
            email: None,
            payment_reference: "p".into(),
            correlation_id: "c".into(),
            event_id: "e".into(),
            payload_hash: "h".into(),
            source: None,
            history: vec![],
            delivery_status: None,
            delivery_rank: None,
            delivery_events: Default::default(),
            version: 1,
        }
    }

    #[test]
    fn absent_optional_fields_are_left_out_of_the_item_not_written_as_null() {
        // `attribute_not_exists(delivery_rank)` fails on a NULL attribute: a packed order
        // written with NULLs could never start awaiting the carrier.
        let mut order = packed_order();
        order.lines.push(RecordLine {
            sku: "A".into(),
            name: "a".into(),
            quantity: 1,
            unit_price: Money {
                amount_minor: 1,
                currency: fleet_common::contract::Currency::try_from("EUR".to_owned()).unwrap(),
            },
            substituted_for: None,
            stock_shards: None,
        });
        order.history.push(HistoryEntry {
            at: now_rfc3339(),
            stage: "orders".into(),
            event: OrderStatus::Accepted.as_str().into(),
            note: None,
            event_id: "e".into(),
        });
        let item = to_item(&order);
        for field in ["delivery_rank", "delivery_status", "email", "source"] {
            assert!(
                !item.contains_key(field),
                "{field} written: {:?}",
                item.get(field)
            );
        }
        let nulls = format!("{item:?}");
        assert!(!nulls.contains("Null("), "no NULL anywhere: {nulls}");
        let back: OrderRecord = from_item(item).unwrap();
        assert_eq!(back, order, "the record reads back unchanged");
    }

    #[test]
    fn item_sizes_follow_dynamodbs_rules() {
        // Examples from DynamoDB's "Item sizes and formats": names count, strings by UTF-8
        // length, a number by its significant digits, containers 3 bytes plus 1 per element.
        let item: Item = HashMap::from([
            ("pk".to_owned(), s("abc")),                              // 2 + 3
            ("n".to_owned(), n(12345)),                               // 1 + 3 + 1
            ("é".to_owned(), AttributeValue::Bool(true)),             // 2 + 1
            ("l".to_owned(), AttributeValue::L(vec![s("ab"), n(7)])), // 1 + 3 + (2+1) + (2+1)
        ]);
        let bytes: usize = item.iter().map(|(k, v)| k.len() + value_bytes(v)).sum();
        assert_eq!(bytes, 5 + 5 + 3 + 10);
        assert_eq!(number_bytes("-0.00123"), 3);
        assert_eq!(number_bytes("1000"), 2, "trailing zeros are trimmed too");
    }

    #[test]
    fn write_units_are_split_at_the_margin_by_purpose() {
        let mut order = packed_order();
        // Small: one unit, all of it the effect's.
        let small = WriteUnits::of_order(&order);
        assert_eq!(
            small,
            WriteUnits {
                effect: 1,
                idempotency: 0,
                history: 0
            }
        );
        assert_eq!(small.transactional().total(), 2, "a transaction pays twice");
        // A history that takes the item past 1 KB: the second unit is the history's.
        for i in 0..12 {
            order.history.push(HistoryEntry {
                at: now_rfc3339(),
                stage: "delivery".into(),
                event: "in_transit".into(),
                note: None,
                event_id: format!("carrier:event-{i:04}"),
            });
        }
        let bytes = to_item(&order)
            .iter()
            .map(|(k, v)| k.len() + value_bytes(v))
            .sum::<usize>();
        assert!((1025..=2048).contains(&bytes), "{bytes}");
        assert_eq!(
            WriteUnits::of_order(&order),
            WriteUnits {
                effect: 1,
                idempotency: 0,
                history: 1
            }
        );
        // A long payload hash takes it past 1 KB before the history: the idempotency's unit.
        order.history.clear();
        order.payload_hash = "h".repeat(1100);
        assert_eq!(
            WriteUnits::of_order(&order),
            WriteUnits {
                effect: 1,
                idempotency: 1,
                history: 0
            }
        );
    }

    #[test]
    fn history_times_are_kept_to_the_millisecond() {
        let at = now_rfc3339();
        let fraction = at
            .split('.')
            .nth(1)
            .map_or(0, |f| f.trim_end_matches('Z').len());
        assert!(fraction <= 3, "{at}");
        assert!(
            time::OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
    }

    /// A store on worker clients whose every DynamoDB request meets `faults` (nothing listens
    /// on the endpoint: every request the plan lets through would fail to connect).
    async fn faulty_store(faults: &str, attempt_timeout_ms: u64) -> (Store, FaultPlan) {
        let plan = FaultPlan::parse(faults).unwrap();
        let aws = fleet_common::config::AwsConfig {
            region: Some("us-east-1".into()),
            sqs_endpoint_url: Some("http://127.0.0.1:9".into()),
            dynamodb_endpoint_url: Some("http://127.0.0.1:9".into()),
            attempt_timeout_ms,
            ..Default::default()
        };
        let clients = fleet_common::aws::Clients::for_workers(&aws, Some(&plan))
            .await
            .unwrap();
        let tables = Tables {
            orders: "o".into(),
            catalog: "c".into(),
        };
        (Store::new(clients.dynamodb, tables, "orders", None), plan)
    }

    async fn put(store: &Store) -> HandlerError {
        let request = || {
            store
                .client
                .put_item()
                .table_name(&store.tables.orders)
                .item("pk", s("order#o"))
                .send()
        };
        let e = store
            .call(Some(WriteUnits::SMALL_EFFECT), request)
            .await
            .unwrap_err();
        failure("writing the order", &e)
    }

    #[tokio::test]
    async fn one_retry_layer_five_requests_at_most_per_call() {
        // The SDK's own retries are off under the store's: a failing call is sent
        // CALL_ATTEMPTS times, not 3 × 5.
        let (store, plan) = faulty_store("dynamodb:*:error:1", 1_000).await;
        let e = put(&store).await;
        assert_eq!(e.reason(), Reason::DOWNSTREAM_UNAVAILABLE);
        assert!(matches!(e, HandlerError::Transient { .. }));
        assert_eq!(
            plan.injected().values().sum::<u64>(),
            CALL_ATTEMPTS as u64,
            "{:?}",
            plan.injected()
        );
    }

    #[tokio::test]
    async fn a_hung_call_ends_at_its_deadline_as_a_transient_timeout() {
        let (store, plan) = faulty_store("dynamodb:*:hang:1", 200).await;
        let started = std::time::Instant::now();
        let e = put(&store).await;
        assert_eq!(e.reason(), Reason::DOWNSTREAM_TIMEOUT, "{e}");
        assert_eq!(plan.injected().values().sum::<u64>(), CALL_ATTEMPTS as u64);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn throttling_that_outlasts_the_retries_is_reported_as_throttling() {
        let (store, plan) = faulty_store("dynamodb:*:throttle:1", 1_000).await;
        let e = put(&store).await;
        assert!(e.is_throttled(), "{e}");
        assert_eq!(plan.injected().values().sum::<u64>(), CALL_ATTEMPTS as u64);
    }

    fn rejected_with(code: &'static str, message: &'static str) -> aws_sdk_dynamodb::Client {
        let rule = aws_smithy_mocks::mock!(aws_sdk_dynamodb::Client::put_item).then_http_response(
            move || {
                aws_smithy_runtime_api::http::Response::new(
                    aws_smithy_runtime_api::http::StatusCode::try_from(400).unwrap(),
                    aws_smithy_types::body::SdkBody::from(format!(
                        r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{code}","message":"{message}"}}"#
                    )),
                )
            },
        );
        aws_smithy_mocks::mock_client!(
            aws_sdk_dynamodb,
            aws_smithy_mocks::RuleMode::MatchAny,
            [&rule]
        )
    }

    #[tokio::test]
    async fn requests_dynamodb_refuses_are_permanent_with_their_own_reasons() {
        let cases = [
            (
                "ValidationException",
                "Item size has exceeded the maximum allowed size",
                Reason::ITEM_TOO_LARGE,
            ),
            (
                "ValidationException",
                "One or more parameter values were invalid",
                Reason::INVALID_REQUEST,
            ),
            (
                "AccessDeniedException",
                "not authorized to perform: dynamodb:PutItem",
                Reason::ACCESS_DENIED,
            ),
            (
                "ResourceNotFoundException",
                "Requested resource not found",
                Reason::TABLE_NOT_FOUND,
            ),
        ];
        for (code, message, reason) in cases {
            let store = Store::new(
                rejected_with(code, message),
                Tables {
                    orders: "o".into(),
                    catalog: "c".into(),
                },
                "orders",
                None,
            );
            let e = put(&store).await;
            assert!(matches!(e, HandlerError::Permanent { .. }), "{code}: {e}");
            assert_eq!(e.reason(), reason, "{code}");
        }
    }
}
