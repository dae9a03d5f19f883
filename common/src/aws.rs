//! AWS clients for the fleet: the standard credential chain in production, loopback emulators
//! locally, and a request counter on every client so that cost per message is counted, not guessed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

use crate::config::AwsConfig;

/// The SQS and DynamoDB clients of one process, sharing one [`RequestCounter`].
#[derive(Clone, Debug)]
pub struct Clients {
    /// SQS, with the endpoint override of the config if any.
    pub sqs: aws_sdk_sqs::Client,
    /// DynamoDB, with the endpoint override of the config if any.
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// Counts every request either client sends (each retry attempt included).
    pub requests: RequestCounter,
}

impl Clients {
    /// Builds both clients from the standard AWS chain and the config's overrides.
    ///
    /// An endpoint override on loopback is an emulator: the clients then sign with fixed
    /// placeholder credentials, so real credentials are never sent to a local process.
    pub async fn from_config(aws: &AwsConfig) -> Self {
        let shared = load_sdk_config(aws).await;
        Self::from_sdk_config(&shared, aws, RequestCounter::default())
    }

    /// Builds both clients from an already loaded [`SdkConfig`].
    pub fn from_sdk_config(shared: &SdkConfig, aws: &AwsConfig, requests: RequestCounter) -> Self {
        Self::assemble(shared, aws, requests, None)
    }

    /// Both clients; with `faults`, their HTTP client (`inner`) wrapped by the fault plan.
    fn assemble(
        shared: &SdkConfig,
        aws: &AwsConfig,
        requests: RequestCounter,
        faults: Option<(&crate::faults::FaultPlan, SharedHttpClient)>,
    ) -> Self {
        let mut sqs =
            aws_sdk_sqs::config::Builder::from(shared).interceptor(requests.for_service("sqs"));
        if let Some(url) = &aws.sqs_endpoint_url {
            sqs = sqs.endpoint_url(url);
        }
        let mut ddb = aws_sdk_dynamodb::config::Builder::from(shared)
            .interceptor(requests.for_service("dynamodb"));
        if let Some(url) = &aws.dynamodb_endpoint_url {
            ddb = ddb.endpoint_url(url);
        }
        if let Some((plan, inner)) = faults {
            sqs = sqs.http_client(plan.wrap("sqs", inner.clone()));
            ddb = ddb.http_client(plan.wrap("dynamodb", inner));
        }
        Self {
            sqs: aws_sdk_sqs::Client::from_conf(sqs.build()),
            dynamodb: aws_sdk_dynamodb::Client::from_conf(ddb.build()),
            requests,
        }
    }
}

impl Clients {
    /// The clients of a running worker: the consumer runtime and the stores own every retry
    /// (`backon`: one layer, see [`crate::runtime`] and the workers' `Store::call`), so the
    /// SDK's own retries are off, and every request has a deadline (`aws.connect_timeout_ms`,
    /// `aws.attempt_timeout_ms`). With `faults`, requests meet that fault plan: only when every
    /// endpoint is on loopback (the emulators), else this refuses.
    ///
    /// # Errors
    /// A fault plan with an endpoint that is not on loopback.
    pub async fn for_workers(
        aws: &AwsConfig,
        faults: Option<&crate::faults::FaultPlan>,
    ) -> Result<Self, String> {
        if faults.is_some() && !all_local(aws) {
            return Err(format!(
                "{} is set, but fault injection is honoured only with loopback endpoints (aws.sqs_endpoint_url, aws.dynamodb_endpoint_url)",
                crate::faults::FAULTS_ENV
            ));
        }
        let mut shared = load_sdk_config(aws).await.into_builder();
        shared.set_retry_config(Some(aws_config::retry::RetryConfig::disabled()));
        shared.set_timeout_config(Some(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(aws.connect_timeout())
                .operation_attempt_timeout(aws.attempt_timeout())
                .build(),
        ));
        let shared = shared.build();
        // The SDK's default client (rustls with aws-lc), made here so it can be wrapped.
        let faults = faults.map(|plan| {
            let inner = aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .build_https();
            (plan, inner)
        });
        Ok(Self::assemble(
            &shared,
            aws,
            RequestCounter::default(),
            faults,
        ))
    }
}

fn all_local(aws: &AwsConfig) -> bool {
    [&aws.sqs_endpoint_url, &aws.dynamodb_endpoint_url]
        .iter()
        .all(|url| url.as_deref().is_some_and(is_loopback_url))
}

/// Loads the shared SDK config: the standard AWS chain, the config's region, and — when every
/// endpoint override is on loopback (the emulators) — fixed placeholder credentials, so real
/// credentials are never sent to a local process.
pub async fn load_sdk_config(aws: &AwsConfig) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &aws.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if all_local(aws) {
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "local-emulator",
            "local-emulator",
            None,
            None,
            "fleet-local-emulator",
        ));
    }
    loader.load().await
}

/// Whether an endpoint URL points at this machine.
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The DynamoDB operations that write, as counted by [`RequestCounter`].
pub const DYNAMODB_WRITE_OPERATIONS: [&str; 5] = [
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "BatchWriteItem",
    "TransactWriteItems",
];

/// The DynamoDB operations that read, as counted by [`RequestCounter`].
pub const DYNAMODB_READ_OPERATIONS: [&str; 4] = ["GetItem", "BatchGetItem", "Query", "Scan"];

/// Counts requests per service and operation, and exports them as the
/// `fleet_aws_requests_total{service, operation}` metric.
#[derive(Clone, Debug, Default)]
pub struct RequestCounter {
    counts: Arc<Mutex<BTreeMap<(&'static str, String), u64>>>,
}

impl RequestCounter {
    /// An interceptor that records into this counter under `service`.
    pub fn for_service(&self, service: &'static str) -> CountingInterceptor {
        CountingInterceptor {
            service,
            counter: self.clone(),
        }
    }

    fn record(&self, service: &'static str, operation: &str) {
        metrics::counter!("fleet_aws_requests_total", "service" => service, "operation" => operation.to_owned())
            .increment(1);
        let mut counts = self.counts.lock().expect("request counter lock");
        *counts.entry((service, operation.to_owned())).or_default() += 1;
    }

    /// Requests sent to `service` so far, all operations.
    pub fn total(&self, service: &str) -> u64 {
        let counts = self.counts.lock().expect("request counter lock");
        counts
            .iter()
            .filter(|((s, _), _)| *s == service)
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests per `service.Operation` so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let counts = self.counts.lock().expect("request counter lock");
        counts
            .iter()
            .map(|((s, op), n)| (format!("{s}.{op}"), *n))
            .collect()
    }
}

/// The SDK interceptor behind [`RequestCounter`]; one per client.
#[derive(Debug)]
pub struct CountingInterceptor {
    service: &'static str,
    counter: RequestCounter,
}

impl Intercept for CountingInterceptor {
    fn name(&self) -> &'static str {
        "FleetRequestCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg.load::<Metadata>().map_or("unknown", Metadata::name);
        self.counter.record(self.service, operation);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_recognised() {
        assert!(is_loopback_url("http://127.0.0.1:4566"));
        assert!(is_loopback_url("http://localhost:4566/"));
        assert!(is_loopback_url("http://[::1]:8000"));
        assert!(!is_loopback_url("https://sqs.us-east-1.amazonaws.com"));
        assert!(!is_loopback_url("http://10.0.0.5:4566"));
    }
}
