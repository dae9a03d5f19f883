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
    /// counts write requests and the write units they cost (`write_units`: 0 for a read, 1 for
    /// a single-item write of an item under 1 KB, [`transaction_units`] for a transaction).
    /// Conditional-check failures are returned as they are, for the caller.
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
                    .with_max_times(CALL_ATTEMPTS - 1)
                    .with_jitter(),
            )
            .when(is_retryable)
            .await
    }
}

/// HTTP requests at most per [`Store::call`]: the first and four retries.
pub const CALL_ATTEMPTS: usize = 5;

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

pub use fleet_common::now_rfc3339;

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
        .call(0, get)
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
        let e = store.call(1, request).await.unwrap_err();
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
