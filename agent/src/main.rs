//! The `ambit` binary. Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure
//! (and for `ambit check --what-if`, traffic the candidate policies would break).

use std::process::ExitCode;

use ambit::cli::{self, Cli, Command};
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => {
            let Some(_logs) = logging("agent") else { return ExitCode::from(1) };
            // Before the runtime: its threads inherit this thread's namespace, which becomes
            // the one every pod-namespace excursion returns to.
            if let Err(e) = ambit::agent::init_host_netns() {
                eprintln!("ambit agent: {e}");
                return ExitCode::from(1);
            }
            daemon("agent", ambit::agent::run(*args), ambit::agent::AgentError::exit_code)
        }
        Command::Status(args) => operator(cli::status(&args)),
        Command::Workloads(args) => operator(cli::workloads(&args)),
        Command::Certs(args) => operator(cli::certs(&args)),
        Command::Policies(args) => operator(cli::policies(&args)),
        Command::Check(args) => operator(cli::check(&args)),
        Command::Trace(args) => operator(cli::trace(&args)),
        Command::Ca(cli::CaCommand::Init { dir, trust_domain }) => {
            offline("ca init", cli::ca_init(&dir, &trust_domain))
        }
        Command::Ca(cli::CaCommand::Rotate { from, to, trust_domain }) => {
            offline("ca rotate", cli::ca_rotate(&from, &to, &trust_domain))
        }
        Command::Ca(cli::CaCommand::Finish { dir, trust_domain }) => {
            offline("ca finish", cli::ca_finish(&dir, &trust_domain))
        }
        Command::Ca(cli::CaCommand::Serve(args)) => {
            let Some(_logs) = logging("ca serve") else { return ExitCode::from(1) };
            daemon("ca serve", ambit::authority::serve(*args), ambit::authority::AuthorityError::exit_code)
        }
    }
}

/// The log of a long-lived command, or `None` after saying why there is none.
fn logging(what: &str) -> Option<ambit::telemetry::LogGuard> {
    ambit::telemetry::init_logging().map_err(|e| eprintln!("ambit {what}: starting the log writer: {e}")).ok()
}

/// Runs a long-lived command on a multi-threaded runtime until it ends; its error is logged
/// and printed, and decides the exit code.
fn daemon<E: std::error::Error>(
    what: &str,
    run: impl std::future::Future<Output = Result<(), E>>,
    exit_code: fn(&E) -> i32,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ambit {what}: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = ambit::error_chain(&e);
            tracing::error!(error = %message, "ambit {what} failed");
            eprintln!("ambit {what}: {message}");
            ExitCode::from(exit_code(&e) as u8)
        }
    }
}

/// Prints the output of a command that needs no agent, or its error (exit code 1).
fn offline(what: &str, result: Result<String, ambit::identity::IdentityError>) -> ExitCode {
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ambit {what}: {}", ambit::error_chain(&e));
            ExitCode::from(1)
        }
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
        Err(cli::CliError::Breaks(report)) => {
            print!("{report}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("ambit: {}", ambit::error_chain(&e));
            // Usage mistakes and bad input exit 2, like clap's own; the rest is a runtime failure.
            ExitCode::from(if matches!(e, cli::CliError::Usage(_) | cli::CliError::Input(_)) { 2 } else { 1 })
        }
    }
}
