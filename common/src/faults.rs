//! Fault injection: the faults SQS and DynamoDB can produce, on demand, for the end-to-end tests,
//! the chaos run and `loadtest`. Never against real AWS: [`crate::aws::Clients::for_workers`]
//! installs a plan only when every endpoint is on loopback, and the `worker` binary refuses to
//! start with `FLEET_FAULTS` set otherwise.
//!
//! The plan wraps the SDK's HTTP client: the SDK builds, signs and parses requests as usual, and
//! the wrapper decides per request whether the emulator sees it. A throttled, failed or reset
//! request never reaches the emulator (its effect is not applied, as on AWS); a lost response
//! reaches it (the effect is applied) and then the connection fails, so the caller cannot know.
//!
//! A plan is a list of rules separated by `;`, each
//! `SERVICE:OPERATION:FAULT:RATE[:queue=SUBSTRING][:burst=ON/PERIOD]`:
//!
//! ```text
//! FLEET_FAULTS="dynamodb:*:throttle:0.3:burst=2s/10s; sqs:SendMessageBatch:fail_entries:0.2:queue=orders"
//! ```
//!
//! - `SERVICE`: `sqs`, `dynamodb` or `*`; `OPERATION`: an API name (`PutItem`,
//!   `TransactWriteItems`, `ReceiveMessage`…) or `*`.
//! - `FAULT`: `throttle` (DynamoDB `ProvisionedThroughputExceededException`, inside a
//!   `TransactWriteItems` a `TransactionCanceledException` with `ThrottlingError` reasons; SQS
//!   `RequestThrottled`), `error` (HTTP 500), `reset` (the connection drops before the request
//!   is sent), `lost_response` (sent and applied, then the connection drops), `slow=DURATION`
//!   (the request waits that long first), `hang` (no answer ever: only a timeout ends it),
//!   `fail_entries` (SQS batch calls: each entry fails with probability `RATE`, the others are
//!   sent: a partial batch failure).
//! - `item_limit=UNITS` (DynamoDB writes): each item takes at most UNITS write units a second,
//!   a scaled-down partition limit (DynamoDB's is 1,000: `item_limit=50` makes a hot item show
//!   at a twentieth of the load); a write over it is throttled as above, inside a transaction
//!   with the `ThrottlingError` on the hot item's position. `conflict` (DynamoDB writes): a
//!   transaction that meets another request under way on one of its items is cancelled
//!   (`TransactionConflict`), and a single write that meets a transaction under way gets
//!   `TransactionConflictException`. Both are decided by the request's keys
//!   ([`items`]), `RATE` being the probability that an item over its limit or a clash is
//!   reported.
//! - `RATE`: the probability, 0–1, that a matching request gets the fault.
//! - `queue=SUBSTRING`: SQS only, requests whose queue URL contains it.
//! - `burst=ON/PERIOD`: the rule is active for the first `ON` of every `PERIOD` (e.g. `2s/10s`).
//!
//! Every injected fault is counted ([`FaultPlan::injected`], and the metric
//! `fleet_faults_injected_total{service,operation,fault}`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use rand::Rng;

mod items;

/// The environment variable that holds a fault plan for the `worker` binary and `loadtest`.
pub const FAULTS_ENV: &str = "FLEET_FAULTS";

/// What a rule does to a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// A throttling error; the request is not sent.
    Throttle,
    /// HTTP 500; the request is not sent.
    ServerError,
    /// The connection fails before the request is sent.
    Reset,
    /// The request is sent (and applied), then the connection fails.
    LostResponse,
    /// The request waits this long, then is sent.
    Slow(Duration),
    /// No answer, ever.
    Hang,
    /// Entries of an SQS batch call fail one by one, with the rule's rate.
    FailEntries,
    /// DynamoDB writes: each item takes at most this many write units a second.
    ItemLimit(f64),
    /// DynamoDB writes: a transaction that meets another request on one of its items is
    /// cancelled, a single write that meets a transaction fails.
    Conflict,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Self::Throttle => "throttle",
            Self::ServerError => "error",
            Self::Reset => "reset",
            Self::LostResponse => "lost_response",
            Self::Slow(_) => "slow",
            Self::Hang => "hang",
            Self::FailEntries => "fail_entries",
            Self::ItemLimit(_) => "item_limit",
            Self::Conflict => "conflict",
        }
    }

    /// Decided by the items a request touches, not by a dice roll per request.
    fn by_item(self) -> bool {
        matches!(self, Self::ItemLimit(_) | Self::Conflict)
    }
}

