//! The four workers of the fleet and what runs them.
//!
//! - [`ingestion`]: the untrusted edge; validates, deduplicates, routes.
//! - [`orders`]: checks products and prices, records the order.
//! - [`warehouse`]: reserves stock, substitutes or removes lines, records the packing.
//! - [`delivery`]: applies carrier status events as a state machine that never moves backwards.
//!
//! [`fleet`] runs any of them in one process; [`scenario`] generates and audits loads for the
//! demo, the tests and the load harness.

pub mod catalog;
pub mod delivery;
pub mod demo;
pub mod fleet;
pub mod ingestion;
pub mod orders;
pub mod scenario;
pub mod store;
pub mod warehouse;
