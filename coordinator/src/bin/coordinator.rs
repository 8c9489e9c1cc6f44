//! The coordinator replica binary.

use clap::Parser;
use paxos_commit_coordinator::config::ConfigArgs;

/// A paxos-commit coordinator replica: a Paxos acceptor for every transaction and the leader
/// of those begun on it. Run 2F+1 of them with the same --replicas list.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
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
    let cfg = match cli.config.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coordinator: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match paxos_commit_proto::server_runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("coordinator: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(paxos_commit_coordinator::serve(
        cfg,
        paxos_commit_proto::shutdown_signal(),
    ));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coordinator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