/// One rule of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// `sqs`, `dynamodb`, or `None` for both.
    pub service: Option<String>,
    /// The API operation, or `None` for every one.
    pub operation: Option<String>,
    /// The fault.
    pub fault: Fault,
    /// Probability per matching request (per entry for `fail_entries`).
    pub rate: f64,
    /// SQS: only requests whose queue URL contains this.
    pub queue: Option<String>,
    /// Active for the first `.0` of every `.1`.
    pub burst: Option<(Duration, Duration)>,
}

/// A set of rules and what they injected so far.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    rules: Vec<FaultRule>,
    started: Option<Instant>,
    injected: Arc<Mutex<BTreeMap<String, u64>>>,
    buckets: Arc<items::ItemBuckets>,
    in_flight: Arc<items::InFlight>,
}

/// A plan that cannot be parsed, with what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("fault plan rule `{rule}`: {problem} (form: SERVICE:OPERATION:FAULT:RATE[:queue=Q][:burst=ON/PERIOD])")]
pub struct FaultPlanError {
    rule: String,
    problem: String,
}

impl FaultPlan {
    /// Parses a plan (see the module documentation). An empty text is an empty plan.
    ///
    /// # Errors
    /// The first rule that does not parse, and why.
    pub fn parse(text: &str) -> Result<Self, FaultPlanError> {
        let mut rules = Vec::new();
        for rule in text.split(';').map(str::trim).filter(|r| !r.is_empty()) {
            rules.push(parse_rule(rule).map_err(|problem| FaultPlanError {
                rule: rule.to_owned(),
                problem,
            })?);
        }
        Ok(Self {
            rules,
            started: Some(Instant::now()),
            ..Self::default()
        })
    }

    /// The plan in `FLEET_FAULTS`, if set and not empty.
    ///
    /// # Errors
    /// When the variable does not parse.
    pub fn from_env() -> Result<Option<Self>, FaultPlanError> {
        match std::env::var(FAULTS_ENV) {
            Ok(text) if !text.trim().is_empty() => Self::parse(&text).map(Some),
            _ => Ok(None),
        }
    }

    /// The rules.
    pub fn rules(&self) -> &[FaultRule] {
        &self.rules
    }

    /// Faults injected so far, by `service.Operation.fault`.
    pub fn injected(&self) -> BTreeMap<String, u64> {
        self.injected.lock().expect("fault counter lock").clone()
    }

    /// Wraps `inner` so that requests of `service` meet this plan's faults.
    pub fn wrap(&self, service: &'static str, inner: SharedHttpClient) -> SharedHttpClient {
        SharedHttpClient::new(FaultyClient {
            service,
            inner,
            plan: self.clone(),
        })
    }

    fn count(&self, service: &'static str, operation: &str, fault: Fault, n: u64) {
        tracing::info!(
            service,
            operation,
            fault = fault.name(),
            count = n,
            "fault injected"
        );
        metrics::counter!("fleet_faults_injected_total", "service" => service, "operation" => operation.to_owned(), "fault" => fault.name())
            .increment(n);
        *self
            .injected
            .lock()
            .expect("fault counter lock")
            .entry(format!("{service}.{operation}.{}", fault.name()))
            .or_default() += n;
    }

    /// Whether `rule` applies to this request now (its dice not rolled yet).
    fn applies(
        &self,
        rule: &FaultRule,
        service: &str,
        operation: &str,
        queue_url: Option<&str>,
    ) -> bool {
        let elapsed = self.started.map(|s| s.elapsed()).unwrap_or_default();
        rule.service.as_deref().is_none_or(|s| s == service)
            && rule.operation.as_deref().is_none_or(|o| o == operation)
            && rule
                .queue
                .as_deref()
                .is_none_or(|q| queue_url.is_some_and(|u| u.contains(q)))
            && rule.burst.is_none_or(|(on, period)| {
                Duration::from_nanos(
                    (elapsed.as_nanos() % period.as_nanos().max(1)).min(u128::from(u64::MAX))
                        as u64,
                ) < on
            })
    }

