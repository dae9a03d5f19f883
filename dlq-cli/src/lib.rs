//! `dlq`: the dead-letter-queue tool of the fleet. Inspects (`list`, `peek`, `show`),
//! attributes, exports, imports, redrives and purges dead-lettered messages, safely: reading
//! never consumes, moving sends before it deletes.

pub mod cli;
pub mod commands;
pub mod error;
pub mod filter;
pub mod output;
pub mod queues;
pub mod record;
pub mod scan;

use clap::CommandFactory;
use fleet_common::aws::{is_loopback_url, load_sdk_config, Clients, RequestCounter};
use fleet_common::config::{AwsConfig, FleetConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command};
use crate::commands::{attribute, inspect, redrive, transfer};
use crate::error::{CliError, Exit, Result};
use crate::output::Output;
use crate::queues::Ctx;

/// Builds the clients from the config (when given) and the standard AWS chain.
///
/// # Errors
/// A config that cannot be read or is invalid.
pub async fn context(cli: &Cli) -> Result<Ctx> {
    let config = match &cli.config {
        Some(path) => Some(FleetConfig::load(path).map_err(|e| CliError::Usage(e.to_string()))?),
        None => None,
    };
    let mut aws = config
        .as_ref()
        .map(|c| c.aws.clone())
        .unwrap_or_else(AwsConfig::default);
    if let Some(region) = &cli.region {
        aws.region = Some(region.clone());
    }
    let env_endpoint = std::env::var("AWS_ENDPOINT_URL_SQS")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .ok();
    let local = aws
        .sqs_endpoint_url
        .as_deref()
        .or(env_endpoint.as_deref())
        .is_some_and(is_loopback_url);
    let shared = load_sdk_config(&aws).await;
    let clients = Clients::from_sdk_config(&shared, &aws, RequestCounter::default());
    let cloudwatch = (!local).then(|| aws_sdk_cloudwatch::Client::new(&shared));
    Ok(Ctx {
        sqs: clients.sqs,
        cloudwatch,
        local,
        config,
    })
}

/// Runs a parsed command line. Ctrl-C (or SIGTERM) cancels `stop`: long commands finish the
/// batch at hand, release what they hold and exit 130.
///
/// # Errors
/// What stopped the command.
pub async fn run(cli: Cli, stop: CancellationToken) -> Result<Exit> {
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(*shell, &mut Cli::command(), "dlq", &mut std::io::stdout());
        return Ok(Exit::Ok);
    }
    let ctx = context(&cli).await?;
    let output = cli.output;
    match cli.command {
        Command::List { prefix } => inspect::list(&ctx, prefix.as_deref(), output).await,
        Command::Peek {
            queue,
            max,
            reveal,
            force,
            filter,
        } => {
            let q = queues::resolve(&ctx, &queue).await?;
            inspect::peek(&ctx, &q, max, &filter, reveal, force, output).await
        }
        Command::Show {
            queue,
            message_id,
            reveal,
            force,
        } => {
            let q = queues::resolve(&ctx, &queue).await?;
            inspect::show(&ctx, &q, &message_id, reveal, force, output).await
        }
        Command::Attribute {
            queue,
            by,
            window,
            examples,
            max,
            force,
        } => {
            let q = queues::resolve(&ctx, &queue).await?;
            attribute::run(&ctx, &q, &by, window, examples, max, force, output).await
        }
        Command::Redrive {
            queue,
            to,
            filter,
            max,
            rate,
            dry_run,
            no_move_task,
            hold,
            wait_in_flight,
        } => {
            if hold < std::time::Duration::from_secs(2)
                || hold > std::time::Duration::from_secs(43_200)
            {
                return Err(CliError::Usage("--hold must be between 2s and 12h".into()));
            }
            let q = queues::resolve(&ctx, &queue).await?;
            let opts = redrive::Options {
                to,
                filter,
                max,
                rate,
                dry_run,
                no_move_task,
                hold,
                wait_in_flight,
            };
            let report = redrive::run(&ctx, &q, &opts, output, &stop).await?;
            match output {
                Output::Json => output::json(&report),
                Output::Table => redrive::print(&report),
            }
            Ok(report.exit())
        }
        Command::Export {
            queue,
            file,
            delete,
            max,
            force,
            filter,
        } => {
            let q = queues::resolve(&ctx, &queue).await?;
            transfer::export(&ctx, &q, &file, &filter, max, delete, force, output).await
        }
        Command::Import { file, to, rate } => {
            let name = ctx
                .config
                .as_ref()
                .and_then(|c| c.queues.get(&to))
                .map_or_else(|| to.clone(), |q| q.name.clone());
            let q = if to.starts_with("http") {
                queues::resolve(&ctx, &to).await?
            } else {
                queues::resolve_name(&ctx, &name).await?
            };
            transfer::import(&ctx, &file, &q, rate, output, &stop).await
        }
        Command::Purge { queue, yes } => {
            let q = queues::resolve(&ctx, &queue).await?;
            transfer::purge(&ctx, &q, yes, output).await
        }
        Command::Completions { .. } => unreachable!("handled above"),
    }
}
