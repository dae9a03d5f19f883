//! What tests, the load harness and the demo share, and the product does not need: the scenario
//! generator and its audit, queue probes and senders, the four handlers chained in memory, and
//! the demo.
//!
//! Layout:
//! - [`scenario`]: generated orders, duplicates, malformed bodies and carrier events, with the end
//!   state each order must reach; the audit compares every field of every order with it.
//! - [`queues`]: send inputs, count what is queued, wait for idle, count each DLQ.
//! - [`chain`]: the four handlers chained in memory (no queues).
//! - [`demo`]: the fleet on the emulators under a generated load, one JSON summary line (the
//!   `demo` binary, run by `scripts/demo`).

#![forbid(unsafe_code)]

pub mod chain;
pub mod demo;
pub mod queues;
pub mod scenario;
