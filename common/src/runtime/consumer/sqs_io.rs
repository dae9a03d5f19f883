//! SQS batch I/O: visibility changes, DeleteMessageBatch and SendMessageBatch entry by entry
//! (retrying what SQS marks as its own fault), and batches sized to SQS's limits.

#[allow(unused_imports)]
use super::*;

impl<H: Handler> Inner<H> {
    pub(super) async fn set_visibility(&self, receipt: &str, visibility_secs: i32) {
        let result = self
            .sqs
            .change_message_visibility()
            .queue_url(&self.pair.queue.url)
            .receipt_handle(receipt)
            .visibility_timeout(visibility_secs)
            .send()
            .await;
        if let Err(e) = result {
            warn!(error = %crate::sdk_error_message(&e), "could not change visibility; SQS redelivers after the visibility timeout");
        }
    }

    /// One ChangeMessageVisibilityBatch of up to ten receipts to `secs`; `Err` when the request
    /// or any entry failed.
    pub(super) async fn change_visibility(
        &self,
        receipts: &[String],
        secs: i32,
    ) -> Result<(), String> {
        let entries = receipts
            .iter()
            .enumerate()
            .map(|(i, r)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(secs)
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        let out = self
            .sqs
            .change_message_visibility_batch()
            .queue_url(&self.pair.queue.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| crate::sdk_error_message(&e))?;
        match out.failed().first() {
            None => Ok(()),
            Some(f) => Err(format!(
                "{} entries failed ({})",
                out.failed().len(),
                f.code()
            )),
        }
    }

    /// Makes messages visible again at once.
    pub(super) async fn release(&self, receipts: Vec<String>) {
        if receipts.is_empty() {
            return;
        }
        let count = receipts.len();
        for chunk in receipts.chunks(SQS_BATCH) {
            if let Err(e) = self.change_visibility(chunk, 0).await {
                warn!(error = %e, "release failed; SQS redelivers after the visibility timeout");
            }
        }
        Stats::bump(&self.stats.released, count as u64);
        events::released(&self.pair.queue.name, count);
    }
}

pub(super) fn sdk_retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(4)
        .with_jitter()
}

/// Whether an SDK error is worth repeating: throttling, a server error, a timeout or a broken
/// connection.
pub(super) fn is_retryable<E>(
    error: &aws_sdk_sqs::error::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> bool
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata,
{
    use aws_sdk_sqs::error::SdkError;
    match error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(e) => {
            let code = e.err().code().unwrap_or_default();
            e.raw().status().is_server_error()
                || matches!(
                    code,
                    "ThrottlingException"
                        | "RequestThrottled"
                        | "Throttling"
                        | "ServiceUnavailable"
                        | "InternalError"
                        | "KmsThrottled"
                )
        }
        _ => false,
    }
}

/// One DeleteMessageBatch, entry by entry: failed entries that SQS marks as its own fault are
/// tried again; sender faults (a stale receipt handle) are reported and left to redelivery.
pub(super) async fn delete_batch(
    sqs: aws_sdk_sqs::Client,
    queue: QueueRef,
    receipts: Vec<String>,
) -> Vec<EntryResult> {
    let mut results: Vec<EntryResult> = vec![Err("not attempted".to_owned()); receipts.len()];
    let mut pending: Vec<usize> = (0..receipts.len()).collect();
    for round in 0..3 {
        if pending.is_empty() {
            break;
        }
        let entries: Vec<_> = pending
            .iter()
            .map(|&i| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&receipts[i])
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        let call = || {
            sqs.delete_message_batch()
                .queue_url(&queue.url)
                .set_entries(Some(entries.clone()))
                .send()
        };
        let out = match call.retry(sdk_retry_policy()).when(is_retryable).await {
            Ok(out) => out,
            Err(e) => {
                let text = crate::sdk_error_message(&e);
                events::delete_partially_failed(
                    &queue.name,
                    "request_failed",
                    pending.len(),
                    false,
                );
                for &i in &pending {
                    results[i] = Err(text.clone());
                }
                return results;
            }
        };
        for ok in out.successful() {
            if let Ok(i) = ok.id().parse::<usize>() {
                results[i] = Ok(());
            }
        }
        let mut retry = Vec::new();
        for failed in out.failed() {
            let Ok(i) = failed.id().parse::<usize>() else {
                continue;
            };
            let will_retry = !failed.sender_fault() && round < 2;
            events::delete_partially_failed(&queue.name, failed.code(), 1, will_retry);
            results[i] = Err(format!(
                "{}: {}",
                failed.code(),
                failed.message().unwrap_or_default()
            ));
            if will_retry {
                retry.push(i);
            }
        }
        pending = retry;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50 << round)).await;
        }
    }
    results
}

