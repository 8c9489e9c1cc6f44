//! The participant-agent binary.

use clap::Parser;
use paxos_commit_agent::config::AgentArgs;

/// A paxos-commit participant agent: run one beside each PostgreSQL database.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = match cli.args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("participant-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match paxos_commit_proto::server_runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("participant-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(paxos_commit_agent::serve(
        cfg,
        paxos_commit_proto::shutdown_signal(),
    )) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("participant-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
