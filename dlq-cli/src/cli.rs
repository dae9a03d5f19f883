//! The command line of `dlq`.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::commands::attribute::Dimension;
use crate::filter::Filter;
use crate::output::Output;

const EXIT_CODES: &str = "\
Exit codes: 0 done; 1 the command could not run (AWS unreachable, missing queue, file error);
2 bad flags or config; 3 some messages failed to move (they are still in the source queue: run
again); 130 interrupted (what was read and not moved is visible again: run again to finish).

QUEUE is a queue name, a queue URL, or a key of the fleet config (`orders` = its DLQ).
Without --config the standard AWS chain decides the region and credentials (AWS_PROFILE,
AWS_REGION, AWS_ENDPOINT_URL…); `--config config/fleet.toml` targets the local emulators.";

fn parse_percent(s: &str) -> Result<f64, String> {
    let pct: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage"))?;
    if (0.0..=100.0).contains(&pct) {
        Ok(pct)
    } else {
        Err(format!("`{s}` is not between 0 and 100"))
    }
}

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

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every DLQ the config or the account knows: depth, in flight, oldest message, sources.
    ///
    /// Sources come from the redrive policies of the account's queues (no need for
    /// ListDeadLetterSourceQueues). The oldest message's age comes from CloudWatch on AWS and
    /// from a sample of up to ten messages on the emulators.
    List {
        /// Only queues whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Messages of a queue, without consuming them; bodies redacted unless --reveal.
    #[command(after_help = READS)]
    Peek {
        /// The queue.
        queue: String,
        /// Show at most this many (matching) messages.
        #[arg(long, default_value_t = 10)]
        max: usize,
        /// Show bodies as they are (they can hold personal data).
        #[arg(long)]
        reveal: bool,
        /// Read a queue that has a redrive policy.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        filter: Filter,
    },
    /// One message in full: attributes, attribution, redrive record, body.
    #[command(after_help = READS)]
    Show {
        /// The queue.
        queue: String,
        /// Its message id.
        message_id: String,
        /// Show the body as it is.
        #[arg(long)]
        reveal: bool,
        /// Read a queue that has a redrive policy.
        #[arg(long)]
        force: bool,
    },
    /// Why are they here: counts and examples by reason, worker, source queue, class and time
    /// (and by the worker's build with `--by version`, by redrive run with `--by redrive`).
    #[command(after_help = READS)]
    Attribute {
        /// The queue.
        queue: String,
        /// Group by these (comma-separated).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "reason,worker,source,class,window"
        )]
        by: Vec<Dimension>,
        /// Width of the first-failure time window.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        window: Duration,
        /// Examples per group.
        #[arg(long, default_value_t = 3)]
        examples: usize,
        /// Read at most this many messages.
        #[arg(long)]
        max: Option<usize>,
        /// Read a queue that has a redrive policy.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        filter: Filter,
    },
    /// Move messages back to their source queue (or --to another), filtered, rate-limited.
    ///
    /// Sends before it deletes: a crash can duplicate a message in the destination, never lose
    /// one; run it again to finish an interrupted redrive. Each run has an id, carried in the
    /// `fleet-redrive` record of what it moves: a message it moved that is dead-lettered again
    /// while it runs is counted as come back and left in the DLQ, never moved twice by one run.
    /// With --canary it moves a few first and halts by itself if they come back. --move-task
    /// hands an unfiltered redrive to SQS's StartMessageMoveTask instead (AWS only; blind: no
    /// record, no canary).
    Redrive {
        /// The DLQ.
        queue: String,
        /// Destination queue (name, URL or config key); default: each message's source queue.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        filter: Filter,
        /// Move at most this many.
        #[arg(long)]
        max: Option<usize>,
        /// At most this many messages per second.
        #[arg(long)]
        rate: Option<NonZeroU32>,
        /// Show what would move, and where; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Hand the whole DLQ to SQS's StartMessageMoveTask (AWS only): fast and server-side,
        /// but blind: no filter, no canary, no `fleet-redrive` record, no run-once guarantee.
        #[arg(long)]
        move_task: bool,
        /// The default since the fleet's own path became the default; kept so scripts still run.
        #[arg(long, hide = true, conflicts_with = "move_task")]
        no_move_task: bool,
        /// How long messages read are held invisible at a time (extended while running).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// How long to wait for messages in flight elsewhere (an interrupted run's) to come back.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        wait_in_flight: Duration,
        /// Move this many first, then watch what becomes of them (--watch) and go on only while
        /// at most --halt-above percent of what moved comes back to the DLQ.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        canary: Option<u32>,
        /// With --canary: halt when more than this percentage of the moved messages has been
        /// dead-lettered again (checked during the watch and for the rest of the run).
        #[arg(long, value_name = "PCT", default_value_t = 10.0, requires = "canary", value_parser = parse_percent)]
        halt_above: f64,
        /// With --canary: how long to watch the canary before moving the rest.
        #[arg(long, value_name = "DURATION", default_value = "2m", requires = "canary", value_parser = humantime::parse_duration)]
        watch: Duration,
    },
    /// Write messages to a JSON Lines file (body, attributes, system attributes).
    Export {
        /// The queue.
        queue: String,
        /// The file to write.
        #[arg(long)]
        file: PathBuf,
        /// Delete what was exported, once the file is synced to disk.
        #[arg(long)]
        delete: bool,
        /// Export at most this many messages.
        #[arg(long)]
        max: Option<usize>,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        filter: Filter,
    },
    /// Send every message of an export file to a queue, bodies and attributes as they are.
    Import {
        /// The export file.
        file: PathBuf,
        /// Destination queue (name, URL or config key of a work queue).
        #[arg(long)]
        to: String,
        /// At most this many messages per second.
        #[arg(long)]
        rate: Option<NonZeroU32>,
    },
    /// Delete every message of a DLQ, after confirmation; says how many went.
    ///
    /// Only DLQs (named `<queue>-dlq` by the fleet): any other queue holds jobs still waiting
    /// for a worker and is refused unless --work-queue is given.
    Purge {
        /// The queue (a config key names its DLQ).
        queue: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// Purge a work queue (not a `<queue>-dlq`): deletes jobs no worker has run yet.
        #[arg(long)]
        work_queue: bool,
    },
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}