/// SendMessageBatch calls, one per destination queue and size-bounded chunk; each entry learns
/// its own outcome.
pub(super) async fn send_batch(
    sqs: aws_sdk_sqs::Client,
    entries: Vec<SendEntry>,
    max_batch_bytes: usize,
) -> Vec<EntryResult> {
    let mut results: Vec<EntryResult> = vec![Err("not attempted".to_owned()); entries.len()];
    let mut by_queue: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_queue.entry(e.queue_url.as_str()).or_default().push(i);
    }
    for (url, indices) in by_queue {
        for chunk in chunk_by_size(&indices, |i| entries[i].size(), max_batch_bytes) {
            let request: Vec<_> = chunk
                .iter()
                .map(|&i| {
                    let e = &entries[i];
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(&e.body)
                        .set_message_attributes(
                            Some(e.attributes.clone()).filter(|a| !a.is_empty()),
                        )
                        .set_message_group_id(e.group_id.clone())
                        .set_message_deduplication_id(e.deduplication_id.clone())
                        .set_delay_seconds(e.delay_seconds)
                        .set_message_system_attributes(e.aws_trace_header.as_ref().map(|h| {
                            HashMap::from([(
                                MessageSystemAttributeNameForSends::AwsTraceHeader,
                                MessageSystemAttributeValue::builder()
                                    .data_type("String")
                                    .string_value(h)
                                    .build()
                                    .expect("data type is set"),
                            )])
                        }))
                        .build()
                        .expect("id and body are set")
                })
                .collect();
            let call = || {
                sqs.send_message_batch()
                    .queue_url(url)
                    .set_entries(Some(request.clone()))
                    .send()
            };
            match call.retry(sdk_retry_policy()).when(is_retryable).await {
                Ok(out) => {
                    for ok in out.successful() {
                        if let Ok(i) = ok.id().parse::<usize>() {
                            results[i] = Ok(());
                        }
                    }
                    for failed in out.failed() {
                        if let Ok(i) = failed.id().parse::<usize>() {
                            results[i] = Err(format!(
                                "{}: {}",
                                failed.code(),
                                failed.message().unwrap_or_default()
                            ));
                        }
                    }
                }
                Err(e) => {
                    let text = crate::sdk_error_message(&e);
                    for &i in &chunk {
                        results[i] = Err(text.clone());
                    }
                }
            }
        }
    }
    results
}