    /// The first rule that applies to this request now, after its dice roll (rules decided by
    /// items are left to [`Self::by_items`]).
    fn pick(&self, service: &str, operation: &str, queue_url: Option<&str>) -> Option<&FaultRule> {
        let mut rng = rand::rng();
        self.rules.iter().find(|r| {
            !r.fault.by_item()
                && self.applies(r, service, operation, queue_url)
                && (r.fault == Fault::FailEntries || rng.random_bool(r.rate.clamp(0.0, 1.0)))
        })
    }

    /// The item rules on a DynamoDB write: `Err` with the answer when an item is over its
    /// limit or the request conflicts; `Ok` with what holds its items as under way (for
    /// `conflict`) until the request ends.
    fn by_items(
        &self,
        operation: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Option<items::Held>, Box<HttpResponse>> {
        let rules: Vec<&FaultRule> = self
            .rules
            .iter()
            .filter(|r| r.fault.by_item() && self.applies(r, "dynamodb", operation, None))
            .collect();
        let Some(body) = body.filter(|_| !rules.is_empty()) else {
            return Ok(None);
        };
        let touches = items::touches(operation, body);
        if touches.is_empty() {
            return Ok(None);
        }
        let transaction = operation == "TransactWriteItems";
        let mut held = None;
        for rule in rules {
            let clash = match rule.fault {
                Fault::ItemLimit(limit) => self.buckets.take(limit, &touches),
                Fault::Conflict => match self.in_flight.enter(&touches, transaction) {
                    Ok(h) => {
                        held = Some(h);
                        None
                    }
                    Err(i) => Some(i),
                },
                _ => None,
            };
            if let Some(index) = clash {
                if rand::rng().random_bool(rule.rate.clamp(0.0, 1.0)) {
                    self.count("dynamodb", operation, rule.fault, 1);
                    return Err(Box::new(item_refused(operation, body, index, rule.fault)));
                }
            }
        }
        Ok(held)
    }
}

fn parse_rule(rule: &str) -> Result<FaultRule, String> {
    let parts: Vec<&str> = rule.split(':').map(str::trim).collect();
    let [service, operation, fault, rate, options @ ..] = parts.as_slice() else {
        return Err("needs at least four fields".into());
    };
    let service = match *service {
        "*" => None,
        "sqs" | "dynamodb" => Some((*service).to_owned()),
        other => return Err(format!("unknown service `{other}` (sqs, dynamodb or *)")),
    };
    let operation = (*operation != "*").then(|| (*operation).to_owned());
    let fault = match fault.split_once('=') {
        Some(("slow", d)) => Fault::Slow(
            humantime::parse_duration(d).map_err(|e| format!("slow={d}: {e}"))?,
        ),
        None => match *fault {
            "throttle" => Fault::Throttle,
            "error" => Fault::ServerError,
            "reset" => Fault::Reset,
            "lost_response" => Fault::LostResponse,
            "hang" => Fault::Hang,
            "fail_entries" => Fault::FailEntries,
            "conflict" => Fault::Conflict,
            other => return Err(format!("unknown fault `{other}` (throttle, error, reset, lost_response, slow=DURATION, hang, fail_entries, item_limit=UNITS, conflict)")),
        },
        Some(("item_limit", u)) => match u.parse::<f64>() {
            Ok(units) if units.is_finite() && units >= 1.0 => Fault::ItemLimit(units),
            _ => return Err(format!("item_limit={u}: write units a second, a number >= 1")),
        },
        Some((other, _)) => return Err(format!("unknown fault `{other}`")),
    };
    let rate: f64 = rate
        .parse()
        .map_err(|_| format!("rate `{rate}` is not a number"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("rate {rate} is not between 0 and 1"));
    }
    if fault.by_item() && service.as_deref() == Some("sqs") {
        return Err(format!("{} applies to DynamoDB writes only", fault.name()));
    }
    let mut out = FaultRule {
        service,
        operation,
        fault,
        rate,
        queue: None,
        burst: None,
    };
    for option in options {
        match option.split_once('=') {
            Some(("queue", q)) => out.queue = Some(q.to_owned()),
            Some(("burst", b)) => {
                let (on, period) = b
                    .split_once('/')
                    .ok_or_else(|| format!("burst `{b}` is not ON/PERIOD"))?;
                let on = humantime::parse_duration(on).map_err(|e| format!("burst: {e}"))?;
                let period =
                    humantime::parse_duration(period).map_err(|e| format!("burst: {e}"))?;
                if on.is_zero() || period < on {
                    return Err(format!("burst `{b}`: need 0 < ON <= PERIOD"));
                }
                out.burst = Some((on, period));
            }
            _ => return Err(format!("unknown option `{option}` (queue=, burst=)")),
        }
    }
    Ok(out)
}

#[derive(Debug)]
struct FaultyClient {
    service: &'static str,
    inner: SharedHttpClient,
    plan: FaultPlan,
}

impl HttpClient for FaultyClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(FaultyConnector {
            service: self.service,
            inner: self.inner.http_connector(settings, components),
            plan: self.plan.clone(),
        })
    }
}

