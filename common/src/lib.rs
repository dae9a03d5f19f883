//! The shared library of the fleet: configuration, AWS clients, the consumer runtime, the
//! failure taxonomy and DLQ attribution, telemetry, health, and provisioning of local queues
//! and tables.

#![forbid(unsafe_code)]

pub mod access;
pub mod attribution;
pub mod aws;
pub mod build_info;
pub mod config;
pub mod contract;
pub mod edge;
pub mod events;
pub mod failure;
pub mod faults;
pub mod health;
pub mod process;
pub mod provision;
pub mod redact;
pub mod redrive_ledger;
pub mod role;
pub mod runtime;
pub mod telemetry;
pub mod topology;
pub mod trace;

pub use failure::{HandlerError, Reason};

/// An AWS SDK error as one line: the error and its causes (code and message of a service error).
pub fn sdk_error_message<E: std::error::Error + 'static>(error: &E) -> String {
    aws_smithy_types::error::display::DisplayErrorContext(error).to_string()
}

/// Now, RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("now formats")
}
