//! `dlq`: the dead-letter-queue tool of the fleet. Inspects (`list`, `peek`, `show`),
//! attributes, exports, imports, redrives and purges dead-lettered messages, safely: reading
//! never consumes, moving sends before it deletes.

#![forbid(unsafe_code)]

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
use crate::error::{CliError, Exit, Result};
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
    let ledger = match &config {
        Some(c) => fleet_common::redrive_ledger::Ledger::from_config(clients.dynamodb, c)
            .map_err(|e| CliError::Usage(e.to_string()))?,
        None => None,
    };
    Ok(Ctx {
        sqs: clients.sqs,
        cloudwatch,
        local,
        config,
        ledger,
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
    let (output, stop) = (cli.output, &stop);
    match cli.command {
        Command::List(args) => args.run(&ctx, output, stop).await,
        Command::Peek(args) => args.run(&ctx, output, stop).await,
        Command::Show(args) => args.run(&ctx, output, stop).await,
        Command::Attribute(args) => args.run(&ctx, output, stop).await,
        Command::Redrive(args) => args.run(&ctx, output, stop).await,
        Command::Export(args) => args.run(&ctx, output, stop).await,
        Command::Import(args) => args.run(&ctx, output, stop).await,
        Command::Purge(args) => args.run(&ctx, output, stop).await,
        Command::Completions { .. } => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod operator_access_matches_the_code {
    //! Derives the CLI's AWS calls from its sources (every `.operation()` on an SQS or CloudWatch
    //! client) and holds them to `fleet_common::access::OPERATOR`, which the operator role of
    //! `deploy/fleet.yaml` is held to in turn (tests/e2e/deploy.rs).

    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use fleet_common::access;
    use regex::Regex;

    /// Methods of a client (or of the `Option` holding one) that are not AWS calls.
    const NOT_CALLS: &[&str] = &[
        "clone", "config", "as_ref", "as_mut", "is_some", "is_none", "take", "unwrap",
    ];

    /// The names the CLI gives its clients; the derivation reads calls on these.
    const CLIENTS: &[(&str, &str)] = &[
        ("sqs", "sqs"),
        ("cw", "cloudwatch"),
        ("cloudwatch", "cloudwatch"),
    ];

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Every source file of the CLI, as (path, code): test modules and comments left out.
    fn sources() -> Vec<(String, String)> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        files.sort();
        assert!(files.len() >= 10, "the CLI's sources were found: {files:?}");
        files
            .into_iter()
            .map(|f| {
                let text = std::fs::read_to_string(&f).expect("a readable source file");
                (f.display().to_string(), code(&text))
            })
            .collect()
    }

    /// The code of a source file: without `#[cfg(test)] mod … { … }` blocks (they end at the
    /// first `}` in column 0) and without `//` comments (doc comments name calls too).
    fn code(text: &str) -> String {
        let mut rest = text;
        let mut kept = String::new();
        while let Some(start) = rest.find("#[cfg(test)]\nmod ") {
            kept.push_str(&rest[..start]);
            rest = match rest[start..].find("\n}") {
                Some(end) => &rest[start + end + 2..],
                None => "",
            };
        }
        kept.push_str(rest);
        kept.lines()
            .map(|line| line.find("//").map_or(line, |c| &line[..c]))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The IAM action of an SDK operation: `send_message_batch` on SQS is `sqs:SendMessage`
    /// (SQS authorises a batch as its single-message action).
    fn action(service: &str, operation: &str) -> String {
        let camel: String = operation
            .split('_')
            .filter(|w| !w.is_empty())
            .map(|w| w[..1].to_uppercase() + &w[1..])
            .collect();
        let camel = match service {
            "sqs" => camel.strip_suffix("Batch").unwrap_or(&camel).to_owned(),
            _ => camel,
        };
        format!("{service}:{camel}")
    }

    /// The actions of every `client.operation()` call in `code`, on a client named as in
    /// [`CLIENTS`] (`ctx.sqs`, `self.sqs`, a `sqs` or `cw` parameter), over line breaks.
    fn calls(code: &str) -> BTreeSet<String> {
        let call = Regex::new(r"\b(sqs|cw|cloudwatch)\s*\.\s*([a-z][a-z0-9_]*)\s*\(\s*\)").unwrap();
        call.captures_iter(code)
            .filter(|c| !NOT_CALLS.contains(&&c[2]))
            .map(|c| {
                let service = CLIENTS
                    .iter()
                    .find(|(name, _)| *name == &c[1])
                    .map(|(_, s)| *s)
                    .expect("a client name");
                action(service, &c[2])
            })
            .collect()
    }

    #[test]
    fn the_cli_calls_exactly_what_the_operator_role_declares() {
        let derived: BTreeSet<String> = sources().iter().flat_map(|(_, c)| calls(c)).collect();
        let declared: BTreeSet<String> = access::OPERATOR
            .api_actions()
            .into_iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            derived, declared,
            "the dlq CLI's SQS and CloudWatch calls (left) and fleet_common::access::OPERATOR (right)"
        );
    }

    #[test]
    fn every_sdk_client_in_the_cli_goes_by_a_name_the_derivation_reads() {
        let binding = Regex::new(
            r"(?:\b(\w+)\s*:\s*&?\s*(?:Option<\s*)?aws_sdk_(?:sqs|cloudwatch)::Client\b|let\s+(\w+)\s*=\s*aws_sdk_(?:sqs|cloudwatch)::Client::|Some\((\w+)\)\s*=\s*&?\s*(?:self|ctx)\.(?:sqs|cloudwatch)\b)",
        )
        .unwrap();
        let mut seen = 0;
        for (file, code) in sources() {
            for c in binding.captures_iter(&code) {
                let name = c.iter().skip(1).flatten().next().unwrap().as_str();
                assert!(
                    CLIENTS.iter().any(|(n, _)| *n == name),
                    "{file}: an SDK client named `{name}`: its calls would not be derived (name it sqs or cw)"
                );
                seen += 1;
            }
        }
        assert!(seen >= 3, "the CLI's clients were found ({seen})");
    }

    #[test]
    fn the_derivation_sees_a_call_that_is_not_declared() {
        let sneaky = "let out = ctx\n        .sqs\n        .purge_queue()\n        .queue_url(&queue.url)\n        .send()\n        .await?;\nlet m = cw.get_metric_data().send().await?;";
        let derived = calls(sneaky);
        assert_eq!(
            derived,
            BTreeSet::from([
                "sqs:PurgeQueue".to_owned(),
                "cloudwatch:GetMetricData".to_owned()
            ])
        );
        let declared = access::OPERATOR.api_actions();
        assert!(derived.iter().all(|a| !declared.contains(a.as_str())));
        assert_eq!(
            calls("self.sqs.delete_message_batch().queue_url(u)"),
            BTreeSet::from(["sqs:DeleteMessage".to_owned()]),
            "a batch call is authorised as its single-message action"
        );
        assert!(calls("let sqs = ctx.sqs.clone();").is_empty());
    }

    #[test]
    fn test_modules_and_comments_are_not_code() {
        let text = "fn a() {}\n/// calls `ctx.sqs.purge_queue()`\nfn b() { sqs.list_queues() }\n#[cfg(test)]\nmod tests {\n    fn t() { ctx.sqs.delete_queue(); }\n}\nfn c() {}\n";
        let code = code(text);
        assert_eq!(calls(&code), BTreeSet::from(["sqs:ListQueues".to_owned()]));
        assert!(code.contains("fn c()"), "{code}");
    }
}
