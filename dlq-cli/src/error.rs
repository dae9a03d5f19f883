//! Errors of the CLI and the exit codes they map to. Messages say what to fix.

use std::process::ExitCode;

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

/// Exit codes: scripts branch on these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done.
    Ok = 0,
    /// The command could not run (AWS unreachable, missing queue, I/O…).
    Failed = 1,
    /// Bad flags or config.
    Usage = 2,
    /// It ran, but some messages failed to move (they are still in the source queue).
    Partial = 3,
    /// Interrupted (Ctrl-C); what was started was finished or released, run again to go on.
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A queue that does not exist.
    #[error("queue `{0}` does not exist (check the name, the region and the endpoint; `dlq list` shows the queues it can see)")]
    QueueNotFound(String),
    /// No credentials anywhere in the standard chain.
    #[error("no AWS credentials found: set AWS_PROFILE (after `aws sso login` or `aws configure`), or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run on a role; for the local emulators pass --config config/fleet.toml")]
    NoCredentials,
    /// The credentials were refused.
    #[error("AWS refused the request while {doing}: {code}: {message} (check the credentials' permissions and the region)")]
    Denied {
        /// What the CLI was doing.
        doing: String,
        /// The error code.
        code: String,
        /// The service's message.
        message: String,
    },
    /// Any other AWS error.
    #[error("AWS request failed while {doing}: {detail}")]
    Aws {
        /// What the CLI was doing.
        doing: String,
        /// The error and its causes.
        detail: String,
    },
    /// Wrong usage that clap cannot see.
    #[error("{0}")]
    Usage(String),
    /// A file problem.
    #[error("{0}")]
    Io(String),
}

impl CliError {
    /// The exit code of this error.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Usage(_) => Exit::Usage,
            _ => Exit::Failed,
        }
    }

    /// Classifies an SDK error of any operation.
    pub fn aws<E, R>(doing: impl Into<String>, e: &SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + 'static,
    {
        let doing = doing.into();
        let detail = fleet_common::sdk_error_message(e);
        if detail.contains("no credentials")
            || detail.contains("CredentialsNotLoaded")
            || detail.contains("failed to load credentials")
        {
            return Self::NoCredentials;
        }
        let code = e.code().unwrap_or_default();
        if matches!(
            code,
            "AccessDenied"
                | "AccessDeniedException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "ExpiredToken"
                | "UnrecognizedClientException"
        ) {
            return Self::Denied {
                doing,
                code: code.to_owned(),
                message: e.message().unwrap_or_default().to_owned(),
            };
        }
        if is_missing_queue(e) {
            return Self::Aws {
                doing,
                detail: "the queue does not exist (check the name or URL, the region and the endpoint; `dlq list` shows the queues it can see)".to_owned(),
            };
        }
        // A service error in a line: its code and message, not the SDK's dump of the response.
        let detail = match e {
            SdkError::ServiceError(_) if !code.is_empty() => {
                format!("{}: {}", code, e.message().unwrap_or("no message"))
            }
            _ => detail,
        };
        Self::Aws { doing, detail }
    }
}

/// Whether an SDK error says the queue does not exist.
pub fn is_missing_queue<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.code()
        .is_some_and(|c| c.contains("NonExistentQueue") || c == "QueueDoesNotExist")
}

/// Result of the CLI.
pub type Result<T> = std::result::Result<T, CliError>;