#[derive(Debug)]
struct FaultyConnector {
    service: &'static str,
    inner: SharedHttpConnector,
    plan: FaultPlan,
}

impl HttpConnector for FaultyConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let operation = request
            .headers()
            .get("x-amz-target")
            .and_then(|t| t.rsplit('.').next())
            .unwrap_or("unknown")
            .to_owned();
        let body: Option<serde_json::Value> = request
            .body()
            .bytes()
            .and_then(|b| serde_json::from_slice(b).ok());
        let queue_url = body
            .as_ref()
            .and_then(|b| b.get("QueueUrl"))
            .and_then(|u| u.as_str())
            .map(str::to_owned);
        let held = if self.service == "dynamodb" {
            match self.plan.by_items(&operation, body.as_ref()) {
                Ok(held) => held,
                Err(answer) => return HttpConnectorFuture::ready(Ok(*answer)),
            }
        } else {
            None
        };
        let Some(rule) = self
            .plan
            .pick(self.service, &operation, queue_url.as_deref())
            .cloned()
        else {
            let answer = self.inner.call(request);
            return match held {
                None => answer,
                Some(held) => HttpConnectorFuture::new(async move {
                    let answer = answer.await;
                    drop(held);
                    answer
                }),
            };
        };
        let call = Call {
            service: self.service,
            operation,
            body,
            plan: self.plan.clone(),
            inner: self.inner.clone(),
        };
        HttpConnectorFuture::new(async move {
            // The request's items stay under way until it ends, whatever fault it meets.
            let _held = held;
            call.inject(&rule, request).await
        })
    }
}

/// A request the plan picked a fault for.
struct Call {
    service: &'static str,
    operation: String,
    body: Option<serde_json::Value>,
    plan: FaultPlan,
    inner: SharedHttpConnector,
}

impl Call {
    /// Answers `request` as `rule`'s fault does, counting the fault.
    async fn inject(
        self,
        rule: &FaultRule,
        request: HttpRequest,
    ) -> Result<HttpResponse, ConnectorError> {
        let Call {
            service,
            operation,
            body,
            plan,
            inner,
        } = self;
        let count = |n| plan.count(service, &operation, rule.fault, n);
        match rule.fault {
            Fault::Throttle => {
                count(1);
                Ok(throttled(service, &operation, body.as_ref()))
            }
            Fault::ServerError => {
                count(1);
                Ok(server_error(service))
            }
            Fault::Reset => {
                count(1);
                Err(ConnectorError::io(
                    "connection reset by peer (injected)".into(),
                ))
            }
            Fault::LostResponse => {
                count(1);
                let _ = inner.call(request).await;
                Err(ConnectorError::io(
                    "connection closed before the response (injected)".into(),
                ))
            }
            Fault::Slow(delay) => {
                count(1);
                tokio::time::sleep(delay).await;
                inner.call(request).await
            }
            Fault::Hang => {
                count(1);
                futures::future::pending().await
            }
            Fault::FailEntries => fail_entries(request, body, rule.rate, &inner, count).await,
            Fault::ItemLimit(_) | Fault::Conflict => inner.call(request).await,
        }
    }
}

