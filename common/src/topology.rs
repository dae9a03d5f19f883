//! The queues of the fleet, resolved to URLs once at start-up.

use std::collections::BTreeMap;

use crate::config::{FleetConfig, QueueConfig};

/// One queue, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRef {
    /// Logical name (key in `[queues]`), with `-dlq` for a DLQ.
    pub key: String,
    /// Name in SQS.
    pub name: String,
    /// URL in SQS.
    pub url: String,
    /// FIFO queue.
    pub fifo: bool,
}

/// A work queue with its DLQ and settings.
#[derive(Debug, Clone)]
pub struct QueuePair {
    /// The work queue.
    pub queue: QueueRef,
    /// Its dead-letter queue.
    pub dlq: QueueRef,
    /// Its configured settings.
    pub settings: QueueConfig,
}

/// Every queue of the config, resolved.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// By logical name.
    pub queues: BTreeMap<String, QueuePair>,
}

/// A queue named in the config does not exist (or cannot be reached).
#[derive(Debug, thiserror::Error)]
#[error("queue `{name}` (config key queues.{key}) cannot be resolved: {message}; run `worker provision` to create it, or check the region and endpoint")]
pub struct ResolveError {
    /// Logical name.
    pub key: String,
    /// SQS name.
    pub name: String,
    /// What SQS said.
    pub message: String,
}

impl Topology {
    /// Looks up the URL of every queue and DLQ in the config.
    ///
    /// # Errors
    /// The first queue that cannot be resolved.
    pub async fn resolve(
        sqs: &aws_sdk_sqs::Client,
        config: &FleetConfig,
    ) -> Result<Self, ResolveError> {
        let keys: Vec<&str> = config.queues.keys().map(String::as_str).collect();
        Self::resolve_only(sqs, config, &keys).await
    }

    /// Looks up the URL of the given queues (logical keys) and their DLQs only: a worker resolves
    /// what its role may touch, nothing more.
    ///
    /// # Errors
    /// The first queue that cannot be resolved.
    pub async fn resolve_only(
        sqs: &aws_sdk_sqs::Client,
        config: &FleetConfig,
        keys: &[&str],
    ) -> Result<Self, ResolveError> {
        let mut queues = BTreeMap::new();
        for (key, settings) in config
            .queues
            .iter()
            .filter(|(k, _)| keys.contains(&k.as_str()))
        {
            let queue = resolve_one(sqs, key, &settings.name, settings.fifo).await?;
            let dlq = resolve_one(
                sqs,
                &format!("{key}-dlq"),
                &settings.dlq_name(),
                settings.fifo,
            )
            .await?;
            queues.insert(
                key.clone(),
                QueuePair {
                    queue,
                    dlq,
                    settings: settings.clone(),
                },
            );
        }
        Ok(Self { queues })
    }

    /// The pair of a logical queue name.
    pub fn pair(&self, key: &str) -> Option<&QueuePair> {
        self.queues.get(key)
    }
}

async fn resolve_one(
    sqs: &aws_sdk_sqs::Client,
    key: &str,
    name: &str,
    fifo: bool,
) -> Result<QueueRef, ResolveError> {
    let out = sqs
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| ResolveError {
            key: key.trim_end_matches("-dlq").to_owned(),
            name: name.to_owned(),
            message: crate::sdk_error_message(&e),
        })?;
    Ok(QueueRef {
        key: key.to_owned(),
        name: name.to_owned(),
        url: out.queue_url().unwrap_or_default().to_owned(),
        fifo,
    })
}
