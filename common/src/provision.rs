//! Creates the queues (each with its DLQ and redrive policy) and the tables of the config.
//! Idempotent: what exists is brought in line with the config and reported as such. Used for the
//! local emulators and for test fixtures; production is provisioned by `deploy/`.

use std::collections::HashMap;
use std::fmt;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    SseSpecification, TimeToLiveSpecification,
};
use aws_sdk_sqs::types::QueueAttributeName;
use serde::Serialize;

use crate::config::{FleetConfig, QueueConfig, TableConfig};

/// What provisioning did to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// It did not exist and was created.
    Created,
    /// It existed; its attributes were set to the config's.
    Updated,
    /// It existed as configured.
    Unchanged,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
        })
    }
}

/// One line of the provisioning report.
#[derive(Debug, Clone, Serialize)]
pub struct Provisioned {
    /// `queue` or `table`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// What was done.
    pub action: Action,
}

/// Provisioning failed on a named resource.
#[derive(Debug, thiserror::Error)]
#[error("provisioning {kind} `{name}` failed: {message}")]
pub struct ProvisionError {
    /// `queue` or `table`.
    pub kind: &'static str,
    /// Its name.
    pub name: String,
    /// Why.
    pub message: String,
}

/// Creates or updates every queue, DLQ and table of `config`.
///
/// # Errors
/// The first resource that could not be provisioned.
pub async fn provision(
    sqs: &aws_sdk_sqs::Client,
    dynamodb: &aws_sdk_dynamodb::Client,
    config: &FleetConfig,
) -> Result<Vec<Provisioned>, ProvisionError> {
    let mut report = Vec::new();
    for queue in config.queues.values() {
        report.extend(provision_queue(sqs, queue).await?);
    }
    report.extend(provision_tables(dynamodb, config).await?);
    Ok(report)
}

/// Creates every table of `config` that is missing (keys, TTL); idempotent.
///
/// # Errors
/// When DynamoDB refuses a call.
pub async fn provision_tables(
    dynamodb: &aws_sdk_dynamodb::Client,
    config: &FleetConfig,
) -> Result<Vec<Provisioned>, ProvisionError> {
    let mut report = Vec::new();
    for table in config.tables.values() {
        report.push(provision_table(dynamodb, table).await?);
    }
    Ok(report)
}

/// The attributes of a queue (or, with `dlq_arn` absent, of its DLQ).
pub fn queue_attributes(
    queue: &QueueConfig,
    dlq_arn: Option<&str>,
) -> HashMap<QueueAttributeName, String> {
    let mut attrs = HashMap::new();
    if queue.fifo {
        attrs.insert(QueueAttributeName::FifoQueue, "true".to_owned());
    }
    if queue.sse {
        attrs.insert(QueueAttributeName::SqsManagedSseEnabled, "true".to_owned());
    }
    attrs.insert(
        QueueAttributeName::VisibilityTimeout,
        queue.visibility_timeout_secs.to_string(),
    );
    match dlq_arn {
        Some(arn) => {
            attrs.insert(
                QueueAttributeName::MessageRetentionPeriod,
                queue.retention_secs.to_string(),
            );
            attrs.insert(
                QueueAttributeName::ReceiveMessageWaitTimeSeconds,
                "20".to_owned(),
            );
            attrs.insert(
                QueueAttributeName::RedrivePolicy,
                serde_json::json!({"deadLetterTargetArn": arn, "maxReceiveCount": queue.max_receive_count}).to_string(),
            );
        }
        None => {
            attrs.insert(
                QueueAttributeName::MessageRetentionPeriod,
                queue.dlq_retention_secs.to_string(),
            );
        }
    }
    attrs
}

/// Creates or updates one work queue and its DLQ (attributes, redrive policy); idempotent.
///
/// # Errors
/// When SQS refuses a call.
pub async fn provision_queue(
    sqs: &aws_sdk_sqs::Client,
    queue: &QueueConfig,
) -> Result<Vec<Provisioned>, ProvisionError> {
    let dlq_name = queue.dlq_name();
    let (dlq_url, dlq_action) = ensure_queue(sqs, &dlq_name, queue_attributes(queue, None)).await?;
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .ok()
        .and_then(|o| {
            o.attributes()
                .and_then(|a| a.get(&QueueAttributeName::QueueArn))
                .cloned()
        })
        .ok_or_else(|| ProvisionError {
            kind: "queue",
            name: dlq_name.clone(),
            message: "no QueueArn attribute".to_owned(),
        })?;
    let (_, action) = ensure_queue(sqs, &queue.name, queue_attributes(queue, Some(&arn))).await?;
    Ok(vec![
        Provisioned {
            kind: "queue",
            name: dlq_name,
            action: dlq_action,
        },
        Provisioned {
            kind: "queue",
            name: queue.name.clone(),
            action,
        },
    ])
}