fn json_response(status: u16, content_type: &str, body: serde_json::Value) -> HttpResponse {
    let text = body.to_string();
    let mut response = HttpResponse::new(
        StatusCode::try_from(status).expect("valid status"),
        SdkBody::from(text.clone()),
    );
    response
        .headers_mut()
        .insert("content-type", content_type.to_owned());
    response
        .headers_mut()
        .insert("content-length", text.len().to_string());
    response
}

/// Both services speak AWS JSON 1.0.
const JSON_1_0: &str = "application/x-amz-json-1.0";

/// The throttling error each service answers with.
fn throttled(service: &str, operation: &str, body: Option<&serde_json::Value>) -> HttpResponse {
    let json = if service == "sqs" {
        serde_json::json!({"__type": "com.amazonaws.sqs#RequestThrottled", "message": "Rate exceeded (injected)"})
    } else if operation == "TransactWriteItems" {
        let items = body
            .and_then(|b| b.get("TransactItems"))
            .and_then(|t| t.as_array())
            .map_or(1, Vec::len);
        let reasons: Vec<serde_json::Value> = (0..items)
            .map(|i| {
                if i == 0 {
                    serde_json::json!({"Code": "ThrottlingError", "Message": "Throughput exceeds the current capacity of your table or index (injected)"})
                } else {
                    serde_json::json!({"Code": "None"})
                }
            })
            .collect();
        serde_json::json!({
            "__type": "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
            "Message": "Transaction cancelled, please refer cancellation reasons for specific reasons [ThrottlingError] (injected)",
            "CancellationReasons": reasons,
        })
    } else {
        serde_json::json!({"__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException", "message": "The level of configured provisioned throughput for the table was exceeded (injected)"})
    };
    json_response(400, JSON_1_0, json)
}

/// The answer to a write refused by an item rule: inside a transaction a cancellation with the
/// reason at the item's position, else the single-item error DynamoDB gives.
fn item_refused(
    operation: &str,
    body: &serde_json::Value,
    index: usize,
    fault: Fault,
) -> HttpResponse {
    let (code, single, text) = match fault {
        Fault::Conflict => (
            "TransactionConflict",
            "TransactionConflictException",
            "Transaction is ongoing for the item (injected)",
        ),
        _ => (
            "ThrottlingError",
            "ProvisionedThroughputExceededException",
            "Throughput exceeds the current capacity for one or more items (injected item_limit)",
        ),
    };
    let json = if operation == "TransactWriteItems" {
        let items = body
            .get("TransactItems")
            .and_then(|t| t.as_array())
            .map_or(1, Vec::len);
        let reasons: Vec<serde_json::Value> = (0..items)
            .map(|i| {
                if i == index {
                    serde_json::json!({"Code": code, "Message": text})
                } else {
                    serde_json::json!({"Code": "None"})
                }
            })
            .collect();
        serde_json::json!({
            "__type": "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
            "Message": format!("Transaction cancelled, please refer cancellation reasons for specific reasons [{code}] (injected)"),
            "CancellationReasons": reasons,
        })
    } else {
        serde_json::json!({"__type": format!("com.amazonaws.dynamodb.v20120810#{single}"), "message": text})
    };
    json_response(400, JSON_1_0, json)
}

fn server_error(service: &str) -> HttpResponse {
    let json = if service == "sqs" {
        serde_json::json!({"__type": "com.amazonaws.sqs#InternalError", "message": "injected"})
    } else {
        serde_json::json!({"__type": "com.amazonaws.dynamodb.v20120810#InternalServerError", "message": "injected"})
    };
    json_response(500, JSON_1_0, json)
}

