//! The consumer runtime every worker gets. See [`Consumer`].

mod batcher;
mod batching;
mod concurrency;
mod consumer;
mod fairness;
mod message;

pub use batcher::{Batcher, EntryResult};
pub use concurrency::Concurrency;
pub use consumer::{Consumer, ConsumerSettings, Stats};
pub use fairness::{carried_group_id, GroupLimits, GroupSlot, ATTEMPTS, DEFERRALS};
pub use message::{
    describe_json_error, is_valid_id, Handler, Json, Message, Outcome, Outgoing, TypedHandler,
};
