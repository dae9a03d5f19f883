//! Finding queues: a command's queue argument, the account's queues with their redrive policies
//! (which is how the CLI finds a DLQ's sources without ListDeadLetterSourceQueues), depths, and
//! the age of the oldest message (CloudWatch on AWS, a sample locally).

use std::collections::BTreeMap;

use aws_sdk_sqs::types::QueueAttributeName;
use fleet_common::config::FleetConfig;
use fleet_common::redrive_ledger::Ledger;
use serde::Serialize;
use time::OffsetDateTime;

use crate::error::{is_missing_queue, CliError, Result};

/// What every command needs.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// SQS.
    pub sqs: aws_sdk_sqs::Client,
    /// CloudWatch, for the age of the oldest message; `None` on the local emulators.
    pub cloudwatch: Option<aws_sdk_cloudwatch::Client>,
    /// The SQS endpoint is an emulator on loopback: no CloudWatch, no StartMessageMoveTask.
    pub local: bool,
    /// The fleet config, when one was found: its queue keys name DLQs (`orders` → `fleet-orders-dlq`).
    pub config: Option<FleetConfig>,
    /// The redrive ledger (`[tables.redrives]` of the config): what became of what a redrive
    /// moved. `None` without a config that names it.
    pub ledger: Option<Ledger>,
}

impl Ctx {
    /// The SenderIds that redrive into the edge (`ingestion.redrivers` of the config): a
    /// message SQS moved from one of their copies names its first sender in its redrive record.
    pub fn redrivers(&self) -> &[String] {
        self.config
            .as_ref()
            .map_or(&[], |c| c.ingestion.redrivers.as_slice())
    }
}

/// A queue, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Queue {
    /// Name.
    pub name: String,
    /// URL.
    pub url: String,
}

impl Queue {
    /// FIFO queues end in `.fifo`.
    pub fn fifo(&self) -> bool {
        self.name.ends_with(".fifo")
    }

    /// The fleet names a DLQ `<queue>-dlq` (before `.fifo`).
    pub fn is_dlq(&self) -> bool {
        self.name.trim_end_matches(".fifo").ends_with("-dlq")
    }
}

/// The redrive policy of a queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedrivePolicy {
    /// The DLQ's ARN.
    pub dead_letter_target_arn: String,
    /// Receives before SQS moves a message there (a string or a number in SQS's JSON).
    #[serde(deserialize_with = "number_or_string")]
    pub max_receive_count: u32,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum N {
        N(u32),
        S(String),
    }
    match N::deserialize(d)? {
        N::N(n) => Ok(n),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}
use serde::Deserialize as _;

/// A queue's attributes that the CLI reports or needs.
#[derive(Debug, Clone, Serialize)]
pub struct QueueInfo {
    /// The queue.
    #[serde(flatten)]
    pub queue: Queue,
    /// Its ARN.
    pub arn: String,
    /// Messages available (ApproximateNumberOfMessages).
    pub visible: u64,
    /// Messages received and not yet deleted or released (ApproximateNumberOfMessagesNotVisible).
    pub in_flight: u64,
    /// Delayed messages.
    pub delayed: u64,
    /// Its redrive policy, when it has a DLQ.
    pub redrive_policy: Option<RedrivePolicy>,
}

/// Resolves a command's queue argument: a URL, a config key (`orders` means that queue's DLQ),
/// or a queue name.
///
/// # Errors
/// A queue that does not exist, or AWS errors.
pub async fn resolve(ctx: &Ctx, arg: &str) -> Result<Queue> {
    if arg.starts_with("http://") || arg.starts_with("https://") {
        let name = arg.rsplit('/').next().unwrap_or(arg).to_owned();
        return Ok(Queue {
            name,
            url: arg.to_owned(),
        });
    }
    let name = ctx
        .config
        .as_ref()
        .and_then(|c| c.queues.get(arg))
        .map_or_else(|| arg.to_owned(), |q| q.dlq_name());
    resolve_name(ctx, &name).await
}

/// Resolves a queue name to its URL.
///
/// # Errors
/// A queue that does not exist, or AWS errors.
pub async fn resolve_name(ctx: &Ctx, name: &str) -> Result<Queue> {
    match ctx.sqs.get_queue_url().queue_name(name).send().await {
        Ok(out) => Ok(Queue {
            name: name.to_owned(),
            url: out.queue_url().unwrap_or_default().to_owned(),
        }),
        Err(e) if is_missing_queue(&e) => Err(CliError::QueueNotFound(name.to_owned())),
        Err(e) => Err(CliError::aws(format!("looking up queue `{name}`"), &e)),
    }
}

