//! The command line of `dlq`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::commands::{attribute, inspect, redrive, transfer};
use crate::output::Output;

const EXIT_CODES: &str = "\
Exit codes: 0 done; 1 the command could not run (AWS unreachable, missing queue, file error);
2 bad flags or config; 3 some messages failed to move (they are still in the source queue: run
again); 130 interrupted (what was read and not moved is visible again: run again to finish).

QUEUE is a queue name, a queue URL, or a key of the fleet config (`orders` = its DLQ).
Without --config the standard AWS chain decides the region and credentials (AWS_PROFILE,
AWS_REGION, AWS_ENDPOINT_URL…); `--config config/fleet.toml` targets the local emulators.";

const READS: &str = "\
Reading does not consume: each message read is held invisible while the command runs and is
visible again right after. Each read does count as a receive (ApproximateReceiveCount goes up by
one). A DLQ has no redrive policy of its own, so nothing else follows; a queue that has one would
move messages to its DLQ after enough reads, so such queues are refused without --force.";

/// Inspect, attribute, export and redrive dead-lettered messages of the fleet.
#[derive(Debug, Parser)]
#[command(name = "dlq", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// The fleet config (queue keys, endpoints of the local emulators).
    #[arg(long, global = true, env = "FLEET_CONFIG")]
    pub config: Option<PathBuf>,
    /// `table` for people, `json` for scripts.
    #[arg(long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// AWS region (default: the standard chain).
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands: each a struct of its flags, in its command's module, with `run`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every DLQ the config or the account knows: depth, in flight, oldest message, sources.
    ///
    /// Sources come from the redrive policies of the account's queues (no need for
    /// ListDeadLetterSourceQueues). The oldest message's age comes from CloudWatch on AWS and
    /// from a sample of up to ten messages on the emulators.
    List(inspect::ListArgs),
    /// Messages of a queue, without consuming them; bodies redacted unless --reveal.
    #[command(after_help = READS)]
    Peek(inspect::PeekArgs),
    /// One message in full: attributes, attribution, redrive record, body.
    #[command(after_help = READS)]
    Show(inspect::ShowArgs),
    /// Why are they here: counts and examples by reason, worker, source queue, class and time
    /// (and by the worker's build with `--by version`, by redrive run with `--by redrive`).
    #[command(after_help = READS)]
    Attribute(attribute::AttributeArgs),
    /// Move messages back to their source queue (or --to another), filtered, rate-limited.
    ///
    /// Sends before it deletes: a crash can duplicate a message in the destination, never lose
    /// one; run it again to finish an interrupted redrive. Each run has an id, carried in the
    /// `fleet-redrive` record of what it moves: a message it moved that is dead-lettered again
    /// while it runs is counted as come back and left in the DLQ, never moved twice by one run.
    /// With --canary it moves a few first and halts by itself if they come back. --move-task
    /// hands an unfiltered redrive to SQS's StartMessageMoveTask instead (AWS only; blind: no
    /// record, no canary).
    Redrive(redrive::RedriveArgs),
    /// Write messages to a JSON Lines file (body, attributes, system attributes).
    Export(transfer::ExportArgs),
    /// Send every message of an export file to a queue, bodies and attributes as they are.
    Import(transfer::ImportArgs),
    /// Delete every message of a DLQ, after confirmation; says how many went.
    ///
    /// Only DLQs (named `<queue>-dlq` by the fleet): any other queue holds jobs still waiting
    /// for a worker and is refused unless --work-queue is given.
    Purge(transfer::PurgeArgs),
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}
