//! `dlq`: parses the command line, runs it, maps the outcome to an exit code. All logic lives in
//! the `dlq_cli` library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use dlq_cli::cli::Cli;
use dlq_cli::error::Exit;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    fleet_common::telemetry::init_cli_tracing();
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("dlq: stopping: finishing the batch at hand and releasing what is held (Ctrl-C again to abort)");
            stop.cancel();
            let _ = tokio::signal::ctrl_c().await;
            std::process::exit(Exit::Interrupted as i32);
        });
    }
    match dlq_cli::run(cli, stop).await {
        Ok(exit) => exit.into(),
        Err(e) => {
            eprintln!("dlq: {e}");
            e.exit().into()
        }
    }
}
