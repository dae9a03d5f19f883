//! SDK edge cases with aws-smithy-mocks: the StartMessageMoveTask path and its fallback, a
//! partial SendMessageBatch failure during a redrive, and the oldest-message age from CloudWatch.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::operation::get_queue_attributes::GetQueueAttributesOutput;
use aws_sdk_sqs::operation::list_message_move_tasks::ListMessageMoveTasksOutput;
use aws_sdk_sqs::operation::receive_message::ReceiveMessageOutput;
use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchOutput;
use aws_sdk_sqs::operation::start_message_move_task::{
    StartMessageMoveTaskError, StartMessageMoveTaskOutput,
};
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ListMessageMoveTasksResultEntry, Message, QueueAttributeName,
    SendMessageBatchResultEntry,
};
use aws_smithy_mocks::{mock, mock_client, Rule, RuleMode};
use dlq_cli::commands::redrive::{self, Options};
use dlq_cli::error::Exit;
use dlq_cli::filter::Filter;
use dlq_cli::output::Output;
use dlq_cli::queues::{oldest_age_from_cloudwatch, Ctx, Queue};
use tokio_util::sync::CancellationToken;

fn ctx(sqs: aws_sdk_sqs::Client, local: bool) -> Ctx {
    Ctx {
        sqs,
        cloudwatch: None,
        local,
        config: None,
        ledger: None,
    }
}

fn dlq() -> Queue {
    Queue {
        name: "fleet-orders-dlq".into(),
        url: "https://sqs.eu-west-1.amazonaws.com/1/fleet-orders-dlq".into(),
    }
}

fn attributes(visible: u64) -> Rule {
    mock!(aws_sdk_sqs::Client::get_queue_attributes).then_output(move || {
        GetQueueAttributesOutput::builder()
            .set_attributes(Some(HashMap::from([
                (
                    QueueAttributeName::QueueArn,
                    "arn:aws:sqs:eu-west-1:1:fleet-orders-dlq".to_owned(),
                ),
                (
                    QueueAttributeName::ApproximateNumberOfMessages,
                    visible.to_string(),
                ),
                (
                    QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
                    "0".to_owned(),
                ),
            ])))
            .build()
    })
}

fn options() -> Options {
    Options {
        to: None,
        filter: Filter::default(),
        max: None,
        rate: None,
        dry_run: false,
        move_task: false,
        hold: Duration::from_secs(30),
        wait_in_flight: Duration::ZERO,
        canary: None,
    }
}

#[tokio::test]
async fn with_move_task_on_aws_the_redrive_uses_a_message_move_task_and_follows_it() {
    let start = mock!(aws_sdk_sqs::Client::start_message_move_task)
        .match_requests(|r| {
            r.source_arn() == Some("arn:aws:sqs:eu-west-1:1:fleet-orders-dlq")
                && r.max_number_of_messages_per_second() == Some(25)
        })
        .then_output(|| {
            StartMessageMoveTaskOutput::builder()
                .task_handle("handle-1")
                .build()
        });
    let running = mock!(aws_sdk_sqs::Client::list_message_move_tasks).then_output(|| {
        ListMessageMoveTasksOutput::builder()
            .results(
                ListMessageMoveTasksResultEntry::builder()
                    .status("RUNNING")
                    .approximate_number_of_messages_moved(40)
                    .approximate_number_of_messages_to_move(100)
                    .build(),
            )
            .build()
    });
    let done = mock!(aws_sdk_sqs::Client::list_message_move_tasks).then_output(|| {
        ListMessageMoveTasksOutput::builder()
            .results(
                ListMessageMoveTasksResultEntry::builder()
                    .status("COMPLETED")
                    .approximate_number_of_messages_moved(100)
                    .approximate_number_of_messages_to_move(100)
                    .build(),
            )
            .build()
    });
    let sqs = mock_client!(
        aws_sdk_sqs,
        RuleMode::Sequential,
        [&attributes(100), &start, &running, &done]
    );
    let opts = Options {
        rate: std::num::NonZeroU32::new(25),
        move_task: true,
        ..options()
    };
    let report = redrive::run(
        &ctx(sqs, false),
        &dlq(),
        &opts,
        Output::Json,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.path, "message-move-task");
    assert_eq!(report.task_handle.as_deref(), Some("handle-1"));
    assert_eq!(report.moved, 100);
    assert_eq!(report.exit(), Exit::Ok);
    assert_eq!(start.num_calls(), 1);
}