/// Splits `items` into runs of at most ten whose summed `size` stays within `limit`.
pub(super) fn chunk_by_size(
    items: &[usize],
    size: impl Fn(usize) -> usize,
    limit: usize,
) -> Vec<Vec<usize>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for &i in items {
        let s = size(i);
        if !current.is_empty() && (current.len() == SQS_BATCH || bytes + s > limit) {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += s;
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::operation::delete_message_batch::DeleteMessageBatchOutput;
    use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchOutput;
    use aws_sdk_sqs::types::{
        BatchResultErrorEntry, DeleteMessageBatchResultEntry, SendMessageBatchResultEntry,
    };
    use aws_smithy_mocks::{mock, mock_client, RuleMode};

    fn queue() -> QueueRef {
        QueueRef {
            key: "orders".into(),
            name: "fleet-orders".into(),
            url: "http://sqs.local/000/fleet-orders".into(),
            fifo: false,
        }
    }

    fn ok_entry(id: &str) -> DeleteMessageBatchResultEntry {
        DeleteMessageBatchResultEntry::builder()
            .id(id)
            .build()
            .unwrap()
    }

    fn failed_entry(id: &str, code: &str, sender_fault: bool) -> BatchResultErrorEntry {
        BatchResultErrorEntry::builder()
            .id(id)
            .code(code)
            .sender_fault(sender_fault)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_partly_failed_delete_batch_retries_only_the_server_side_failures() {
        let first = mock!(aws_sdk_sqs::Client::delete_message_batch).then_output(|| {
            DeleteMessageBatchOutput::builder()
                .successful(ok_entry("0"))
                .failed(failed_entry("1", "InternalError", false))
                .failed(failed_entry("2", "ReceiptHandleIsInvalid", true))
                .build()
                .unwrap()
        });
        // The retry carries only entry 1.
        let second = mock!(aws_sdk_sqs::Client::delete_message_batch)
            .match_requests(|r| r.entries().len() == 1 && r.entries()[0].id() == "1")
            .then_output(|| {
                DeleteMessageBatchOutput::builder()
                    .successful(ok_entry("1"))
                    .set_failed(Some(vec![]))
                    .build()
                    .unwrap()
            });
        let sqs = mock_client!(aws_sdk_sqs, RuleMode::Sequential, [&first, &second]);
        let results = delete_batch(sqs, queue(), vec!["r0".into(), "r1".into(), "r2".into()]).await;
        assert_eq!(results[0], Ok(()));
        assert_eq!(results[1], Ok(()), "a server-side failure is retried");
        assert!(results[2]
            .as_ref()
            .unwrap_err()
            .contains("ReceiptHandleIsInvalid"));
        assert_eq!(second.num_calls(), 1);
    }

    #[tokio::test]
    async fn a_throttled_delete_batch_is_retried_with_backoff() {
        let throttled = mock!(aws_sdk_sqs::Client::delete_message_batch).then_http_response(|| {
            aws_smithy_runtime_api::http::Response::new(
                aws_smithy_runtime_api::http::StatusCode::try_from(400).unwrap(),
                aws_smithy_types::body::SdkBody::from(
                    r#"{"__type":"com.amazonaws.sqs#RequestThrottled","message":"Rate exceeded"}"#,
                ),
            )
        });
        let ok = mock!(aws_sdk_sqs::Client::delete_message_batch).then_output(|| {
            DeleteMessageBatchOutput::builder()
                .successful(ok_entry("0"))
                .set_failed(Some(vec![]))
                .build()
                .unwrap()
        });
        let sqs = mock_client!(aws_sdk_sqs, RuleMode::Sequential, [&throttled, &ok]);
        let results = delete_batch(sqs, queue(), vec!["r0".into()]).await;
        assert_eq!(results, vec![Ok(())]);
        assert!(throttled.num_calls() >= 1);
    }

    #[tokio::test]
    async fn a_delete_batch_that_keeps_failing_reports_every_entry() {
        let down = mock!(aws_sdk_sqs::Client::delete_message_batch).then_http_response(|| {
            aws_smithy_runtime_api::http::Response::new(
                aws_smithy_runtime_api::http::StatusCode::try_from(500).unwrap(),
                aws_smithy_types::body::SdkBody::from(
                    r#"{"__type":"com.amazonaws.sqs#InternalError"}"#,
                ),
            )
        });
        let sqs = mock_client!(aws_sdk_sqs, RuleMode::MatchAny, [&down]);
        let results = delete_batch(sqs, queue(), vec!["r0".into(), "r1".into()]).await;
        assert!(results.iter().all(Result::is_err));
    }

    #[tokio::test]
    async fn send_batches_report_each_entry_and_split_by_queue() {
        let send = mock!(aws_sdk_sqs::Client::send_message_batch).then_output(|| {
            SendMessageBatchOutput::builder()
                .successful(
                    SendMessageBatchResultEntry::builder()
                        .id("0")
                        .message_id("m")
                        .md5_of_message_body("x")
                        .build()
                        .unwrap(),
                )
                .failed(failed_entry("1", "InvalidMessageContents", true))
                .build()
                .unwrap()
        });
        let sqs = mock_client!(aws_sdk_sqs, RuleMode::MatchAny, [&send]);
        let entry = |url: &str| SendEntry {
            queue_url: url.into(),
            body: "{}".into(),
            attributes: HashMap::new(),
            group_id: None,
            deduplication_id: None,
            delay_seconds: None,
            aws_trace_header: None,
        };
        let results = send_batch(sqs, vec![entry("a"), entry("a"), entry("b")], 256 * 1024).await;
        assert_eq!(results[0], Ok(()));
        assert!(results[1].is_err());
        assert_eq!(send.num_calls(), 2, "one call per destination queue");
    }

    #[test]
    fn chunks_respect_count_and_size() {
        let items: Vec<usize> = (0..25).collect();
        let chunks = chunk_by_size(&items, |_| 1, usize::MAX);
        assert_eq!(
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        let chunks = chunk_by_size(&items[..4], |_| 100_000, 256 * 1024);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2]);
    }
}