async fn ensure_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    attrs: HashMap<QueueAttributeName, String>,
) -> Result<(String, Action), ProvisionError> {
    let fail = |message: String| ProvisionError {
        kind: "queue",
        name: name.to_owned(),
        message,
    };
    if let Ok(found) = sqs.get_queue_url().queue_name(name).send().await {
        let url = found.queue_url().unwrap_or_default().to_owned();
        let current = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .map_err(|e| fail(crate::sdk_error_message(&e)))?;
        let current = current.attributes().cloned().unwrap_or_default();
        let differs = attrs
            .iter()
            .filter(|(k, _)| **k != QueueAttributeName::FifoQueue)
            .any(|(k, v)| !same_attribute(k, current.get(k), v));
        if !differs {
            return Ok((url, Action::Unchanged));
        }
        let mut settable = attrs;
        settable.remove(&QueueAttributeName::FifoQueue);
        sqs.set_queue_attributes()
            .queue_url(&url)
            .set_attributes(Some(settable))
            .send()
            .await
            .map_err(|e| fail(crate::sdk_error_message(&e)))?;
        return Ok((url, Action::Updated));
    }
    let created = sqs
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attrs))
        .send()
        .await
        .map_err(|e| fail(crate::sdk_error_message(&e)))?;
    Ok((
        created.queue_url().unwrap_or_default().to_owned(),
        Action::Created,
    ))
}

/// Attribute values compare as JSON when they are JSON (a redrive policy may come back with
/// its count as a string or a number).
fn same_attribute(name: &QueueAttributeName, current: Option<&String>, wanted: &str) -> bool {
    let Some(current) = current else {
        return false;
    };
    if *name == QueueAttributeName::RedrivePolicy {
        let norm = |s: &str| {
            serde_json::from_str::<serde_json::Value>(s).ok().map(|v| {
                (
                    v["deadLetterTargetArn"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    v["maxReceiveCount"]
                        .to_string()
                        .trim_matches('"')
                        .to_owned(),
                )
            })
        };
        return norm(current) == norm(wanted);
    }
    current == wanted
}

/// Creates `table` if absent (or brings its TTL setting in line); idempotent.
///
/// # Errors
/// When DynamoDB refuses.
pub async fn provision_table(
    ddb: &aws_sdk_dynamodb::Client,
    table: &TableConfig,
) -> Result<Provisioned, ProvisionError> {
    let fail = |message: String| ProvisionError {
        kind: "table",
        name: table.name.clone(),
        message,
    };
    let exists = match ddb.describe_table().table_name(&table.name).send().await {
        Ok(found) => {
            let keys: Vec<String> = found
                .table()
                .map(|t| {
                    t.key_schema()
                        .iter()
                        .map(|k| k.attribute_name().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            let wanted: Vec<String> = std::iter::once(table.partition_key.clone())
                .chain(table.sort_key.clone())
                .collect();
            if keys != wanted {
                return Err(fail(format!(
                    "exists with keys {keys:?}, config wants {wanted:?}; delete it or fix tables.*"
                )));
            }
            true
        }
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()) =>
        {
            false
        }
        Err(e) => return Err(fail(crate::sdk_error_message(&e))),
    };
    if !exists {
        create_table(ddb, table)
            .await
            .map_err(|e| fail(crate::sdk_error_message(&e)))?;
    }
    if let Some(ttl) = &table.ttl_attribute {
        enable_ttl(ddb, &table.name, ttl)
            .await
            .map_err(|e| fail(crate::sdk_error_message(&e)))?;
    }
    Ok(Provisioned {
        kind: "table",
        name: table.name.clone(),
        action: if exists {
            Action::Unchanged
        } else {
            Action::Created
        },
    })
}

/// Creates a table on demand, encrypted, with the config's keys (string attributes).
async fn create_table(
    ddb: &aws_sdk_dynamodb::Client,
    table: &TableConfig,
) -> Result<
    (),
    aws_sdk_dynamodb::error::SdkError<aws_sdk_dynamodb::operation::create_table::CreateTableError>,
> {
    let mut request = ddb
        .create_table()
        .table_name(&table.name)
        .billing_mode(BillingMode::PayPerRequest)
        .sse_specification(SseSpecification::builder().enabled(true).build())
        .attribute_definitions(string_attribute(&table.partition_key))
        .key_schema(key(&table.partition_key, KeyType::Hash));
    if let Some(sort) = &table.sort_key {
        request = request
            .attribute_definitions(string_attribute(sort))
            .key_schema(key(sort, KeyType::Range));
    }
    request.send().await.map(|_| ())
}

/// Turns TTL on for `attribute`, unless it is on already (real DynamoDB refuses setting it
/// twice).
async fn enable_ttl(
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    attribute: &str,
) -> Result<
    (),
    aws_sdk_dynamodb::error::SdkError<
        aws_sdk_dynamodb::operation::update_time_to_live::UpdateTimeToLiveError,
    >,
> {
    let enabled = ddb
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .ok()
        .and_then(|o| {
            o.time_to_live_description()
                .and_then(|d| d.attribute_name().map(str::to_owned))
        });
    if enabled.as_deref() == Some(attribute) {
        return Ok(());
    }
    ddb.update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name(attribute)
                .enabled(true)
                .build()
                .expect("attribute and flag are set"),
        )
        .send()
        .await
        .map(|_| ())
}

fn string_attribute(name: &str) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .expect("name and type are set")
}

fn key(name: &str, kind: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .expect("name and type are set")
}