#[tokio::test]
async fn by_default_on_aws_the_redrive_moves_the_messages_itself_so_each_carries_its_record() {
    let start = mock!(aws_sdk_sqs::Client::start_message_move_task)
        .then_output(|| StartMessageMoveTaskOutput::builder().build());
    let empty = mock!(aws_sdk_sqs::Client::receive_message)
        .then_output(|| ReceiveMessageOutput::builder().build());
    let sqs = mock_client!(
        aws_sdk_sqs,
        RuleMode::MatchAny,
        [&start, &empty, &attributes(0)]
    );
    let report = redrive::run(
        &ctx(sqs, false),
        &dlq(),
        &options(),
        Output::Json,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(start.num_calls(), 0, "no blind move task unless asked");
    assert_eq!(report.path, "receive-send-delete");
    assert!(!report.redrive_id.is_empty());
    // --move-task with a filter is refused before anything moves.
    let sqs = mock_client!(aws_sdk_sqs, RuleMode::MatchAny, [&start, &attributes(5)]);
    let opts = Options {
        move_task: true,
        max: Some(3),
        ..options()
    };
    let refused = redrive::run(
        &ctx(sqs, false),
        &dlq(),
        &opts,
        Output::Json,
        &CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("--move-task")),
        "{:?}",
        refused.as_ref().err()
    );
    assert_eq!(start.num_calls(), 0);
}

#[tokio::test]
async fn a_refused_move_task_falls_back_to_moving_the_messages_and_says_why() {
    let refused = mock!(aws_sdk_sqs::Client::start_message_move_task).then_error(|| {
        StartMessageMoveTaskError::UnsupportedOperation(
            aws_sdk_sqs::types::error::UnsupportedOperation::builder()
                .message("not here")
                .build(),
        )
    });
    let empty = mock!(aws_sdk_sqs::Client::receive_message)
        .then_output(|| ReceiveMessageOutput::builder().build());
    let sqs = mock_client!(
        aws_sdk_sqs,
        RuleMode::MatchAny,
        [&refused, &empty, &attributes(0)]
    );
    let opts = Options {
        move_task: true,
        ..options()
    };
    let report = redrive::run(
        &ctx(sqs, false),
        &dlq(),
        &opts,
        Output::Json,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.path, "receive-send-delete");
    assert!(
        report.path_reason.contains("StartMessageMoveTask refused"),
        "{}",
        report.path_reason
    );
}