/// A partial batch failure: each entry fails with probability `rate` and is not sent; the
/// others are, and the answer reports both.
async fn fail_entries(
    mut request: HttpRequest,
    body: Option<serde_json::Value>,
    rate: f64,
    inner: &SharedHttpConnector,
    count: impl FnOnce(u64),
) -> Result<HttpResponse, ConnectorError> {
    let Some(mut body) = body else {
        return inner.call(request).await;
    };
    let Some(entries) = body.get("Entries").and_then(|e| e.as_array()).cloned() else {
        return inner.call(request).await;
    };
    let (failed, kept): (Vec<serde_json::Value>, Vec<serde_json::Value>) = {
        let mut rng = rand::rng();
        entries
            .into_iter()
            .partition(|_| rng.random_bool(rate.clamp(0.0, 1.0)))
    };
    if failed.is_empty() {
        return inner.call(request).await;
    }
    count(failed.len() as u64);
    let failures: Vec<serde_json::Value> = failed
        .iter()
        .map(|e| {
            serde_json::json!({"Id": e.get("Id").cloned().unwrap_or_default(), "SenderFault": false, "Code": "InternalError", "Message": "injected entry failure"})
        })
        .collect();
    let mut answer = if kept.is_empty() {
        serde_json::json!({"Successful": []})
    } else {
        body["Entries"] = serde_json::Value::Array(kept);
        let text = body.to_string();
        request
            .headers_mut()
            .insert("content-length", text.len().to_string());
        *request.body_mut() = SdkBody::from(text);
        let response = inner.call(request).await?;
        let status = response.status();
        let bytes = read_body(response).await?;
        if !status.is_success() {
            return Ok(json_response(
                status.as_u16(),
                JSON_1_0,
                serde_json::from_slice(&bytes).unwrap_or_default(),
            ));
        }
        serde_json::from_slice(&bytes).unwrap_or_else(|_| serde_json::json!({}))
    };
    let mut all_failed = answer
        .get("Failed")
        .and_then(|f| f.as_array())
        .cloned()
        .unwrap_or_default();
    all_failed.extend(failures);
    answer["Failed"] = serde_json::Value::Array(all_failed);
    Ok(json_response(200, JSON_1_0, answer))
}

async fn read_body(response: HttpResponse) -> Result<bytes::Bytes, ConnectorError> {
    use http_body_util::BodyExt;
    let body = response.into_body();
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ConnectorError::io(e.to_string().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_bad_ones_say_what_is_wrong() {
        let plan = FaultPlan::parse(
            "dynamodb:*:throttle:0.3:burst=2s/10s; sqs:SendMessageBatch:fail_entries:0.2:queue=orders; *:*:slow=250ms:1",
        )
        .unwrap();
        assert_eq!(plan.rules().len(), 3);
        assert_eq!(plan.rules()[0].fault, Fault::Throttle);
        assert_eq!(
            plan.rules()[0].burst,
            Some((Duration::from_secs(2), Duration::from_secs(10)))
        );
        assert_eq!(plan.rules()[1].queue.as_deref(), Some("orders"));
        assert_eq!(
            plan.rules()[2].fault,
            Fault::Slow(Duration::from_millis(250))
        );
        assert!(plan.rules()[2].service.is_none());
        for (bad, says) in [
            ("dynamodb:*:throttle", "four fields"),
            ("s3:*:throttle:0.1", "unknown service"),
            ("sqs:*:explode:0.1", "unknown fault"),
            ("sqs:*:throttle:2", "between 0 and 1"),
            ("sqs:*:throttle:0.1:burst=10s/2s", "ON <= PERIOD"),
        ] {
            let e = FaultPlan::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(FaultPlan::parse("").unwrap().rules().is_empty());
    }

    #[test]
    fn rules_match_by_service_operation_and_queue() {
        let plan = FaultPlan::parse("sqs:SendMessageBatch:throttle:1:queue=orders").unwrap();
        assert!(plan
            .pick("sqs", "SendMessageBatch", Some("http://x/fleet-orders"))
            .is_some());
        assert!(plan
            .pick("sqs", "SendMessageBatch", Some("http://x/fleet-ingest"))
            .is_none());
        assert!(plan.pick("sqs", "ReceiveMessage", None).is_none());
        assert!(plan.pick("dynamodb", "SendMessageBatch", None).is_none());
        let never = FaultPlan::parse("*:*:error:0").unwrap();
        assert!((0..100).all(|_| never.pick("sqs", "X", None).is_none()));
    }
}