/// Reads a queue's attributes.
///
/// # Errors
/// AWS errors.
pub async fn info(ctx: &Ctx, queue: &Queue) -> Result<QueueInfo> {
    let out = ctx
        .sqs
        .get_queue_attributes()
        .queue_url(&queue.url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await;
    let out = match out {
        Ok(out) => out,
        Err(e) if is_missing_queue(&e) => return Err(CliError::QueueNotFound(queue.name.clone())),
        Err(e) => {
            return Err(CliError::aws(
                format!("reading the attributes of `{}`", queue.name),
                &e,
            ))
        }
    };
    let attrs = out.attributes().cloned().unwrap_or_default();
    let get = |name: QueueAttributeName| attrs.get(&name).cloned();
    let count = |name: QueueAttributeName| get(name).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(QueueInfo {
        queue: queue.clone(),
        arn: get(QueueAttributeName::QueueArn).unwrap_or_default(),
        visible: count(QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        delayed: count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        redrive_policy: get(QueueAttributeName::RedrivePolicy)
            .and_then(|p| serde_json::from_str(&p).ok()),
    })
}

/// Every queue of the account (names starting with `prefix`), with its attributes.
///
/// # Errors
/// AWS errors.
pub async fn account(ctx: &Ctx, prefix: Option<&str>) -> Result<Vec<QueueInfo>> {
    let mut urls = Vec::new();
    let mut token = None;
    loop {
        let out = ctx
            .sqs
            .list_queues()
            .set_queue_name_prefix(prefix.map(str::to_owned))
            .max_results(1000)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| CliError::aws("listing the account's queues", &e))?;
        urls.extend(out.queue_urls().iter().cloned());
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    let mut infos = Vec::with_capacity(urls.len());
    for url in urls {
        let name = url.rsplit('/').next().unwrap_or(&url).to_owned();
        match info(ctx, &Queue { name, url }).await {
            Ok(i) => infos.push(i),
            // Deleted between the listing and now.
            Err(CliError::QueueNotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(infos)
}

/// The names of the queues whose redrive policy targets each DLQ ARN.
pub fn sources_by_dlq(queues: &[QueueInfo]) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for q in queues {
        if let Some(p) = &q.redrive_policy {
            map.entry(p.dead_letter_target_arn.clone())
                .or_default()
                .push(q.queue.name.clone());
        }
    }
    for v in map.values_mut() {
        v.sort();
    }
    map
}

/// The age of the oldest message in seconds, from CloudWatch's ApproximateAgeOfOldestMessage
/// (the latest one-minute maximum of the last 15 minutes).
///
/// # Errors
/// CloudWatch errors.
pub async fn oldest_age_from_cloudwatch(
    cw: &aws_sdk_cloudwatch::Client,
    queue: &str,
    now: OffsetDateTime,
) -> Result<Option<f64>> {
    use aws_sdk_cloudwatch::primitives::DateTime;
    use aws_sdk_cloudwatch::types::{Dimension, Statistic};
    let out = cw
        .get_metric_statistics()
        .namespace("AWS/SQS")
        .metric_name("ApproximateAgeOfOldestMessage")
        .dimensions(Dimension::builder().name("QueueName").value(queue).build())
        .start_time(DateTime::from_secs(
            (now - time::Duration::minutes(15)).unix_timestamp(),
        ))
        .end_time(DateTime::from_secs(now.unix_timestamp()))
        .period(60)
        .statistics(Statistic::Maximum)
        .send()
        .await
        .map_err(|e| {
            CliError::aws(
                format!("reading the age of the oldest message of `{queue}` from CloudWatch"),
                &e,
            )
        })?;
    Ok(out
        .datapoints()
        .iter()
        .filter_map(|d| Some((d.timestamp()?.secs(), d.maximum()?)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, v)| v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str, dlq: Option<&str>) -> QueueInfo {
        QueueInfo {
            queue: Queue {
                name: name.into(),
                url: format!("http://q/{name}"),
            },
            arn: format!("arn:aws:sqs:us-east-1:000000000000:{name}"),
            visible: 0,
            in_flight: 0,
            delayed: 0,
            redrive_policy: dlq.map(|d| RedrivePolicy {
                dead_letter_target_arn: format!("arn:aws:sqs:us-east-1:000000000000:{d}"),
                max_receive_count: 5,
            }),
        }
    }

    #[test]
    fn sources_are_found_from_redrive_policies() {
        let queues = [
            q("a", Some("shared-dlq")),
            q("b", Some("shared-dlq")),
            q("c", Some("c-dlq")),
            q("shared-dlq", None),
        ];
        let map = sources_by_dlq(&queues);
        assert_eq!(
            map["arn:aws:sqs:us-east-1:000000000000:shared-dlq"],
            vec!["a", "b"]
        );
        assert_eq!(map["arn:aws:sqs:us-east-1:000000000000:c-dlq"], vec!["c"]);
    }

    #[test]
    fn redrive_policies_parse_with_either_number_form() {
        let p: RedrivePolicy =
            serde_json::from_str(r#"{"deadLetterTargetArn":"arn:x","maxReceiveCount":"5"}"#)
                .unwrap();
        assert_eq!(p.max_receive_count, 5);
        let p: RedrivePolicy =
            serde_json::from_str(r#"{"deadLetterTargetArn":"arn:x","maxReceiveCount":7}"#).unwrap();
        assert_eq!(p.max_receive_count, 7);
    }
}
