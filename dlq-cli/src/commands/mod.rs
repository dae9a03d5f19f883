//! One module per group of subcommands.

pub mod attribute;
pub mod inspect;
pub mod redrive;
pub mod transfer;