#[tokio::test]
async fn a_partly_failed_send_deletes_only_what_was_sent_and_exits_partial() {
    let attribution = |source: &str| {
        format!(
            r#"{{"reason":"dependency_unavailable","class":"attempts_exhausted","detail":"x","worker":"orders","source_queue":"{source}","attempts":5,"first_failed_at":"2026-11-20T10:00:00Z","last_failed_at":"2026-11-20T10:05:00Z","correlation_id":"c","source_message_id":"s","origin":null}}"#
        )
    };
    let messages: Vec<Message> = (0..3)
        .map(|i| {
            Message::builder()
                .message_id(format!("m{i}"))
                .receipt_handle(format!("r{i}"))
                .body(format!("{{\"n\":{i}}}"))
                .message_attributes(
                    "fleet-attribution",
                    aws_sdk_sqs::types::MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(attribution("fleet-orders"))
                        .build()
                        .unwrap(),
                )
                .build()
        })
        .collect();
    let batch = mock!(aws_sdk_sqs::Client::receive_message).then_output(move || {
        ReceiveMessageOutput::builder()
            .set_messages(Some(messages.clone()))
            .build()
    });
    let empty = mock!(aws_sdk_sqs::Client::receive_message)
        .then_output(|| ReceiveMessageOutput::builder().build());
    let url = mock!(aws_sdk_sqs::Client::get_queue_url).then_output(|| {
        aws_sdk_sqs::operation::get_queue_url::GetQueueUrlOutput::builder()
            .queue_url("https://sqs/1/fleet-orders")
            .build()
    });
    let send = mock!(aws_sdk_sqs::Client::send_message_batch).then_output(|| {
        SendMessageBatchOutput::builder()
            .successful(
                SendMessageBatchResultEntry::builder()
                    .id("0")
                    .message_id("n0")
                    .md5_of_message_body("x")
                    .build()
                    .unwrap(),
            )
            .successful(
                SendMessageBatchResultEntry::builder()
                    .id("2")
                    .message_id("n2")
                    .md5_of_message_body("x")
                    .build()
                    .unwrap(),
            )
            .failed(
                BatchResultErrorEntry::builder()
                    .id("1")
                    .code("InternalError")
                    .sender_fault(false)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    });
    let delete = mock!(aws_sdk_sqs::Client::delete_message_batch)
        .match_requests(|r| {
            r.entries()
                .iter()
                .map(|e| e.receipt_handle())
                .collect::<Vec<_>>()
                == ["r0", "r2"]
        })
        .then_output(|| {
            aws_sdk_sqs::operation::delete_message_batch::DeleteMessageBatchOutput::builder()
                .set_successful(Some(vec![]))
                .set_failed(Some(vec![]))
                .build()
                .unwrap()
        });
    let release = mock!(aws_sdk_sqs::Client::change_message_visibility_batch)
        .then_output(|| aws_sdk_sqs::operation::change_message_visibility_batch::ChangeMessageVisibilityBatchOutput::builder().set_successful(Some(vec![])).set_failed(Some(vec![])).build().unwrap());
    let sqs = mock_client!(
        aws_sdk_sqs,
        RuleMode::MatchAny,
        [
            &attributes(3),
            &url,
            &send,
            &delete,
            &release,
            &batch,
            &empty
        ]
    );
    // `batch` answers the first receive only: MatchAny uses a rule until it is exhausted.
    let opts = Options {
        filter: Filter {
            reasons: vec!["dependency_unavailable".into()],
            ..Filter::default()
        },
        ..options()
    };
    let report = redrive::run(
        &ctx(sqs, true),
        &dlq(),
        &opts,
        Output::Json,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.matched, 3);
    assert_eq!(report.moved, 2);
    assert_eq!(report.failed, 1);
    assert_eq!(report.exit(), Exit::Partial, "some messages failed to move");
    assert_eq!(delete.num_calls(), 1, "only the sent messages were deleted");
    assert!(
        release.num_calls() >= 1,
        "the unsent message was released at once"
    );
}

#[tokio::test]
async fn the_oldest_age_comes_from_cloudwatchs_latest_maximum() {
    use aws_sdk_cloudwatch::operation::get_metric_statistics::GetMetricStatisticsOutput;
    use aws_sdk_cloudwatch::primitives::DateTime;
    use aws_sdk_cloudwatch::types::Datapoint;
    let stats = mock!(aws_sdk_cloudwatch::Client::get_metric_statistics)
        .match_requests(|r| {
            r.metric_name() == Some("ApproximateAgeOfOldestMessage")
                && r.namespace() == Some("AWS/SQS")
        })
        .then_output(|| {
            GetMetricStatisticsOutput::builder()
                .datapoints(
                    Datapoint::builder()
                        .timestamp(DateTime::from_secs(1_000))
                        .maximum(120.0)
                        .build(),
                )
                .datapoints(
                    Datapoint::builder()
                        .timestamp(DateTime::from_secs(1_060))
                        .maximum(180.0)
                        .build(),
                )
                .build()
        });
    let cw = mock_client!(aws_sdk_cloudwatch, [&stats]);
    let age = oldest_age_from_cloudwatch(&cw, "fleet-orders-dlq", time::OffsetDateTime::now_utc())
        .await
        .unwrap();
    assert_eq!(age, Some(180.0));
}

#[tokio::test]
async fn a_service_error_reads_as_one_line_and_a_missing_queue_says_what_to_check() {
    use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;
    let missing = mock!(aws_sdk_sqs::Client::send_message_batch).then_error(|| {
        SendMessageBatchError::QueueDoesNotExist(
            aws_sdk_sqs::types::error::QueueDoesNotExist::builder()
                .message("The specified queue does not exist.")
                .meta(
                    aws_sdk_sqs::error::ErrorMetadata::builder()
                        .code("AWS.SimpleQueueService.NonExistentQueue")
                        .message("The specified queue does not exist.")
                        .build(),
                )
                .build(),
        )
    });
    let sqs = mock_client!(aws_sdk_sqs, RuleMode::MatchAny, [&missing]);
    let e = sqs
        .send_message_batch()
        .queue_url("https://sqs.eu-west-1.amazonaws.com/1/nope")
        .send()
        .await
        .unwrap_err();
    let text = dlq_cli::error::CliError::aws("sending to `nope`", &e).to_string();
    assert!(text.contains("the queue does not exist"), "{text}");
    assert!(text.contains("dlq list"), "{text}");
    assert!(!text.contains("ServiceError") && text.len() < 300, "{text}");
    let limited = mock!(aws_sdk_sqs::Client::send_message_batch).then_error(|| {
        SendMessageBatchError::TooManyEntriesInBatchRequest(
            aws_sdk_sqs::types::error::TooManyEntriesInBatchRequest::builder()
                .message("Too many entries.")
                .meta(
                    aws_sdk_sqs::error::ErrorMetadata::builder()
                        .code("AWS.SimpleQueueService.TooManyEntriesInBatchRequest")
                        .message("Too many entries.")
                        .build(),
                )
                .build(),
        )
    });
    let sqs = mock_client!(aws_sdk_sqs, RuleMode::MatchAny, [&limited]);
    let e = sqs
        .send_message_batch()
        .queue_url("https://sqs.eu-west-1.amazonaws.com/1/q")
        .send()
        .await
        .unwrap_err();
    let text = dlq_cli::error::CliError::aws("sending to `q`", &e).to_string();
    assert!(text.contains("Too many entries."), "{text}");
    assert!(
        !text.contains("raw: Response") && text.len() < 300,
        "{text}"
    );
}
