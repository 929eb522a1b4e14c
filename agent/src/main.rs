//! The `ambit` binary. Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure.

use std::process::ExitCode;

use ambit::cli::{self, Cli, Command};
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => {
            let _logs = ambit::telemetry::init_logging();
            // Before the runtime: its threads inherit this thread's namespace, which becomes
            // the one every pod-namespace excursion returns to.
            if let Err(e) = ambit::agent::init_host_netns() {
                eprintln!("ambit agent: {e}");
                return ExitCode::from(1);
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ambit agent: starting the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(ambit::agent::run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let message = ambit::telemetry::error_chain(&e);
                    tracing::error!(error = %message, "agent failed");
                    eprintln!("ambit agent: {message}");
                    ExitCode::from(e.exit_code() as u8)
                }
            }
        }
        Command::Status(args) => operator(cli::status(&args)),
        Command::Workloads(args) => operator(cli::workloads(&args)),
        Command::Certs(args) => operator(cli::certs(&args)),
        Command::Policies(args) => operator(cli::policies(&args)),
        Command::Check(args) => operator(cli::check(&args)),
        Command::Trace(args) => operator(cli::trace(&args)),
        Command::Ca(cli::CaCommand::Init { dir, trust_domain }) => match cli::ca_init(&dir, &trust_domain) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ambit ca init: {}", ambit::telemetry::error_chain(&e));
                ExitCode::from(1)
            }
        },
    }
}

/// Runs an operator command on a small single-threaded runtime and prints its output.
fn operator(command: impl std::future::Future<Output = Result<String, cli::CliError>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ambit: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(command) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ambit: {}", ambit::telemetry::error_chain(&e));
            // Usage mistakes exit 2, like clap's own; everything else is a runtime failure.
            ExitCode::from(if matches!(e, cli::CliError::Usage(_)) { 2 } else { 1 })
        }
    }
}
