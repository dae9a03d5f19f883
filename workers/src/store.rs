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
use fleet_common::contract::{Address, Money};
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

    /// Runs one DynamoDB request: waits for the rate limiter, retries throttling with backoff,
    /// counts write requests and the write units they cost (`write_units`: 0 for a read, 1 for
    /// a single-item write of an item under 1 KB, [`transaction_units`] for a transaction).
    /// Conditional-check failures are returned as they are, for the caller.
    ///
    /// # Errors
    /// The SDK error after retries.
    pub async fn call<T, E, F, Fut>(
        &self,
        write_units: u32,
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
            if write_units > 0 {
                metrics::counter!("fleet_ddb_write_requests_total", "stage" => self.stage)
                    .increment(1);
                metrics::counter!("fleet_ddb_write_units_total", "stage" => self.stage)
                    .increment(u64::from(write_units));
            }
            request().await
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(25))
                    .with_max_delay(Duration::from_secs(1))
                    .with_max_times(5)
                    .with_jitter(),
            )
            .when(is_throttling)
            .await
    }
}

/// Write units of a TransactWriteItems of `items` items: DynamoDB charges two per item (under
/// 1 KB), for the prepare and the commit.
pub fn transaction_units(items: usize) -> u32 {
    u32::try_from(items.saturating_mul(2)).unwrap_or(u32::MAX)
}

/// The SDK's raw response type, as it appears in `SdkError`.
pub use aws_sdk_dynamodb::config::http::HttpResponse as DynamoResponse;

fn is_throttling<E: ProvideErrorMetadata>(e: &SdkError<E, DynamoResponse>) -> bool {
    matches!(
        e.code(),
        Some(
            "ProvisionedThroughputExceededException"
                | "ThrottlingException"
                | "RequestLimitExceeded"
        )
    )
}

/// A DynamoDB failure as a handler error: transient (the SDK and [`Store::call`] have already
/// retried; SQS visibility gives the next, longer pause). Details go to logs only.
pub fn transient<E>(what: &str, e: &SdkError<E, DynamoResponse>) -> HandlerError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    HandlerError::transient(
        Reason::DOWNSTREAM_UNAVAILABLE,
        format!("{what}: {}", e.code().unwrap_or("request failed")),
    )
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
        .map_err(|e| HandlerError::transient(Reason("corrupt_record"), e.to_string()))
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
    /// `accepted`, `rejected`, `packed` or `unpackable`.
    pub status: String,
    /// Why it was rejected, when it was.
    #[serde(default)]
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
    /// Source of the submission.
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
}

/// Now, RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("now formats")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_optional_fields_are_left_out_of_the_item_not_written_as_null() {
        // `attribute_not_exists(delivery_rank)` fails on a NULL attribute: a packed order
        // written with NULLs could never start awaiting the carrier.
        let mut order = crate::delivery::tests::order(None, &[]);
        order.lines.push(RecordLine {
            sku: "A".into(),
            name: "a".into(),
            quantity: 1,
            unit_price: Money {
                amount_minor: 1,
                currency: fleet_common::contract::Currency::try_from("EUR".to_owned()).unwrap(),
            },
            substituted_for: None,
        });
        order.history.push(HistoryEntry {
            at: now_rfc3339(),
            stage: "orders".into(),
            event: "accepted".into(),
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
}
